"""What held streams cost the server in memory, and whether it comes back when they expire.

A real `hmlstm serve` (the shipped model, `--idle-timeout 30`) is sent N streams with a stream id (1,000
by default). Each sends one 16-character chunk, reads its response and goes away, so the server holds
the stream for a resume until the idle timeout forgets it (a disconnect storm). The server's resident
memory (RSS) is read: at the start, with the N streams held, after they expired, and the same again for
a second storm; the held-stream count comes from its metrics. Writes the "memory" section of
docs/benchmarks.md with --write-docs.

    python benchmarks/memory.py [--streams 1000] [--write-docs]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import psutil  # noqa: E402

from benchmarks.report import add_write_docs, publish  # noqa: E402
from benchmarks.serve_bench import TEXT, scrape, start_server  # noqa: E402
from hmlstm.serving.model import DEFAULT_MODEL  # noqa: E402
from hmlstm.v1 import segmenter_pb2 as pb  # noqa: E402
from hmlstm.v1 import segmenter_pb2_grpc as pb_grpc  # noqa: E402

IDLE_S = 30  # long enough that no stream expires while the storm is still sent


async def storm(target: str, n: int, tag: str) -> None:
    """n streams with ids: one chunk each, its response read, then the client goes away."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.SegmenterStub(channel)

        async def one(i: int) -> None:
            start = (i * 7919) % (len(TEXT) - 100)
            call = stub.StreamSegment(iter([
                pb.SegmentRequest(config=pb.StreamConfig(stream_id=f"{tag}-{i}")),
                pb.SegmentRequest(chunk=pb.TextChunk(offset=0, text=TEXT[start : start + 16]))]))
            await call.read()
            call.cancel()

        for k in range(0, n, 100):  # 100 at a time: the storm, not the client, is measured
            await asyncio.gather(*(one(i) for i in range(k, min(n, k + 100))))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=1000)
    add_write_docs(ap)
    args = ap.parse_args()
    proc, target = start_server(DEFAULT_MODEL, ["--idle-timeout", str(IDLE_S), "--max-streams", "5000"])
    server = psutil.Process(proc.pid)

    def held() -> int:
        return int(scrape(proc.metrics_urls[0]).get("hmlstm_held_streams", -1))

    def rss() -> float:
        return server.memory_info().rss / 2**20

    rows = []
    try:
        asyncio.run(storm(target, 8, "warm"))  # the first calls' one-time allocations (sessions, buffers)
        deadline = time.monotonic() + 2 * IDLE_S
        while held() and time.monotonic() < deadline:
            time.sleep(0.5)
        rows.append(("start (after a warm-up of 8 streams, expired)", rss(), held()))
        for round_ in (1, 2):
            asyncio.run(storm(target, args.streams, f"r{round_}"))
            rows.append((f"storm {round_}: {args.streams:,} streams held", rss(), held()))
            deadline = time.monotonic() + 2 * IDLE_S
            while held() and time.monotonic() < deadline:
                time.sleep(0.5)
            rows.append((f"storm {round_}: after they expired (idle timeout {IDLE_S} s)", rss(), held()))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    base = rows[0][1]
    per_stream = (rows[1][1] - base) * 2**20 / max(rows[1][2], 1)
    lines = ["## Memory of held streams (`benchmarks/memory.py`)", "",
             f"A real server with the shipped model; {args.streams:,} streams with an id each send one 16-character "
             "chunk, read the response and go away, so the server holds each for a resume until its idle timeout "
             "forgets it. Server resident memory (RSS) and the held-stream count from its metrics:", "",
             "| when | RSS MiB | held streams |", "|---|---:|---:|"]
    lines += [f"| {what} | {mib:.1f} | {n:,} |" for what, mib, n in rows]
    second_growth = rows[3][1] - rows[2][1]
    lines += ["", f"- Per held stream: about {per_stream / 1024:.0f} KiB of RSS (the first storm's growth over the "
              f"{rows[1][2]:,} streams held): its recurrent state and the rewind history a resume needs (32 responses "
              "back for a live stream), the segment tracker and gRPC's call objects.",
              f"- After the streams expire the server forgets them (0 held), and RSS changes by "
              f"{rows[2][1] - rows[1][1]:+.1f} MiB: the allocator keeps freed memory for reuse rather than returning "
              f"it to the system. It is reused: the second storm of as many streams grew RSS by {second_growth:.1f} "
              "MiB from there, so memory is bounded by the most streams held at once, not by how many came and "
              "went. A server that must hand memory back after a storm can run `--workers` and be restarted, or "
              "lower `--idle-timeout`."]
    publish("memory", "\n".join(lines), args.write_docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
