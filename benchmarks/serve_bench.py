"""Serving throughput, latency and CPU cost against the machine's limit, all measured in one run.

For each model (the shipped one, and a 3x256 one with random weights), side by side:
  1. the server (a real `hmlstm serve` process) with its defaults (cross-stream batching, one
     worker), and variants: batching off, 2 worker processes, ORT threads spinning, larger and
     adaptive max batch at 256 streams;
  2. the echo floor: a bare grpc.aio servicer on the same proto (benchmarks/echo_server.py), closed
     loop and paced at the server's own message rate;
  3. ONNX Runtime called directly at the server rows' batch shapes (1, 64, 256 x 1, 16, 256), no gRPC;
  4. the same network's TensorFlow tf.function at those shapes;
  5. the limit: numpy's sgemm rate, measured in this run, / the model's FLOPs per character.
Clients are closed-loop: each of N concurrent streams sends a chunk, waits for its response, sends
the next. For every server row the server's own CPU seconds (read from its process through its
metrics, not wall time: the clients share the cores) per chunk and per character, split into the
model calls (hmlstm_model_cpu_seconds_total) and the rest. Prints the report; with --write-docs it
also writes the "serve" section of docs/benchmarks.md and docs/serve_bench.png.

    python benchmarks/serve_bench.py [--seconds 3] [--quick] [--write-docs]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks.report import DOCS, write_section  # noqa: E402
from hmlstm import spec  # noqa: E402
from hmlstm.model.data import builtin_text  # noqa: E402
from hmlstm.serving.model import DEFAULT_MODEL, LoadedModel, load_model  # noqa: E402

# What clients send: the built-in text without what the shipped model was trained without (as `hmlstm
# segment` strips it), so that the model sees the text it was trained on and fires at its real rates.
_STRIP = json.loads(spec.card_path(DEFAULT_MODEL).read_text())["provenance"].get("strip_delimiters") or ""
TEXT = builtin_text().translate(str.maketrans("", "", _STRIP))


def sgemm_gflops(n: int = 1024, repeats: int = 10) -> float:
    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    b = np.random.default_rng(1).random((n, n), dtype=np.float32)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def flops_per_char(config: dict, vocab: int) -> float:
    units = config["num_units"]
    n = len(units)
    macs = 0
    for l, h in enumerate(units):
        below = config["embed_dim"] if l == 0 else units[l - 1]
        above = units[l + 1] if l + 1 < n else 0
        has_z = l + 1 < n or config.get("top_boundary")
        macs += (below + h + above) * (4 * h + (1 if has_z else 0))
    macs += sum(units) * n + sum(units) * config["output_dim"] + config["output_dim"] * vocab
    return 2.0 * macs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_path: Path | None, extra: list[str] = (), workers: int = 1,
                 echo: bool = False, log: Path | None = None, env: dict | None = None,
                 root: Path = ROOT, hold_ms: float = 0.0) -> tuple[subprocess.Popen, str]:
    """A real `hmlstm serve` process (or the echo floor, its responses held ``hold_ms`` as a batch's are); its
    metrics endpoints are in proc.metrics_urls. ``log``: where its stderr goes (appended), so that a server that
    does not start says why."""
    port, metrics_port = free_port(), free_port()
    while any(not _port_free(metrics_port + i) for i in range(workers)):
        metrics_port = free_port()
    if echo:
        cmd = [sys.executable, str(ROOT / "benchmarks" / "echo_server.py"), str(port), str(metrics_port), str(hold_ms)]
    else:
        cmd = [sys.executable, "-m", "hmlstm.cli", "serve", str(model_path), "--port", str(port), "--metrics-port",
               str(metrics_port), "--max-streams", "2000", "--idle-timeout", "600", "--workers", str(workers),
               *extra]
    sink = open(log, "a") if log is not None else subprocess.DEVNULL  # noqa: SIM115 (the process holds it)
    proc = subprocess.Popen(cmd, stderr=sink, cwd=root, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})})
    if log is not None:
        sink.close()  # the child has its own copy

    def why() -> str:
        if log is None:
            return ""
        lines = [ln for ln in Path(log).read_text(errors="replace").splitlines() if ln.strip()]
        return f"; its log ({log}) ends: {lines[-1][:300]}" if lines else f"; its log ({log}) is empty"

    proc.metrics_urls = [f"http://127.0.0.1:{metrics_port + i}/metrics" for i in range(workers)]
    target = f"127.0.0.1:{port}"
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode}{why()}")
        try:
            with grpc.insecure_channel(target) as ch:
                health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
            for url in proc.metrics_urls:  # every worker up
                scrape(url)
            return proc, target
        except (grpc.RpcError, OSError):
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server did not start within 60 s{why()}")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def scrape(url: str) -> dict[str, float]:
    import urllib.request

    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def server_counters(proc) -> dict[str, float]:
    """Summed over the server's workers: CPU seconds (all, model), pieces run and model calls."""
    total = {"cpu": 0.0, "model_cpu": 0.0, "rows": 0.0, "calls": 0.0}
    for url in proc.metrics_urls:
        v = scrape(url)
        total["cpu"] += v.get("process_cpu_seconds_total", 0.0)
        total["model_cpu"] += v.get("hmlstm_model_cpu_seconds_total", 0.0)
        total["rows"] += v.get("hmlstm_batch_size_sum", 0.0)
        total["calls"] += v.get("hmlstm_batch_size_count", 0.0)
    return total


async def drive(target: str, streams: int, chunk: int, seconds: float, warmup: float, pace_msgs: float = 0.0):
    """Closed-loop load; returns (chars/s, latencies in s) over the window after warm-up.

    pace_msgs > 0: all streams together send about that many chunks per second (each stream waits
    for its response and for its next turn), to compare CPU per message at a given message rate.
    """
    import grpc

    from hmlstm.v1 import segmenter_pb2 as pb
    from hmlstm.v1 import segmenter_pb2_grpc as pb_grpc

    done: list[tuple[float, float, int]] = []  # (finish time, latency, chars)
    t_start = time.perf_counter()
    t_stop = t_start + warmup + seconds
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.SegmenterStub(channel)

        async def one(i: int) -> None:
            queue: asyncio.Queue = asyncio.Queue()

            async def requests():
                yield pb.SegmentRequest(config=pb.StreamConfig())
                offset = 0
                while (piece := await queue.get()) is not None:
                    yield pb.SegmentRequest(chunk=pb.TextChunk(offset=offset, text=piece))
                    offset += len(piece)

            call = stub.StreamSegment(requests())
            pos = (i * 7919) % (len(TEXT) - 10_000)
            period = streams / pace_msgs if pace_msgs else 0.0
            turn = time.perf_counter() + period * i / max(1, streams)
            while time.perf_counter() < t_stop:
                if period:
                    await asyncio.sleep(max(0.0, turn - time.perf_counter()))
                    turn += period
                piece = TEXT[pos : pos + chunk]
                pos = pos + chunk if pos + 2 * chunk < len(TEXT) else 0
                t0 = time.perf_counter()
                await queue.put(piece)
                await call.read()
                t1 = time.perf_counter()
                done.append((t1, t1 - t0, len(piece)))
            await queue.put(None)
            while await call.read() != grpc.aio.EOF:
                pass

        await asyncio.gather(*(one(i) for i in range(streams)))
    window = [(t, lat, n) for t, lat, n in done if t_start + warmup <= t <= t_stop]
    lat = np.array([lat for _, lat, _ in window])
    return sum(n for _, _, n in window) / seconds, lat


def direct_ort(model: LoadedModel, batch: int, chunk: int, seconds: float) -> dict:
    """ONNX Runtime called directly, ``batch`` streams of ``chunk`` characters per call, state fed back.

    Returns chars/s, per-call latencies and the CPU seconds per character (this process's CPU, which
    does nothing else meanwhile: ORT's calling and pool threads)."""
    state = model.zero_state(batch)
    ids = model.vocab.encode(TEXT[: 200_000])
    starts = (np.arange(batch) * 7919) % (len(ids) - 4 * chunk - 1)
    lengths = np.full(batch, chunk, np.int32)
    pos, lats, chars = 0, [], 0
    cpu0 = time.process_time()
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end or not lats:
        tokens = np.stack([ids[s + pos : s + pos + chunk] for s in starts])
        t0 = time.perf_counter()
        out = model.run(tokens, lengths, state)
        lats.append(time.perf_counter() - t0)
        state = {model.state_map[k]: v for k, v in out.items() if k in model.state_map}
        chars += batch * chunk
        pos = (pos + chunk) % (3 * chunk)
    cpu = time.process_time() - cpu0
    return {"rate": chars / sum(lats), "lat": np.array(lats), "cpu_per_char": cpu / chars}


def tensorflow_rate(config: dict, vocab: int, chunk: int, batch: int, seconds: float) -> float:
    from hmlstm.cli import quiet_tensorflow

    tf = quiet_tensorflow()

    from hmlstm.model.config import ModelConfig
    from hmlstm.model.network import HMLSTMNetwork

    net = HMLSTMNetwork(ModelConfig(vocab_size=vocab, **{k: v for k, v in config.items() if k != "vocab_size"}))
    state = net.initial_state(batch)
    spec = tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape, t.dtype), state)

    @tf.function(input_signature=[tf.TensorSpec([batch, chunk], tf.int32), spec])
    def step(tokens, state):
        out = net(tokens, state)
        return out.logits, out.boundaries, out.final_state

    tokens = np.random.default_rng(0).integers(0, vocab, (batch, chunk)).astype(np.int32)
    _, _, state = step(tokens, state)
    n, t_total = 0, 0.0
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        logits, _, state = step(tokens, state)
        logits.numpy()
        t_total += time.perf_counter() - t0
        n += batch * chunk
    return n / t_total


def random_3x256(tmp: Path) -> Path:
    """A 3x256 model with random weights on the built-in vocabulary, exported (quick validation)."""
    from hmlstm.model.config import ModelConfig, TrainConfig
    from hmlstm.model.data import Vocabulary
    from hmlstm.model.train import Trainer

    vocab = Vocabulary.from_text(TEXT)
    model = ModelConfig(vocab_size=len(vocab), num_units=(256, 256, 256))
    run = tmp / "run3x256"
    from hmlstm.cli import quiet_tensorflow

    tf = quiet_tensorflow()

    from hmlstm.model.checkpoint import write_run_info
    trainer = Trainer(model, TrainConfig())
    write_run_info(run, model, TrainConfig(), vocab, {"corpus": "random weights (speed only)"})
    tf.train.Checkpoint(trainer=trainer).save(str(run / "ckpt" / "ckpt"))
    from hmlstm.export.convert import ExportConfig, export
    out = tmp / "3x256.onnx"
    export(run, out, ExportConfig(times=(7,), batches=(2,)), log=lambda m: None)
    return out


def ort_profile(path: Path, batch: int = 64, steps: int = 64) -> list[tuple[str, float, int]]:
    """Where a batched call spends its time: ONNX Runtime's own profiler, summed by op type."""
    import json

    import onnxruntime as ort

    from hmlstm.export.validate import make_feeds

    model = load_model(path, "cpu")
    so = ort.SessionOptions()
    so.enable_profiling = True
    so.log_severity_level = 3
    with tempfile.TemporaryDirectory() as tmp:
        so.profile_file_prefix = str(Path(tmp) / "prof")
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        feeds = make_feeds(np.random.default_rng(0), model.units, len(model.vocab), batch, steps, None, False, False)
        for _ in range(3):
            sess.run(None, feeds)
        events = json.loads(Path(sess.end_profiling()).read_text())
    import onnx

    top_level = {n.name for n in onnx.load(str(path)).graph.node}
    by_op: dict[str, list[float]] = {}
    loop_total = 0.0
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        op, node = e["args"].get("op_name", "?"), e["name"][: -len("_kernel_time")]
        if op == "Loop":
            loop_total += e["dur"]
        else:
            by_op.setdefault(op if node not in top_level else f"{op} (outside the loop)", []).append(e["dur"])
    inside = sum(sum(v) for k, v in by_op.items() if "outside" not in k)
    wall = loop_total + sum(sum(v) for k, v in by_op.items() if "outside" in k)
    rows = [(op, sum(v) / wall, len(v)) for op, v in by_op.items()]
    rows.append(("Loop control and scan-output copies", (loop_total - inside) / wall, 3))
    return sorted(rows, key=lambda r: -r[1])


def pct(x: np.ndarray, q: float) -> float:
    return float(np.percentile(x, q)) * 1e3 if len(x) else float("nan")


# (label, extra serve flags, workers, streams, chunks): the server rows of one model.
SERVER_GRID = [
    ("server", [], 1, [1, 8, 64, 256], [1, 16, 256]),
    ("server, batching off", ["--no-batching"], 1, [1, 64], [16, 256]),
    ("server, 2 workers", [], 2, [64, 256], [16, 256]),
    ("server, ORT threads spinning", ["--ort-spinning", "on"], 1, [1, 64], [16]),
    ("server, max batch 64", ["--max-batch", "64"], 1, [256], [16]),
    ("server, max batch 128", ["--max-batch", "128"], 1, [256], [16]),
    ("server, max batch 256", ["--max-batch", "256"], 1, [256], [16]),
    ("server, max batch adaptive", ["--max-batch", "0"], 1, [256], [16]),
]
QUICK_GRID = [("server", [], 1, [1, 8], [16]), ("server, 2 workers", [], 2, [8], [16])]


def run_row(proc, target, what, n, c, seconds, pace=0.0) -> dict:
    before = server_counters(proc)
    rate, lat = asyncio.run(drive(target, n, c, seconds, warmup=min(1.0, seconds / 2), pace_msgs=pace))
    after = server_counters(proc)
    d = {k: after[k] - before[k] for k in after}
    # CPU over the whole drive (warm-up included), divided by the chunks of the whole drive
    chunks_total = rate * (seconds + min(1.0, seconds / 2)) / c
    row = {"what": what, "streams": n, "chunk": c, "rate": rate, "p50": pct(lat, 50), "p99": pct(lat, 99),
           "rows_per_call": d["rows"] / d["calls"] if d["calls"] else float("nan"),
           "cpu_chunk": d["cpu"] / chunks_total if chunks_total else float("nan"),
           "model_chunk": d["model_cpu"] / chunks_total if chunks_total else float("nan")}
    print(f"  {what} N={n} C={c}: {rate:,.0f} chars/s p50 {row['p50']:.2f} ms, server CPU "
          f"{1e6 * row['cpu_chunk']:.0f} us/chunk (model {1e6 * row['model_chunk']:.0f})", flush=True)
    return row


def bench_model(name: str, path: Path, grid, seconds: float, gflops: float, full: bool):
    model = load_model(path, "cpu", spinning=False)  # the server's default session options
    limit = gflops * 1e9 / flops_per_char(model.config, len(model.vocab))
    print(f"{name}:", flush=True)
    rows = []
    for what, extra, workers, streams, chunks in grid:
        proc, target = start_server(path, extra, workers)
        try:
            for c in chunks:
                for n in streams:
                    rows.append(run_row(proc, target, what, n, c, seconds))
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    if full:
        proc, target = start_server(None, echo=True)
        try:
            for n in (64, 256):
                rows.append(run_row(proc, target, "echo floor (closed loop)", n, 16, seconds))
            srv = _find(rows, "server", 64, 16)
            if srv:  # the same message rate as the server row: per-message cost depends on the rate
                rows.append(run_row(proc, target, "echo floor (paced at the server's rate)", 64, 16, seconds,
                                    pace=srv["rate"] / 16))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    shapes = [(b, c) for b in (1, 64, 256) for c in (1, 16, 256)] if full else [(1, 16), (8, 16)]
    for b, c in shapes:
        d = direct_ort(model, b, c, seconds)
        rows.append({"what": "ONNX Runtime direct", "streams": b, "chunk": c, "rate": d["rate"],
                     "p50": pct(d["lat"], 50), "p99": pct(d["lat"], 99), "cpu_char": d["cpu_per_char"]})
    if full:  # ONNX Runtime's own default (idle threads spin): its best rate when it has the cores to itself
        spinning = load_model(path, "cpu", spinning=True)
        for b, c in [(b, c) for b in (64, 256) for c in (16, 256)]:
            d = direct_ort(spinning, b, c, seconds)
            rows.append({"what": "ONNX Runtime direct, threads spinning", "streams": b, "chunk": c,
                         "rate": d["rate"], "p50": pct(d["lat"], 50), "p99": pct(d["lat"], 99),
                         "cpu_char": d["cpu_per_char"]})
        del spinning
    for b, c in shapes:
        if c == 1 and b > 1:
            continue
        rows.append({"what": "TensorFlow tf.function", "streams": b, "chunk": c,
                     "rate": tensorflow_rate(model.config, len(model.vocab), c, b, seconds),
                     "p50": float("nan"), "p99": float("nan")})
    print(f"{name}: direct ONNX Runtime and TensorFlow rows done", flush=True)
    return model, limit, rows


def _fmt(x: float, scale: float = 1.0, digits: int = 0) -> str:
    return "" if x != x else f"{x * scale:,.{digits}f}"


def report(results, gflops: float, seconds: float) -> str:
    lines = ["## Serving throughput and cost (`benchmarks/serve_bench.py`)", "",
             f"Measured in one run: numpy sgemm {gflops:.0f} GFLOP/s (1024^3, float32, best of 10). The limit of a "
             "model is that rate / its FLOPs per character (matmuls only). Closed-loop clients: each stream sends a "
             f"chunk and waits for its response; {seconds:g} s per row after warm-up, clients and server on the same "
             "2 cores. `server CPU`: the server process's CPU seconds per chunk (from its own metrics, summed over "
             "its workers), and the part spent in model calls (`hmlstm_model_cpu_seconds_total`: ONNX Runtime's "
             "calling and pool threads); `rest` is everything else (gRPC, asyncio, tracking, responses, "
             "batching). For ONNX Runtime direct, `streams` is the batch and the CPU is per character of the "
             "call. `streams per call`: the mean batch the server ran. This machine is a shared VM: repeated "
             "runs of the 64-stream rows have varied by up to 1.5x, so compare rows within one run.", ""]
    for name, model, limit, rows in results:
        units = "x".join(map(str, model.units))
        lines += [f"### {name} ({units}, vocabulary {len(model.vocab)}, {model.engine} engine): limit {limit:,.0f} "
                  "chars/s", "",
                  "| what | streams | chunk | chars/s | % of limit | p50 ms | p99 ms | streams per call | "
                  "server CPU us/chunk | of it model | rest | CPU us/char |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            cpu_char = r.get("cpu_char", r.get("cpu_chunk", float("nan")) / r["chunk"])
            model_cpu = r.get("model_chunk", float("nan"))
            rest = r.get("cpu_chunk", float("nan")) - (0.0 if model_cpu != model_cpu else model_cpu)
            lines.append(
                f"| {r['what']} | {r['streams']} | {r['chunk']} | {r['rate']:,.0f} | {100 * r['rate'] / limit:.1f}% | "
                f"{r['p50']:.2f} | {r['p99']:.2f} | {_fmt(r.get('rows_per_call', float('nan')), 1, 1)} | "
                f"{_fmt(r.get('cpu_chunk', float('nan')), 1e6)} | {_fmt(model_cpu, 1e6)} | {_fmt(rest, 1e6)} | "
                f"{_fmt(cpu_char, 1e6, 1)} |")
        lines += ["", *targets(rows, limit), ""]
    lines += ["![serving throughput](serve_bench.png)"]
    return "\n".join(lines)


def profile_section(name: str, prof) -> str:
    top = prof[:12]
    matmul = sum(share for op, share, _ in prof if op.split()[0] in ("MatMul", "Gemm", "FusedMatMul"))
    lines = [f"### Where the time goes: {name}, batch 64 x 64 steps (ONNX Runtime profiler, kernel time by op)", "",
             "| op | share of the call's kernel time | kernel calls |", "|---|---:|---:|"]
    lines += [f"| {op} | {100 * share:.1f}% | {n} |" for op, share, n in top]
    lines += ["", f"Matrix products are {100 * matmul:.0f}% of kernel time as the profiler counts it; the rest is "
              "the loop body's element-wise ops and the Loop's per-iteration control on the host."]
    return "\n".join(lines)


def _find(rows, what, streams, chunk):
    return next((r for r in rows if r["what"] == what and r["streams"] == streams and r["chunk"] == chunk), None)


def _met(ok: bool) -> str:
    return "met" if ok else "not met"


def targets(rows, limit) -> list[str]:
    out = ["Targets:"]
    srv = _find(rows, "server", 64, 16)
    echo_paced = _find(rows, "echo floor (paced at the server's rate)", 64, 16)
    echo_closed = _find(rows, "echo floor (closed loop)", 64, 16)
    ort64 = _find(rows, "ONNX Runtime direct", 64, 16)
    if srv and echo_paced and echo_closed:
        rest = srv["cpu_chunk"] - srv["model_chunk"]
        for label, echo in (("paced at the server's message rate", echo_paced), ("closed loop", echo_closed)):
            ratio = rest / echo["cpu_chunk"]
            out.append(f"- 64 streams x 16 chars: the server's CPU outside the model call, {1e6 * rest:.0f} us per "
                       f"chunk, is {ratio:.2f}x the echo floor's {1e6 * echo['cpu_chunk']:.0f} us per message "
                       f"({label}) (target <= 2): {_met(ratio <= 2)}.")
    if srv and ort64:
        ratio = (srv["cpu_chunk"] / 16) / ort64["cpu_char"]
        out.append(f"- 64 streams x 16 chars: the server's total CPU per character, {1e6 * srv['cpu_chunk'] / 16:.1f} "
                   f"us, is {ratio:.2f}x the direct ONNX Runtime call's {1e6 * ort64['cpu_char']:.1f} us at batch 64 "
                   f"x 16 (target <= 1.3): {_met(ratio <= 1.3)}.")
        if ratio > 1.3:
            out.append("  What bounds it: a Python gRPC server's own cost per message (the echo floor's row) is "
                       "already a large share of the model's cost per 16-character chunk; at 256-character chunks "
                       "the same per-message cost is spread over 16x the characters.")
    for b in (64, 256):
        for c in (16, 256):
            t = _find(rows, "TensorFlow tf.function", b, c)
            candidates = [r for r in (_find(rows, "ONNX Runtime direct", b, c),
                                      _find(rows, "ONNX Runtime direct, threads spinning", b, c)) if r]
            if candidates and t:
                o = max(candidates, key=lambda r: r["rate"])
                how = "threads spinning" if "spinning" in o["what"] else "threads not spinning"
                ratio = o["rate"] / t["rate"]
                out.append(f"- batch {b} x {c} steps: ONNX Runtime (the faster setting: {how}) is {ratio:.2f}x "
                           f"TensorFlow (target >= 1.3): {_met(ratio >= 1.3)}.")
    if any(r["what"] == "ONNX Runtime direct" and r["streams"] >= 64 for r in rows):
        out.append("  What bounds it: at batch 64 and 256 both engines spend the step in the same matrix products "
                   "and per-row element-wise work (ONNX Runtime reaches about 60-80% of the sgemm limit here); "
                   "the inference graph's fewer nodes per step (110, was 154) pay at one stream, not here.")
    for n in (64, 256):
        for c in (16, 256):
            one, two = _find(rows, "server", n, c), _find(rows, "server, 2 workers", n, c)
            if one and two:
                out.append(f"- {n} streams x {c} chars: 2 workers give {two['rate'] / one['rate']:.2f}x one worker's "
                           f"throughput ({two['rate']:,.0f} against {one['rate']:,.0f} chars/s).")
    at256 = [r for r in rows if r["streams"] == 256 and r["chunk"] == 16 and
             (r["what"] == "server" or r["what"].startswith("server, max batch"))]
    if len(at256) > 1:
        from hmlstm.serving.config import ServeConfig

        def label(r):
            return (f"the default ({ServeConfig().max_batch})" if r["what"] == "server"
                    else r["what"].replace("server, max batch ", ""))

        best = max(at256, key=lambda r: r["rate"])
        out.append("- max batch at 256 streams x 16 chars: " + ", ".join(
            f"{label(r)} {r['rate']:,.0f} chars/s (p99 {r['p99']:.0f} ms)" for r in at256)
            + f"; fastest: {label(best)}.")
    best64 = max((r for r in rows if r["what"] == "server" and r["streams"] == 64), key=lambda r: r["rate"],
                 default=None)
    if best64:
        share = best64["rate"] / limit
        out.append(f"- 64 streams, best chunk ({best64['chunk']}): {100 * share:.0f}% of the limit (target >= 60%): "
                   f"{_met(share >= 0.6)}. p99/p50 {best64['p99'] / best64['p50']:.2f} (target <= 3): "
                   f"{_met(best64['p99'] / best64['p50'] <= 3)}.")
    return out


def plot(results, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, (name, _model, limit, rows) in zip(axes[0], results):
        for what, style in (("server", "-"), ("server, batching off", "--"), ("server, 2 workers", ":")):
            for c in sorted({r["chunk"] for r in rows}):
                pts = sorted((r["streams"], r["rate"]) for r in rows if r["what"] == what and r["chunk"] == c)
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", label=f"{what}, chunk {c}")
        ax.axhline(limit, color="k", lw=1, ls=":", label="limit (sgemm / FLOPs per char)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel("characters / s")
        ax.set_title(name, fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


ENGINE_COST_SHAPES = ((256, 16), (64, 16), (64, 256))  # (streams, characters per chunk)


def held_echo_row(served: dict, seconds: float) -> dict:
    """The echo with its responses held for the batch cycle its clients saw in ``served`` (a server's row):
    streams / that server's message rate. Its clients then send in the same bursts at the same rate: the
    floor of any grpc.aio server at that arrival pattern."""
    streams, chunk = served["streams"], served["chunk"]
    held = start_server(None, echo=True, hold_ms=1e3 * streams * chunk / served["rate"])
    try:
        return run_row(*held, "echo, held", streams, chunk, seconds)
    finally:
        held[0].terminate()
        held[0].wait(timeout=60)


def engine_cost(seconds: float, rounds: int = 3, shapes=ENGINE_COST_SHAPES, against: Path | None = None) -> str:
    """Per engine and shape: ONNX Runtime called directly, beside a real server with that engine. ``against``:
    another checkout's server (sparse engine) too, alternating with this one's, for a before-and-after."""
    lines = ["## What the server adds to the engine (`benchmarks/serve_bench.py --engine-cost`)", "",
             "Shipped model, S streams x C-character chunks of the built-in text (stripped as clients strip it). "
             "`engine`: ONNX Runtime called directly at batch S x C with the server's session options (threads "
             "not spinning), CPU seconds of the process per character. `server`: a real `hmlstm serve --engine E` "
             "driven by S closed-loop gRPC streams from another process on the same 2 cores, its own CPU per "
             "character from its metrics, and the part in model calls; `rest / msg`: the server's CPU outside "
             "model calls per message; p99: the clients' latency per chunk. `echo / msg`: the bare grpc.aio "
             "echo's CPU per message (benchmarks/echo_server.py) with its responses held for that server's batch "
             "cycle in the same round, so its clients send in the same bursts at the same rate: the floor of any "
             "Python gRPC server there. `floor / direct`: the server / direct ratio of a server whose own work cost "
             "no more than the echo's (its model calls as measured, plus the echo per message): where a server "
             f"with no Python of its own would be. Medians of {rounds} alternating rounds of {seconds:g} s.", "",
             "| engine | S x C | direct chars/s | direct CPU us/char | server chars/s | server CPU us/char | "
             "of it model | rest | rest / msg (us) | echo / msg (us) | server / direct | floor / direct | p99 ms |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for engine in ("sparse", "dense"):
        model = load_model(DEFAULT_MODEL, "cpu", spinning=False, engine=engine)
        servers = [(engine, start_server(DEFAULT_MODEL, ["--engine", engine]))]
        if against is not None and engine == "sparse":
            servers.append((f"{engine}, {against.name}", start_server(
                DEFAULT_MODEL, ["--engine", engine], env={"PYTHONPATH": str(against)}, root=against)))
        try:
            for streams, chunk in shapes:
                direct, served, echo = [], [[] for _ in servers], []
                for _ in range(rounds):
                    direct.append(direct_ort(model, streams, chunk, seconds))
                    for k, (name, (proc, target)) in enumerate(servers):
                        served[k].append(run_row(proc, target, f"server {name}", streams, chunk, seconds))
                    echo.append(held_echo_row(served[0][-1], seconds))  # at this checkout's server's cycle
                d_rate = float(np.median([d["rate"] for d in direct]))
                d_cpu = float(np.median([d["cpu_per_char"] for d in direct]))
                e_msg = float(np.median([r["cpu_chunk"] for r in echo]))
                for k, ((name, _), rows) in enumerate(zip(servers, served)):
                    s_rate = float(np.median([r["rate"] for r in rows]))
                    s_cpu = float(np.median([r["cpu_chunk"] for r in rows])) / chunk
                    s_model = float(np.median([r["model_chunk"] for r in rows])) / chunk
                    p99 = float(np.median([r["p99"] for r in rows]))
                    floor = (s_model + e_msg / chunk) / d_cpu
                    lines.append(f"| {name} | {streams} x {chunk} | {d_rate:,.0f} | {1e6 * d_cpu:.2f} | "
                                 f"{s_rate:,.0f} | {1e6 * s_cpu:.2f} | {1e6 * s_model:.2f} | "
                                 f"{1e6 * (s_cpu - s_model):.2f} | {1e6 * (s_cpu - s_model) * chunk:.0f} | "
                                 + ("| " if k else f"{1e6 * e_msg:.0f} | ") + f"{s_cpu / d_cpu:.2f} | "
                                 + ("| " if k else f"{floor:.2f} | ") + f"{p99:.1f} |")
                    print(lines[-1], flush=True)
        finally:
            for _, (proc, _) in servers:
                proc.terminate()
                proc.wait(timeout=60)
        del model
    return "\n".join(lines)


def _free_env(root: Path) -> dict:
    # The checkout's own package first: sitecustomize imports hmlstm before `-m` puts the folder on the path.
    return {"PYTHONPATH": os.pathsep.join([str(root), str(ROOT / "benchmarks" / "free_model"),
                                           os.environ.get("PYTHONPATH", "")]), "HMLSTM_FREE_MODEL": "1"}


def front_end(seconds: float, rounds: int = 3, streams: int = 256, chunk: int = 16,
              against: Path | None = None) -> str:
    """What the server's front end alone can carry: `hmlstm serve` with a model call that costs nothing
    (benchmarks/free_model: the real model's outputs, looked up) at 1 and 2 workers, beside the bare
    grpc.aio echo on the same proto; messages and characters per second of the server's own CPU. Then the
    same at the real model's operating point: calls that take as long as the real ones (sleeping, as a call
    on an accelerator takes time without the host's CPU), beside the echo with its responses held for as
    long as that server's batch cycle. ``against``: another checkout (e.g. a git worktree of an earlier
    commit), its free-model servers alternating with these rows."""
    model = load_model(DEFAULT_MODEL, "cpu", spinning=False)
    call_us = 1e6 / float(np.median([direct_ort(model, streams, chunk, seconds)["rate"] for _ in range(rounds)]))
    del model
    roots = [("", ROOT)] + ([(f", {against.name}", against)] if against is not None else [])
    slow = "free model, calls as long as the real model's"
    setups = [("echo", 1, dict(echo=True))]
    for tag, root in roots:
        env = _free_env(root)
        kw = dict(env=env) if root == ROOT else dict(env=env, root=root)
        setups += [(f"free model{tag}", 1, kw)] + ([(f"free model{tag}", 2, kw)] if not tag else [])
        setups.append((f"{slow}{tag}", 1, {**kw, "env": {**env, "HMLSTM_FREE_MODEL_US_PER_CHAR": f"{call_us:.3f}"}}))
    paced_name = "echo, paced at the free model's message rate"
    held_name = f"echo, responses held for the batch cycle of \"{slow}\""
    procs = [start_server(DEFAULT_MODEL, workers=w, **kw) for _, w, kw in setups]
    rows: dict[tuple[str, int], list[dict]] = {(name, w): [] for name, w, _ in setups}
    rows[(paced_name, 1)], rows[(held_name, 1)] = [], []
    try:
        for _ in range(rounds):
            for (name, w, _), (proc, target) in zip(setups, procs):
                rows[(name, w)].append(run_row(proc, target, name, streams, chunk, seconds))
            echo = procs[0]
            rows[(paced_name, 1)].append(run_row(*echo, "echo, paced", streams, chunk, seconds,
                                                 pace=rows[("free model", 1)][-1]["rate"] / chunk))
            rows[(held_name, 1)].append(held_echo_row(rows[(slow, 1)][-1], seconds))
    finally:
        for proc, _ in procs:
            proc.terminate()
            proc.wait(timeout=60)
    lines = ["## What the front end alone carries (`benchmarks/serve_bench.py --front-end`)", "",
             f"{streams} closed-loop streams x {chunk}-character chunks from another process on the same 2 cores. "
             "`free model`: a real `hmlstm serve` whose model call costs nothing (benchmarks/free_model: the "
             "shipped model's real outputs, computed once per shape and looked up), so its CPU is the front end's "
             "alone: gRPC, asyncio, batching, tracking, responses. `echo`: the bare grpc.aio servicer on the same "
             "proto (benchmarks/echo_server.py), the floor of any Python gRPC server. A gRPC server's CPU per "
             "message depends on how its messages arrive (fewer per wake-up cost more each), so the echo is "
             "measured three ways: flat out; `paced`, its clients sending evenly at the message rate the free-model "
             "server reached in that round; `held`, every response held until a clock ticks once per batch cycle "
             "of the slow free-model server, so its clients send in the same bursts as a batching server's. "
             f"`calls as long as the real model's`: the free model's calls sleep {call_us:.2f} us per row and step, "
             f"the wall time of ONNX Runtime's own call at {streams} x {chunk} on this machine (measured in this run, "
             "threads not spinning): the message rate and arrival bursts of the real server with the model's CPU "
             "taken away, as on an accelerator. Per CPU second: messages and characters the server handles per "
             f"second of its own CPU (all its workers). Medians of {rounds} alternating rounds of {seconds:g} s.", "",
             "| server | workers | messages/s | chars/s | server CPU us/msg | messages per CPU s | "
             "chars per CPU s | p99 ms |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    order = [("echo", 1), (paced_name, 1), (held_name, 1)] + [(n, w) for n, w, _ in setups[1:]]
    for name, w in order:
        rs = rows[(name, w)]
        rate = float(np.median([r["rate"] for r in rs]))
        cpu_msg = float(np.median([r["cpu_chunk"] for r in rs]))
        p99 = float(np.median([r["p99"] for r in rs]))
        lines.append(f"| {name} | {w} | {rate / chunk:,.0f} | {rate:,.0f} | {1e6 * cpu_msg:.0f} | "
                     f"{1 / cpu_msg:,.0f} | {chunk / cpu_msg:,.0f} | {p99:.1f} |")
        print(lines[-1], flush=True)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--engine-cost", action="store_true",
                    help="only what the server adds to each engine's CPU per character at 256 x 16, 64 x 16 "
                         "and 64 x 256 (streams x characters per chunk)")
    ap.add_argument("--front-end", action="store_true",
                    help="only what the front end carries with a model call that costs nothing, beside the echo")
    ap.add_argument("--against", type=Path, default=None, metavar="CHECKOUT",
                    help="with --front-end or --engine-cost: also another checkout's server (git worktree add DIR "
                         "COMMIT), alternating with this one's")
    ap.add_argument("--quick", action="store_true", help="a small grid, for trying the script")
    ap.add_argument("--no-3x256", action="store_true")
    ap.add_argument("--write-docs", action="store_true",
                    help="write the report into docs/benchmarks.md and docs/serve_bench.png (not with --quick)")
    args = ap.parse_args()
    if args.write_docs and args.quick:
        ap.error("--quick is for trying the script; its small grid never replaces the committed report")
    if not 0.5 <= args.seconds <= 600:  # NaN fails too
        ap.error(f"--seconds is each row's measuring time, 0.5 to 600; got {args.seconds}")
    if args.front_end and args.engine_cost:
        ap.error("--front-end and --engine-cost are sections of their own: run one, then the other")
    if args.against is not None:
        if not (args.front_end or args.engine_cost):
            ap.error("--against compares another checkout in --front-end or --engine-cost; give one of them")
        if not (args.against / "hmlstm" / "serving" / "server.py").is_file():
            ap.error(f"--against {args.against}: not a checkout of this project (make one with "
                     "`git worktree add DIR COMMIT`)")
    for asked, run, section in ((args.front_end, front_end, "serve-front-end"),
                                (args.engine_cost, engine_cost, "serve-engines")):
        if asked:  # one section of its own
            text = run(args.seconds, against=args.against)
            print(text)
            if args.write_docs:
                print(f"\nwrote {write_section(section, text)}")
            return
    grid = QUICK_GRID if args.quick else SERVER_GRID
    gflops = sgemm_gflops()
    print(f"sgemm: {gflops:.1f} GFLOP/s", flush=True)
    results = []
    model, limit, rows = bench_model("shipped model", DEFAULT_MODEL, grid, args.seconds, gflops, not args.quick)
    results.append(("shipped model", model, limit, rows))
    if not args.no_3x256 and not args.quick:
        with tempfile.TemporaryDirectory() as tmp:
            path = random_3x256(Path(tmp))
            g2 = [("server", [], 1, [1, 64], [16, 256]), ("server, 2 workers", [], 2, [64], [16, 256])]
            model, limit, rows = bench_model("3x256, random weights", path, g2, args.seconds, gflops, False)
            results.append(("3x256, random weights", model, limit, rows))
    gflops_after = sgemm_gflops()
    text = report(results, gflops, args.seconds)
    text += (f"\n\nsgemm before the rows {gflops:.0f} GFLOP/s, after {gflops_after:.0f} GFLOP/s "
             "(the limits use the first).")
    text += "\n\n" + profile_section("shipped model", ort_profile(DEFAULT_MODEL))
    print(text)
    if args.write_docs:
        plot(results, DOCS / "serve_bench.png")
        print(f"\nwrote {write_section('serve', text)} and {DOCS / 'serve_bench.png'}")
    else:
        print("\n(not written: pass --write-docs to replace the report in docs/benchmarks.md)")


if __name__ == "__main__":
    main()
