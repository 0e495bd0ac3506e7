"""An exported hmlstm model loaded into ONNX Runtime, with what its metadata says.

No TensorFlow and no onnx package here: the metadata is read through ONNX
Runtime's own model metadata, so the server starts with onnxruntime alone.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import numpy as np

from hmlstm import spec
from hmlstm.errors import first_line
from hmlstm.runtime import CPU, TENSORRT, Runtime, check_against_cpu, device_unavailable, make_session
from hmlstm.serving.metadata import read_metadata
from hmlstm.vocabulary import Vocabulary

ASSETS = Path(__file__).resolve().parents[1] / "assets"
DEFAULT_MODEL = ASSETS / "default.onnx"
ENGINES = ("auto",) + spec.ENGINES
# What --engine auto runs on a GPU. The sparse graph's data-dependent shapes (NonZero) may cost a
# device-to-host copy at every step on CUDA; benchmarks/gpu_bench.py measures both engines there, and
# until a GPU run shows the sparse one faster, auto keeps the dense graph on CUDA and TensorRT.
GPU_AUTO_ENGINE = "dense"


class ModelLoadError(Exception):
    """The file is missing, not ONNX, or not an exported hmlstm model."""


@dataclass(frozen=True)
class LoadedModel:
    path: Path
    runtime: Runtime
    vocab: Vocabulary
    config: dict
    provenance: dict
    state_map: dict[str, str]  # output name -> input name
    alignment: dict[int, str]  # boundary layer -> "end" (fires on a segment's last char) or "start" (next's first)
    engine: str = "dense"  # "sparse": layers >= 2 compute only their active rows (export/inference.py)
    lookahead: int = 0  # the boundaries at step t speak of character t - lookahead (spec.META_LOOKAHEAD)

    @property
    def num_layers(self) -> int:
        return len(self.config["num_units"])

    @property
    def units(self) -> list[int]:
        return list(self.config["num_units"])

    @property
    def boundary_layers(self) -> list[int]:
        """1-based layers with a boundary detector."""
        n = self.num_layers
        return list(range(1, n + 1)) if self.config.get("top_boundary") else list(range(1, n))

    @property
    def state_inputs(self) -> list[str]:
        return list(self.state_map.values())

    def zero_state(self, batch: int = 1) -> dict[str, np.ndarray]:
        state = {}
        for l, units in enumerate(self.units, start=1):
            for part in spec.STATE_PARTS:
                state[spec.state_input(part, l)] = np.zeros((batch, 1 if part == "z" else units), np.float32)
        return state

    def run(self, tokens: np.ndarray, lengths: np.ndarray, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One blocking ONNX Runtime call. tokens [B, T] with T >= 1; state inputs [B, ...]."""
        if tokens.shape[1] < 1:
            raise ValueError("time length 0 cannot run through the model's Loop")
        names = self._output_names
        feeds = {spec.TOKENS: tokens, spec.LENGTHS: lengths, **{k: np.asarray(v) for k, v in state.items()}}
        return dict(zip(names, self.runtime.cpu.run(self.runtime.session.run, names, feeds)))

    @cached_property
    def _output_names(self) -> list[str]:
        return [o.name for o in self.runtime.session.get_outputs()]


def load_model(path: str | Path | None = None, device: str = "auto", threads: int | None = None,
               spinning: bool | None = None, trt_cache: str | None = None, trt_fp16: bool = False,
               tolerance: float = 1e-4, engine: str = "auto") -> LoadedModel:
    """Load an exported model. On TensorRT, which export validation did not cover, its outputs are
    first checked against the CPU provider's (within ``tolerance``); a model that fails is refused.

    engine: which graph to run, "sparse" or "dense", from ``path`` or the companion file the export
    wrote beside it (``spec.engine_path``); "auto": sparse on the CPU, ``GPU_AUTO_ENGINE`` on a GPU,
    and whichever ``path`` holds where its companion is missing.
    """
    if engine not in ENGINES:
        raise ModelLoadError(f"--engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    path = Path(path) if path else DEFAULT_MODEL
    session_args = (device, threads, spinning, trt_cache, trt_fp16, tolerance)
    named = path
    path, named_meta = _graph_to_open(path, engine, device)  # from the files' metadata: one session, not two
    rt, meta = _open(path, *session_args)
    if path != named:  # the companion is the same model as the file named (its engine checked below)
        _check_companion(named, named_meta, path, meta)
    held = meta.get(spec.META_ENGINE, "dense")  # files written before the sparse graph are dense
    want = engine if engine != "auto" else "sparse" if rt.providers[0] == CPU else GPU_AUTO_ENGINE
    if want != held:  # the guess was wrong (a GPU provider that fell back to the CPU): the other graph after all
        other = spec.engine_path(named, want)
        if other != path and other.is_file():
            rt2, meta2 = _open(other, *session_args)
            _check_companion(path, meta, other, meta2, want)
            path, rt, meta, held = other, rt2, meta2, want
        elif engine != "auto":
            where = f"{other.name} is not beside it" if other != path else "it was exported before the sparse graph"
            raise ModelLoadError(f"--engine {engine}: {path} holds the {held} graph and {where}; "
                                 f"`hmlstm export {path} --out NEW.onnx` writes both")
    rt = replace(rt, note=f"{rt.note}, {held} engine")
    try:
        vocab = Vocabulary(json.loads(meta[spec.META_VOCAB]))
        config = json.loads(meta[spec.META_CONFIG])
        state_map = json.loads(meta[spec.META_STATE_MAP])
        provenance = json.loads(meta.get(spec.META_PROVENANCE, "{}"))
        alignment = {int(k): v for k, v in json.loads(meta.get(spec.META_ALIGNMENT, "{}")).items()}
        lookahead = int(json.loads(meta.get(spec.META_LOOKAHEAD, "0")))
        if lookahead < 0:
            raise ValueError(f"look-ahead {lookahead}")
    except (KeyError, ValueError, TypeError) as e:
        raise ModelLoadError(f"{path}: hmlstm metadata is incomplete or corrupt ({e})") from None
    n = len(config["num_units"])
    detectors = range(1, n + 1 if config.get("top_boundary") else n)
    alignment = {l: alignment.get(l, "end") for l in detectors}  # models exported before alignment: "end"
    return LoadedModel(path, rt, vocab, config, provenance, state_map, alignment, held, lookahead)


def _graph_to_open(path: Path, engine: str, device: str) -> tuple[Path, dict]:
    """The file whose graph will run, ``path`` or its companion holding the engine wanted (for "auto", the
    engine of the device the session will most likely land on), and ``path``'s metadata. Read from the
    files, without a session; anything unreadable here is left to _open to name."""
    try:
        meta = read_metadata(path)
    except (OSError, ValueError):
        return path, {}
    held = meta.get(spec.META_ENGINE, "dense")
    if engine == "auto":
        on_cpu = device == "cpu" or all(device_unavailable(d) for d in ("tensorrt", "cuda"))
        engine = "sparse" if on_cpu else GPU_AUTO_ENGINE
    other = spec.engine_path(path, engine)
    if engine == held or other == path or not other.is_file():
        return path, meta
    try:
        if read_metadata(other).get(spec.META_ENGINE, "dense") == engine:
            return other, meta
    except (OSError, ValueError):
        pass
    return path, meta


def _check_companion(path: Path, meta: dict, other: Path, meta2: dict, want: str | None = None) -> None:
    """``other`` must be the same model as ``path`` (config, vocabulary, provenance), holding ``want``."""
    same = all(meta2.get(k) == meta.get(k) for k in (spec.META_CONFIG, spec.META_VOCAB, spec.META_PROVENANCE))
    want = want or meta2.get(spec.META_ENGINE, "dense")
    if meta2.get(spec.META_ENGINE, "dense") != want or not same:
        raise ModelLoadError(f"{other} is not the {want} graph of {path.name} (another export or engine)")


def ort_cause(message: str, limit: int = 240) -> str:
    """ONNX Runtime's error without its wrapping: "[ONNXRuntimeError] : 1 : FAIL : Load model from X failed:"
    and the C++ source locations ("/onnxruntime_src/.../model.cc:181 onnxruntime::Model::Model(...)") go; the
    cause, which comes last ("Unsupported model IR version: 14, ..."), stays, its end kept where it is long."""
    text = re.sub(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*", "", message.strip())
    text = re.sub(r"^Load model from .*? failed:\s*", "", text)
    text = re.sub(r"\S+\.(?:cc|h|cpp):\d+\s+(?:\S+\(.*?\)\s*(?:const\s*)?)?", "", text).strip()
    if len(text) > limit:  # the cause is at the end: keep that, and say something was left out
        text = "... " + text[-limit:].split(" ", 1)[-1]
    return text or message[:limit]


def _open(path: Path, device, threads, spinning, trt_cache, trt_fp16, tolerance) -> tuple[Runtime, dict]:
    """A session on ``path`` and its metadata, or ModelLoadError in one line."""
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.onnx"))
        raise ModelLoadError(f"{path} is a folder; give the .onnx file" + (f" (it holds {', '.join(found[:3])})"
                                                                           if found else ""))
    if not path.exists():
        hint = " (the shipped default model is missing: reinstall the package)" if path == DEFAULT_MODEL else ""
        raise ModelLoadError(f"model file {path} does not exist{hint}")
    if not path.is_file():
        raise ModelLoadError(f"model {path} is not a regular file (a device or a pipe); give the .onnx file")
    try:
        rt = make_session(str(path), device, threads, spinning, trt_cache, trt_fp16)
        if rt.providers[0] == TENSORRT:
            check_against_cpu(rt, str(path), tolerance)
    except RuntimeError as e:
        raise ModelLoadError(str(e)) from None
    except Exception as e:  # ORT raises its own types for files that are not ONNX
        raise ModelLoadError(f"{path} is not a loadable ONNX model: {ort_cause(first_line(e))}") from None
    meta = rt.session.get_modelmeta().custom_metadata_map
    if meta.get(spec.META_FORMAT) != spec.FORMAT:
        raise ModelLoadError(
            f"{path} is an ONNX model but not an exported hmlstm model (metadata {spec.META_FORMAT!r} is "
            f"{meta.get(spec.META_FORMAT)!r}, expected {spec.FORMAT!r}); export one with `hmlstm export`")
    return rt, meta
