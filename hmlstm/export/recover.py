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
from hmlstm.errors import UserError
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


def assign_weights(network, model: onnx.ModelProto) -> None:
    """Copy the file's initializers into ``network``'s variables (UserError if ambiguous)."""
    pool: dict[tuple[int, ...], list[tuple[str, np.ndarray]]] = {}
    for name, arr in _initializers(model):
        if arr.dtype == np.float32 and arr.ndim >= 1:
            pool.setdefault(arr.shape, []).append((name, arr))
    for group in pool.values():
        group.sort(key=lambda x: _natural(x[0]))
    cells = network.cell.cells
    wanted = [network.embedding, network.gate_kernel, *network.out_kernels, network.logit_kernel,
              network.logit_bias]
    for cell in cells:
        wanted += [cell.kernel, cell.bias] + (list(cell.ln) if cell.ln is not None else [])
    by_shape: dict[tuple[int, ...], list] = {}
    for v in wanted:
        by_shape.setdefault(tuple(v.shape), []).append(v)
    k1 = cells[0].kernel
    embed = network.embedding.shape[1]
    head, tail = (embed, k1.shape[1]), (k1.shape[0] - embed, k1.shape[1])
    if not pool.get(tuple(k1.shape)) and len(pool.get(head, [])) == 1 and len(pool.get(tail, [])) == 1:
        # The inference graph (inference.py) splits layer 1's kernel into its input and recurrent parts.
        pool[tuple(k1.shape)] = [("layer1", np.concatenate([pool.pop(head)[0][1], pool.pop(tail)[0][1]]))]
    for shape, variables in by_shape.items():
        have = pool.get(shape, [])
        if len(have) != len(variables):
            raise UserError(f"cannot recover the weights: the model has {len(have)} tensor(s) of shape "
                            f"{list(shape)} where {len(variables)} are expected; it was not written by "
                            "this exporter's graph family")
        # Capture order follows use order: the loop's kernel/bias pairs, the output kernels by layer.
        for v, (_, arr) in zip(variables, have):
            v.assign(arr)


def recover_run(model_path: str | Path, run_dir: str | Path, log=print) -> Path:
    """Write a run directory whose checkpoint holds ``model_path``'s weights; returns it."""
    import tensorflow as tf

    from hmlstm.export.convert import stream_function, tf_reference
    from hmlstm.export.validate import make_feeds, run_session
    from hmlstm.model.checkpoint import write_run_info
    from hmlstm.model.network import HMLSTMNetwork
    from hmlstm.runtime import make_session

    path = Path(model_path)
    model = onnx.load(str(path))
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
    assign_weights(network, model)

    # The slope a scales s_z inside the boundary's hard sigmoid, so the forward pass depends only
    # on its sign; it is the loop's one captured float scalar (tf2onnx: "scan/while/input_N").
    slopes = [float(a) for name, a in _initializers(model)
              if a.ndim == 0 and a.dtype == np.float32 and "while/input" in name and float(a) > 0]
    network.slope.assign(slopes[0] if len(slopes) == 1 else 1.0)
    session = make_session(str(path), "cpu").session
    feeds = make_feeds(np.random.default_rng(0), config.num_units, config.vocab_size, 3, 200, None, False, False)
    expected = run_session(session, feeds)
    got = tf_reference(stream_function(network), config.num_units)(feeds)
    diff = max(float(np.abs(got[k] - expected[k]).max()) for k in expected)
    if not diff <= TOLERANCE:
        raise UserError(f"cannot recover {path}: the rebuilt network differs from the file by {diff:.3g} "
                        f"(> {TOLERANCE:g})")
    log(f"recovered the weights of {path.name}: max |TensorFlow - the file| {diff:.2g} on 3 x 200 steps")

    run_dir = Path(run_dir)
    write_run_info(run_dir, config, train, vocab, {
        "corpus": provenance.get("corpus") or "", "source": source_of(provenance),
        "corpus_sha256": provenance.get("corpus_sha256"), "held_out_chars": provenance.get("held_out_chars"),
        "strip_delimiters": provenance.get("strip_delimiters"),
        "command": provenance.get("command"), "created": provenance.get("created"),
        "recovered_from": f"{path.name}, {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}",
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
