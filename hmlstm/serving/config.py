"""The server's settings, built once at the entry point."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

MAX_ORT_THREADS = 256  # ONNX Runtime makes every thread at start-up: 100,000 of them hang the server
# The documented range of every numeric flag of `hmlstm serve` (docs/protocol.md, `serve --help`):
MAX_STREAMS = 100_000  # each open stream holds its recurrent state and rewind history
# A chunk must fit gRPC's 8 MiB message limit at 4 bytes per character (UTF-8's longest), with room to spare.
MAX_CHUNK_CHARS = 1 << 20
MAX_SECONDS = 2_000_000  # gRPC takes durations in int32 milliseconds (24.8 days); 2e6 s (23 days) fits
MAX_WAIT_US = 1_000_000  # a piece waits at most a second for others to join its batch
MAX_CALL_THREADS = 256
WORKERS_PER_CORE = 4


def max_workers() -> int:
    """The most ``--workers`` this machine takes: a few per core (more only queue on the same cores)."""
    return WORKERS_PER_CORE * (os.cpu_count() or 1)



@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 50051  # 0: any free port
    metrics_port: int | None = 9464  # Prometheus text format on http://host:port/metrics; None: off
    device: str = "auto"  # auto (TensorRT, else CUDA, where they work), tensorrt, cuda, cpu
    trt_cache: str | None = None  # where TensorRT keeps its built engines (None: rebuilt at every start)
    trt_fp16: bool = False  # let TensorRT compute in half precision
    engine: str = "auto"  # sparse, dense, or auto: sparse on the CPU, dense on a GPU (serving/model.py)
    device_tolerance: float = 1e-4  # TensorRT's outputs against the CPU's at start-up (runtime.check_against_cpu)
    max_streams: int = 256  # concurrent streaming calls; more get RESOURCE_EXHAUSTED
    max_chunk_chars: int = 65_536  # per TextChunk
    # per unary Segment request; the server advertises less if the answer could exceed max_message_bytes
    max_text_chars: int = 100_000
    max_message_bytes: int = 8 * 1024 * 1024  # gRPC receive limit
    max_top_k: int = 50
    idle_timeout_s: float = 60.0  # a call silent this long is closed; a detached stream is forgotten
    grace_s: float = 10.0  # on SIGTERM, open streams get this long to finish
    tls_cert: str | None = None  # PEM files; both or neither
    tls_key: str | None = None
    auth_token: str | None = None  # if set, calls need "authorization: Bearer <token>"
    workers: int = 1  # server processes on this port (workers.py); each has its own session and batcher
    call_threads: int = 4  # threads that run unbatched ONNX Runtime calls off the event loop
    ort_threads: int | None = None  # ONNX Runtime intra-op threads (None: its default)
    # ONNX Runtime's idle threads spin between the Loop's steps (None: ORT's default, on). Off by default
    # here: at 64 streams the server was as fast with half the model's CPU (docs/benchmarks.md).
    ort_spinning: bool | None = False
    piece_chars: int = 4096  # longest run through the model in one call (bounds memory)
    state_store: str = "memory"  # memory, sqlite:PATH (one machine), redis://HOST:PORT/DB (replicas)
    persist_depth: int = 8  # a stored stream can rewind this many responses back
    # The longest a response waits for its stream's save; a store that keeps missing it is treated as down
    # (saver.py). Responses say whether their save made it (SegmentResponse.durable).
    store_timeout_s: float = 0.25
    # Connections older than this are sent GOAWAY, so long-lived clients re-resolve and reach new replicas;
    # calls open then get max_connection_age_grace_s to finish. None: connections live forever.
    max_connection_age_s: float | None = None
    max_connection_age_grace_s: float = 30.0
    batching: bool = True  # run pending pieces of many streams as one call
    max_batch: int = 256  # rows in one batched call; 0: every pending piece (up to max_streams). 256 was
    # 1.2-1.5x as fast as 64 at 256 streams of 16-character chunks in three runs, p99 lower (docs/benchmarks.md)
    max_wait_us: int = 200  # how long the oldest pending piece may wait for others to join
    max_wait_fraction: float = 0.5  # ...or this fraction of the previous call's time, if longer (batching.py)
    io_binding: str = "auto"  # keep recurrent state on the device between calls: auto (with CUDA), on, off
    worker_index: int = 0  # set by the supervisor for each of its workers
    reuse_port: bool = False  # share the port with this server's own workers (SO_REUSEPORT); set by the supervisor

    @property
    def store_io_timeout_s(self) -> float:
        """The longest one state-store call may hold its thread (Redis's socket timeout, a read, the probe):
        4 x --store-timeout, at least 1 s. Responses never wait this long (saver.py)."""
        return max(1.0, 4 * self.store_timeout_s)

    @property
    def batch_rows(self) -> int:
        """Rows of one batched call: --max-batch (0: every pending piece), never more than --max-streams."""
        return min(self.max_batch or self.max_streams, self.max_streams)

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both a certificate and a key")
        if self.engine not in ("auto", "sparse", "dense"):
            raise ValueError(f"--engine must be auto, sparse or dense, got {self.engine!r}")
        if self.io_binding not in ("auto", "on", "off"):
            raise ValueError(f"io_binding must be auto, on or off, got {self.io_binding!r}")
        for flag, value, high in (("--max-streams", self.max_streams, MAX_STREAMS),
                                  ("--max-chunk-chars", self.max_chunk_chars, MAX_CHUNK_CHARS)):
            if not 1 <= value <= high:
                raise ValueError(f"{flag} must be 1-{high:,}, got {value:,}")
        for flag, value, low in (("--idle-timeout", self.idle_timeout_s, "more than 0"),
                                 ("--grace", self.grace_s, "0 or more"),
                                 ("--store-timeout", self.store_timeout_s, "more than 0"),
                                 ("--max-connection-age-grace", self.max_connection_age_grace_s, "0 or more")):
            ok = math.isfinite(value) and (value >= 0 if low == "0 or more" else value > 0) and value <= MAX_SECONDS
            if not ok:
                raise ValueError(f"{flag} must be a number of seconds {low}, at most {MAX_SECONDS:,} "
                                 f"(24 days), got {value}")
        if not (math.isfinite(self.device_tolerance) and self.device_tolerance > 0):
            raise ValueError(f"--device-tolerance must be more than 0, got {self.device_tolerance}")
        if self.max_connection_age_s is not None and not (math.isfinite(self.max_connection_age_s)
                                                          and 0 < self.max_connection_age_s <= MAX_SECONDS):
            raise ValueError(f"--max-connection-age must be a number of seconds more than 0, at most "
                             f"{MAX_SECONDS:,} (24 days), got {self.max_connection_age_s}")
        if not 0 <= self.max_wait_us <= MAX_WAIT_US:
            raise ValueError(f"--max-wait-us must be 0-{MAX_WAIT_US:,}, got {self.max_wait_us:,}")
        if not 0 <= self.max_wait_fraction <= 1:
            raise ValueError(f"--max-wait-fraction must be between 0 and 1, got {self.max_wait_fraction}")
        if self.ort_threads is not None and not 1 <= self.ort_threads <= MAX_ORT_THREADS:
            raise ValueError(f"--ort-threads must be 1-{MAX_ORT_THREADS} (this machine has {os.cpu_count()} cores), "
                             f"got {self.ort_threads}")
        if not 1 <= self.persist_depth <= 32:
            raise ValueError(f"--persist-depth must be 1-32 (a live stream keeps 32), got {self.persist_depth}")
        if not 0 <= self.max_batch <= MAX_STREAMS:
            raise ValueError(f"--max-batch must be 0 (every pending piece, up to --max-streams) to {MAX_STREAMS:,}, "
                             f"got {self.max_batch:,}")
        if not 1 <= self.call_threads <= MAX_CALL_THREADS:
            raise ValueError(f"--call-threads must be 1-{MAX_CALL_THREADS}, got {self.call_threads:,}")
        if not 1 <= self.workers <= max_workers():
            raise ValueError(f"--workers must be 1-{max_workers()} (at most {WORKERS_PER_CORE} per core on this "
                             f"machine's {os.cpu_count()}: each worker is a whole server with its own model session), "
                             f"got {self.workers:,}")
        for name, port in (("--port", self.port), ("--metrics-port", self.metrics_port)):
            if port is not None and not 0 <= port <= 65535:
                raise ValueError(f"{name} {port} is not a port number (0-65535)")
        if self.port and self.metrics_port:  # worker i serves metrics on metrics_port + i
            if self.metrics_port <= self.port < self.metrics_port + self.workers:
                same = "both" if self.port == self.metrics_port else "overlapping: worker i's metrics are on " \
                    "--metrics-port + i, and one of them is"
                raise ValueError(f"--port and --metrics-port are {same} {self.port}; give them different ports")
        if self.metrics_port and self.metrics_port + self.workers - 1 > 65535:
            raise ValueError(f"--metrics-port {self.metrics_port} with --workers {self.workers}: worker i serves "
                             f"metrics on --metrics-port + i, past 65535")
