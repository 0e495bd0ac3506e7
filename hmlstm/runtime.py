"""ONNX Runtime sessions: the CUDA execution provider where it really works, else CPU.

No TensorFlow here: the server imports this. ``onnxruntime.get_device()``
says GPU for the GPU wheel even without a GPU, and a failed CUDA provider
prints a stack of C++ errors, so we decide from facts: is there an NVIDIA
driver, and does the session we built list CUDAExecutionProvider? Anything
ORT prints while trying is captured and boiled down to one reason line.
"""

from __future__ import annotations

import ctypes
import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass, field

import onnxruntime as ort

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def _task_ids() -> set[int]:
    """This process's thread ids (Linux; empty elsewhere)."""
    try:
        return {int(t) for t in os.listdir("/proc/self/task")}
    except OSError:
        return set()


def _threads_cpu_seconds(tids) -> float:
    total = 0
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except OSError:  # the thread has ended
            pass
    return total / os.sysconf("SC_CLK_TCK")


class ModelCpu:
    """CPU seconds spent running the model: the calling threads inside ``session.run`` (``time.thread_time``)
    plus ONNX Runtime's own intra-op pool threads, which do nothing else. The pool threads are those
    the session created (ids seen before and after it was made; Linux only, elsewhere they are not
    counted). Read by the server's ``hmlstm_model_cpu_seconds_total`` and the serving benchmark."""

    def __init__(self, pool_threads: frozenset[int] = frozenset()):
        self.pool_threads = pool_threads
        self._calls = 0.0
        self._lock = threading.Lock()

    def run(self, fn, *args):
        t0 = time.thread_time()
        try:
            return fn(*args)
        finally:
            spent = time.thread_time() - t0
            with self._lock:
                self._calls += spent

    def seconds(self) -> float:
        return self._calls + _threads_cpu_seconds(self.pool_threads)


@dataclass(frozen=True)
class Runtime:
    session: ort.InferenceSession
    providers: tuple[str, ...]
    note: str  # one line: what runs where, and why CUDA is not used if it is not
    cpu: ModelCpu = field(default_factory=ModelCpu, compare=False)

    @property
    def on_cuda(self) -> bool:
        return self.providers[0] == CUDA


def nvidia_driver_present() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


def _capture_fd2(fn):
    """Run fn() with file descriptor 2 sent to a temp file; return (result, text)."""
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            result = fn()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        tmp.seek(0)
        return result, tmp.read().decode("utf-8", "replace")


def _reason(log: str) -> str:
    m = re.search(r"error: ([^\n\x1b]+)", log) or re.search(r"\] ([^\n\x1b]+)", log)
    return m.group(1).strip()[:160] if m else "the session did not list it"


def session_options(threads: int | None = None, spinning: bool | None = None) -> ort.SessionOptions:
    """threads: intra-op threads (None: ORT's default, one per core). spinning: whether idle
    worker threads spin waiting for work (None: ORT's default, on). Spinning lowers the latency
    of one small call but burns a core between the Loop's steps, which a server that also runs
    gRPC and Python on the same cores pays for (measured in docs/benchmarks.md)."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    if spinning is not None:
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return so


def make_session(model: str | bytes, device: str = "auto", threads: int | None = None,
                 spinning: bool | None = None) -> Runtime:
    """Build one inference session. device: auto (CUDA if it works), cuda (must work), cpu."""
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device must be auto, cuda or cpu, got {device!r}")
    so = session_options(threads, spinning)
    before = _task_ids()

    def runtime(sess, note):
        return Runtime(sess, tuple(sess.get_providers()), note, ModelCpu(frozenset(_task_ids() - before)))

    why = ""
    if device != "cpu":
        if CUDA not in ort.get_available_providers():
            why = "this onnxruntime build has no CUDA provider"
        elif not nvidia_driver_present():
            why = "no NVIDIA driver (libcuda.so.1 not found)"
        else:
            sess, log = _capture_fd2(
                lambda: ort.InferenceSession(model, so, providers=[CUDA, CPU]))
            if sess.get_providers()[0] == CUDA:
                return runtime(sess, "ONNX Runtime on CUDA")
            why = f"CUDA provider failed to load: {_reason(log)}"
        if device == "cuda":
            raise RuntimeError(f"--device cuda asked for, but {why}")
    sess = ort.InferenceSession(model, so, providers=[CPU])
    return runtime(sess, "ONNX Runtime on CPU" + (f" (CUDA not used: {why})" if why else ""))
