"""Corpora, the character vocabulary, and truncated-BPTT batches.

Corpora: the built-in one (Python's own documentation, which ships with every
CPython: the ``pydoc_data.topics`` text plus the standard library's
docstrings, read with ``ast``), any UTF-8 text file, the Penn
Treebank character format (``a _ b``, ``_`` for a space), and a synthetic
language with known word and phrase boundaries generated from a seed.

This module needs only NumPy: export and serving share the vocabulary code.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hmlstm.errors import UserError
from hmlstm.vocabulary import UNK, Vocabulary  # noqa: F401  (the vocabulary is shared with the server)


@dataclass(frozen=True)
class Corpus:
    """A text plus, where known, its true boundaries.

    word_ends / phrase_ends / sentence_ends: bool [len(text)], True on the
    last character of a word / phrase / sentence, or None where the corpus
    does not know them. held_out: how many characters at the end of the text
    no training run sees, where the corpus fixes that (the built-in one);
    0 leaves it to the training run's validation fraction.
    """

    name: str
    text: str
    word_ends: np.ndarray | None = None
    phrase_ends: np.ndarray | None = None
    source: str | None = None  # what load_corpus was given, to load it again
    strip: str | None = None  # the delimiters removed, if any
    sentence_ends: np.ndarray | None = None
    held_out: int = 0
    sha256: str | None = None  # of the text before any stripping: which text this was

    def truths(self) -> dict[str, np.ndarray]:
        """The known unit ends by unit name: words, phrases, sentences."""
        named = {"words": self.word_ends, "phrases": self.phrase_ends, "sentences": self.sentence_ends}
        return {k: v for k, v in named.items() if v is not None}

    def unit_starts(self, units: tuple[str, ...]) -> np.ndarray:
        """float32 [len(text), len(units)]: 1 on the first character of each unit named (words, phrases,
        sentences), the targets of --boundary-targets. UserError where the corpus does not know a unit, or
        where its text still holds the delimiters that mark it (a model would learn to read them, nothing
        more): a prose text must be trained with its delimiters stripped."""
        known = self.truths()
        missing = [u for u in units if u not in known]
        if missing:
            raise UserError(f"--boundary-targets {','.join(missing)}: {self.name} does not mark where its "
                            f"{' or '.join(missing)} are (it knows: {', '.join(known) or 'none'})")
        if not self.strip and not self.name.startswith("segmented:"):
            raise UserError("--boundary-targets teaches where the removed delimiters were, but this text keeps them: "
                            "the model would only learn to fire after a space. Add --strip-whitespace (or "
                            "--strip-delimiters CHARS)")
        out = np.zeros((len(self.text), len(units)), np.float32)
        for j, u in enumerate(units):
            out[0, j] = 1.0  # the text's first character starts its first unit
            out[1:, j] = known[u][:-1]
        return out

    def held_out_start(self, val_fraction: float) -> int:
        """Index of the first held-out character: fixed by the corpus, else the last val_fraction."""
        n_val = self.held_out or int(len(self.text) * val_fraction)
        return len(self.text) - n_val

    def part(self, start: int, end: int | None, label: str) -> Corpus:
        """Characters [start, end) with their truths, named ``name, label``."""
        cut = {k: (None if v is None else v[start:end])
               for k, v in (("word_ends", self.word_ends), ("phrase_ends", self.phrase_ends),
                            ("sentence_ends", self.sentence_ends))}
        return dataclasses.replace(self, name=f"{self.name}, {label}", text=self.text[start:end], held_out=0, **cut)


BUILTIN_NAME = "builtin:pydoc_data.topics+stdlib-docstrings"
HELD_OUT_EVERY = 10  # a document is held out when crc32(its key) % 10 == 0: about a tenth of the text
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
MIN_DOCSTRING = 20  # shorter docstrings ("Return self.") carry no English worth learning


def _stdlib_sources() -> tuple[Path, list[Path]]:
    """(the standard library's folder, its own .py files in a fixed order; tests and site-packages not)."""
    import os
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS]
        files.extend(Path(folder) / n for n in names if n.endswith(".py"))
    return root, sorted(files)


def cache_dir() -> Path:
    """Where hmlstm keeps what it can compute again: $HMLSTM_CACHE_DIR, else $XDG_CACHE_HOME/hmlstm, else
    ~/.cache/hmlstm."""
    import os

    if os.environ.get("HMLSTM_CACHE_DIR"):
        return Path(os.environ["HMLSTM_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hmlstm"


def _read_cached(path: Path) -> tuple[tuple[str, str], ...] | None:
    import json

    try:
        docs = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(docs, list) and all(isinstance(d, list) and len(d) == 2 and all(isinstance(x, str) for x in d)
                                          for d in docs):
            return tuple((k, t) for k, t in docs)
    except (OSError, ValueError):
        pass
    return None  # absent, unreadable or damaged: read the documents again


def _write_cached(path: Path, docs: tuple[tuple[str, str], ...]) -> None:
    """Atomically, and silently not at all where the folder cannot be written (a read-only home)."""
    import json
    import os
    import tempfile

    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".builtin-", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(docs, f, ensure_ascii=False)
        os.replace(tmp, path)
        for old in path.parent.glob("builtin-*.json"):  # another Python's (or an edited stdlib's) text
            if old != path:
                old.unlink(missing_ok=True)
    except OSError:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


@functools.cache
def builtin_documents() -> tuple[tuple[str, str], ...]:
    """(key, text) of every built-in document, in a fixed order, exact duplicates dropped.

    Keys: ``topic:NAME`` for each ``pydoc_data.topics`` entry, ``doc:MODULE[.QUALNAME]``
    for each docstring of the standard library's own modules (tests excluded),
    read with ``ast``: nothing is imported. About 2.2 MB; 4 s to read, so the result is kept in
    ``cache_dir()``, under a name that the Python version and every source file's path, size and
    modification time decide: any change to them reads the documents again.
    """
    import sys
    from pydoc_data import topics as topics_module

    root, files = _stdlib_sources()
    fingerprint = hashlib.sha256(f"{sys.version}\0{root}\0{MIN_DOCSTRING}\0{sorted(_SKIP_DIRS)}".encode())
    for f in [Path(topics_module.__file__), *files]:
        st = f.stat()
        fingerprint.update(f"\0{f}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    cached_path = cache_dir() / f"builtin-{fingerprint.hexdigest()[:24]}.json"
    docs = _read_cached(cached_path)
    if docs is None:
        docs = _read_documents(root, files, topics_module.topics)
        _write_cached(cached_path, docs)
    return docs


def _read_documents(root: Path, files: list[Path], topics: dict[str, str]) -> tuple[tuple[str, str], ...]:
    import ast

    docs = [(f"topic:{k}", topics[k].strip()) for k in sorted(topics)]
    for f in files:
        try:
            tree = ast.parse(f.read_bytes())
        except (SyntaxError, ValueError):
            continue  # a few files are deliberately invalid (tests data, templates)
        module = ".".join(f.relative_to(root).with_suffix("").parts)
        docs.extend(_docstrings(tree, module.removesuffix(".__init__")))
    seen: set[str] = set()
    unique = []
    for key, text in docs:
        if len(text) >= MIN_DOCSTRING and text not in seen:
            seen.add(text)
            unique.append((key, text))
    return tuple(unique)


def _docstrings(tree, prefix: str) -> list[tuple[str, str]]:
    import ast

    out = []
    doc = ast.get_docstring(tree, clean=True)
    if doc:
        out.append((f"doc:{prefix}", doc.strip()))
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            out.extend(_docstrings(node, f"{prefix}.{node.name}"))
    return out


def is_held_out(key: str) -> bool:
    """Whether a built-in document belongs to the fixed held-out part."""
    return zlib.crc32(key.encode()) % HELD_OUT_EVERY == 0


@functools.cache
def builtin_parts() -> tuple[str, str]:
    """(training text, held-out text) of the built-in corpus; documents joined by a blank line."""
    docs = builtin_documents()
    train = "\n\n".join(t for k, t in docs if not is_held_out(k))
    held = "\n\n".join(t for k, t in docs if is_held_out(k))
    return train, held


def builtin_text() -> str:
    """The built-in corpus: its training documents, then its held-out ones (see builtin_parts)."""
    train, held = builtin_parts()
    return train + "\n\n" + held


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


PHRASE_PUNCTUATION = ".,;:!?"
SENTENCE_PUNCTUATION = ".!?"


def punctuation_ends(text: str, marks: str) -> np.ndarray:
    """True on a punctuation mark in ``marks`` that a space, a newline, a tab or the end follows."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    followed = np.ones(len(text), bool)
    followed[:-1] = np.isin(codes[1:], [ord(" "), ord("\n"), ord("\t")])
    return np.isin(codes, [ord(c) for c in marks]) & followed


def prose_corpus(name: str, text: str, held_out: int = 0) -> Corpus:
    """A natural text's truths: words end before whitespace, phrases and sentences at punctuation
    followed by whitespace."""
    return Corpus(name, text, space_word_ends(text), punctuation_ends(text, PHRASE_PUNCTUATION),
                  sentence_ends=punctuation_ends(text, SENTENCE_PUNCTUATION), held_out=held_out,
                  sha256=text_sha256(text))


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
    if not text:
        raise UserError(f"corpus file {p} is empty; give it some text")
    if not text.strip():
        raise UserError(f"corpus file {p} contains only whitespace; give it some text")
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
    """Units one per line (``sep`` None) or separated by ``sep``; the text is their concatenation. With ``sep``,
    one line break at the end of the file is not part of the last unit."""
    raw = read_text_file(path)
    if sep is not None and "\n" not in sep:  # the line break that ends a file (an editor's) is not in its last unit
        raw = raw[:-2] if raw.endswith("\r\n") else raw[:-1] if raw.endswith("\n") else raw
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
        corpus = prose_corpus(BUILTIN_NAME, text, held_out=len(builtin_parts()[1]))
    elif source == "synthetic":
        corpus = synthetic_corpus(seed)
    else:
        if fmt not in ("auto", "text", "ptb", "lines"):
            raise UserError(f"unknown corpus format {fmt!r}; use auto, text, ptb or lines")
        if fmt == "lines":
            corpus = read_segmented(source)
        else:
            text = read_text_file(source)
            if fmt == "ptb" and not looks_like_ptb_chars(text):
                raise UserError(f"--format ptb: {source} is not in the Penn Treebank character format (one "
                                "character per token, '_' for a space: 'a _ b'); plain text needs no --format")
            if fmt == "ptb" or (fmt == "auto" and looks_like_ptb_chars(text)):
                corpus = prose_corpus(f"ptb-chars:{source}", decode_ptb_chars(text))
            else:
                corpus = prose_corpus(f"file:{source}", text)
    if strip:
        corpus = strip_corpus(corpus, strip)
    return dataclasses.replace(corpus, source=source or "builtin", strip=strip or None)


def source_of(meta: dict) -> str | None:
    """What ``load_corpus`` needs to read a run's corpus again, from its metadata or model provenance."""
    if meta.get("source"):
        return meta["source"]
    name = (meta.get("corpus") or "").split(" stripped of ")[0]
    if name.startswith("builtin"):
        return "builtin"
    if name.startswith("synthetic"):
        return "synthetic"
    return name.split(":", 1)[1] if name.startswith(("file:", "ptb-chars:")) else None


def run_corpus(meta: dict) -> Corpus | None:
    """A run's whole corpus read again from its metadata or model provenance (source, strip_delimiters,
    train_config's seed), or None where that text cannot be read again."""
    source = source_of(meta)
    if source is None:
        return None
    try:
        return load_corpus(source, seed=(meta.get("train_config") or {}).get("seed", 0),
                           strip=meta.get("strip_delimiters"))
    except UserError:
        return None  # the training file is gone


def training_part(meta: dict, corpus: Corpus | None = None) -> Corpus | None:
    """The part of a run's corpus (``run_corpus``, unless given) that it trained on, or None."""
    corpus = corpus or run_corpus(meta)
    if corpus is None:
        return None
    return corpus.part(0, corpus.held_out_start((meta.get("train_config") or {}).get("val_fraction", 0.1)),
                       "training part")


def strip_corpus(corpus: Corpus, strip: str) -> Corpus:
    """The corpus without the characters in ``strip``; word ends become the removed positions,
    the other truths and the held-out part follow the kept characters."""
    extra = [corpus.phrase_ends, corpus.sentence_ends]
    present = [e for e in extra if e is not None]
    held = np.zeros(len(corpus.text), bool)
    held[len(corpus.text) - corpus.held_out:] = True
    text, ends, mapped = strip_delimiters(corpus.text, strip, held, *present)
    if not text:
        raise UserError(f"the corpus is empty once {strip!r} is stripped")
    it = iter(mapped[1:])
    phrase, sentence = (None if e is None else next(it) for e in extra)
    return dataclasses.replace(corpus, name=f"{corpus.name} stripped of {strip!r}", text=text, word_ends=ends,
                               strip=strip, phrase_ends=phrase, sentence_ends=sentence,
                               held_out=int(mapped[0].sum()) if corpus.held_out else 0)


def split(ids: np.ndarray, start: int) -> tuple[np.ndarray, np.ndarray]:
    """Everything from ``start`` on (``Corpus.held_out_start``) is the validation set."""
    return ids[:start], ids[start:]


def delay(a: np.ndarray | None, k: int) -> np.ndarray | None:
    """``a`` moved k rows later: row t holds row t-k, the first k rows are 0 (--lookahead's targets, where the
    output at step t speaks of character t-k)."""
    if a is None or not k:
        return a
    out = np.zeros_like(a)
    out[k:] = a[: len(a) - k]
    return out


def too_short(chars: int, batch_size: int, seq_len: int, what: str = "the text") -> str:
    """Why ``chars`` characters cannot make one batch of ``batch_size`` streams x ``seq_len`` steps ("" if they
    can: each stream needs seq_len + 1 characters, the inputs and the next characters to predict)."""
    if (chars // batch_size - 1) // seq_len >= 1:
        return ""
    return (f"{what} ({chars:,} characters) is too short for batch size {batch_size:,} x sequence length "
            f"{seq_len:,}; use a longer text or smaller --batch-size/--seq-len")


def size_problem(train_chars: int, val_chars: int, batch_size: int, seq_len: int) -> str:
    """What is wrong with the sizes of a run on a text split into training and validation parts ("" if nothing).
    Needs no TensorFlow: the CLI asks before loading it."""
    if why := too_short(train_chars, batch_size, seq_len, "the training part"):
        return why
    if val_chars < 2 * (seq_len + 1):
        return (f"the validation part ({val_chars:,} characters) is shorter than two sequences of {seq_len:,}; use a "
                "longer text, a larger --val-fraction or a smaller --seq-len")
    return ""


class StreamBatcher:
    """Cuts a token stream into ``batch_size`` parallel contiguous streams.

    Batch k holds characters [k*T, (k+1)*T) of every stream, so the state at
    the end of batch k is the right start for batch k+1 (truncated BPTT).
    """

    def __init__(self, ids: np.ndarray, batch_size: int, seq_len: int, labels: np.ndarray | None = None):
        per_stream = len(ids) // batch_size
        self.steps = (per_stream - 1) // seq_len
        if self.steps < 1:
            raise UserError(too_short(len(ids), batch_size, seq_len))
        self.data = ids[: per_stream * batch_size].reshape(batch_size, per_stream)
        self.seq_len = seq_len
        n = 0 if labels is None else labels.shape[1]  # per character: one target per supervised layer
        labels = np.zeros((len(ids), 0), np.float32) if labels is None else labels
        self.labels = labels[: per_stream * batch_size].reshape(batch_size, per_stream, n)

    def __len__(self) -> int:
        return self.steps

    def batch(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets) [B, T] int32; targets are inputs shifted by one."""
        t = self.seq_len
        chunk = self.data[:, k * t : (k + 1) * t + 1]
        return chunk[:, :-1], chunk[:, 1:]

    def targets(self, k: int) -> np.ndarray:
        """The boundary targets of batch k's inputs: float32 [B, T, supervised layers]."""
        t = self.seq_len
        return self.labels[:, k * t : (k + 1) * t]
