"""The GPU host's measurements (run by scripts/gpu_check.sh): direct ONNX Runtime and the server.

    python benchmarks/gpu_bench.py --mode gpu|cpu --out bench.md

gpu: ONNX Runtime on CUDA called directly at batch 1/64/256/1024/4096 x 16 and 256 steps, each shape
with the dense and the sparse graph (the sparse one's NonZero may cost a device-to-host copy per
step; the faster one is what `hmlstm serve --engine` should run there: the report says which), then the
real server (`hmlstm serve --device cuda`, batching, --workers 1 and 4) at 256 and 1024 streams, the
clients spread over several processes so that they are not the bound. cpu: the same steps on the
CPU provider with a small grid, to try the kit and the check where there is no GPU. Needs no
TensorFlow. Writes a markdown report to --out (for docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks.serve_bench import direct_ort, drive, pct, server_counters, start_server  # noqa: E402
from hmlstm.serving.model import DEFAULT_MODEL, load_model  # noqa: E402

GRIDS = {
    "gpu": dict(device="cuda", batches=(1, 64, 256, 1024, 4096), steps=(16, 256), workers=(1, 4),
                streams=(256, 1024), chunks=(16, 256), seconds=2.0, warmup=1.0, clients=8),  # about 2 minutes in all
    "cpu": dict(device="cpu", batches=(1, 64), steps=(16,), workers=(1,), streams=(64,), chunks=(16,),
                seconds=0.3, warmup=0.2, clients=2),  # the kit and the script rehearsed: the numbers are not the point
}


def _client(args) -> tuple[float, list[float]]:
    target, streams, chunk, seconds, warmup = args
    rate, lat = asyncio.run(drive(target, streams, chunk, seconds, warmup=warmup))
    return rate, lat.tolist()


def drive_many(target: str, streams: int, chunk: int, seconds: float, clients: int, warmup: float):
    """``streams`` closed-loop streams split over ``clients`` processes; (chars/s, latencies)."""
    per = [streams // clients + (1 if i < streams % clients else 0) for i in range(clients)]
    with ProcessPoolExecutor(len(per)) as pool:
        results = list(pool.map(_client, [(target, n, chunk, seconds, warmup) for n in per if n]))
    return sum(r for r, _ in results), np.concatenate([np.array(l) for _, l in results])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=sorted(GRIDS), default="gpu")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    g = GRIDS[args.mode]
    lines = [f"### Measured ({args.mode} mode, device {g['device']}, shipped model)", "",
             "| what | workers | batch or streams | chunk | chars/s | p50 ms | p99 ms | server CPU us/chunk |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]

    def emit(row: str) -> None:
        lines.append(row)
        print(row, flush=True)
        args.out.write_text("\n".join(lines) + "\n")  # what was measured survives a time limit

    models = {e: load_model(DEFAULT_MODEL, g["device"], spinning=False, engine=e) for e in ("dense", "sparse")}
    for model in models.values():
        emit(f"| (session: {model.runtime.note}) | | | | | | | |")
    wins = {"dense": 0, "sparse": 0}
    for b in g["batches"]:
        for c in g["steps"]:
            rates = {}
            for engine, model in models.items():
                d = direct_ort(model, b, c, g["seconds"])
                rates[engine] = d["rate"]
                emit(f"| ONNX Runtime direct, {engine} | | {b} | {c} | {d['rate']:,.0f} | {pct(d['lat'], 50):.2f} | "
                     f"{pct(d['lat'], 99):.2f} | |")
            wins[max(rates, key=rates.get)] += 1
    faster = max(wins, key=wins.get)
    emit(f"| faster engine on {g['device']}: **{faster}** at {wins[faster]} of {sum(wins.values())} shapes "
         f"(serve with --engine {faster}) | | | | | | | |")
    del models
    for w in g["workers"]:
        proc, target = start_server(DEFAULT_MODEL, ["--device", g["device"], "--engine", faster], workers=w,
                                    log=args.out.with_name("server.log"))
        try:
            for c in g["chunks"]:
                for n in g["streams"]:
                    before = server_counters(proc)
                    t0 = time.perf_counter()
                    rate, lat = drive_many(target, n, c, g["seconds"], g["clients"], g["warmup"])
                    after = server_counters(proc)
                    chunks = rate * (time.perf_counter() - t0) / c
                    cpu = (after["cpu"] - before["cpu"]) / chunks if chunks else float("nan")
                    emit(f"| server, --device {g['device']} --engine {faster} | {w} | {n} | {c} | {rate:,.0f} | "
                         f"{pct(lat, 50):.2f} | {pct(lat, 99):.2f} | {1e6 * cpu:,.0f} |")
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    lines += ["", f"{os.cpu_count()} CPU cores; clients in {g['clients']} processes on the same host."]
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
