"""The exported model's interface: every input and output, by name, dtype and shape.

Pure Python (no TensorFlow, no ONNX): the server and the exporter both read
it. Shapes use the symbolic axes ``batch`` and ``time``; both are dynamic.

Inputs
  tokens        int32 [batch, time]   character ids (0 = unknown)
  lengths       int32 [batch]         steps row b advances, 0..time; rows past
                                      their length output zeros and keep state
  state_c{l}    float32 [batch, H_l]  layer l memory cell    (l = 1..L)
  state_h{l}    float32 [batch, H_l]  layer l hidden state
  state_z{l}    float32 [batch, 1]    layer l boundary at the previous step (0/1)

Outputs
  logits           float32 [batch, time, vocab]   next-character scores
  boundaries       float32 [batch, time, layers]  z of each layer at each step (0/1)
  boundary_logits  float32 [batch, time, layers]  s_z: z = 1 iff s_z > 0 (a margin)
  next_state_c{l}, next_state_h{l}, next_state_z{l}
                   the state after lengths[b] steps: feed it back as state_*{l}

Never send time = 0: ONNX Runtime cannot run a Loop with zero iterations.
"""

from __future__ import annotations

from dataclasses import dataclass

FORMAT = "hmlstm-stream/1"
TOKENS = "tokens"
LENGTHS = "lengths"
LOGITS = "logits"
BOUNDARIES = "boundaries"
BOUNDARY_LOGITS = "boundary_logits"
STATE_PARTS = ("c", "h", "z")

# Keys of the ONNX metadata_props; values are JSON text.
META_FORMAT = "hmlstm.format"
META_CONFIG = "hmlstm.model_config"
META_VOCAB = "hmlstm.vocabulary"
META_STATE_MAP = "hmlstm.state_map"
META_IO = "hmlstm.io"
META_VERSIONS = "hmlstm.versions"
META_PROVENANCE = "hmlstm.provenance"
# {"1": "start", "2": "end", ...} per layer with a boundary detector: "end" = z fires on a
# segment's last character (the paper's reading); "start" = on the next segment's first
# (a layer trained with --entropy-target, whose target is set one step after an entropy peak).
META_ALIGNMENT = "hmlstm.boundary_alignment"
# "K": the boundaries output at step t speak of character t-K (train --lookahead; "0" or absent: of
# character t). A reader holds a stream's last K characters undecided, and decides them at its end by
# running K more steps of LOOKAHEAD_PAD_ID.
META_LOOKAHEAD = "hmlstm.lookahead"
LOOKAHEAD_PAD_ID = 0  # the unknown character
# {"embedding": {"axis": 0, "parts": ["<initializer>"]}, "layer2/kernel": {"axis": 1, "parts": ["<gate
# columns>", "<boundary column>"]}, ..., "slope": 2.5}: where each weight lies in the file (its parts
# joined along the axis), so that an export can be exported again exactly (export/recover.py). Files
# written before it are recovered by shape, each candidate placement proven against the file.
META_WEIGHTS = "hmlstm.weights"
# "sparse": layers >= 2 compute only the rows that UPDATE or FLUSH at a step (export/inference.py);
# "dense": every row at every step. Absent in files written before the sparse graph: "dense".
META_ENGINE = "hmlstm.engine"


ENGINES = ("sparse", "dense")
MIN_OPSET, MAX_OPSET = 13, 18  # what tf2onnx 1.17 converts the loop to


def export_choice_error(engines: tuple[str, ...], opset: int) -> str:
    """Why an export cannot write these engines at this opset ("" if it can): checked by ExportConfig and,
    before TensorFlow is imported, by `hmlstm export`."""
    if not engines or len(set(engines)) != len(engines) or set(engines) - set(ENGINES):
        return f"engines must be some of {', '.join(ENGINES)}, each once, e.g. sparse,dense; got {engines}"
    if not MIN_OPSET <= opset <= MAX_OPSET:
        return (f"opset {opset} is outside {MIN_OPSET}-{MAX_OPSET} (tf2onnx 1.17 supports up to {MAX_OPSET}); "
                "pick one in that range")
    return ""


def _base(model_path):
    from pathlib import Path

    p = Path(model_path)
    stem = p.stem[: -len(".dense")] if p.stem.endswith(".dense") else p.stem
    return p, stem


def card_path(model_path):
    """The model card written beside an exported model: ``model.onnx`` (and its dense companion
    ``model.dense.onnx``) -> ``model.card.json``."""
    p, stem = _base(model_path)
    return p.with_name(stem + ".card.json")


def engine_path(model_path, engine: str):
    """Where an export keeps the graph of ``engine`` beside ``model_path``: the sparse graph in
    ``model.onnx``, the dense one in ``model.dense.onnx``."""
    p, stem = _base(model_path)
    return p.with_name(stem + (".dense" if engine == "dense" else "") + p.suffix)


def boundary_alignment(num_layers: int, top_boundary: bool, start_aligned: int) -> dict[str, str]:
    """Per layer with a detector: "start" for the ``start_aligned`` bottom layers (taught to fire on a
    unit's first character, see --entropy-target), "end" for the rest."""
    layers = range(1, num_layers + 1 if top_boundary else num_layers)
    return {str(l): "start" if l <= start_aligned else "end" for l in layers}


@dataclass(frozen=True)
class IOSpec:
    name: str
    dtype: str  # numpy dtype name
    shape: tuple[str | int, ...]
    doc: str

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "doc": self.doc}


def state_input(part: str, layer: int) -> str:
    return f"state_{part}{layer}"


def state_output(part: str, layer: int) -> str:
    return f"next_state_{part}{layer}"


def state_map(num_layers: int) -> dict[str, str]:
    """Which state output feeds which state input at the next call."""
    return {state_output(p, l): state_input(p, l)
            for l in range(1, num_layers + 1) for p in STATE_PARTS}


def io_spec(num_units: tuple[int, ...], vocab_size: int) -> tuple[list[IOSpec], list[IOSpec]]:
    n = len(num_units)
    inputs = [
        IOSpec(TOKENS, "int32", ("batch", "time"), "character ids, 0 = unknown"),
        IOSpec(LENGTHS, "int32", ("batch",), "steps each row advances (0..time)"),
    ]
    outputs = [
        IOSpec(LOGITS, "float32", ("batch", "time", vocab_size), "next-character scores"),
        IOSpec(BOUNDARIES, "float32", ("batch", "time", n), "z of each layer, 0/1"),
        IOSpec(BOUNDARY_LOGITS, "float32", ("batch", "time", n), "s_z; z = 1 iff s_z > 0"),
    ]
    docs = {"c": "memory cell", "h": "hidden state", "z": "boundary at the last step, 0/1"}
    for l, units in enumerate(num_units, start=1):
        for p in STATE_PARTS:
            size = 1 if p == "z" else units
            inputs.append(IOSpec(state_input(p, l), "float32", ("batch", size), f"layer {l} {docs[p]}"))
            outputs.append(IOSpec(state_output(p, l), "float32", ("batch", size),
                                  f"layer {l} {docs[p]} after lengths[b] steps"))
    return inputs, outputs
