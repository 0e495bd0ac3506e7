"""The hmlstm command: clean errors for user mistakes, real outputs otherwise."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hmlstm.cli import main

TINY = ["--layers", "2", "--units", "8", "--embed-dim", "4", "--output-dim", "8",
        "--batch-size", "4", "--seq-len", "10", "--no-progress"]


def run_cli(*args, cwd=None, input=None):
    env = dict(os.environ)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # the command must quiet TensorFlow by itself
    return subprocess.run([sys.executable, "-m", "hmlstm.cli", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=300, input=input)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    corpus = out.parent / "corpus.txt"
    corpus.write_text("the cat sat on the mat. the dog sat on the log. " * 40)
    assert main(["train", str(corpus), "--out", str(out), "--steps", "6", *TINY]) == 0
    return out


def _one_error_line(stderr: str, *needles: str) -> None:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("hmlstm: error: ")
    for n in needles:
        assert n in lines[0]


def test_missing_corpus_is_one_clean_line_in_a_real_process(tmp_path):
    r = run_cli("train", tmp_path / "missing.txt", "--out", tmp_path / "run")
    assert r.returncode == 2
    _one_error_line(r.stderr, "does not exist")
    assert not (tmp_path / "run").exists()  # nothing half-written


@pytest.mark.parametrize("content, needle", [(b"", "empty"), (b"\xff\xfe\x00bad", "not UTF-8")])
def test_bad_corpus_file(tmp_path, capsys, content, needle):
    p = tmp_path / "c.txt"
    p.write_bytes(content)
    assert main(["train", str(p), "--out", str(tmp_path / "run"), *TINY]) == 2
    _one_error_line(capsys.readouterr().err, needle)
    assert not (tmp_path / "run").exists()


def test_sequence_length_below_two(tmp_path, capsys):
    assert main(["train", "synthetic", "--seq-len", "1", "--out", str(tmp_path / "r")]) == 2
    _one_error_line(capsys.readouterr().err, "sequence length must be at least 2")


def test_plot_writes_png(trained_run, tmp_path, capsys):
    out = tmp_path / "b.png"
    assert main(["plot", str(trained_run), "--text", "the cat sat", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in capsys.readouterr().out


def test_plot_text_with_characters_the_vocabulary_lacks(trained_run, tmp_path, capsys):
    out = tmp_path / "b.png"
    assert main(["plot", str(trained_run), "--text", "the ZEBRA", "--out", str(out)]) == 2
    _one_error_line(capsys.readouterr().err, "--allow-unknown", "Z")
    assert not out.exists()
    assert main(["plot", str(trained_run), "--text", "the ZEBRA", "--out", str(out),
                 "--allow-unknown"]) == 0


def test_corrupt_checkpoint_is_one_clean_line(trained_run, tmp_path):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(trained_run, bad)
    for f in (bad / "ckpt").glob("*.data-*"):
        f.write_bytes(f.read_bytes()[:20])
    r = run_cli("plot", bad, "--out", tmp_path / "x.png")
    assert r.returncode == 2
    _one_error_line(r.stderr, "cannot be restored")


def test_checkpoint_that_is_not_a_run(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    _one_error_line(capsys.readouterr().err, "not an hmlstm training run")


def test_corrupt_config(trained_run, tmp_path, capsys):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(trained_run, bad)
    (bad / "config.json").write_text("{not json")
    assert main(["plot", str(bad)]) == 2
    _one_error_line(capsys.readouterr().err, "corrupt")


def test_train_ptb_format_file(tmp_path, capsys):
    p = tmp_path / "ptb.char.train.txt"
    p.write_text("t h e _ c a t _ s a t\n" * 200)
    assert main(["train", str(p), "--out", str(tmp_path / "r"), "--steps", "2", *TINY]) == 0
    cfg = (tmp_path / "r" / "config.json").read_text()
    assert "ptb-chars" in cfg
    vocab = (tmp_path / "r" / "vocab.json").read_text()
    assert "_" not in vocab and '" "' in vocab  # underscores became spaces


def test_package_entry_point_is_declared_and_is_the_one_python_m_runs():
    import importlib

    import tomllib

    scripts = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, name = scripts["hmlstm"].partition(":")
    from hmlstm.cli.process import run

    assert getattr(importlib.import_module(module), name) is run
    for entry in ("hmlstm/__main__.py", "hmlstm/cli/__main__.py"):
        assert "sys.exit(run())" in (Path(__file__).parents[1] / entry).read_text()


def test_the_shipped_preset_gives_the_shipped_recipe_and_flags_beside_it_win(tmp_path, capsys):
    import json

    from hmlstm.cli import main

    out = tmp_path / "run"
    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat sat on the mat. the dog sat on the log.\n" * 80)
    small = ["--units", "8", "--embed-dim", "4", "--output-dim", "8", "--batch-size", "4", "--seq-len", "10",
             "--no-progress"]
    assert main(["train", str(corpus), "--preset", "shipped", "--steps", "3", "--out", str(out), *small]) == 0
    cfg = json.loads((out / "config.json").read_text())
    shipped = json.loads((Path(__file__).resolve().parents[1] / "hmlstm/assets/default.card.json").read_text())
    want = shipped["provenance"]["train_config"]
    for key in ("boundary_targets", "entropy_target", "peak_fractions", "seed"):
        assert cfg["train"][key] == want[key], key
    assert cfg["model"]["top_boundary"] and cfg["strip_delimiters"] == shipped["provenance"]["strip_delimiters"]
    assert cfg["train"]["max_steps"] == 3 and cfg["model"]["num_units"] == [8, 8, 8]  # the flags given win
    assert cfg["preset"] == "shipped"


def test_info_prints_the_card_and_json(capsys):
    import json

    from hmlstm.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("default.onnx: 3 layers x 128/128/128 units") and "default.dense.onnx beside it" in out
    assert "recipe: hmlstm train builtin --preset shipped" in out and "trained without: ' \\n\\t'" in out
    assert "learned: layer 1 supervised: word starts, layer 2 supervised: phrase starts" in out
    assert "look-ahead: 3 characters (each boundary is decided 3 characters after it" in out
    assert "layer 1, held-out text (builtin): word-start F1 0.94" in out
    assert main(["info", "--json"]) == 0
    card = json.loads(capsys.readouterr().out)
    assert card["engine"] == "sparse" and card["vocabulary_size"] == 110
    assert main(["info", "no-such.onnx"]) == 2
