"""`hmlstm serve`: the gRPC server, one process or several workers."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hmlstm.cli.common import _load_model, read_token_file
from hmlstm.errors import UserError


def _add_serve(sub) -> None:
    from hmlstm.serving.config import (
        MAX_CALL_THREADS,
        MAX_CHUNK_CHARS,
        MAX_ORT_THREADS,
        MAX_SECONDS,
        MAX_STREAMS,
        MAX_WAIT_US,
        WORKERS_PER_CORE,
        ServeConfig,
        max_workers,
    )

    d = ServeConfig()
    p = sub.add_parser("serve", help="serve streaming segmentation over gRPC",
                       description="Serve an exported model (the shipped default when none is named) over "
                       "gRPC, with health checking, reflection and Prometheus metrics.")
    p.add_argument("model", nargs="?", default=None, help="an .onnx file written by `hmlstm export`")
    p.add_argument("--host", default=d.host, help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=d.port, help="gRPC port (0: any free port)")
    p.add_argument("--metrics-port", type=int, default=d.metrics_port, help="Prometheus port; -1 turns it off")
    p.add_argument("--device", default=d.device, choices=["auto", "tensorrt", "cuda", "cpu"],
                   help="auto: TensorRT where its libraries load, else CUDA where it works, else the CPU; "
                        "tensorrt or cuda: refuse to start without it")
    p.add_argument("--engine", default=d.engine, choices=["auto", "sparse", "dense"],
                   help="sparse: layers above the first compute only the streams that UPDATE or FLUSH at a step "
                        "(faster on the CPU); dense: every stream at every step; auto: sparse on the CPU, dense "
                        "on a GPU. The export writes both (MODEL.onnx sparse, MODEL.dense.onnx dense)")
    p.add_argument("--trt-cache", default=d.trt_cache, metavar="DIR",
                   help="where TensorRT keeps the engines it builds (the first start builds them)")
    p.add_argument("--trt-fp16", action="store_true", help="let TensorRT compute in half precision")
    p.add_argument("--device-tolerance", type=float, default=d.device_tolerance,
                   help="largest |TensorRT - CPU| accepted at start-up; a model beyond it is refused "
                        "(FP16 usually needs more)")
    p.add_argument("--max-streams", type=int, default=d.max_streams,
                   help=f"concurrent streams per process, 1-{MAX_STREAMS:,}; more get RESOURCE_EXHAUSTED")
    p.add_argument("--max-chunk-chars", type=int, default=d.max_chunk_chars,
                   help=f"longest chunk a client may send, 1-{MAX_CHUNK_CHARS:,} characters")
    p.add_argument("--idle-timeout", type=float, default=d.idle_timeout_s,
                   help=f"seconds a call may stay silent before it is closed (and a detached stream forgotten), "
                        f"more than 0, at most {MAX_SECONDS:,}")
    p.add_argument("--grace", type=float, default=d.grace_s,
                   help=f"seconds open streams get on SIGTERM or Ctrl-C (a second one ends it at once), "
                        f"0-{MAX_SECONDS:,}")
    p.add_argument("--tls-cert", default=os.environ.get("HMLSTM_TLS_CERT") or None,
                   help="PEM certificate (with --tls-key); default $HMLSTM_TLS_CERT, which `hmlstm health` follows")
    p.add_argument("--tls-key", default=os.environ.get("HMLSTM_TLS_KEY") or None,
                   help="PEM private key; default $HMLSTM_TLS_KEY")
    auth = p.add_mutually_exclusive_group()
    auth.add_argument("--auth-token-env", default=None, metavar="VAR",
                      help="require 'authorization: Bearer $VAR' on every call")
    auth.add_argument("--auth-token-file", default=None, metavar="FILE",
                      help="require 'authorization: Bearer <the file's first line>' on every call (a mounted "
                           "Kubernetes Secret, say: the token stays out of the environment)")
    p.add_argument("--workers", type=int, default=d.workers,
                   help="server processes sharing the port, each with its own ONNX Runtime session and batcher; "
                        "worker i serves metrics on --metrics-port + i; resume across workers needs a shared "
                        f"--state-store; 1-{max_workers()} here ({WORKERS_PER_CORE} per core)")
    p.add_argument("--call-threads", type=int, default=d.call_threads,
                   help=f"threads for unbatched model calls (--no-batching), 1-{MAX_CALL_THREADS}")
    p.add_argument("--state-store", default=d.state_store,
                   help="where resumable streams live: memory, sqlite:PATH, or redis://HOST:PORT/DB")
    p.add_argument("--store-optional", action="store_true",
                   help="start even if --state-store does not answer (streams go on without durability until it "
                        "does); without it an unreachable store is refused at start")
    p.add_argument("--store-timeout", type=float, default=d.store_timeout_s, metavar="SECONDS",
                   help=f"the longest a response waits for its stream's save (more than 0, at most "
                        f"{MAX_SECONDS:,}); it then says durable = false, and a store that keeps missing this is "
                        "treated as down until a probe gets an answer")
    p.add_argument("--max-connection-age", type=float, default=d.max_connection_age_s, metavar="SECONDS",
                   help=f"send clients GOAWAY on connections older than this (at most {MAX_SECONDS:,}), so they "
                        "reconnect and re-resolve (and reach replicas added since); default: never")
    p.add_argument("--max-connection-age-grace", type=float, default=d.max_connection_age_grace_s,
                   metavar="SECONDS", help="how long calls open on such a connection may go on (default %(default)g)")
    p.add_argument("--persist-depth", type=int, default=d.persist_depth,
                   help="how many responses back a stream restored from the state store can resume (its stored "
                        "rewind window; a live stream's is 32)")
    p.add_argument("--no-batching", action="store_true", help="one model call per stream piece")
    p.add_argument("--max-batch", type=int, default=d.max_batch,
                   help=f"streams' pieces per batched call, 0-{MAX_STREAMS:,} (0: every pending piece; never more than "
                        "--max-streams)")
    p.add_argument("--max-wait-us", type=int, default=d.max_wait_us,
                   help=f"microseconds a piece may wait for others to join its batch, 0-{MAX_WAIT_US:,}")
    p.add_argument("--max-wait-fraction", type=float, default=d.max_wait_fraction,
                   help="...or, if longer, this fraction of the previous batched call's time (keeps busy "
                        "closed-loop streams in one batch; 0 turns it off)")
    p.add_argument("--ort-threads", type=int, default=d.ort_threads,
                   help=f"ONNX Runtime intra-op threads, 1-{MAX_ORT_THREADS} (default: one per core)")
    p.add_argument("--ort-spinning", choices=["on", "off"], default="on" if d.ort_spinning else "off",
                   help="whether ONNX Runtime's idle threads spin between the Loop's steps (default off: as fast "
                        "at 64 streams on half the model's CPU; on lowers one stream's latency a little)")
    p.add_argument("--io-binding", default=d.io_binding, choices=["auto", "on", "off"],
                   help="keep recurrent state on the device between calls (auto: with CUDA)")
    p.set_defaults(func=cmd_serve)


def _serve_config(args):
    from hmlstm.serving.config import ServeConfig

    token = None
    if args.auth_token_env:
        token = os.environ.get(args.auth_token_env)
        if not token:
            raise UserError(f"--auth-token-env {args.auth_token_env}: that environment variable is empty or unset")
    if args.auth_token_file:
        token = read_token_file(args.auth_token_file, "--auth-token-file")
    d = ServeConfig()
    if args.device in ("cpu", "cuda"):  # TensorRT's own settings, which another device would ignore
        for flag, given in (("--trt-fp16", args.trt_fp16), ("--trt-cache", args.trt_cache is not None)):
            if given:
                raise UserError(f"{flag} is a TensorRT setting, and --device {args.device} does not use TensorRT; "
                                "drop it, or use --device tensorrt (or auto)")
    if args.device == "cpu" and args.io_binding == "on":
        raise UserError("--io-binding on keeps the recurrent state on a GPU between calls, and --device cpu has "
                        "none; drop it (auto binds where CUDA runs)")
    batching_flags = [f for f, given in (("--max-batch", args.max_batch != d.max_batch),
                                         ("--max-wait-us", args.max_wait_us != d.max_wait_us),
                                         ("--max-wait-fraction", args.max_wait_fraction != d.max_wait_fraction))
                      if given]
    if args.no_batching and batching_flags:
        raise UserError(f"{', '.join(batching_flags)} shape{'s' if len(batching_flags) == 1 else ''} batched calls, "
                        "and --no-batching turns batching off; give one or the other")
    if not args.no_batching and args.call_threads != d.call_threads:
        raise UserError("--call-threads sizes the threads of unbatched calls (--no-batching); batched calls run on "
                        "the batcher's own thread. Add --no-batching or drop --call-threads")
    for flag, env, f in (("--tls-cert", "HMLSTM_TLS_CERT", args.tls_cert),
                         ("--tls-key", "HMLSTM_TLS_KEY", args.tls_key)):
        named = flag if f != os.environ.get(env) else f"${env}"  # the default comes from the environment
        if f and not Path(f).exists():
            raise UserError(f"{named} {f}: no such file")
        if f and Path(f).is_dir():
            raise UserError(f"{named} {f} is a folder; name the PEM file in it")
    if args.tls_cert and args.tls_key:  # a certificate that is not one is named here, not as "cannot listen"
        import ssl

        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(args.tls_cert, args.tls_key)
        except (ssl.SSLError, OSError, ValueError) as e:
            why = getattr(e, "reason", None) or str(e).strip() or type(e).__name__
            raise UserError(f"--tls-cert {args.tls_cert} with --tls-key {args.tls_key} cannot be used: they are not "
                            f"a PEM certificate and its matching private key (ssl: {why})") from None
    try:
        return ServeConfig(
            host=args.host, port=args.port, metrics_port=None if args.metrics_port == -1 else args.metrics_port,
            device=args.device, max_streams=args.max_streams, max_chunk_chars=args.max_chunk_chars,
            idle_timeout_s=args.idle_timeout, grace_s=args.grace, tls_cert=args.tls_cert, tls_key=args.tls_key,
            auth_token=token, workers=args.workers, call_threads=args.call_threads, batching=not args.no_batching,
            max_batch=args.max_batch,
            max_wait_us=args.max_wait_us, max_wait_fraction=args.max_wait_fraction, state_store=args.state_store,
            persist_depth=args.persist_depth, store_timeout_s=args.store_timeout,
            max_connection_age_s=args.max_connection_age, max_connection_age_grace_s=args.max_connection_age_grace,
            io_binding=args.io_binding, ort_threads=args.ort_threads, trt_cache=args.trt_cache,
            trt_fp16=args.trt_fp16, device_tolerance=args.device_tolerance, engine=args.engine,
            ort_spinning=args.ort_spinning == "on")
    except ValueError as e:
        raise UserError(str(e)) from None


def cmd_serve(args) -> int:
    import asyncio
    import logging

    from hmlstm.serving.server import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    from hmlstm.serving.store import StoreUnavailable, open_store

    config = _serve_config(args)
    try:
        store = open_store(config.state_store, timeout_s=config.store_io_timeout_s)
    except (ValueError, StoreUnavailable) as e:
        raise UserError(str(e)) from None
    if store is not None:
        try:
            store.ping()  # reachable now? (Redis: bounded by its socket timeout)
        except StoreUnavailable as e:
            if not args.store_optional:
                raise UserError(f"--state-store is unreachable ({e}); start it, or pass --store-optional to serve "
                                "without durability until it answers") from None
            print(f"hmlstm: warning: --state-store is unreachable ({e}); serving without durability until it "
                  "answers (--store-optional)", file=sys.stderr)
        finally:
            store.close()
    if config.workers > 1:
        from hmlstm.serving.workers import run_workers

        if config.metrics_port:  # worker i serves its metrics on --metrics-port + i: all must be free now
            import socket

            for i in range(config.workers):
                with socket.socket() as probe:
                    try:
                        probe.bind((config.host, config.metrics_port + i))
                    except OSError:
                        raise UserError(f"metrics port {config.metrics_port + i} (worker {i}'s: --metrics-port + {i}) "
                                        f"on {config.host} is taken; choose another --metrics-port, or -1 for "
                                        "none") from None

        _load_model(args.model, config.device, config.ort_threads, config.ort_spinning, config)  # fail here, once
        try:
            return run_workers(args.model, config)
        except OSError as e:
            raise UserError(f"cannot serve: {e}") from None
    model = _load_model(args.model, config.device, config.ort_threads, config.ort_spinning, config)
    try:
        received = asyncio.run(serve(model, config))
    except OSError as e:
        raise UserError(f"cannot serve: {e}") from None
    return exit_status(received)


def exit_status(received: int | None) -> int:
    """As every hmlstm command ends on a signal: 130 after Ctrl-C (SIGINT), 143 after SIGTERM, once the
    graceful shutdown is done; 0 when the server ended otherwise."""
    import signal

    return {signal.SIGINT: 130, signal.SIGTERM: 143}.get(received, 0)
