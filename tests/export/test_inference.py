"""The exported inference graph: same outputs as the training network, fewer nodes per step."""

import numpy as np
import onnx
import pytest

from hmlstm import spec
from hmlstm.export.convert import convert, stream_function, tf_reference
from hmlstm.export.passes import selects_to_where
from hmlstm.export.validate import make_feeds, run_session
from hmlstm.model.config import ModelConfig
from hmlstm.model.network import HMLSTMNetwork
from hmlstm.runtime import make_session


def _body(model: onnx.ModelProto) -> onnx.GraphProto:
    loop = next(n for n in model.graph.node if n.op_type == "Loop")
    return next(a.g for a in loop.attribute if a.name == "body")


@pytest.mark.parametrize("kw", [
    dict(num_units=(12, 10, 8), top_boundary=True, layer_norm=True),  # every branch: FLUSH/UPDATE/COPY, LN
    dict(num_units=(12, 10, 8)),  # a top layer without a detector (UPDATE/COPY only)
    dict(num_units=(9,)),  # one layer: no layer above, no layer below
])
def test_inference_graph_equals_the_training_network_with_fewer_nodes(kw):
    cfg = ModelConfig(vocab_size=23, embed_dim=6, output_dim=11, **kw)
    net = HMLSTMNetwork(cfg, seed=3)
    net.slope.assign(2.5)
    chars = [""] + [chr(ord("a") + i) for i in range(22)]
    fast = convert(net, chars, {}, optimized=True)
    plain = convert(net, chars, {}, optimized=False)
    assert len(_body(fast).node) < len(_body(plain).node)
    assert sum(n.op_type == "Loop" for n in fast.graph.node) == 1
    expected_fn = tf_reference(stream_function(net), cfg.num_units)
    session = make_session(fast.SerializeToString(), "cpu").session
    for batch, steps in ((1, 1), (5, 40)):
        feeds = make_feeds(np.random.default_rng(batch), cfg.num_units, cfg.vocab_size, batch, steps,
                           None, ragged=batch > 1, random_state=True)
        expected, got = expected_fn(feeds), run_session(session, feeds)
        np.testing.assert_array_equal(got[spec.BOUNDARIES], expected[spec.BOUNDARIES])
        for name in expected:
            np.testing.assert_allclose(got[name], expected[name], atol=2e-5, err_msg=name)


def test_selects_become_single_where_nodes(tiny_run):
    from hmlstm.model.checkpoint import load_network

    net, info = load_network(tiny_run)
    model = convert(net, info.vocab.chars, {})
    body = _body(model)
    ops = [n.op_type for n in body.node]
    assert "Where" in ops and "Not" not in ops  # tf2onnx's Cast/Not/Mul/Add selects are gone
    assert selects_to_where(model) == 0  # nothing left to rewrite


def test_an_export_exported_again_from_its_own_weights_gives_the_same_outputs(tiny_onnx, tmp_path):
    from hmlstm.export.convert import ExportConfig, export
    from hmlstm.export.recover import recover_run

    logs = []
    run = recover_run(tiny_onnx.path, tmp_path / "recovered", log=logs.append)
    assert "max |TensorFlow - the file|" in logs[0]
    again = export(run, tmp_path / "again.onnx", ExportConfig(times=(1, 7), batches=(1, 3)), log=lambda m: None)
    assert again.card["provenance"]["recovered_from"].startswith("tiny.onnx")
    assert again.card["provenance"]["command"] == tiny_onnx.card["provenance"]["command"]
    feeds = make_feeds(np.random.default_rng(0), (12, 10), again.card["vocabulary_size"], 3, 50, None, True, True)
    before = run_session(make_session(str(tiny_onnx.path), "cpu").session, feeds)
    after = run_session(make_session(str(again.path), "cpu").session, feeds)
    for name in before:
        np.testing.assert_allclose(after[name], before[name], atol=1e-5, err_msg=name)


def test_recovery_refuses_a_model_whose_weights_it_cannot_place(tiny_onnx, tmp_path):
    from hmlstm.errors import UserError
    from hmlstm.export.recover import recover_run

    model = onnx.load(str(tiny_onnx.path))
    emb = next(i for i in model.graph.initializer if len(i.dims) == 2 and i.dims[1] == 8)  # the embedding [V, 8]
    model.graph.initializer.remove(emb)
    broken = tmp_path / "broken.onnx"
    onnx.save(model, str(broken))
    with pytest.raises(UserError, match="cannot recover"):
        recover_run(broken, tmp_path / "run", log=lambda m: None)
