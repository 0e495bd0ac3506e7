"""An exported model back to a training run directory, so a newer exporter can export it again.

An hmlstm ``.onnx`` file carries everything a run directory holds that export
needs: the model config, vocabulary and provenance in its metadata, and every
weight as an initializer. ``recover_run`` rebuilds the network from them and
proves the result equal to the file it came from (TensorFlow against ONNX
Runtime on real text) before it writes a checkpoint; a file whose weights it
cannot place unambiguously is refused, never guessed.

Weights are placed by shape, and where several weights share a shape (the
layers' biases, the per-layer output kernels) in the order tf2onnx names them,
which is the order the network uses them; layer 1's kernel may come in two
parts (the inference graph multiplies its input part before the loop). The
equality check is what makes that safe.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from hmlstm import spec
from hmlstm.errors import UserError, first_line
from hmlstm.model.config import ModelConfig, TrainConfig
from hmlstm.model.data import Vocabulary, source_of

TOLERANCE = 1e-4  # |TensorFlow - the file's own outputs| after recovery


def _initializers(model: onnx.ModelProto) -> list[tuple[str, np.ndarray]]:
    found = [(i.name, numpy_helper.to_array(i)) for i in model.graph.initializer]
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                found += [(i.name, numpy_helper.to_array(i)) for i in attr.g.initializer]
    return found


def _natural(name: str):
    import re

    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def network_weights(network) -> dict[str, object]:
    """Every weight of ``network`` by a stable key ("embedding", "layer2/kernel", ...), in use order."""
    weights = {"embedding": network.embedding, "gate_kernel": network.gate_kernel}
    weights.update({f"out_kernel{l}": v for l, v in enumerate(network.out_kernels, start=1)})
    weights.update({"logit_kernel": network.logit_kernel, "logit_bias": network.logit_bias})
    for l, cell in enumerate(network.cell.cells, start=1):
        weights[f"layer{l}/kernel"], weights[f"layer{l}/bias"] = cell.kernel, cell.bias
        if cell.ln is not None:
            weights[f"layer{l}/ln_gamma"], weights[f"layer{l}/ln_beta"] = cell.ln
    return weights


def _splits(key: str, shape: tuple[int, ...], embed: int, units: dict[str, int]) -> list[tuple[int, int]]:
    """(axis, at): where the exported graphs may cut a weight in two (besides not at all)."""
    layer, _, kind = key.partition("/")
    out = [(0, embed)] if key == "layer1/kernel" else []  # layer 1's input rows, multiplied before the loop
    if layer in units and kind in ("kernel", "bias") and shape[-1] == 4 * units[layer] + 1:
        out.append((len(shape) - 1, 4 * units[layer]))  # the sparse engine's gate and boundary columns
    return out


def weight_map(network, model: onnx.ModelProto) -> dict[str, object] | None:
    """Where each weight lies in the file, for its metadata (``spec.META_WEIGHTS``).

    Each weight maps to {"axis": a, "parts": [initializer names]}: the initializers that, joined
    along axis a, equal it bit for bit. One part, or two where a graph cuts the weight (layer 1's
    input rows, multiplied before the loop; a layer's gate and boundary columns in the sparse
    engine). Initializers equal in value are interchangeable, so matching by value is exact. None
    where some weight is not found (a graph that transforms weights). The boundary slope, which
    the graph folds into a threshold, is recorded by value ("slope").
    """
    by_shape: dict[tuple[int, ...], list[tuple[str, np.ndarray]]] = {}
    for name, arr in _initializers(model):
        by_shape.setdefault(arr.shape, []).append((name, arr))

    def find(value: np.ndarray) -> str | None:
        return next((n for n, a in by_shape.get(value.shape, []) if a.dtype == value.dtype
                     and np.array_equal(a, value)), None)

    embed = network.embedding.shape[1]
    units = {f"layer{l}": c.units for l, c in enumerate(network.cell.cells, start=1)}
    found: dict[str, object] = {}
    for key, var in network_weights(network).items():
        value = var.numpy()
        place = {"axis": 0, "parts": [find(value)]}
        for axis, at in ([] if place["parts"][0] else _splits(key, value.shape, embed, units)):
            parts = [find(p) for p in np.split(value, [at], axis=axis)]
            if None not in parts:
                place = {"axis": axis, "parts": parts}
                break
        if None in place["parts"]:
            return None
        found[key] = place
    return {**found, "slope": float(network.slope.numpy())}


def _candidates(network, model: onnx.ModelProto, limit: int = 256):
    """Assignments {weight key: array} for a file without a weight map, most likely first.

    Weights are placed by shape. Where several initializers share a shape (the layers' biases,
    the per-layer output kernels, layer 1's recurrent rows beside another layer's kernel) every
    ordering is a candidate, tf2onnx's naming order (which follows use order) first; the caller
    keeps the first candidate whose outputs equal the file's. Yields nothing when some shape has
    too few tensors.
    """
    import itertools

    pool: dict[tuple[int, ...], list[np.ndarray]] = {}
    for _, arr in sorted(_initializers(model), key=lambda x: _natural(x[0])):
        if arr.dtype == np.float32 and arr.ndim >= 1:
            pool.setdefault(arr.shape, []).append(arr)
    weights = network_weights(network)
    k1 = weights["layer1/kernel"]
    embed = network.embedding.shape[1]
    head, tail = (embed, k1.shape[1]), (k1.shape[0] - embed, k1.shape[1])
    splits: list[tuple[np.ndarray | None, dict]] = [(None, pool)]
    if len(pool.get(tuple(k1.shape), [])) < sum(tuple(v.shape) == tuple(k1.shape) for v in weights.values()):
        # The inference graph (inference.py) multiplies layer 1's input rows before the loop: its kernel
        # is two tensors, the recurrent rows possibly the same shape as another layer's kernel.
        splits = []
        for i, j in itertools.product(range(len(pool.get(head, []))), range(len(pool.get(tail, [])))):
            if head == tail and i == j:
                continue
            rest = {k: list(v) for k, v in pool.items()}
            joined = np.concatenate([pool[head][i], pool[tail][j]])
            rest[head] = [a for n, a in enumerate(pool[head]) if n != i]
            rest[tail] = [a for n, a in enumerate(rest[tail]) if n != (j if head != tail else j - (j > i))]
            splits.append((joined, rest))
    groups: dict[tuple[int, ...], list[str]] = {}
    for key, var in weights.items():
        groups.setdefault(tuple(var.shape), []).append(key)
    made = 0
    for joined, rest in splits:
        keys_k1 = ["layer1/kernel"] if joined is not None else []
        choices = []
        for shape, keys in groups.items():
            keys = [k for k in keys if k not in keys_k1]
            have = rest.get(shape, [])
            if len(have) < len(keys):
                choices = None
                break
            if keys:
                choices.append((keys, list(itertools.permutations(range(len(have)), len(keys)))))
        if choices is None:
            continue
        for picks in itertools.product(*(perms for _, perms in choices)):
            out = {"layer1/kernel": joined} if joined is not None else {}
            for (keys, _), pick in zip(choices, picks):
                shape = tuple(weights[keys[0]].shape)
                out.update({k: rest[shape][p] for k, p in zip(keys, pick)})
            yield out
            made += 1
            if made >= limit:
                return


def _slope(model: onnx.ModelProto) -> float:
    """The boundary slope of a file without a weight map: the one positive float scalar the time Loop
    takes in (tf2onnx passes captured values in as loop inputs), else 1.0. It scales s_z inside the
    boundary's hard sigmoid, so the forward pass depends on it only where |s_z| is within rounding of 0,
    and a slope that gives the same firing threshold gives the same outputs."""
    scalars = {name: float(a) for name, a in _initializers(model) if a.ndim == 0 and a.dtype == np.float32}
    loop = next((n for n in model.graph.node if n.op_type == "Loop"), None)
    captured = {scalars[i] for i in (loop.input[2:] if loop is not None else []) if scalars.get(i, 0) > 0}
    if len(captured) != 1:
        return 1.0
    value = captured.pop()
    # This exporter's graphs capture the firing threshold t = 2^-24 / a instead (inference.fire_threshold)
    return value if value > 1e-6 else 2.0**-24 / value


def _mapped(network, model: onnx.ModelProto, mapping: dict[str, object]) -> dict[str, np.ndarray]:
    arrays = dict(_initializers(model))
    weights = network_weights(network)
    places = {k: v for k, v in mapping.items() if k != "slope"}
    if set(places) != set(weights) or any(n not in arrays for p in places.values() for n in p["parts"]):
        raise UserError("cannot recover the weights: the file's weight map does not fit its model config "
                        "or names tensors the file lacks")
    out = {k: np.concatenate([arrays[n] for n in p["parts"]], axis=p["axis"]) for k, p in places.items()}
    bad = [k for k, v in out.items() if v.shape != tuple(weights[k].shape)]
    if bad:
        raise UserError(f"cannot recover the weights: the file's weight map gives {bad[0]} the wrong shape")
    return out


def assign(network, values: dict[str, np.ndarray]) -> None:
    for key, var in network_weights(network).items():
        var.assign(values[key])


def recover_run(model_path: str | Path, run_dir: str | Path, log=print) -> Path:
    """Write a run directory whose checkpoint holds ``model_path``'s weights; returns it."""
    import tensorflow as tf

    from hmlstm.export.functions import stream_function, tf_reference
    from hmlstm.export.validate import make_feeds, run_session
    from hmlstm.model.checkpoint import write_run_info
    from hmlstm.model.network import HMLSTMNetwork
    from hmlstm.runtime import make_session

    path = Path(model_path)
    try:
        model = onnx.load(str(path))
    except Exception as e:  # protobuf's DecodeError and friends: not an ONNX file
        first = first_line(e, 120)
        raise UserError(f"{path} is not an ONNX file ({first}); give an .onnx written by `hmlstm export` "
                        "or a training run directory") from None
    meta = {p.key: p.value for p in model.metadata_props}
    if meta.get(spec.META_FORMAT) != spec.FORMAT:
        raise UserError(f"{path} is not an exported hmlstm model (no {spec.META_FORMAT!r} metadata)")
    config = ModelConfig.from_dict(json.loads(meta[spec.META_CONFIG]))
    vocab = Vocabulary(json.loads(meta[spec.META_VOCAB]))
    provenance = json.loads(meta.get(spec.META_PROVENANCE, "{}"))
    train_d = dict(provenance.get("train_config") or {})
    train_d["rate_targets"] = tuple(train_d.get("rate_targets", ()))
    train = TrainConfig(**train_d)
    network = HMLSTMNetwork(config)

    network.slope.assign(_slope(model))
    try:
        session = make_session(str(path), "cpu").session
    except Exception as e:  # ORT's own error types, for a file whose graph is broken
        first = first_line(e, 200)
        raise UserError(f"cannot recover {path}: ONNX Runtime cannot load it ({first})") from None
    feeds = make_feeds(np.random.default_rng(0), config.num_units, config.vocab_size, 3, 200, None, False, False)
    expected = run_session(session, feeds)
    reference = tf_reference(stream_function(network), config.num_units)
    if spec.META_WEIGHTS in meta:  # written by this exporter: the exact place of every weight
        mapping = json.loads(meta[spec.META_WEIGHTS])
        network.slope.assign(float(mapping.get("slope", network.slope.numpy())))
        candidates = iter([_mapped(network, model, mapping)])
    else:  # an older export: by shape, each candidate proven below
        candidates = _candidates(network, model)
    tried, best = 0, float("inf")
    for values in candidates:
        tried += 1
        assign(network, values)
        got = reference(feeds)
        diff = max(float(np.abs(got[k] - expected[k]).max()) for k in expected)
        best = min(best, diff)
        if diff <= TOLERANCE:
            break
    else:
        if not tried:
            raise UserError(f"cannot recover the weights of {path}: it lacks tensors of the shapes its model "
                            "config needs; it was not written by this exporter's graph family")
        raise UserError(f"cannot recover {path}: no placement of its weights ({tried} tried) gives its outputs; "
                        f"the closest differs by {best:.3g} (> {TOLERANCE:g})")
    log(f"recovered the weights of {path.name}: max |TensorFlow - the file| {diff:.2g} on 3 x 200 steps")

    run_dir = Path(run_dir)
    write_run_info(run_dir, config, train, vocab, {
        "corpus": provenance.get("corpus") or "", "source": source_of(provenance),
        "corpus_sha256": provenance.get("corpus_sha256"), "held_out_chars": provenance.get("held_out_chars"),
        "strip_delimiters": provenance.get("strip_delimiters"),
        "command": provenance.get("command"), "created": provenance.get("created"), "preset": provenance.get("preset"),
        "recovered_from": f"{path.name}, {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}",
        "run": provenance.get("run"),  # the training run's name, which the export's provenance keeps
    })
    metrics = {"step": provenance.get("step"), "val_bpc": [[provenance.get("step"), provenance.get("val_bpc")]]}
    card = spec.card_path(path)  # the training-time scores, where the card is beside it
    if card.is_file():
        try:
            metrics["boundary"] = json.loads(card.read_text(encoding="utf-8"))["evaluation"]["boundaries"]
        except (ValueError, KeyError, TypeError):
            pass
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    ckpt = tf.train.Checkpoint(trainer=tf.train.Checkpoint(network=network))
    ckpt.save(str(run_dir / "ckpt" / "ckpt"))
    return run_dir
