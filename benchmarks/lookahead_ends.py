"""What the look-ahead's padding costs at the end of a text: each sentence as a text of its own.

A model with look-ahead K decides a text's last K characters from K padding steps of the unknown character
run after it (spec.LOOKAHEAD_PAD_ID), which it never saw in training. This sends each sentence of the
built-in held-out text (whitespace removed) as its own stream, the way a client of the unary `Segment` rpc
would, and scores word starts (layer 1) on the last K characters of each sentence and on the rest, beside
the same characters read inside one long stream (where real text follows them).

    python benchmarks/lookahead_ends.py [--model hmlstm/assets/default.onnx] [--sentences 2000]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hmlstm import boundary_scores, spec  # noqa: E402
from hmlstm.model.data import load_corpus  # noqa: E402
from hmlstm.serving.model import DEFAULT_MODEL, load_model  # noqa: E402


def decide(model, ids: np.ndarray) -> np.ndarray:
    """Layer 1's boundary for each character of one text run as one stream, padding steps at its end."""
    k = model.lookahead
    padded = np.concatenate([ids, np.full(k, spec.LOOKAHEAD_PAD_ID, np.int32)])
    out = model.run(padded[None, :], np.array([len(padded)], np.int32), model.zero_state(1))
    return out[spec.BOUNDARIES][0, k:, 0] > 0.5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--sentences", type=int, default=2000, help="the first this many held-out sentences")
    args = ap.parse_args()
    model = load_model(args.model, "cpu", threads=1, spinning=False)
    k = model.lookahead
    corpus = load_corpus("builtin", strip=model.provenance.get("strip_delimiters") or " \n\t")
    held = corpus.part(corpus.held_out_start(0.1), None, "held out")
    truth = held.unit_starts(("words",))[:, 0] > 0
    starts = np.flatnonzero(held.unit_starts(("sentences",))[:, 0] > 0)
    bounds = list(zip(starts[: args.sentences], starts[1 : args.sentences + 1]))
    end = bounds[-1][1]
    ids = model.vocab.encode(held.text[:end])
    whole = decide(model, ids)  # one stream: every character has real text after it (but the very last)
    alone = np.concatenate([decide(model, ids[a:b]) for a, b in bounds])  # each sentence its own text
    tail = np.zeros(end, bool)
    for a, b in bounds:
        tail[max(a, b - k) : b] = True
    rows = [("the last K characters of each sentence", tail), ("the rest", ~tail), ("all", np.ones(end, bool))]
    print(f"{args.model.name}: look-ahead {k}; {len(bounds):,} sentences of the built-in held-out text, "
          f"{end:,} characters, {int(tail.sum()):,} of them in a sentence's last {k}\n")
    print("| characters | word starts there | F1, each sentence its own text | F1, inside one stream |")
    print("|---|---:|---:|---:|")
    for name, mask in rows:
        a = boundary_scores.score(alone[mask], truth[:end][mask])
        w = boundary_scores.score(whole[mask], truth[:end][mask])
        print(f"| {name} | {int(truth[:end][mask].sum()):,} | {a.f1:.3f} | {w.f1:.3f} |")


if __name__ == "__main__":
    main()
