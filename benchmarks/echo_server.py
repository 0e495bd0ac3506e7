"""The echo floor: a bare grpc.aio servicer on the project's proto, for `serve_bench.py`.

It answers every chunk of a ``StreamSegment`` call with an empty ``SegmentResponse`` and
does nothing else: no model, no tracking, no batching. Its CPU per message is the floor
of any Python gRPC server here, the yardstick for what ``hmlstm serve`` spends on its
own work. Serves health (so the benchmark's readiness probe works) and Prometheus'
``process_cpu_seconds_total`` like the real server.

    python benchmarks/echo_server.py PORT METRICS_PORT
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
    async def StreamSegment(self, request_iterator, context):
        async for req in request_iterator:
            if req.HasField("chunk"):
                yield pb.SegmentResponse()


async def main(port: int, metrics_port: int) -> None:
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    start_http_server(metrics_port, addr="127.0.0.1", registry=registry)
    server = grpc.aio.server()
    pb_grpc.add_SegmenterServicer_to_server(Echo(), server)
    checker = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await checker.set("", health_pb2.HealthCheckResponse.SERVING)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
