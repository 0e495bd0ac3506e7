"""Boundary quality against true segmentations: the yardstick of the product.

``evaluate(model_path, corpus)`` runs a model over a text whose true unit ends
are known and reports, per layer: the firing rate; precision, recall and F1
under both alignments (a boundary on the last character of a unit, or on the
first character of the next); the F1 of a random detector at the same rate;
and bits per character. Beside them, two baselines from the same network
that need no boundary detector at all: peaks and rises of the language
model's next-character entropy (a unit tends to end where what comes next is
hardest to guess).

Models: a training run directory (TensorFlow) or an exported .onnx file (ONNX
Runtime; no TensorFlow needed).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hmlstm import boundary_scores
from hmlstm import spec as io_spec
from hmlstm.errors import UserError
from hmlstm.model.data import Corpus, Vocabulary

PIECE = 4096


@dataclass(frozen=True)
class Outputs:
    logits: np.ndarray  # [T, V]
    boundaries: np.ndarray  # [T, L] 0/1
    vocab: Vocabulary
    unknown: int
    alignment: dict[int, str]  # layer with a boundary detector -> "start" or "end" (what the model declares)


class _Progress:
    """Says how far a long run over a text has come, at most every ``every_s`` seconds."""

    def __init__(self, log, total: int, every_s: float = 10.0):
        self.log, self.total, self.every_s = log, total, every_s
        self.t0 = self.last = time.monotonic()

    def __call__(self, done: int) -> None:
        now = time.monotonic()
        if self.log is not None and now - self.last >= self.every_s and done < self.total:
            self.last = now
            rate = done / max(now - self.t0, 1e-9)
            self.log(f"  {done / self.total:.0%} ({done:,} of {self.total:,} characters, about "
                     f"{(self.total - done) / max(rate, 1e-9):.0f}s to go)")


def _run_onnx(path: Path, text: str, progress=None) -> Outputs:
    from hmlstm import spec
    from hmlstm.serving.model import ModelLoadError, load_model

    try:  # one stream, one character a step: a second intra-op thread saves 14% of the time and costs 73% more
        # CPU (shipped model, 2 cores: 51.6 against 59.7 us/char; 103 against 59.7 us of CPU), and spins
        model = load_model(path, "cpu", threads=1, spinning=False)
    except ModelLoadError as e:
        raise UserError(str(e)) from None
    ids, unknown = model.vocab.encode_counting(text)
    ids = _padded(ids, model.lookahead)
    state, logits, z = model.zero_state(1), [], []
    for i in range(0, len(ids), PIECE):
        piece = ids[None, i : i + PIECE]
        out = model.run(piece, np.array([piece.shape[1]], np.int32), state)
        logits.append(out[spec.LOGITS][0])
        z.append(out[spec.BOUNDARIES][0])
        state = {model.state_map[k]: v for k, v in out.items() if k in model.state_map}
        if progress is not None:
            progress(i + piece.shape[1])
    return _decided(np.concatenate(logits), np.concatenate(z), model.lookahead, model.vocab, unknown,
                    dict(model.alignment))


def _padded(ids: np.ndarray, lookahead: int) -> np.ndarray:
    """The text's ids, then the look-ahead's padding steps (as the server runs them at a stream's end)."""
    return np.concatenate([ids, np.full(lookahead, io_spec.LOOKAHEAD_PAD_ID, ids.dtype)]) if lookahead else ids


def _decided(logits: np.ndarray, z: np.ndarray, lookahead: int, *rest) -> Outputs:
    """Outputs per character of the text: the logits of its steps, and the boundaries decided about each
    character (a model with look-ahead K says them K steps later)."""
    n = len(z) - lookahead
    return Outputs(logits[:n], z[lookahead:], *rest)


def _run_checkpoint(path: Path, text: str, progress=None) -> Outputs:
    import tensorflow as tf

    from hmlstm.model.checkpoint import load_network

    net, info = load_network(path)
    ids, unknown = info.vocab.encode_counting(text)
    ids = _padded(ids, info.train.lookahead)
    spec = tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape, t.dtype), net.initial_state(1))

    @tf.function(input_signature=[tf.TensorSpec([1, None], tf.int32), spec])
    def run(tokens, state):
        out = net(tokens, state)
        return out.logits, out.boundaries, out.final_state

    state, logits, z = net.initial_state(1), [], []
    for i in range(0, len(ids), PIECE):
        lg, b, state = run(ids[None, i : i + PIECE], state)
        logits.append(lg.numpy()[0])
        z.append(b.numpy()[0])
        if progress is not None:
            progress(i + PIECE)
    declared = io_spec.boundary_alignment(info.model.num_layers, info.model.top_boundary,
                                          info.train.start_aligned)
    return _decided(np.concatenate(logits), np.concatenate(z), info.train.lookahead, info.vocab, unknown,
                    {int(k): v for k, v in declared.items()})


def run_model(path: str | Path, text: str, log=None) -> Outputs:
    """The model's logits and boundaries over ``text``; ``log``, if given, hears how far it has come every
    10 s (a long text takes minutes)."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"model {p} does not exist; give a training run directory or an exported .onnx file")
    if not text:
        raise UserError("the text to evaluate is empty")
    progress = _Progress(log, len(text)) if log is not None else None
    return _run_onnx(p, text, progress) if p.is_file() else _run_checkpoint(p, text, progress)


def next_char_entropy(logits: np.ndarray) -> np.ndarray:
    """Entropy in bits of the predicted next character after each position: [T]."""
    z = logits - logits.max(axis=-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=-1, keepdims=True)
    return -(p * np.log2(np.maximum(p, 1e-30))).sum(axis=-1)


def entropy_peaks(h: np.ndarray) -> np.ndarray:
    """Fire where the entropy is a local maximum (higher than before, not lower than after)."""
    fire = np.zeros(len(h), bool)
    fire[1:-1] = (h[1:-1] > h[:-2]) & (h[1:-1] >= h[2:])
    return fire


def entropy_rises(h: np.ndarray) -> np.ndarray:
    """Fire wherever the entropy rises from the previous position."""
    fire = np.zeros(len(h), bool)
    fire[1:] = h[1:] > h[:-1]
    return fire


def bits_per_char(logits: np.ndarray, ids: np.ndarray) -> float:
    if len(ids) < 2:
        return float("nan")
    z = logits[:-1] - logits[:-1].max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return float(-logp[np.arange(len(ids) - 1), ids[1:]].mean() / math.log(2))


def unigram_bpc(train_text: str, text: str, vocab: Vocabulary) -> float:
    """Bits per character of ``text`` (from its second character, like bits_per_char) under a unigram
    character model estimated from ``train_text`` over the model's vocabulary, add-one smoothed: the
    language model has to beat this to know anything beyond character frequencies."""
    counts = np.bincount(vocab.encode(train_text), minlength=len(vocab)).astype(np.float64) + 1.0
    logp = np.log2(counts / counts.sum())
    ids = vocab.encode(text)
    return float(-logp[ids[1:]].mean()) if len(ids) > 1 else float("nan")


def _aligned(truth_end: np.ndarray) -> dict[str, np.ndarray]:
    start = np.zeros_like(truth_end)
    start[1:] = truth_end[:-1]  # the first character of the next unit
    return {"end": truth_end, "start": start}


def evaluate(model: str | Path, corpus: Corpus, training: Corpus | None = None, log=None) -> dict:
    """Per-layer scores and baselines for ``model`` on ``corpus`` (which must know its word ends).

    ``training``: the text the model trained on, for the unigram baseline of its BPC. ``log``: told each
    stage as it starts (the model run over a long text takes a while).
    """
    log = log or (lambda m: None)
    if corpus.word_ends is None:
        raise UserError(f"{corpus.name} has no known boundaries to score against")
    log(f"running the model over {len(corpus.text):,} characters")
    out = run_model(model, corpus.text, log=log)
    truths = corpus.truths()
    names = list(truths)
    units = ", ".join(names[:-1]) + f" and {names[-1]}" if len(names) > 1 else names[0]
    log(f"scoring every layer against {units}, and the entropy baselines")
    ids = out.vocab.encode(corpus.text)
    layers = {}
    for l in range(out.boundaries.shape[1]):
        pred = out.boundaries[:, l] > 0.5
        entry = {"rate": round(float(pred.mean()), 4), "alignment": out.alignment.get(l + 1)}  # None: no detector
        for unit, truth in truths.items():
            entry[unit] = {a: boundary_scores.score(pred, t).to_dict() for a, t in _aligned(truth).items()}
        layers[f"layer{l + 1}"] = entry
    h = next_char_entropy(out.logits)
    baselines = {}
    for name, fire in (("entropy_peaks", entropy_peaks(h)), ("entropy_rises", entropy_rises(h))):
        baselines[name] = {unit: boundary_scores.score(fire, truth).to_dict() for unit, truth in truths.items()}
    report = {"model": str(model), "text": corpus.name, "chars": len(corpus.text), "unknown_chars": out.unknown,
              "text_sha256": corpus.sha256,
              "bpc": round(bits_per_char(out.logits, ids), 4), "layers": layers, "baselines": baselines}
    if training is not None:
        log(f"the unigram baseline of the training text ({len(training.text):,} characters)")
        report["unigram_bpc"] = round(unigram_bpc(training.text, corpus.text, out.vocab), 4)
        report["training_text"] = {"name": training.name, "chars": len(training.text), "sha256": training.sha256}
    return report


def text_label(name: str) -> str:
    """A corpus name as a short label: "file:../data/x.txt stripped of ' '" -> "x.txt", "builtin:..." -> "builtin"."""
    source = name.split(" stripped of ")[0].split(",")[0]
    kind, _, rest = source.partition(":")
    return Path(rest).name if kind in ("file", "ptb-chars") else kind


def format_report(r: dict) -> str:
    """The report as text: per unit, each layer scored first in the alignment the model declares (``start``:
    a boundary on a unit's first character; ``end``: on its last), then F1 in the other one; a layer without
    a boundary detector says so instead of showing zeros."""
    lines = [f"{r['model']} on {r['text']}: {r['chars']:,} characters, {r['bpc']:.3f} bits per character"
             + (f" (a unigram model of the training text: {r['unigram_bpc']:.3f})" if "unigram_bpc" in r else "")
             + (f", {r['unknown_chars']} unknown" if r["unknown_chars"] else "")]
    units = [u for u in ("words", "phrases", "sentences") if u in next(iter(r["layers"].values()))]
    for unit in units:
        lines.append(f"\n{unit}: true ends at {next(iter(r['layers'].values()))[unit]['end']['true_rate']:.1%} "
                     "of characters")
        lines.append(f"  {'detector':<16}{'rate':>7}{'aligned':>9}{'P':>7}{'R':>7}{'F1':>7}{'F1 other':>10}"
                     f"{'random F1':>11}")
        for name, e in r["layers"].items():
            if "alignment" in e and e["alignment"] is None:
                lines.append(f"  {name:<16}{'':>7}  no boundary detector (--top-boundary gives the top layer one)")
                continue
            declared = e.get("alignment") or "end"
            other = "start" if declared == "end" else "end"
            s, o = e[unit][declared], e[unit][other]
            lines.append(f"  {name:<16}{e['rate']:>7.1%}{declared:>9}{s['precision']:>7.2f}{s['recall']:>7.2f}"
                         f"{s['f1']:>7.2f}{o['f1']:>10.2f}{s['random_f1']:>11.2f}")
        for name, b in r["baselines"].items():
            s = b[unit]
            lines.append(f"  {name:<16}{s['rate']:>7.1%}{'':>9}{s['precision']:>7.2f}{s['recall']:>7.2f}"
                         f"{s['f1']:>7.2f}{'':>10}{s['random_f1']:>11.2f}")
    return "\n".join(lines)
