"""The echo floor: a bare grpc.aio servicer on the project's proto, for `serve_bench.py`.

It answers every chunk of a ``StreamSegment`` call with an empty ``SegmentResponse`` and
does nothing else: no model, no tracking, no batching. Its CPU per message is the floor
of any Python gRPC server here, the yardstick for what ``hmlstm serve`` spends on its
own work. Serves health (so the benchmark's readiness probe works) and Prometheus'
``process_cpu_seconds_total`` like the real server.

``HOLD_MS`` > 0: every response waits for the next tick of a clock that ticks every HOLD_MS
milliseconds, and all the responses waiting go out together, as a batching server's do when its
model call ends. Closed-loop clients then send in the same bursts as they do to ``hmlstm serve``:
the floor at the server's own message rate and arrival pattern.

    python benchmarks/echo_server.py PORT METRICS_PORT [HOLD_MS]
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc  # noqa: E402
from grpc_health.v1 import health, health_pb2, health_pb2_grpc  # noqa: E402
from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server  # noqa: E402

from hmlstm.v1 import segmenter_pb2 as pb  # noqa: E402
from hmlstm.v1 import segmenter_pb2_grpc as pb_grpc  # noqa: E402


class Echo(pb_grpc.SegmenterServicer):
    def __init__(self, hold_s: float = 0.0):
        self.hold_s = hold_s
        self._tick: asyncio.Future | None = None  # what the responses held now wait for
        self._clock: asyncio.Task | None = None

    async def StreamSegment(self, request_iterator, context):
        async for req in request_iterator:
            if req.HasField("chunk"):
                if self.hold_s:
                    await self._next_tick()
                yield pb.SegmentResponse()

    def _next_tick(self) -> asyncio.Future:
        if self._clock is None:
            self._tick = asyncio.get_running_loop().create_future()
            self._clock = asyncio.create_task(self._run_clock())
        return self._tick

    async def _run_clock(self) -> None:
        """Tick every hold_s from the first held response on, whoever waits: like a batching server, whose
        calls follow one another whenever pieces are queued, the cycle does not stretch with the clients."""
        loop = asyncio.get_running_loop()
        at = loop.time()
        while True:
            at += self.hold_s
            await asyncio.sleep(max(0.0, at - loop.time()))
            tick, self._tick = self._tick, loop.create_future()
            tick.set_result(None)


async def main(port: int, metrics_port: int, hold_ms: float = 0.0) -> None:
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    start_http_server(metrics_port, addr="127.0.0.1", registry=registry)
    server = grpc.aio.server()
    pb_grpc.add_SegmenterServicer_to_server(Echo(hold_ms / 1e3), server)
    checker = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await checker.set("", health_pb2.HealthCheckResponse.SERVING)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]) if len(sys.argv) > 3 else 0.0))
