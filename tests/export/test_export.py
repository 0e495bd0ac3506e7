import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from hmlstm import spec
from hmlstm.errors import UserError
from hmlstm.export.convert import (
    ExportConfig,
    export,
    read_metadata,
    stream_function,
    tf_float_spread,
    tf_reference,
)
from hmlstm.export.validate import (
    BoundaryMismatchError,
    DtypeMismatchError,
    NameMismatchError,
    ShapeMismatchError,
    StructureError,
    ValidationReport,
    ValueMismatchError,
    check_interface,
    check_streaming,
    check_structure,
    compare,
    make_feeds,
    run_session,
    validate,
)
from hmlstm.model.checkpoint import load_network
from hmlstm.model.config import TrainConfig
from hmlstm.model.data import synthetic_corpus
from hmlstm.runtime import make_session
from tests.conftest import TINY_MODEL

UNITS = TINY_MODEL["num_units"]
V = len(set(synthetic_corpus(seed=0, n_chars=8000).text)) + 1  # the tiny run's vocabulary, with unknown


@pytest.fixture(scope="module")
def model(tiny_onnx):
    return onnx.load(str(tiny_onnx.path))


@pytest.fixture(scope="module")
def session(tiny_onnx):
    return make_session(str(tiny_onnx.path), "cpu").session


@pytest.fixture(scope="module")
def reference(tiny_run):
    net, _ = load_network(tiny_run)
    return tf_reference(stream_function(net), UNITS), net


@pytest.fixture(scope="module")
def spread(reference):
    net = reference[1]
    return tf_float_spread(net, stream_function(net), UNITS)


def test_export_keeps_one_loop_and_validates_on_the_full_grid(tiny_onnx, model):
    card = tiny_onnx.card
    v = card["validation"]
    assert v["loops"] == 1
    assert v["cases"] == [f"batch {b} x time {t}" for t in (1, 7, 333, 5000) for b in (1, 3, 17)] + [
        "batch 3 x time 7, no row runs", "batch 5 x time 9, every row FLUSHes first"]
    assert v["providers"] == ["CPUExecutionProvider sparse", "CPUExecutionProvider dense"]
    assert v["activity"]["layer2"]["none_active"] > 0 and 0 < v["activity"]["layer2"]["active_fraction"] < 1
    assert v["tolerance"] == 1e-4 and all(d <= 1e-4 for d in v["max_abs_diff"].values())
    assert v["streaming_chunks"] == [1, 3, 64] * 2  # each engine
    assert sum(n.op_type == "Loop" for n in model.graph.node) == 1


@pytest.mark.parametrize("engine", ["sparse", "dense"])
def test_the_written_files_match_tensorflow_checked_here_not_by_the_exporter(tiny_onnx, reference, engine):
    """What the card above records, checked independently: the files on disk, run by a fresh ONNX Runtime
    session, against TensorFlow, from a random (non-zero) state over 60 steps of 4 streams."""
    from hmlstm.export.validate import make_feeds, run_session

    path = spec.engine_path(tiny_onnx.path, engine)
    m = onnx.load(str(path))
    assert [n.op_type for n in m.graph.node].count("Loop") == 1
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = make_feeds(np.random.default_rng(11), UNITS, V, 4, 60, None, ragged=False, random_state=True)
    expected, actual = reference[0](feeds), run_session(sess, feeds)
    assert set(actual) == set(expected)
    for name, want in expected.items():
        np.testing.assert_allclose(actual[name], want, atol=1e-4, rtol=0, err_msg=name)


def test_the_loop_stacks_only_what_the_graph_reads(model):
    from hmlstm.export.passes import prune_unused_scan_outputs

    loop = next(n for n in model.graph.node if n.op_type == "Loop")
    read = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    scan_outputs = loop.output[len(loop.input) - 2 :]
    assert scan_outputs and all(o in read for o in scan_outputs)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    assert prune_unused_scan_outputs(copy) == 0  # already pruned at export


def test_model_size_does_not_depend_on_sequence_length(model, session):
    tokens = next(i for i in model.graph.input if i.name == spec.TOKENS)
    assert [d.dim_param for d in tokens.type.tensor_type.shape.dim] == ["batch", "time"]
    # The same file runs any length.
    for t in (2, 900):
        feeds = make_feeds(np.random.default_rng(0), UNITS, V, 2, t, None, False, False)
        assert run_session(session, feeds)[spec.LOGITS].shape[1] == t


def test_metadata_round_trip(tiny_onnx, tiny_run, model):
    meta = read_metadata(model)
    net, info = load_network(tiny_run)
    assert meta[spec.META_FORMAT] == spec.FORMAT
    assert meta[spec.META_CONFIG] == info.model.to_dict()
    assert meta[spec.META_VOCAB] == info.vocab.chars
    assert meta[spec.META_STATE_MAP] == {f"next_state_{p}{l}": f"state_{p}{l}" for l in (1, 2) for p in "chz"}
    assert meta[spec.META_VERSIONS]["opset"] == 17
    assert meta[spec.META_PROVENANCE]["corpus"].startswith("synthetic")
    assert {o["name"] for o in meta[spec.META_IO]["outputs"]} == {o.name for o in model.graph.output}
    # ONNX Runtime sees the same metadata, which is how the server reads it.
    rt_meta = ort.InferenceSession(str(tiny_onnx.path)).get_modelmeta().custom_metadata_map
    assert json.loads(rt_meta[spec.META_VOCAB]) == info.vocab.chars
    card = json.loads(tiny_onnx.card_path.read_text())
    assert card["model_config"] == info.model.to_dict() and card["validation"]["loops"] == 1
    assert meta[spec.META_ALIGNMENT] == card["boundary_alignment"] == {"1": "end"}  # no entropy target, no top z


def test_boundary_alignment_follows_the_training_that_set_it():
    assert spec.boundary_alignment(3, True, 1) == {"1": "start", "2": "end", "3": "end"}
    assert spec.boundary_alignment(3, False, 0) == {"1": "end", "2": "end"}
    assert spec.boundary_alignment(3, True, 2) == {"1": "start", "2": "start", "3": "end"}
    assert TrainConfig(entropy_target=1.0).target_fractions == (1.0,)
    assert TrainConfig(entropy_target=1.0, peak_fractions=(0.7, 0.25)).target_fractions == (0.7, 0.25)
    assert TrainConfig(peak_fractions=(0.7, 0.25)).target_fractions == ()  # no weight, no target


def test_chunked_runs_equal_one_full_run(session):
    report = ValidationReport()
    ids = np.random.default_rng(3).integers(0, V, 150).astype(np.int32)
    check_streaming(session, UNITS, V, ids, (1, 3, 64, 150), 1e-5, report)
    assert report.streaming_chunks == [1, 3, 64, 150] and report.streaming_max_abs_diff <= 1e-5


def test_ragged_batch_rows_equal_rows_run_alone(session):
    rng = np.random.default_rng(5)
    feeds = make_feeds(rng, UNITS, V, 3, 9, None, True, True)
    feeds[spec.LENGTHS] = np.array([9, 4, 0], np.int32)
    out = run_session(session, feeds)
    alone = {k: v[1:2] for k, v in feeds.items()}
    alone[spec.TOKENS] = feeds[spec.TOKENS][1:2, :4]
    alone[spec.LENGTHS] = np.array([4], np.int32)
    one = run_session(session, alone)
    np.testing.assert_allclose(out[spec.LOGITS][1, :4], one[spec.LOGITS][0], atol=1e-6)
    np.testing.assert_array_equal(out[spec.LOGITS][1, 4:], 0.0)
    for l in (1, 2):
        np.testing.assert_allclose(out[f"next_state_c{l}"][1], one[f"next_state_c{l}"][0], atol=1e-6)
        np.testing.assert_array_equal(out[f"next_state_h{l}"][2], feeds[f"state_h{l}"][2])  # length 0


# ------------------------------------------------ broken models fail with the right error


def _session(m):
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("shift", [0.05, 1e-4])
def test_perturbed_weights_fail_on_values(model, reference, spread, shift):
    """A wrong weight is not explained away by TensorFlow's float32 spread, even a small one."""
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    big = max(broken.graph.initializer, key=lambda t: np.prod(t.dims))
    arr = onnx.numpy_helper.to_array(big).copy()
    arr += shift
    big.CopyFrom(onnx.numpy_helper.from_array(arr, big.name))
    with pytest.raises((ValueMismatchError, BoundaryMismatchError)) as e:
        validate(broken, {"cpu": _session(broken)}, reference[0], UNITS, V, times=(7, 333), batches=(3,),
                 tolerance=1e-6 if shift < 1e-3 else 1e-4, spread=spread)
    if isinstance(e.value, ValueMismatchError):
        assert e.value.max_abs_diff > e.value.tolerance and e.value.output in {o.name for o in model.graph.output}


def test_float_spread_is_seeded_nonzero_and_restores_the_weights(reference, spread):
    fn, net = reference
    before = [v.numpy().copy() for v in net.trainable_variables]
    feeds = make_feeds(np.random.default_rng(3), UNITS, V, 3, 50, None, ragged=True, random_state=True)
    expected = fn(feeds)
    first, second = spread(feeds, expected), spread(feeds, expected)
    assert all(np.array_equal(w, v.numpy()) for w, v in zip(before, net.trainable_variables))
    assert set(first) == set(expected)
    assert all(np.array_equal(first[k], second[k]) for k in first)
    assert 0 < first[spec.LOGITS].max() < 1e-4  # one ulp of the weights: float noise, not a different model
    assert np.array_equal(fn(feeds)[spec.LOGITS], expected[spec.LOGITS])


def test_renamed_output_fails_on_names(model, session):
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    old = broken.graph.output[0].name
    for node in broken.graph.node:
        node.output[:] = ["renamed" if o == old else o for o in node.output]
        node.input[:] = ["renamed" if i == old else i for i in node.input]
    broken.graph.output[0].name = "renamed"
    ins, outs = spec.io_spec(UNITS, V)
    with pytest.raises(NameMismatchError, match="renamed"):
        check_interface(_session(broken), ins, outs)


def test_wrong_dtype_and_shape_are_named(session):
    ins, outs = spec.io_spec(UNITS, V)
    bad_dtype = [spec.IOSpec(s.name, "int64" if s.name == spec.TOKENS else s.dtype, s.shape, s.doc) for s in ins]
    with pytest.raises(DtypeMismatchError, match="tokens"):
        check_interface(session, bad_dtype, outs)
    bad_shape = [spec.IOSpec(s.name, s.dtype, ("batch", 99), s.doc) if s.name == "state_c1" else s for s in ins]
    with pytest.raises(ShapeMismatchError, match="state_c1"):
        check_interface(session, bad_shape, outs)


def test_fixed_time_axis_fails_structure(model):
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    tokens = next(i for i in broken.graph.input if i.name == spec.TOKENS)
    tokens.type.tensor_type.shape.dim[1].dim_value = 100
    with pytest.raises(StructureError, match="fixed axis"):
        check_structure(broken)


def test_model_without_a_loop_fails_structure():
    h = onnx.helper
    graph = h.make_graph([h.make_node("Identity", ["tokens"], ["y"])], "unrolled",
                         [h.make_tensor_value_info("tokens", onnx.TensorProto.INT32, ["batch", "time"])],
                         [h.make_tensor_value_info("y", onnx.TensorProto.INT32, ["batch", "time"])])
    m = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=8)
    with pytest.raises(StructureError, match=r"exactly one top-level Loop \(the time loop\), found 0"):
        check_structure(m)


def test_invalid_graph_fails_the_checker(model):
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    broken.graph.node[0].input[0] = "no_such_tensor"
    with pytest.raises(StructureError, match="checker"):
        check_structure(broken)


def _case(flip_s_z):
    shape = (2, 5, 2)
    s_z = np.full(shape, 2.0, np.float32)
    s_z[1, 2, 0] = flip_s_z
    e = {spec.BOUNDARIES: (s_z > 0).astype(np.float32), spec.BOUNDARY_LOGITS: s_z,
         spec.LOGITS: np.zeros((2, 5, 3), np.float32), "next_state_c1": np.zeros((2, 4), np.float32)}
    a = {k: v.copy() for k, v in e.items()}
    a[spec.BOUNDARIES][1, 2, 0] = 1 - a[spec.BOUNDARIES][1, 2, 0]
    a[spec.LOGITS][1, 3:] = 7.0  # the row diverges after the flip
    a["next_state_c1"][1] = 7.0
    return e, a


def test_boundary_flip_near_threshold_is_explained_and_reported():
    e, a = _case(3e-7)
    report = ValidationReport()
    compare(e, a, np.array([5, 5]), 1e-4, 1e-4, "toy", report)
    assert report.boundary_flips_explained == [
        {"case": "toy", "row": 1, "step": 2, "layer": 1, "s_z": pytest.approx(3e-7)}]


def test_boundary_flip_far_from_threshold_fails():
    e, a = _case(0.5)
    with pytest.raises(BoundaryMismatchError, match=r"\(1, 2, 0\)"):
        compare(e, a, np.array([5, 5]), 1e-4, 1e-4, "toy", ValidationReport())


def test_value_mismatch_says_which_output_and_by_how_much():
    e, a = _case(3e-7)
    a[spec.LOGITS][0, 0, 0] = 0.25
    with pytest.raises(ValueMismatchError) as err:
        compare(e, a, np.array([5, 5]), 1e-4, 1e-4, "toy", ValidationReport())
    assert err.value.output == spec.LOGITS and err.value.max_abs_diff == pytest.approx(0.25)
    assert isinstance(err.value, ValueError)


def _spread_case(ort_diff, tf_spread, step=3):
    e, _ = _case(2.0)
    a = {k: v.copy() for k, v in e.items()}
    a[spec.LOGITS][0, step, 1] += ort_diff
    moved = {k: np.zeros_like(v) for k, v in e.items()}
    moved[spec.LOGITS][0, 1, 2] = tf_spread  # two steps away, same row: within the window
    return e, a, lambda: moved


def test_value_within_the_references_own_float_spread_is_explained_and_reported():
    e, a, spread = _spread_case(3e-4, 2e-4)
    report = ValidationReport()
    compare(e, a, np.array([5, 5]), 1e-4, 1e-4, "toy", report, spread, explain_factor=2.0)
    [v] = report.values_explained
    assert v == {"case": "toy", "output": spec.LOGITS, "values": 1, "max_abs_diff": pytest.approx(3e-4),
                 "reference_spread": pytest.approx(2e-4), "max_ratio_to_spread": pytest.approx(1.5)}


@pytest.mark.parametrize("ort_diff, tf_spread, why", [
    (5e-4, 2e-4, "more than twice the spread"),
    (3e-2, 1e-1, "beyond the cap of 100x the tolerance"),
])
def test_value_beyond_the_references_float_spread_fails(ort_diff, tf_spread, why):
    e, a, spread = _spread_case(ort_diff, tf_spread)
    with pytest.raises(ValueMismatchError, match="logits") as err:
        compare(e, a, np.array([5, 5]), 1e-4, 1e-4, "toy", ValidationReport(), spread, explain_factor=2.0)
    assert err.value.max_abs_diff == pytest.approx(ort_diff, rel=1e-3), why


def test_spread_in_another_row_or_far_away_explains_nothing():
    for row, step in ((1, 3), (0, 3 + 9 + 1)):
        e, _ = _case(2.0)
        e = {k: np.concatenate([v] * 4, axis=1) if v.ndim == 3 else v for k, v in e.items()}  # 20 steps
        a = {k: v.copy() for k, v in e.items()}
        a[spec.LOGITS][0, 3, 0] += 3e-4
        moved = {k: np.zeros_like(v) for k, v in e.items()}
        moved[spec.LOGITS][row, step, 0] = 1e-3
        with pytest.raises(ValueMismatchError, match="moves by only 0 there"):
            compare(e, a, np.array([20, 20]), 1e-4, 1e-4, "toy", ValidationReport(), lambda moved=moved: moved)


# ------------------------------------------------ bad input


def test_failed_validation_writes_nothing(tiny_run, tmp_path):
    out = tmp_path / "m.onnx"
    with pytest.raises(ValueMismatchError):
        export(tiny_run, out, ExportConfig(tolerance=0.0, times=(7,), batches=(3,)), log=lambda m: None)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("opset", [12, 19])
def test_opset_outside_range(opset):
    with pytest.raises(UserError, match="13-18"):
        ExportConfig(opset=opset)


def test_unwritable_output_paths(tiny_run, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        export(tiny_run, tmp_path / "no" / "m.onnx", log=lambda m: None)
    with pytest.raises(UserError, match="is a directory"):
        export(tiny_run, tmp_path, log=lambda m: None)


def test_missing_and_partial_checkpoints(tiny_run, tmp_path):
    import shutil
    with pytest.raises(UserError, match="does not exist"):
        export(tmp_path / "nothing", tmp_path / "m.onnx", log=lambda m: None)
    partial = tmp_path / "partial"
    shutil.copytree(tiny_run, partial)
    shutil.rmtree(partial / "ckpt")
    with pytest.raises(UserError, match="no saved weights"):
        export(partial, tmp_path / "m.onnx", log=lambda m: None)


def test_checkpoint_from_another_model_config(tiny_run, tmp_path):
    import shutil
    other = tmp_path / "other"
    shutil.copytree(tiny_run, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["model"]["num_units"] = [16, 16]
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="cannot be restored"):
        export(other, tmp_path / "m.onnx", log=lambda m: None)
    assert not (tmp_path / "m.onnx").exists()


def test_export_cli_refusal_is_one_line(tiny_run, tmp_path, capsys):
    from hmlstm.cli import main
    assert main(["export", str(tiny_run), "--out", str(tmp_path / "m.onnx"), "--opset", "19"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "opset 19" in err[0]


def test_card_carries_the_held_out_evaluation_of_a_stripped_run(tmp_path):
    from hmlstm.model.config import TrainConfig
    from hmlstm.model.data import load_corpus
    from hmlstm.model.train import train

    corpus = load_corpus("synthetic", strip=" .")
    train(corpus, TINY_MODEL, TrainConfig(batch_size=8, seq_len=20, max_steps=3), tmp_path / "run", progress=False)
    other = tmp_path / "other.txt"
    other.write_text("an other text. with words, phrases and sentences! " * 20)
    result = export(tmp_path / "run", tmp_path / "m.onnx", ExportConfig(times=(7,), batches=(2,),
                                                                        eval_text=str(other)), log=lambda m: None)
    held, cross = result.card["evaluation"]["held_out"], result.card["evaluation"]["other_text"]
    assert cross["chars"] == len(other.read_text().replace(" ", "").replace(".", ""))  # stripped like training
    assert cross["unigram_bpc"] > 0 and held["unigram_bpc"] > 0 and held["training_text"]["chars"] > held["chars"]
    assert result.card["provenance"]["strip_delimiters"] == " ."
    assert held["chars"] == int(len(corpus.text) * 0.1) and "stripped" in held["text"]
    assert {"words", "phrases"} <= set(held["layers"]["layer1"]) and "entropy_peaks" in held["baselines"]
