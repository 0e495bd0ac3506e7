"""``hmlstm serve --workers N``: N server processes on one address, and the supervisor that runs them.

One Python process tops out at what one event loop and one ONNX Runtime session
can do (docs/benchmarks.md). N processes, each a complete server with its own
session and batcher, listen on the same port with SO_REUSEPORT, and the kernel
spreads new connections over them. The port is shared only among them: the
supervisor checks that nothing listens there first (a bind without
SO_REUSEPORT) and keeps a socket bound to it for its lifetime, so a second
``hmlstm serve`` on the same port is refused instead of silently splitting its
clients' traffic.

- Each worker holds its own streams. A stream resumed on another worker
  continues from the durable state store (SQLite or Redis); with
  ``--state-store memory`` it cannot, and the supervisor says so at start-up.
- Metrics: worker i serves its own Prometheus endpoint on metrics_port + i
  (``worker`` is also in ModelInfo), so a scrape config lists N targets.
- SIGTERM or SIGINT to the supervisor reaches every worker, each of which shuts
  down gracefully (health NOT_SERVING, open streams get the grace period).
- A worker that dies is restarted (its streams resume from the store on any
  worker); one that dies within 10 s of starting, 3 times in a row, stops all.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import signal
import time

from hmlstm.serving.config import ServeConfig
from hmlstm.serving.ports import bind_socket, check_port_free

log = logging.getLogger("hmlstm.serve")
CRASH_WINDOW_S = 10.0
CRASH_LIMIT = 3


def worker_config(config: ServeConfig, index: int, port: int) -> ServeConfig:
    metrics = config.metrics_port
    if metrics:  # 0 (any free port) and None (off) stay as they are
        metrics += index
    return dataclasses.replace(config, port=port, metrics_port=metrics, worker_index=index, reuse_port=True,
                               workers=1)


def _worker_main(model_path, config: ServeConfig) -> None:
    import asyncio

    from hmlstm.serving.model import load_model
    from hmlstm.serving.server import serve

    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(name)s[{config.worker_index}] %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor forwards Ctrl-C as SIGTERM
    model = load_model(model_path, config.device, config.ort_threads, config.ort_spinning, config.trt_cache,
                       config.trt_fp16, config.device_tolerance, config.engine)
    asyncio.run(serve(model, config))


def run_workers(model_path, config: ServeConfig) -> int:
    """Start ``config.workers`` servers on one port; supervise until SIGTERM/SIGINT. Returns an exit code."""
    n = config.workers
    port = check_port_free(config.host, config.port)
    guard = bind_socket(config.host, port, reuse_port=True)  # held: keeps other servers off the port
    if config.state_store == "memory":
        log.warning("--state-store memory with --workers %d: each worker holds only its own streams, so a "
                    "resume that reaches another worker fails; use sqlite:PATH or redis://HOST:PORT/DB", n)
    ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold gRPC or ORT threads
    stopping = False
    received: list[int] = []
    procs: list = [None] * n

    def on_signal(signum, frame):
        nonlocal stopping
        received.append(signum)
        if stopping:  # a second signal: the workers' grace periods end now (each takes it as its second)
            for p in procs:
                if p is not None and p.is_alive():
                    os.kill(p.pid, signal.SIGTERM)
        stopping = True

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    started = [0.0] * n
    crashes = [0] * n

    def start(i: int) -> None:
        procs[i] = ctx.Process(target=_worker_main, args=(model_path, worker_config(config, i, port)),
                               name=f"hmlstm-worker-{i}", daemon=False)
        procs[i].start()
        started[i] = time.monotonic()

    log.info("starting %d workers on %s:%d%s", n, config.host, port,
             f", metrics on ports {config.metrics_port}..{config.metrics_port + n - 1}"
             if config.metrics_port else "")
    code = 0
    try:
        for i in range(n):
            if stopping:  # SIGTERM during start-up: the workers started so far are stopped below
                break
            start(i)
        while not stopping:
            time.sleep(0.2)
            for i, p in enumerate(procs):
                if p.is_alive() or stopping:
                    continue
                quick = time.monotonic() - started[i] < CRASH_WINDOW_S
                crashes[i] = crashes[i] + 1 if quick else 1
                if crashes[i] >= CRASH_LIMIT:
                    log.error("worker %d exited with status %s %d times within %gs of starting; stopping",
                              i, p.exitcode, CRASH_LIMIT, CRASH_WINDOW_S)
                    stopping, code = True, 1
                    break
                log.warning("worker %d (pid %d) exited with status %s; restarting it", i, p.pid, p.exitcode)
                start(i)
    finally:
        for p in procs:
            if p is not None and p.is_alive():
                os.kill(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + config.grace_s + 10
        for p in procs:
            if p is not None:
                p.join(max(0.1, deadline - time.monotonic()))
                if p.is_alive():
                    p.kill()
                    p.join(5)
        guard.close()
        for s, h in old.items():
            signal.signal(s, h)
    if code == 0 and received:  # as `hmlstm serve` in one process: 130 after Ctrl-C, 143 after SIGTERM
        code = {signal.SIGINT: 130, signal.SIGTERM: 143}[received[0]]
    return code
