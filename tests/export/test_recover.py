"""Exporting an export again: every model this exporter wrote, whatever its shapes, and the shipped one."""

import json

import numpy as np
import onnx
import pytest

from hmlstm import spec
from hmlstm.errors import UserError
from hmlstm.export.convert import ExportConfig, convert, export
from hmlstm.export.recover import network_weights, recover_run
from hmlstm.export.validate import make_feeds, run_session
from hmlstm.model.config import ModelConfig
from hmlstm.model.network import HMLSTMNetwork
from hmlstm.runtime import make_session
from hmlstm.vocabulary import UNK

CHARS = [UNK] + [chr(ord("a") + i) for i in range(22)]


def _colliding_network():
    """Shapes chosen to collide: layer 1's input rows [16, 33], its recurrent rows [8 + 8, 33] and layer 3's
    kernel [8 + 8, 33] are one shape; the three biases [33] and the three output kernels [8, 11] too.
    Every weight random, so that only the right placement reproduces the file."""
    cfg = ModelConfig(vocab_size=23, embed_dim=16, num_units=(8, 8, 8), output_dim=11, top_boundary=True)
    net = HMLSTMNetwork(cfg, seed=7)
    rng = np.random.default_rng(7)
    for v in network_weights(net).values():
        v.assign(rng.normal(0, 0.5, v.shape).astype(np.float32))
    net.slope.assign(2.0)
    return net


def _same_outputs(a, b, units, vocab):
    feeds = make_feeds(np.random.default_rng(1), units, vocab, 4, 80, None, True, True)
    x = run_session(make_session(str(a), "cpu").session, feeds)
    y = run_session(make_session(str(b), "cpu").session, feeds)
    np.testing.assert_array_equal(x[spec.BOUNDARIES], y[spec.BOUNDARIES])
    for name in x:
        np.testing.assert_allclose(x[name], y[name], atol=1e-5, err_msg=name)


@pytest.mark.parametrize("engine", ["sparse", "dense"])
def test_an_export_with_colliding_shapes_is_exported_again_exactly(tmp_path, engine):
    """Recovered by the file's weight map and, for the dense graph (converted once), also by shape as for files
    written before the weight map, each candidate placement proven; the one recovered by shape is exported
    again."""
    net = _colliding_network()
    model = convert(net, CHARS, {}, engine=engine)
    ways = {"weight map": model}
    if engine == "dense":
        by_shape = onnx.ModelProto()
        by_shape.CopyFrom(model)
        keep = [p for p in model.metadata_props if p.key != spec.META_WEIGHTS]
        del by_shape.metadata_props[:]
        by_shape.metadata_props.extend(keep)
        ways["by shape"] = by_shape
    from hmlstm.model.checkpoint import load_network

    for way, file in ways.items():
        path = tmp_path / f"collide-{way.replace(' ', '-')}.onnx"
        onnx.save(file, str(path))
        logs = []
        run = recover_run(path, tmp_path / f"run-{way.replace(' ', '-')}", log=logs.append)
        assert "recovered the weights" in logs[0], way
        again, _ = load_network(run)
        for key, v in network_weights(again).items():
            np.testing.assert_array_equal(v.numpy(), network_weights(net)[key].numpy(), err_msg=f"{way}: {key}")
    # the same engine only, unvalidated: what is claimed is the file again, which _same_outputs checks
    # (validation against TensorFlow has tests of its own)
    out = export(run, tmp_path / "again.onnx", ExportConfig(engines=(engine,), validate=False), log=lambda m: None)
    _same_outputs(path, out.path, net.config.num_units, net.config.vocab_size)


def test_the_readmes_re_export_command_works_on_the_shipped_model(shipped_reexport):
    """`hmlstm export hmlstm/assets/default.onnx --out x.onnx`: the shipped file's weights recovered (its
    weight map, or by shape for a file written before it), both graphs written and validated, and the new
    sparse graph gives the shipped one's boundaries on real text."""
    from hmlstm.model.data import load_corpus
    from hmlstm.serving.model import DEFAULT_MODEL
    from hmlstm.vocabulary import Vocabulary

    out, err = shipped_reexport
    assert "recovered the weights of default.onnx" in err and "validated" in err
    # the shipped file was validated at 3e-4 (its logits drift further over 5,000 steps): so is its re-export
    assert "validating at 0.0003, the tolerance default.onnx was exported with (its card)" in err
    for stage in ("loading ", "converting the sparse and dense graphs with tf2onnx", "validating against TensorFlow",
                  "evaluating for the model card"):  # the export says what it is doing as it goes
        assert stage in err, stage
    assert out.is_file() and spec.engine_path(out, "dense").is_file() and spec.card_path(out).is_file()
    card = json.loads(spec.card_path(out).read_text())
    shipped = json.loads(spec.card_path(DEFAULT_MODEL).read_text())
    assert card["provenance"]["command"] == shipped["provenance"]["command"]
    assert card["evaluation"]["held_out"]["bpc"] == pytest.approx(shipped["evaluation"]["held_out"]["bpc"], abs=1e-4)
    # the earlier card's evaluation of another text is kept, not dropped (nothing here scores it again)
    assert card["evaluation"]["other_text"] == shipped["evaluation"]["other_text"]
    meta = {p.key: p.value for p in onnx.load(str(DEFAULT_MODEL)).metadata_props}
    corpus = load_corpus("builtin", strip=shipped["provenance"]["strip_delimiters"])
    ids = np.array(Vocabulary(json.loads(meta[spec.META_VOCAB])).encode(corpus.text[-20_000:]), np.int32)
    units = shipped["model_config"]["num_units"]
    feeds = make_feeds(np.random.default_rng(0), units, shipped["model_config"]["vocab_size"], 8, 2000, None,
                       False, False)
    feeds[spec.TOKENS] = ids[: 8 * 2000].reshape(8, 2000)
    before = run_session(make_session(str(DEFAULT_MODEL), "cpu").session, feeds)
    for path in (out, spec.engine_path(out, "dense")):
        after = run_session(make_session(str(path), "cpu").session, feeds)
        np.testing.assert_array_equal(after[spec.BOUNDARIES], before[spec.BOUNDARIES])
        np.testing.assert_allclose(after[spec.LOGITS], before[spec.LOGITS], atol=1e-4)


@pytest.mark.parametrize("content", [b"", b"not an onnx file at all\n", "truncated"])
def test_a_file_that_is_not_onnx_gets_one_line(tmp_path, tiny_onnx, capsys, content):
    from hmlstm.cli import main

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(tiny_onnx.path.read_bytes()[:4000] if content == "truncated" else content)
    with pytest.raises(UserError, match="is not an ONNX file|not an exported hmlstm model"):
        recover_run(bad, tmp_path / "run", log=lambda m: None)
    assert main(["export", str(bad), "--out", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hmlstm: error:") and "Traceback" not in err[0], err


def test_a_card_scores_no_held_out_text_that_is_not_the_one_training_held_out(tmp_path):
    """Issue 30, item 25: a run whose corpus reads differently now (a changed file, another Python's standard
    library) is not scored on today's text as if it were the held-out part; the export says why."""
    from hmlstm.cli import main
    from hmlstm.export.convert import card_evaluations
    from hmlstm.model.checkpoint import read_run_info
    from tests.test_cli import TINY

    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat. the dog sat on the log. " * 40)
    assert main(["train", str(text), "--out", str(tmp_path / "run"), "--steps", "2", *TINY]) == 0
    info = read_run_info(tmp_path / "run")
    assert info.meta.get("corpus_sha256")
    text.write_text("another text now, under the same name. " * 40)
    logs = []
    assert card_evaluations(tmp_path / "run", info, log=logs.append) == {}
    assert any("not scoring the held-out text" in m and "reads differently here" in m for m in logs), logs
