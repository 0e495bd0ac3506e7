"""benchmarks/segmentation_peers.py: how the dictionary packages are given text and scored (the packages
themselves are benchmark-only; a segmenter that splits after every 'the' stands in for them here)."""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.segmentation_peers import peer_starts, word_starts  # noqa: E402
from hmlstm.model.data import prose_corpus, strip_corpus  # noqa: E402


def _split_the(run: str) -> list[str]:
    pieces, rest = [], run
    while "the" in rest[1:]:
        cut = rest.index("the", 1)
        pieces.append(rest[:cut])
        rest = rest[cut:]
    return [*pieces, rest]


def _marked(corpus, starts) -> str:
    return "".join("|" + c if s else c for c, s in zip(corpus.text, starts))


def test_the_packages_get_lower_case_sentences_and_punctuation_is_its_own_segment_or_joins_the_word():
    corpus = strip_corpus(prose_corpus("t", "The cat, the dog. Then (the) end!"), " ")
    assert corpus.text == "Thecat,thedog.Then(the)end!"
    assert _marked(corpus, word_starts(corpus)) == "|The|cat,|the|dog.|Then|(the)|end!"
    own = peer_starts(corpus, _split_the, "own")
    assert _marked(corpus, own) == "|Thecat|,|thedog|.|Then|(|the|)|end|!"
    joined = peer_starts(corpus, _split_the, "joined")  # a sentence's first run still starts a word
    assert _marked(corpus, joined) == "|Thecat,|thedog.|Then(|the)|end!"
    assert own.dtype == np.bool_ and len(own) == len(corpus.text)
