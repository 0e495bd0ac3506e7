"""The sparse engine: layers >= 2 computed only on their active rows, checked against an independent NumPy
HM-LSTM, against the dense graph on real text with the shipped model, and for the pieces it is built from."""

import json

import numpy as np
import onnx
import pytest

from hmlstm import spec
from hmlstm.export.convert import convert, stream_function, tf_reference
from hmlstm.export.inference import fire_threshold
from hmlstm.export.passes import loop_body_nodes, optimize
from hmlstm.export.validate import active_rows, make_feeds, run_session
from hmlstm.model.config import ModelConfig
from hmlstm.model.network import HMLSTMNetwork
from hmlstm.runtime import make_session
from tests.model import reference

CHARS = [""] + [chr(ord("a") + i) for i in range(22)]


def _body_ops(model):
    loop = next(n for n in model.graph.node if n.op_type == "Loop")
    return [n.op_type for n in next(a.g for a in loop.attribute if a.name == "body").node]


def _numpy_network(net, feeds):
    """The whole network in NumPy, step by step with explicit COPY / UPDATE / FLUSH branches
    (tests/model/reference.py), rows past their length holding their state; returns boundaries
    [B, T, L] and the final state."""
    cells = net.cell.cells
    emb = net.embedding.numpy()
    tokens, lengths = feeds[spec.TOKENS], feeds[spec.LENGTHS]
    state = [[feeds[spec.state_input(p, l)].copy() for p in spec.STATE_PARTS] for l in range(1, len(cells) + 1)]
    batch, steps = tokens.shape
    zs = np.zeros((batch, steps, len(cells)), np.float32)
    for t in range(steps):
        live = (t < lengths)[:, None]
        h_below, z_below, new = emb[tokens[:, t]], np.ones((batch, 1), np.float32), []
        for l, cell in enumerate(cells):
            c, h, z = state[l]
            above = state[l + 1][1] if l + 1 < len(cells) else None
            ln = tuple(v.numpy() for v in cell.ln) if cell.ln is not None else None
            c2, h2, z2, _ = reference.step(cell.kernel.numpy(), cell.bias.numpy(), h_below, z_below, above,
                                           c, h, z, float(net.slope.numpy()), cell.has_boundary, ln)
            new.append([np.where(live, c2, c), np.where(live, h2, h), np.where(live, z2, z)])
            zs[:, t, l] = np.where(live[:, 0], z2[:, 0], 0.0)
            h_below, z_below = h2, z2
        state = new
    return zs, state


@pytest.mark.parametrize("kw", [
    dict(num_units=(12, 10, 8), top_boundary=True, layer_norm=True),  # FLUSH/UPDATE/COPY in every upper layer, LN
    dict(num_units=(12, 10, 8)),  # a top layer without a detector: UPDATE/COPY only
    dict(num_units=(9,)),  # one layer: nothing is sparse
])
def test_the_sparse_graph_is_the_hm_lstm_of_an_independent_numpy_reading(kw):
    cfg = ModelConfig(vocab_size=23, embed_dim=6, output_dim=11, **kw)
    net = HMLSTMNetwork(cfg, seed=5)
    net.slope.assign(2.5)
    model = convert(net, CHARS, {}, engine="sparse")
    if len(cfg.num_units) > 1:
        assert {"NonZero", "GatherND", "ScatterND"} <= set(_body_ops(model))
    session = make_session(model.SerializeToString(), "cpu").session
    for batch, steps, seed in ((1, 30, 0), (6, 25, 1), (4, 9, 2)):
        feeds = make_feeds(np.random.default_rng(seed), cfg.num_units, cfg.vocab_size, batch, steps, None,
                           ragged=batch > 1, random_state=True)
        if not net.cell.cells[-1].has_boundary:  # a layer without a detector never fired: its z is 0
            feeds[spec.state_input("z", len(cfg.num_units))][:] = 0.0
        if seed == 2:
            feeds[spec.LENGTHS][:] = 0  # no row runs: every gather of every step is empty
        got = run_session(session, feeds)
        zs, state = _numpy_network(net, feeds)
        np.testing.assert_array_equal(got[spec.BOUNDARIES], zs)
        for l, parts in enumerate(state, start=1):
            for part, want in zip(spec.STATE_PARTS, parts):
                np.testing.assert_allclose(got[spec.state_output(part, l)], want, atol=2e-5,
                                           err_msg=f"{part}{l} batch {batch}")


def test_sparse_and_dense_give_the_training_networks_outputs_and_only_the_sparse_one_gathers(tiny_run):
    from hmlstm.model.checkpoint import load_network

    net, info = load_network(tiny_run)
    models = {e: convert(net, info.vocab.chars, {}, engine=e) for e in ("sparse", "dense")}
    assert "NonZero" not in _body_ops(models["dense"])
    assert "NonZero" in _body_ops(models["sparse"])
    for m in models.values():
        assert json.loads(next(p.value for p in m.metadata_props if p.key == spec.META_WEIGHTS))["slope"] > 0
    expected_fn = tf_reference(stream_function(net), net.config.num_units)
    feeds = make_feeds(np.random.default_rng(0), net.config.num_units, net.config.vocab_size, 9, 60, None,
                       ragged=True, random_state=True)
    expected = expected_fn(feeds)
    for engine, m in models.items():
        got = run_session(make_session(m.SerializeToString(), "cpu").session, feeds)
        np.testing.assert_array_equal(got[spec.BOUNDARIES], expected[spec.BOUNDARIES], err_msg=engine)
        for name in expected:
            np.testing.assert_allclose(got[name], expected[name], atol=2e-5, err_msg=f"{engine} {name}")


@pytest.mark.parametrize("slope", [1.0, 1.76, 2.5, 5.0, 0.3])
def test_the_fire_threshold_is_the_training_graphs_rounding_exactly(slope):
    """z = round(clip((a s + 1) / 2, 0, 1)) in float32 (tf.round: half to even) against s > t, on every
    float32 within 2000 ulps of t and on a spread of magnitudes."""
    t = fire_threshold(slope)
    a = np.float32(slope)
    bits = t.view(np.int32) + np.arange(-2000, 2000, dtype=np.int32)
    near = bits.view(np.float32)
    rng = np.random.default_rng(0)
    spread = np.concatenate([rng.standard_normal(20000) * 10.0 ** rng.integers(-12, 2, 20000)]).astype(np.float32)
    for s in (near, spread, -near, np.float32([0.0, -0.0, 1e-45, np.inf, -np.inf])):
        z = np.round(np.clip((a * s + np.float32(1.0)) * np.float32(0.5), np.float32(0), np.float32(1)))
        np.testing.assert_array_equal(z == 1.0, s > t)


def test_graph_passes_cut_loop_nodes_and_keep_every_output_bit_for_bit(tiny_run):
    import tf2onnx

    from hmlstm.export.convert import tf_signature
    from hmlstm.export.inference import inference_function
    from hmlstm.model.checkpoint import load_network

    net, _ = load_network(tiny_run)
    raw, _ = tf2onnx.convert.from_function(inference_function(net, "sparse"), opset=17,
                                           input_signature=tf_signature(net.config.num_units, net.config.vocab_size))
    raw.ir_version = onnx.helper.find_min_ir_version_for(list(raw.opset_import))
    passed = onnx.ModelProto()
    passed.CopyFrom(raw)
    done = optimize(passed)
    # Every structural pass finds something in a fresh conversion. How many Identity nodes tf2onnx leaves
    # depends on what the process traced before (0 to 3 seen, fewer with op determinism on), so that pass is
    # held to what it leaves behind instead, and proven on a graph of its own below.
    assert all(v for k, v in done.items() if k != "identities"), done
    assert loop_body_nodes(passed) <= loop_body_nodes(raw) - 10
    assert not _removable_identities(passed)
    feeds = make_feeds(np.random.default_rng(3), net.config.num_units, net.config.vocab_size, 5, 40, None,
                       ragged=True, random_state=True)
    before = run_session(make_session(raw.SerializeToString(), "cpu").session, feeds)
    after = run_session(make_session(passed.SerializeToString(), "cpu").session, feeds)
    assert set(before) == set(after)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)


def _removable_identities(model) -> list[str]:
    """Identity nodes left in a Loop body that drop_identities should have removed: all but those that give
    a body output a second name for a body input or for another body output."""
    left = []
    for node in model.graph.node:
        if node.op_type != "Loop":
            continue
        body = next(a.g for a in node.attribute if a.name == "body")
        outputs = {o.name for o in body.output}
        produced = {o for n in body.node for o in n.output}
        left += [n.name for n in body.node if n.op_type == "Identity" and
                 (n.output[0] not in outputs or (n.input[0] in produced and n.input[0] not in outputs))]
    return left


def test_dropping_identities_keeps_those_that_name_a_value_twice_and_the_outputs_bit_for_bit():
    """A Loop body with each kind of Identity: one read by another node (readers read its input), one that
    names a body output for a value no output has (the producer writes the output's name), and two that must
    stay (the loop condition passed through, a carried state also stacked)."""
    from onnx import TensorProto, helper

    from hmlstm.export.passes import drop_identities

    f = TensorProto.FLOAT
    body = helper.make_graph(
        [helper.make_node("Add", ["x_in", "one"], ["a"]),
         helper.make_node("Identity", ["a"], ["a_id"], name="read"),
         helper.make_node("Mul", ["a_id", "two"], ["b"]),
         helper.make_node("Identity", ["b"], ["x_out"], name="renamed"),
         helper.make_node("Identity", ["cond_in"], ["cond_out"], name="condition"),
         helper.make_node("Identity", ["x_out"], ["stacked"], name="stacked")],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x_in", f, [2])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x_out", f, [2]),
         helper.make_tensor_value_info("stacked", f, [2])],
        initializer=[helper.make_tensor("one", f, [], [1.0]), helper.make_tensor("two", f, [], [2.0])])
    graph = helper.make_graph(
        [helper.make_node("Loop", ["n", "cond", "x"], ["x_final", "xs"], body=body)], "g",
        [helper.make_tensor_value_info("n", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x", f, [2])],
        [helper.make_tensor_value_info("x_final", f, [2]), helper.make_tensor_value_info("xs", f, [None, 2])])
    raw = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    raw.ir_version = 8
    onnx.checker.check_model(raw, full_check=True)
    passed = onnx.ModelProto()
    passed.CopyFrom(raw)
    assert drop_identities(passed) == 2
    onnx.checker.check_model(passed, full_check=True)
    assert _removable_identities(raw) == ["read", "renamed"] and not _removable_identities(passed)
    assert sorted(n.name for n in passed.graph.node[0].attribute[0].g.node if n.op_type == "Identity") == \
        ["condition", "stacked"]
    feeds = {"n": np.array(4, np.int64), "cond": np.array(True), "x": np.array([0.5, -3.0], np.float32)}
    before = run_session(make_session(raw.SerializeToString(), "cpu").session, feeds)
    after = run_session(make_session(passed.SerializeToString(), "cpu").session, feeds)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    np.testing.assert_array_equal(after["x_final"], [((((0.5 + 1) * 2 + 1) * 2 + 1) * 2 + 1) * 2,
                                                     ((((-3.0 + 1) * 2 + 1) * 2 + 1) * 2 + 1) * 2])


def test_active_rows_follow_the_cases():
    """Layer 2 is active where it fired at t-1 (the state's z at t = 0) or layer 1 fired at t, while the row runs."""
    z = np.zeros((2, 4, 3), np.float32)
    z[0, 1, 0] = 1  # row 0: layer 1 fires at t=1 -> layer 2 UPDATEs at t=1
    z[0, 2, 1] = 1  # row 0: layer 2 fires at t=2 -> FLUSH at t=3
    feeds = {spec.LENGTHS: np.array([4, 2], np.int32)}
    for l in (1, 2, 3):
        feeds[spec.state_input("z", l)] = np.array([[0.0], [1.0 if l == 2 else 0.0]], np.float32)  # row 1 FLUSHes at 0
    active, live = active_rows(feeds, {spec.BOUNDARIES: z})
    assert active[0].tolist() == [[False, True, False, True], [True, False, False, False]]
    assert active[1].tolist() == [[False, False, True, False], [False, False, False, False]]
    assert live.tolist() == [[True] * 4, [True, True, False, False]]


def test_the_shipped_sparse_and_dense_graphs_give_the_same_boundaries_on_held_out_text():
    """The shipped model's two graphs over the built-in held-out text (170,808 characters), as 64 streams fed
    ragged chunks of 1-32 characters the way the server batches them: every boundary equal, h, c and logits
    within the export's validation tolerance. benchmarks/sparse_bench.py does the same on Tiny Shakespeare."""
    from benchmarks.sparse_bench import Engine, exactness, ort_engine
    from hmlstm.model.data import load_corpus
    from hmlstm.serving.model import DEFAULT_MODEL
    from hmlstm.vocabulary import Vocabulary

    card = json.loads(spec.card_path(DEFAULT_MODEL).read_text())
    assert card["engine"] == "sparse" and card["engines"]["dense"]["file"] == "default.dense.onnx"
    assert card["engines"]["sparse"]["loop_body_nodes"] <= 90 and card["engines"]["dense"]["loop_body_nodes"] <= 75
    meta = {p.key: p.value for p in onnx.load(str(DEFAULT_MODEL)).metadata_props}
    assert meta[spec.META_ENGINE] == "sparse"
    corpus = load_corpus("builtin", strip=card["provenance"]["strip_delimiters"])
    ids = np.array(Vocabulary(json.loads(meta[spec.META_VOCAB])).encode(corpus.text[corpus.held_out_start(0.1):]))
    assert len(ids) > 170_000
    sparse = ort_engine("sparse", DEFAULT_MODEL, threads=1)
    dense = ort_engine("dense", spec.engine_path(DEFAULT_MODEL, "dense"), threads=1)
    assert isinstance(sparse, Engine)
    result = exactness(sparse, dense, ids, card["model_config"]["num_units"])
    assert result["differences"] == 0, result
    assert result["logits"] <= 1e-4 and result["state"] <= 1e-4 and result["s_z"] <= 1e-4, result
