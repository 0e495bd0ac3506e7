"""Prometheus metrics, on a registry of the server's own (several servers may share a process)."""

from __future__ import annotations

import threading
from bisect import bisect_left

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString


class _ModelCpu:
    """hmlstm_model_cpu_seconds_total, read from the runtime's own accounting at each scrape."""

    def __init__(self, cpu):
        self.cpu = cpu

    def collect(self):
        yield CounterMetricFamily("hmlstm_model_cpu_seconds", "CPU seconds spent in model calls (the calling "
                                  "thread inside ONNX Runtime plus its intra-op threads); process_cpu_seconds_total "
                                  "less this is the server's own work", value=self.cpu.seconds())


class BatchHistogram:
    """A Prometheus histogram that takes a batch's values at once: ``observe_many`` buckets them with one
    NumPy call (prometheus_client's Histogram takes a lock and walks its buckets in Python for every value,
    and the server observes several values per message). Exposed like a Histogram at each scrape."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...], registry: CollectorRegistry):
        self.name, self.documentation = name, documentation
        self.upper = tuple(float(b) for b in buckets)
        self._counts = np.zeros(len(self.upper) + 1, np.int64)  # per bucket, not cumulative; the last: +Inf
        self._sum = 0.0
        self._lock = threading.Lock()  # observers run on the event loop, scrapes on the HTTP server's thread
        registry.register(self)

    def observe(self, value: float) -> None:
        i = bisect_left(self.upper, value)  # the first bucket whose bound is >= value (Prometheus' "le")
        with self._lock:
            self._counts[i] += 1
            self._sum += value

    def observe_many(self, values: np.ndarray) -> None:
        values = np.asarray(values, np.float64)
        counts = np.bincount(np.searchsorted(self.upper, values, side="left"), minlength=len(self._counts))
        with self._lock:
            self._counts += counts
            self._sum += float(values.sum())

    def collect(self):
        with self._lock:
            cumulative, total = np.cumsum(self._counts).tolist(), self._sum
        bounds = [floatToGoString(b) for b in self.upper] + ["+Inf"]
        yield HistogramMetricFamily(self.name, self.documentation, buckets=list(zip(bounds, cumulative)),
                                    sum_value=total)


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
        self.chunk_latency = BatchHistogram(
            "hmlstm_chunk_latency_seconds", "From a chunk's arrival to its response",
            (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10), self.registry)
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
        self.batch_size = BatchHistogram("hmlstm_batch_size", "Streams' pieces per model call",
                                         (1, 2, 4, 8, 16, 32, 64, 128, 256), self.registry)
        self.queue_wait = BatchHistogram("hmlstm_queue_wait_seconds", "From a piece's arrival to its model call",
                                         (0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1),
                                         self.registry)
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
