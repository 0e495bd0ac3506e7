"""Prometheus metrics, on a registry of the server's own (several servers may share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily


class _ModelCpu:
    """hmlstm_model_cpu_seconds_total, read from the runtime's own accounting at each scrape."""

    def __init__(self, cpu):
        self.cpu = cpu

    def collect(self):
        yield CounterMetricFamily("hmlstm_model_cpu_seconds", "CPU seconds spent in model calls (the calling "
                                  "thread inside ONNX Runtime plus its intra-op threads); process_cpu_seconds_total "
                                  "less this is the server's own work", value=self.cpu.seconds())


class Metrics:
    def __init__(self, model_cpu=None) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_cpu_seconds_total, memory, open fds
        if model_cpu is not None:
            self.registry.register(_ModelCpu(model_cpu))
        self.active_streams = Gauge("hmlstm_active_streams", "Streaming calls attached to a stream now",
                                    registry=self.registry)
        self.held_streams = Gauge("hmlstm_held_streams", "Streams held for resume by id", registry=self.registry)
        self.chars = Counter("hmlstm_chars_processed", "Characters run through the model", registry=self.registry)
        self.chunk_latency = Histogram(
            "hmlstm_chunk_latency_seconds", "From a chunk's arrival to its response",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10),
            registry=self.registry)
        self.errors = Counter("hmlstm_errors", "Calls ended with an error, by gRPC status code", ["code"],
                              registry=self.registry)
        self.age_cuts = Counter("hmlstm_connection_age_cuts", "Streams ended because their connection outlived "
                                "--max-connection-age and its grace (expected: the client resumes; not in "
                                "hmlstm_errors_total)", registry=self.registry)
        self.store_errors = Counter("hmlstm_state_store_errors", "State-store reads or writes that failed",
                                    registry=self.registry)
        self.store_up = Gauge("hmlstm_state_store_up", "1 while the state store answers, 0 while it is down "
                              "(streams then go on without durability); 1 with no store", registry=self.registry)
        self.store_up.set(1)
        self.unsaved_streams = Gauge("hmlstm_unsaved_streams", "Streams whose acknowledged state is not (yet) in "
                                     "the state store", registry=self.registry)
        self.requests = Counter("hmlstm_requests", "Calls started, by method", ["method"], registry=self.registry)
        self.takeovers = Counter("hmlstm_stream_takeovers", "Resumes that took a stream over from a call still "
                                 "attached to it", registry=self.registry)
        self.batch_size = Histogram("hmlstm_batch_size", "Streams' pieces per model call",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry)
        self.queue_wait = Histogram("hmlstm_queue_wait_seconds", "From a piece's arrival to its model call",
                                    buckets=(0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1),
                                    registry=self.registry)
        self._http = None

    def serve_http(self, host: str, port: int) -> int:
        """Start the /metrics endpoint; returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        return server.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
