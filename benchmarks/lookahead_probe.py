"""Would deciding a word start K characters late help? A probe for the look-ahead design (issue 27).

The HM-LSTM is unchanged (no window input, no new state): layer 1's detector at step t is taught
whether character t-K started a word (the --boundary-targets words target shifted by K), so that it
has read K more characters when it decides (layers 2 and 3 keep the earlier recipe's entropy-peak
targets). Each K trains the shipped model's shape on the built-in
text without whitespace for the same number of steps, then scores z[t] against start[t-K] on the
held-out part (word-start F1). Prints one JSON line per K.

    python benchmarks/lookahead_probe.py --k 0 2 [--steps 1500]

It predates `hmlstm train --lookahead K`, which moves every supervised layer's target K steps later (the
shipped recipe supervises all three); this probe moves layer 1's alone, with layers 2 and 3 on the earlier
recipe's entropy peaks, so its numbers compare K values under one recipe, not the product's recipe.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hmlstm import boundary_scores  # noqa: E402
from hmlstm.model.data import Corpus, load_corpus  # noqa: E402


def probe(k: int, steps: int, out: Path) -> dict:
    from hmlstm.evaluation import run_model
    from hmlstm.model.config import TrainConfig
    from hmlstm.model.train import train

    corpus = load_corpus("builtin", strip=" \n\t")
    starts = Corpus.unit_starts

    def shifted(self, units):  # the target of step t is whether character t-K started a unit
        a = starts(self, units)
        return np.concatenate([np.zeros((k, a.shape[1]), a.dtype), a[: len(a) - k]]) if k else a

    Corpus.unit_starts = shifted
    try:
        cfg = TrainConfig(max_steps=steps, boundary_targets=("words",), entropy_target=1.0,  # layers 2 and 3
                          peak_fractions=(0.7, 0.25, 0.08), peak_window=9)  # as the earlier shipped recipe
        t0 = time.monotonic()
        train(corpus, dict(top_boundary=True), cfg, out, progress=False, log=lambda m: None)
        minutes = (time.monotonic() - t0) / 60
    finally:
        Corpus.unit_starts = starts
    held = corpus.part(corpus.held_out_start(0.1), None, "held out")
    truth = held.unit_starts(("words",))[:, 0] > 0
    z = run_model(out, held.text).boundaries[:, 0] > 0.5
    n = len(truth) - k
    s = boundary_scores.score(z[k:], truth[:n])  # z at t decides character t-K
    return {"K": k, "steps": steps, "word_start_f1": round(s.f1, 4), "precision": round(s.precision, 4),
            "recall": round(s.recall, 4), "train_minutes": round(minutes, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--steps", type=int, default=1500)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for k in args.k:
            print(json.dumps(probe(k, args.steps, Path(tmp) / f"k{k}")), flush=True)


if __name__ == "__main__":
    main()
