"""Boundaries taught from the delimiters a text had (train --boundary-targets): the targets are where the
stripped delimiters were, the input never holds them, and the mode is recorded where users look."""

import dataclasses

import numpy as np
import pytest

from hmlstm.errors import UserError
from hmlstm.model.config import TrainConfig
from hmlstm.model.data import Corpus, StreamBatcher, prose_corpus, strip_corpus, synthetic_corpus
from hmlstm.model.train import train

TINY = dict(embed_dim=8, num_units=(24, 12), output_dim=24)
CFG = TrainConfig(batch_size=16, seq_len=32, max_steps=100, checkpoint_every=1000, eval_every=100,
                  learning_rate=1e-2, boundary_targets=("words",))


def test_the_targets_are_the_first_characters_of_the_units_the_stripped_delimiters_marked():
    corpus = strip_corpus(prose_corpus("t", "ab cd, ef gh. ij"), " ")
    assert corpus.text == "abcd,efgh.ij"
    starts = corpus.unit_starts(("words", "phrases"))
    assert starts.dtype == np.float32 and starts.shape == (12, 2)
    assert "".join("|" + c if s else c for c, s in zip(corpus.text, starts[:, 0])) == "|ab|cd,|ef|gh.|ij"
    assert "".join("|" + c if s else c for c, s in zip(corpus.text, starts[:, 1])) == "|abcd,|efgh.|ij"
    batcher = StreamBatcher(np.arange(12), 2, 2, starts)  # the targets travel with the inputs they belong to
    x, _ = batcher.batch(1)
    np.testing.assert_array_equal(batcher.targets(1), starts[x])


def test_a_text_that_keeps_its_delimiters_or_does_not_mark_the_unit_is_refused():
    with pytest.raises(UserError, match="keeps them.*--strip-whitespace"):
        prose_corpus("t", "ab cd ef").unit_starts(("words",))
    with pytest.raises(UserError, match="does not mark where its sentences are"):
        strip_corpus(synthetic_corpus(n_chars=200), " ").unit_starts(("sentences",))


def _random_words(seed: int, n: int, mark_starts: bool = False) -> Corpus:
    """Letters drawn at random, a space before each with probability 0.3: where a word starts cannot be
    told from the letters. ``mark_starts`` upper-cases each word's first letter: a leak of the target."""
    rng = np.random.default_rng(seed)
    letters = rng.choice(list("abcdefgh"), n)
    starts = rng.random(n) < 0.3
    if mark_starts:
        letters = np.where(starts, np.char.upper(letters), letters)
    text = "".join((" " + c) if s else c for c, s in zip(letters, starts)).strip()
    return strip_corpus(dataclasses.replace(prose_corpus("random words", text), held_out=len(text) // 5), " ")


def _word_start_f1(corpus: Corpus, tmp_path, name: str) -> float:
    result = train(corpus, TINY, CFG, tmp_path / name, progress=False)
    return result.boundary["layer1"]["word_starts"]["f1"]


def test_supervision_learns_only_what_the_input_can_tell_and_a_leak_would_show(tmp_path):
    """Word starts that the letters cannot predict stay unpredictable (F1 near what firing at the words' rate
    gives, 0.3, and far from 1): nothing of the target reaches the input. The same measurement catches a leak:
    with each start marked in the input (upper case) the same training scores near 1. And where the letters
    do tell (the synthetic language's words), the supervised detector finds them."""
    blind = _word_start_f1(_random_words(0, 12_000), tmp_path, "blind")
    leaked = _word_start_f1(_random_words(0, 12_000, mark_starts=True), tmp_path, "leaked")
    words = _word_start_f1(strip_corpus(synthetic_corpus(seed=0, n_chars=12_000), " "), tmp_path, "words")
    assert blind < 0.55, blind
    assert leaked > 0.9, leaked
    assert words > 0.75, words  # 0.82 here after these 100 steps


def test_the_mode_is_recorded_in_the_run_and_said_by_info(tmp_path, capsys):
    import json

    from hmlstm.cli import main

    corpus = strip_corpus(synthetic_corpus(seed=1, n_chars=3000), " ")
    cfg = dataclasses.replace(CFG, batch_size=4, seq_len=10, max_steps=2)
    train(corpus, dict(TINY, top_boundary=True), dataclasses.replace(cfg, boundary_targets=("none", "phrases")),
          tmp_path / "run", progress=False)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["boundary_targets"] == [
        "none", "phrases"]
    capsys.readouterr()
    assert main(["info", str(tmp_path / "run")]) == 0
    assert "learned: layer 1 unsupervised, layer 2 supervised: phrase starts" in capsys.readouterr().out


def test_an_export_without_targets_says_its_layers_learned_without_labels(tiny_onnx, capsys):
    from hmlstm.cli import main

    assert tiny_onnx.card["boundary_learning"] == {"1": "unsupervised"}
    assert main(["info", str(tiny_onnx.path)]) == 0
    assert "learned: layer 1 unsupervised" in capsys.readouterr().out
