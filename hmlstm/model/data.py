"""Corpora, the character vocabulary, and truncated-BPTT batches.

Corpora: the built-in one (Python's own documentation text, which ships with
every CPython as ``pydoc_data.topics``), any UTF-8 text file, the Penn
Treebank character format (``a _ b``, ``_`` for a space), and a synthetic
language with known word and phrase boundaries generated from a seed.

This module needs only NumPy: export and serving share the vocabulary code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hmlstm.errors import UserError
from hmlstm.vocabulary import UNK, Vocabulary  # noqa: F401  (the vocabulary is shared with the server)


@dataclass(frozen=True)
class Corpus:
    """A text plus, where known, its true boundaries.

    word_ends / phrase_ends: bool [len(text)], True on the last character of
    a word / phrase, or None where the corpus does not know them.
    """

    name: str
    text: str
    word_ends: np.ndarray | None = None
    phrase_ends: np.ndarray | None = None
    source: str | None = None  # what load_corpus was given, to load it again
    strip: str | None = None  # the delimiters removed, if any


def builtin_text() -> str:
    """Python's documentation topics (~465 KB of English), in a fixed order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k].strip() for k in sorted(topics))


def read_text_file(path: str | Path) -> str:
    p = Path(path)
    if not p.exists():
        raise UserError(f"corpus file {p} does not exist; name an existing UTF-8 text file")
    if p.is_dir():
        raise UserError(f"corpus path {p} is a directory; name a UTF-8 text file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"corpus file {p} is not UTF-8 (bad byte at offset {e.start}); "
            "convert it, e.g. iconv -f latin1 -t utf-8"
        ) from None
    if not text.strip():
        raise UserError(f"corpus file {p} is empty; give it some text")
    return text


def looks_like_ptb_chars(text: str) -> bool:
    """True for the PTB character format: single characters separated by spaces."""
    lines = [ln for ln in text.splitlines()[:200] if ln.strip()]
    if not lines:
        return False
    return all(all(len(tok) == 1 for tok in ln.split()) for ln in lines) and "_" in text


def decode_ptb_chars(text: str) -> str:
    """``a _ b`` -> ``a b``: tokens joined, ``_`` is a space, lines kept."""
    out = []
    for line in text.splitlines():
        toks = line.split()
        if toks:
            out.append("".join(" " if t == "_" else t for t in toks))
    return "\n".join(out) + "\n"


def synthetic_corpus(seed: int = 0, n_chars: int = 200_000, n_words: int = 60,
                     n_phrases: int = 24) -> Corpus:
    """A toy language with known word and phrase boundaries.

    A lexicon of ``n_words`` random lowercase words (2-7 letters) and a set of
    ``n_phrases`` phrase templates (2-4 words each) are drawn from ``seed``;
    the text is a random sequence of phrases, words joined by a space, each
    phrase ended by ". ". Truth: the last letter of each word, and the last
    letter of each phrase's last word.
    """
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    lexicon: list[str] = []
    while len(lexicon) < n_words:
        w = "".join(rng.choice(letters, rng.integers(2, 8)))
        if w not in lexicon:
            lexicon.append(w)
    phrases = [
        [lexicon[i] for i in rng.integers(0, n_words, rng.integers(2, 5))]
        for _ in range(n_phrases)
    ]
    # Zipf-like phrase frequencies, as in language.
    weights = 1.0 / np.arange(1, n_phrases + 1)
    weights /= weights.sum()
    pieces: list[str] = []
    word_ends: list[int] = []
    phrase_ends: list[int] = []
    pos = 0
    while pos < n_chars:
        phrase = phrases[rng.choice(n_phrases, p=weights)]
        for j, w in enumerate(phrase):
            pieces.append(w)
            pos += len(w)
            word_ends.append(pos - 1)
            sep = ". " if j == len(phrase) - 1 else " "
            if j == len(phrase) - 1:
                phrase_ends.append(pos - 1)
            pieces.append(sep)
            pos += len(sep)
    text = "".join(pieces)
    we = np.zeros(len(text), bool)
    we[word_ends] = True
    pe = np.zeros(len(text), bool)
    pe[phrase_ends] = True
    return Corpus(f"synthetic(seed={seed})", text, we, pe)


def space_word_ends(text: str) -> np.ndarray:
    """True on the last character of each word of a spaced text."""
    chars = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    space = np.isin(chars, [ord(" "), ord("\n"), ord("\t")])
    ends = np.zeros(len(text), bool)
    ends[:-1] = ~space[:-1] & space[1:]
    if len(text):
        ends[-1] = not space[-1]
    return ends


def strip_delimiters(text: str, chars: str = " ", *extra: np.ndarray) -> tuple[str, np.ndarray, list]:
    """Remove every character in ``chars``; the removed positions become the truth.

    Returns (stripped text, word_ends, extra arrays mapped): word_ends[i] is True
    where a run of delimiters followed stripped character i (it ended a unit).
    Each array in ``extra`` (bool, one entry per original character, True on a
    unit's last character) is carried over to the kept characters.
    """
    if not chars:
        raise UserError("--strip-delimiters needs at least one character to strip")
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    removed = np.isin(codes, [ord(c) for c in chars])
    kept = np.flatnonzero(~removed)
    stripped = "".join(text[i] for i in kept) if len(kept) < len(text) else text
    after = np.zeros(len(text), bool)
    after[:-1] = removed[1:]
    ends = after[kept]
    if len(kept):
        ends[-1] = True  # the text's end closes the last unit
    return stripped, ends, [np.asarray(e, bool)[kept] for e in extra]


def read_segmented(path: str | Path, sep: str | None = None) -> Corpus:
    """Units one per line (``sep`` None) or separated by ``sep``; the text is their concatenation."""
    raw = read_text_file(path)
    units = [u for u in (raw.splitlines() if sep is None else raw.split(sep)) if u.strip()]
    units = [u.strip() if sep is None else u for u in units]
    if not units:
        raise UserError(f"{path} holds no units; one unit per line, or separated by --sep")
    text = "".join(units)
    ends = np.zeros(len(text), bool)
    ends[np.cumsum([len(u) for u in units]) - 1] = True
    return Corpus(f"segmented:{path}", text, ends)


def load_corpus(source: str | None, fmt: str = "auto", seed: int = 0, strip: str | None = None) -> Corpus:
    """``None`` or "builtin" -> built-in text; "synthetic" -> synthetic; else a path.

    ``strip``: characters to remove; the removed positions become the word truth.
    """
    if source in (None, "builtin"):
        text = builtin_text()
        corpus = Corpus("builtin:pydoc_data.topics", text, space_word_ends(text))
    elif source == "synthetic":
        corpus = synthetic_corpus(seed)
    else:
        if fmt not in ("auto", "text", "ptb", "lines"):
            raise UserError(f"unknown corpus format {fmt!r}; use auto, text, ptb or lines")
        if fmt == "lines":
            corpus = read_segmented(source)
        else:
            text = read_text_file(source)
            if fmt == "ptb" or (fmt == "auto" and looks_like_ptb_chars(text)):
                text = decode_ptb_chars(text)
                corpus = Corpus(f"ptb-chars:{source}", text, space_word_ends(text))
            else:
                corpus = Corpus(f"file:{source}", text, space_word_ends(text))
    if strip:
        extra = [corpus.phrase_ends] if corpus.phrase_ends is not None else []
        text, ends, mapped = strip_delimiters(corpus.text, strip, *extra)
        if not text:
            raise UserError(f"the corpus is empty once {strip!r} is stripped")
        corpus = Corpus(f"{corpus.name} stripped of {strip!r}", text, ends, mapped[0] if mapped else None)
    return dataclasses.replace(corpus, source=source or "builtin", strip=strip or None)


def split(ids: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """The last ``val_fraction`` of the stream is the validation set."""
    n_val = int(len(ids) * val_fraction)
    return ids[: len(ids) - n_val], ids[len(ids) - n_val :]


class StreamBatcher:
    """Cuts a token stream into ``batch_size`` parallel contiguous streams.

    Batch k holds characters [k*T, (k+1)*T) of every stream, so the state at
    the end of batch k is the right start for batch k+1 (truncated BPTT).
    """

    def __init__(self, ids: np.ndarray, batch_size: int, seq_len: int):
        per_stream = len(ids) // batch_size
        self.steps = (per_stream - 1) // seq_len
        if self.steps < 1:
            raise UserError(
                f"the text ({len(ids)} characters) is too short for batch size {batch_size} "
                f"x sequence length {seq_len}; use a longer text or smaller --batch-size/--seq-len"
            )
        self.data = ids[: per_stream * batch_size].reshape(batch_size, per_stream)
        self.seq_len = seq_len

    def __len__(self) -> int:
        return self.steps

    def batch(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets) [B, T] int32; targets are inputs shifted by one."""
        t = self.seq_len
        chunk = self.data[:, k * t : (k + 1) * t + 1]
        return chunk[:, :-1], chunk[:, 1:]
