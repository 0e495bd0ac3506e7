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
import threading
import time
from dataclasses import dataclass, field

import onnxruntime as ort

from hmlstm import spec
from hmlstm.capture import capture_fds

TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
DEVICES = ("auto", "tensorrt", "cuda", "cpu")


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
        """Runs on the GPU (CUDA, or TensorRT with CUDA beside it): state and outputs live on the device."""
        return self.providers[0] in (CUDA, TENSORRT)


def nvidia_driver_present() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


def _reason(log: str) -> str:
    """The cause in what ONNX Runtime printed while a provider failed: CUDA's own failure first (ORT prints
    "CUDA failure 100: no CUDA-capable device is detected ... cudaSetDevice" on stdout, then falls back to
    the CPU), else its first error line."""
    m = re.search(r"(CUDA failure \d+: [^\n\x1b;]+?)(?: ; GPU=| ; hostname=|\n|$)", log) \
        or re.search(r"(CUDA error[^\n\x1b]*)", log) \
        or re.search(r"error: ([^\n\x1b]+)", log) or re.search(r"\] ([^\n\x1b]+)", log)
    return m.group(1).strip()[:200] if m else "the session did not list it"


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


_preloaded: list[str] | None = None

# The sonames ONNX Runtime's CUDA and TensorRT providers need (their NEEDED entries, and cuDNN and
# nvJitLink, which cuBLAS and the provider open at run time), as the NVIDIA pip packages ship them.
NVIDIA_SONAMES = ("libcudart.so", "libnvJitLink.so", "libcublasLt.so", "libcublas.so", "libcurand.so",
                  "libcufft.so", "libnvrtc.so", "libcudnn.so", "libnvinfer.so", "libnvonnxparser.so")


def nvidia_library_dirs(paths=None) -> list[str]:
    """Every ``nvidia/*/lib`` (and ``tensorrt_libs``) folder under the import path: where the NVIDIA pip
    packages (nvidia-cublas, nvidia-cudnn, ..., CUDA 12's nvidia/<name>/lib or 13's nvidia/cu13/lib)
    put their libraries. With the kit installed by ``pip install --target DIR`` and DIR first on the
    path, the host interpreter's own site-packages are still on it, so the host's packages are found."""
    import glob
    import sys

    found = []
    for base in paths if paths is not None else sys.path:
        for d in sorted(glob.glob(os.path.join(base or ".", "nvidia", "*", "lib"))
                        + glob.glob(os.path.join(base or ".", "tensorrt_libs"))):
            if os.path.isdir(d) and d not in found:
                found.append(d)
    return found


def preload_nvidia(paths=None) -> list[str]:
    """Load the CUDA, cuDNN and TensorRT libraries from the NVIDIA pip packages by absolute path.

    ONNX Runtime's provider libraries name them by soname (libcublasLt.so.13, ...) and carry no
    RUNPATH, so the loader finds them only on its search path or already loaded: a library loaded by
    absolute path with RTLD_GLOBAL satisfies every later NEEDED entry with its soname. Libraries that
    need others are retried until nothing more loads. Returns one line per library: loaded, or why not.
    """
    candidates = []
    for d in nvidia_library_dirs(paths):
        for name in sorted(os.listdir(d)):
            stem = name.split(".so", 1)[0] + ".so"
            if stem in NVIDIA_SONAMES and re.fullmatch(r"[\w.+-]+\.so\.\d+", name):
                candidates.append(os.path.join(d, name))
    lines, pending = [], candidates
    while pending:
        failed = []
        for path in pending:
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                lines.append(f"loaded {path}")
            except OSError as e:
                failed.append((path, str(e)))
        if len(failed) == len(pending):
            lines += [f"not loaded {path}: {why}" for path, why in failed]
            break
        pending = [path for path, _ in failed]
    return lines


def _capture_fds(fn):
    """Run fn() with file descriptors 1 and 2 sent to one temp file; return (result, text)."""
    return capture_fds(fn, (1, 2))


def _preload_nvidia_libraries() -> list[str]:
    """With HMLSTM_ORT_PRELOAD_DLLS=1, before the first GPU session: the NVIDIA pip packages' libraries
    by absolute path (``preload_nvidia``), then ``onnxruntime.preload_dlls`` for what it finds beside
    itself. Returns what was done, what preload_dlls printed (on stdout and stderr) included."""
    global _preloaded
    if _preloaded is not None or os.environ.get("HMLSTM_ORT_PRELOAD_DLLS") != "1":
        return _preloaded or []
    lines = preload_nvidia()
    if hasattr(ort, "preload_dlls"):
        try:
            _, text = _capture_fds(ort.preload_dlls)
            lines += [f"onnxruntime.preload_dlls: {line}" for line in text.splitlines() if line.strip()]
        except Exception as e:  # the reason shows when the provider then fails to load
            lines.append(f"onnxruntime.preload_dlls failed: {e}")
    _preloaded = lines
    return lines


def tensorrt_libraries_present() -> bool:
    """TensorRT's runtime and its ONNX parser both load (the provider needs both)."""
    def loads(*names):
        for name in names:
            try:
                ctypes.CDLL(name)
                return True
            except OSError:
                pass
        return False

    return loads("libnvinfer.so.10", "libnvinfer.so.8", "libnvinfer.so") and \
        loads("libnvonnxparser.so.10", "libnvonnxparser.so.8", "libnvonnxparser.so")


def _gpu_unavailable(provider: str) -> str:
    """Why ``provider`` cannot be used here, or "" if it may be tried."""
    if provider not in ort.get_available_providers():
        return f"this onnxruntime build has no {provider.removesuffix('ExecutionProvider')} provider"
    if not nvidia_driver_present():
        return "no NVIDIA driver (libcuda.so.1 not found)"
    if provider == TENSORRT and not tensorrt_libraries_present():
        return "the TensorRT libraries (libnvinfer and libnvonnxparser) do not load"
    return ""


def device_unavailable(device: str) -> str:
    """Why ``device`` (tensorrt or cuda) cannot be used here, or "" if a session may try it: what can be known
    without building a session (the provider in this build, the driver, TensorRT's libraries)."""
    return _gpu_unavailable({"tensorrt": TENSORRT, "cuda": CUDA}[device])


def make_session(model: str | bytes, device: str = "auto", threads: int | None = None,
                 spinning: bool | None = None, trt_cache: str | None = None, trt_fp16: bool = False) -> Runtime:
    """Build one inference session.

    device: auto (TensorRT where its libraries load, else CUDA where it works, else the CPU), tensorrt or
    cuda (must work, or RuntimeError with the reason in one line), cpu. trt_cache: where TensorRT keeps
    the engines it builds (the first session builds them, which takes a while; later ones load them);
    trt_fp16: let TensorRT run in half precision (check the outputs: ``check_against_cpu``).
    """
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device != "cpu":
        _preload_nvidia_libraries()
    so = session_options(threads, spinning)
    before = _task_ids()

    def runtime(sess, note):
        return Runtime(sess, tuple(sess.get_providers()), note, ModelCpu(frozenset(_task_ids() - before)))

    whys = []
    if device in ("auto", "tensorrt"):
        why = _gpu_unavailable(TENSORRT)
        if not why:
            options = {"trt_fp16_enable": trt_fp16}
            if trt_cache:
                options.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(trt_cache))
            sess, log = _capture_fds(lambda: ort.InferenceSession(
                model, so, providers=[(TENSORRT, options), CUDA, CPU]))
            if sess.get_providers()[0] == TENSORRT:
                return runtime(sess, "ONNX Runtime on TensorRT" + (" (FP16 allowed)" if trt_fp16 else ""))
            why = f"TensorRT provider failed to load: {_reason(log)}"
        if device == "tensorrt":
            raise RuntimeError(f"--device tensorrt asked for, but {why}")
        whys.append(f"TensorRT not used: {why}")
    if device in ("auto", "cuda"):
        why = _gpu_unavailable(CUDA)
        if not why:
            sess, log = _capture_fds(lambda: ort.InferenceSession(model, so, providers=[CUDA, CPU]))
            if sess.get_providers()[0] == CUDA:
                return runtime(sess, "ONNX Runtime on CUDA" + (f" ({whys[0]})" if whys else ""))
            why = f"CUDA provider failed to load: {_reason(log)}"
        if device == "cuda":
            raise RuntimeError(f"--device cuda asked for, but {why}")
        whys.append(f"CUDA not used: {why}")
    sess = ort.InferenceSession(model, so, providers=[CPU])
    # One line: the reasons usually coincide (no driver), so say a shared reason once.
    reasons = [w.split(": ", 1)[1] for w in whys]
    if len(set(reasons)) == 1 and len(whys) > 1:
        detail = f"TensorRT and CUDA not used: {reasons[0]}"
    else:
        detail = "; ".join(whys)
    return runtime(sess, "ONNX Runtime on CPU" + (f" ({detail})" if detail else ""))


def check_against_cpu(runtime: Runtime, model: str | bytes, tolerance: float = 1e-4, steps: int = 64,
                      batch: int = 4, seed: int = 0) -> float:
    """Run ``runtime`` and the CPU provider on the same random inputs; RuntimeError if they differ.

    Boundaries must agree exactly, every other output within ``tolerance`` (absolute). Returns the
    largest difference. For a provider that validation at export did not cover (TensorRT, which fuses
    and may reorder or down-cast the loop body's work)."""
    import numpy as np

    cpu = ort.InferenceSession(model, session_options(1, False), providers=[CPU])
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in cpu.get_inputs():
        if i.name == spec.TOKENS:
            vocab = next(o.shape[2] for o in cpu.get_outputs() if o.name == spec.LOGITS)
            feeds[i.name] = rng.integers(0, vocab, (batch, steps)).astype(np.int32)
        elif i.name == spec.LENGTHS:
            feeds[i.name] = np.full(batch, steps, np.int32)
        else:  # a state input [batch, size]
            feeds[i.name] = np.zeros((batch, i.shape[1]), np.float32)
    names = [o.name for o in cpu.get_outputs()]
    want = dict(zip(names, cpu.run(names, feeds)))
    got = dict(zip(names, runtime.session.run(names, feeds)))
    worst, where = 0.0, ""
    for name in names:
        if name == spec.BOUNDARIES:
            if not np.array_equal(got[name], want[name]):
                flips = int((got[name] != want[name]).sum())
                raise RuntimeError(f"{runtime.providers[0]} disagrees with the CPU on {flips} boundary value(s) "
                                   f"of a {batch} x {steps} check; refusing to serve on it")
            continue
        d = float(np.abs(got[name] - want[name]).max())
        if d > worst:
            worst, where = d, name
    if not worst <= tolerance:
        raise RuntimeError(f"{runtime.providers[0]} differs from the CPU by up to {worst:.3g} on {where} "
                           f"(tolerance {tolerance:g}); refusing to serve on it")
    return worst
