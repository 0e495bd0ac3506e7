"""CPU and CUDA execution providers side by side, on the same models in one run.

Direct ONNX Runtime calls (batch 1, 64, 256 x 64 steps) on the shipped model,
then the server (`hmlstm serve --device cpu|cuda`) at 64 streams. Where no
working CUDA provider exists the CUDA rows say why. Writes a Markdown report.

    python benchmarks/provider_bench.py --out report.md [--seconds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks.serve_bench import drive, pct, start_server  # noqa: E402
from hmlstm.export.validate import make_feeds, run_session  # noqa: E402
from hmlstm.runtime import make_session  # noqa: E402
from hmlstm.serving.model import DEFAULT_MODEL, load_model  # noqa: E402


def direct(device: str, batches=(1, 64, 256), steps: int = 64, repeats: int = 5):
    rt = make_session(str(DEFAULT_MODEL), device)
    model = load_model(DEFAULT_MODEL, "cpu")
    rows = []
    for b in batches:
        feeds = make_feeds(np.random.default_rng(0), model.units, len(model.vocab), b, steps, None, False, False)
        run_session(rt.session, feeds)
        best = min(_timed(lambda f=feeds: run_session(rt.session, f)) for _ in range(repeats))
        rows.append((b, b * steps / best, best * 1e3))
    return rt.note, rows


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    lines = ["# CPU and CUDA execution providers", "", "## Direct ONNX Runtime (shipped model, 64 steps per call)",
             "", "| provider | batch | chars/s | ms per call |", "|---|---:|---:|---:|"]
    notes = []
    for device in ("cpu", "cuda"):
        try:
            note, rows = direct(device)
        except RuntimeError as e:
            notes.append(f"- {device}: {e}")
            continue
        notes.append(f"- {device}: {note}")
        lines += [f"| {device} | {b} | {rate:,.0f} | {ms:.2f} |" for b, rate, ms in rows]
    lines += ["", *notes, "", "## Server, 64 closed-loop streams", "",
              "| device | state on device (IO binding) | chunk | chars/s | p50 ms | p99 ms |",
              "|---|---|---:|---:|---:|---:|"]
    for device, binding in (("cpu", "off"), ("cuda", "off"), ("cuda", "on")):
        try:
            proc, target = start_server(DEFAULT_MODEL, True, ["--device", device, "--io-binding", binding])
        except RuntimeError as e:
            lines.append(f"| {device} | {binding} | | did not start: {e} | | |")
            continue
        try:
            for chunk in (16, 256):
                rate, lat = asyncio.run(drive(target, 64, chunk, args.seconds, 1.0))
                lines.append(f"| {device} | {binding} | {chunk} | {rate:,.0f} | {pct(lat, 50):.2f} | "
                             f"{pct(lat, 99):.2f} |")
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
