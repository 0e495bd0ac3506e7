"""A Triton Inference Server model repository for an exported model.

``write_repository(model_path, repo)`` writes ``REPO/hmlstm/1/model.onnx`` and
``REPO/hmlstm/config.pbtxt``: the ONNX Runtime backend, dynamic batch and time
axes, and the sequence batcher with *implicit state*: every state input is
paired with the state output that feeds it at the next call (the model's own
state map), starts as zeros, and stays inside Triton between a sequence's
requests, so a client sends only tokens and lengths, and flags a sequence's first
and last request (sequence_start, sequence_end) as any Triton sequence client does. No TensorFlow and no
Triton package here: the config is protobuf text written from the model's
metadata (``hmlstm.spec``), and the tests parse it with Triton's own
``ModelConfig``.

What Triton gives and what it does not, against ``hmlstm serve``: docs/triton.md.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from hmlstm import spec

MODEL_NAME = "hmlstm"


def _dims(shape) -> str:
    """Triton dims without the batch axis; the time axis is variable (-1)."""
    return "[ " + ", ".join("-1" if d == "time" else str(d) for d in shape[1:]) + " ]"


INSTANCES = ("gpu", "cpu")


def config_text(meta: dict[str, str], name: str = MODEL_NAME, max_batch_size: int = 256,
                idle_us: int = 60_000_000, gpus: int = 1, instance: str = "gpu", max_sequences: int = 256,
                queue_delay_us: int = 200) -> str:
    """config.pbtxt for a model whose ONNX metadata is ``meta`` (key -> JSON text).

    The sequence batcher's ``oldest`` strategy: up to ``max_sequences`` sequences are candidates for a
    batch per instance (more wait in Triton's backlog until one ends or idles out), batches are formed
    from those with a request ready, preferring sizes up to ``max_batch_size``, waiting at most
    ``queue_delay_us`` for more. Unlike ``direct`` it needs no READY control input and never pads a
    batch with empty slots. instance: "gpu" (KIND_GPU on ``gpus`` devices) or "cpu" (KIND_CPU)."""
    if instance not in INSTANCES:
        raise ValueError(f"instance must be one of {INSTANCES}, not {instance!r}")
    if not 1 <= max_sequences or not 1 <= max_batch_size:
        raise ValueError("max_sequences and max_batch_size must be at least 1")
    io = json.loads(meta[spec.META_IO])
    state_map = json.loads(meta[spec.META_STATE_MAP])  # output -> input
    states_in = set(state_map.values())
    vocab = json.loads(meta[spec.META_VOCAB])
    lines = [f'name: "{name}"', 'backend: "onnxruntime"', f"max_batch_size: {max_batch_size}", ""]
    for s in io["inputs"]:
        if s["name"] in states_in:
            continue
        if s["name"] == spec.LENGTHS:  # [batch] in the model: one number per sequence
            lines += ["input [", "  {", f'    name: "{s["name"]}"', "    data_type: TYPE_INT32",
                      "    dims: [ 1 ]", "    reshape: { shape: [ ] }", "  }", "]"]
        else:
            lines += ["input [", "  {", f'    name: "{s["name"]}"', "    data_type: TYPE_INT32",
                      f"    dims: {_dims(s['shape'])}", "  }", "]"]
    for s in io["outputs"]:
        if s["name"] in state_map:
            continue
        lines += ["output [", "  {", f'    name: "{s["name"]}"', "    data_type: TYPE_FP32",
                  f"    dims: {_dims(s['shape'])}", "  }", "]"]
    preferred = [b for b in (32, 64, 128, 256, 512, 1024) if b < max_batch_size] + [max_batch_size]
    lines += ["", "sequence_batching {", f"  max_sequence_idle_microseconds: {idle_us}",
              "  oldest {", f"    max_candidate_sequences: {max_sequences}",
              f"    preferred_batch_size: [ {', '.join(map(str, preferred[-3:]))} ]",
              f"    max_queue_delay_microseconds: {queue_delay_us}", "  }"]
    # No control inputs: the model has no START/READY tensors, and with implicit state Triton itself
    # gives a sequence its initial (zero) state on the request flagged sequence_start.
    shapes = {s["name"]: s["shape"] for s in io["inputs"]}
    for out, inp in state_map.items():
        dims = _dims(shapes[inp])
        lines += ["  state {", f'    input_name: "{inp}"', f'    output_name: "{out}"', "    data_type: TYPE_FP32",
                  f"    dims: {dims}",
                  "    initial_state {", "      data_type: TYPE_FP32", f"      dims: {dims}",
                  "      zero_data: true", f'      name: "zero_{inp}"', "    }", "  }"]
    group = ("{ count: 1, kind: KIND_GPU, gpus: [ " + ", ".join(str(g) for g in range(gpus)) + " ] }"
             if instance == "gpu" else "{ count: 1, kind: KIND_CPU }")
    lines += ["}", "", f"instance_group [ {group} ]", ""]
    params = {"vocabulary": json.dumps(vocab, ensure_ascii=False),
              "boundary_alignment": meta.get(spec.META_ALIGNMENT, "{}"),
              "lookahead_chars": meta.get(spec.META_LOOKAHEAD, "0"),
              "state_map": meta[spec.META_STATE_MAP], "hmlstm_format": meta[spec.META_FORMAT]}
    for key, value in params.items():
        lines += ["parameters {", f'  key: "{key}"', f"  value: {{ string_value: {json.dumps(value)} }}", "}"]
    return "\n".join(lines) + "\n"


def read_metadata(model_path: Path) -> dict[str, str]:
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def write_repository(model_path: str | Path, repo: str | Path, name: str = MODEL_NAME, instance: str = "gpu",
                     max_sequences: int = 256) -> Path:
    """REPO/NAME/1/model.onnx and REPO/NAME/config.pbtxt; returns the config's path.

    The graph is the one ``hmlstm serve --engine auto`` would run on that device: the dense companion
    (``model.dense.onnx``) for a GPU instance, the sparse graph for a CPU one, where the export wrote both;
    else ``model_path`` itself."""
    model_path, repo = Path(model_path), Path(repo)
    if instance not in INSTANCES:
        raise ValueError(f"instance must be one of {INSTANCES}, not {instance!r}")
    for engine in ("dense", "sparse") if instance == "gpu" else ("sparse", "dense"):
        candidate = spec.engine_path(model_path, engine)
        if candidate.is_file() and read_metadata(candidate).get(spec.META_ENGINE, "dense") == engine:
            model_path = candidate
            break
    meta = read_metadata(model_path)
    if meta.get(spec.META_FORMAT) != spec.FORMAT:
        raise ValueError(f"{model_path} is not an exported hmlstm model")
    version = repo / name / "1"
    version.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_path, version / "model.onnx")
    config = repo / name / "config.pbtxt"
    config.write_text(config_text(meta, name, instance=instance, max_sequences=max_sequences), encoding="utf-8")
    return config
