"""Soak: 64 concurrent streams against a real server for 10 minutes; is memory flat?

Each of 64 closed-loop clients streams the built-in text in 16-character
chunks under a stream id, ends its stream after 2,000 characters and starts a
new one (so streams are created, resumed-capable, finished and forgotten all
along). Every 10 s the server process's resident memory, characters/s and
errors are sampled. Writes the "soak" section of docs/benchmarks.md.

    python benchmarks/soak.py [--minutes 10] [--streams 64] [--state-store memory]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402

from benchmarks.report import NOT_WRITTEN, add_write_docs, write_section  # noqa: E402
from benchmarks.serve_bench import TEXT, start_server  # noqa: E402
from hmlstm.serving.model import DEFAULT_MODEL  # noqa: E402
from hmlstm.v1 import segmenter_pb2 as pb  # noqa: E402
from hmlstm.v1 import segmenter_pb2_grpc as pb_grpc  # noqa: E402


async def client(stub, i: int, stop: float, counters: dict) -> None:
    pos = (i * 7919) % (len(TEXT) - 10_000)
    n = 0
    while time.monotonic() < stop:
        n += 1
        queue: asyncio.Queue = asyncio.Queue()

        async def requests(q=queue, sid=f"soak-{i}-{n}"):
            yield pb.SegmentRequest(config=pb.StreamConfig(stream_id=sid))
            while (item := await q.get()) is not None:
                yield pb.SegmentRequest(chunk=pb.TextChunk(offset=item[0], text=item[1]))

        call = stub.StreamSegment(requests())
        try:
            for off in range(0, 2000, 16):
                if time.monotonic() >= stop:
                    break
                piece = TEXT[pos : pos + 16]
                pos = pos + 16 if pos + 32 < len(TEXT) else 0
                await queue.put((off, piece))
                await call.read()
                counters["chars"] += len(piece)
            await queue.put(None)
            while await call.read() != grpc.aio.EOF:
                pass
            counters["streams"] += 1
        except grpc.aio.AioRpcError as e:
            counters["errors"] += 1
            counters.setdefault("codes", set()).add(e.code().name)


async def soak(target: str, streams: int, minutes: float, proc: psutil.Process):
    counters = {"chars": 0, "streams": 0, "errors": 0}
    samples = []
    t0 = time.monotonic()
    stop = t0 + 60 * minutes
    async with grpc.aio.insecure_channel(target) as ch:
        stub = pb_grpc.SegmenterStub(ch)
        tasks = [asyncio.create_task(client(stub, i, stop, counters)) for i in range(streams)]
        last_chars, last_t = 0, t0
        while time.monotonic() < stop:
            await asyncio.sleep(10)
            now = time.monotonic()
            samples.append({"t": now - t0, "rss_mb": proc.memory_info().rss / 2**20,
                            "chars_s": (counters["chars"] - last_chars) / (now - last_t),
                            "streams_done": counters["streams"], "errors": counters["errors"]})
            last_chars, last_t = counters["chars"], now
            print(f"{samples[-1]['t']:6.0f}s rss {samples[-1]['rss_mb']:7.1f} MiB "
                  f"{samples[-1]['chars_s']:8,.0f} chars/s streams {counters['streams']} "
                  f"errors {counters['errors']}", flush=True)
        await asyncio.gather(*tasks)
    return samples, counters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--state-store", default="memory")
    add_write_docs(ap)
    args = ap.parse_args()
    proc, target = start_server(DEFAULT_MODEL, batching=True, extra=["--state-store", args.state_store])
    try:
        samples, counters = asyncio.run(soak(target, args.streams, args.minutes, psutil.Process(proc.pid)))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    after_1 = [s for s in samples if s["t"] >= 60] or samples
    rss = np.array([s["rss_mb"] for s in after_1])
    t = np.array([s["t"] for s in after_1])
    slope = float(np.polyfit(t / 60, rss, 1)[0]) if len(rss) > 2 else float("nan")
    flat = rss.max() - rss.min() < 25 and abs(slope) < 2
    lines = [
        "## Soak (`benchmarks/soak.py`)", "",
        f"{args.streams} concurrent closed-loop streams, 16-character chunks, each stream ended after 2,000 "
        f"characters and replaced by a new one with a new id; {args.minutes:g} minutes against `hmlstm serve` "
        f"(shipped model, batching on, state store `{args.state_store}`), client and server on the same 2 cores.", "",
        f"- streams completed: {counters['streams']:,}; errors: {counters['errors']} "
        f"{sorted(counters.get('codes', []))}",
        f"- characters/s: mean {np.mean([s['chars_s'] for s in samples]):,.0f}",
        f"- server resident memory after the first minute: {rss.min():.1f} to {rss.max():.1f} MiB, trend "
        f"{slope:+.2f} MiB/minute: {'flat' if flat else 'NOT flat'}", "",
        "| minute | RSS MiB | chars/s | streams done | errors |", "|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {s['t'] / 60:.1f} | {s['rss_mb']:.1f} | {s['chars_s']:,.0f} | {s['streams_done']:,} | "
              f"{s['errors']} |" for s in samples[:: max(1, len(samples) // 20)]]
    text = "\n".join(lines)
    print(text)
    print(f"\nwrote {write_section('soak', text)}" if args.write_docs else NOT_WRITTEN)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
