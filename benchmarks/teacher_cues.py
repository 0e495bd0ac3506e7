"""How good each self-supervised boundary target would be, measured on a trained model's own entropy.

A layer is taught to fire after the language model's entropy peaks
(``hmlstm train --entropy-target``). Which peaks, is the choice this script
measures without training anything: for one model, each candidate teacher's
F1 against word starts (layer 1's unit) and phrase starts (the upper layers'),
on the built-in held-out text and on any other text, whitespace removed.
Beside them: the model's own layers. Writes the ``teacher-cues`` section of
docs/segmentation.md with --write-docs.

    python benchmarks/teacher_cues.py runs/window10k --eval-text ../shared/data/tinyshakespeare.txt
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import add_write_docs, publish  # noqa: E402
from hmlstm import boundary_scores  # noqa: E402
from hmlstm.cli import quiet_tensorflow  # noqa: E402

quiet_tensorflow()
from hmlstm.evaluation import entropy_peaks, entropy_rises, next_char_entropy, run_model  # noqa: E402
from hmlstm.model.data import Corpus, load_corpus  # noqa: E402

STRIP = " \n\t"
CHARS = 200_000


def local_contrast(h: np.ndarray, window: int) -> np.ndarray:
    """Entropy above the mean of the ``window`` characters around (fewer at the ends), as training computes it."""
    sums = np.convolve(h, np.ones(window), "same")
    counts = np.convolve(np.ones_like(h), np.ones(window), "same")
    return h - sums / counts


def top_peaks(peak: np.ndarray, score: np.ndarray, fraction: float) -> np.ndarray:
    """The peaks whose score is among the highest ``fraction`` of all peaks' (over the whole text; training
    ranks within each batch)."""
    return peak & (score >= np.quantile(score[peak], 1.0 - fraction))


def after(fire: np.ndarray) -> np.ndarray:
    """A cue at t taught to z at t+1 (the start alignment)."""
    out = np.zeros_like(fire)
    out[1:] = fire[:-1]
    return out


def cues(h: np.ndarray) -> dict[str, np.ndarray]:
    peak = entropy_peaks(h)
    out = {"every peak (`--peak-fractions 1`)": after(peak), "entropy rises": after(entropy_rises(h))}
    for f in (0.8, 0.7, 0.6):
        out[f"highest {f:.0%} of peaks"] = after(top_peaks(peak, h, f))
    for w in (5, 9, 15):
        out[f"highest 70% above a {w}-character mean (`--peak-window {w}`)"] = \
            after(top_peaks(peak, local_contrast(h, w), 0.7))
    for f in (0.25, 0.15, 0.08):
        out[f"highest {f:.0%} of peaks (upper layers)"] = after(top_peaks(peak, h, f))
    return out


def measure(model: str, corpus: Corpus) -> list[tuple[str, float, float, float, float]]:
    """(cue, rate, word-start F1, phrase-start F1, random F1 for phrases at that rate) per cue and layer."""
    out = run_model(model, corpus.text)
    starts = {u: after(corpus.truths()[u]) for u in ("words", "phrases")}
    detectors = {**cues(next_char_entropy(out.logits)),
                 **{f"the model's layer {l + 1}": out.boundaries[:, l] > 0.5 for l in range(out.boundaries.shape[1])}}
    rows = []
    for name, fire in detectors.items():
        w, p = (boundary_scores.score(fire, starts[u]) for u in ("words", "phrases"))
        rows.append((name, w.rate, w.f1, p.f1, p.random_f1))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a training run directory or an exported .onnx")
    ap.add_argument("--eval-text", default=None, metavar="PATH", help="another text, whitespace removed the same way")
    add_write_docs(ap)
    args = ap.parse_args()
    builtin = load_corpus("builtin", strip=STRIP)
    start = builtin.held_out_start(0.1)
    texts = {"built-in held-out": builtin.part(start, start + CHARS, "held out")}
    if args.eval_text:
        texts[Path(args.eval_text).stem] = load_corpus(args.eval_text, strip=STRIP).part(0, CHARS, "start")
    results = {name: measure(args.model, c) for name, c in texts.items()}
    names = [r[0] for r in next(iter(results.values()))]
    header = "| cue (taught to z at t+1) | " + " | ".join(
        f"{t}: rate | word F1 | phrase F1 / random" for t in results) + " |"
    lines = [
        "## Which peaks to teach", "",
        f"Written by `benchmarks/teacher_cues.py {Path(args.model).name}"
        + (f" --eval-text {args.eval_text}`" if args.eval_text else "`")
        + ". Every candidate target, scored as a detector on the model's own next-character entropy, "
        f"start-aligned, on at most {CHARS:,} characters of each text with whitespace removed. A layer trained on "
        "a cue tends to end near it, usually a little above (the student generalizes its teacher).", "",
        header, "|---|" + "---:|---:|---|" * len(results)]
    for i, name in enumerate(names):
        cells = [name]
        for rows in results.values():
            _, rate, wf1, pf1, prand = rows[i]
            cells += [f"{rate:.1%}", f"{wf1:.3f}", f"{pf1:.3f} / {prand:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    publish("teacher-cues", "\n".join(lines), args.write_docs, ROOT / "docs" / "segmentation.md")


if __name__ == "__main__":
    main()
