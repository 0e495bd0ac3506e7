"""Precision, recall and F1 of detected boundaries against true ones (NumPy only).

A boundary is a position in the character stream. The model's z^l_t = 1 says
"a segment of layer l ends at character t". Truth arrays use the same
convention: True on the last character of a unit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class BoundaryScore:
    precision: float
    recall: float
    f1: float
    rate: float  # fraction of positions where the detector fired
    true_rate: float  # fraction of positions that are true boundaries
    random_f1: float  # F1 of a random detector firing at the same rate

    def to_dict(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in asdict(self).items()}


def _f1(p: float, r: float) -> float:
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)


def score(pred: np.ndarray, truth: np.ndarray) -> BoundaryScore:
    """Exact-position match of two boolean arrays of the same length.

    With no predictions precision is 0; with no true boundaries recall is 0.
    The random baseline fires independently at the same rate: its expected
    precision is the true rate and its expected recall the firing rate.
    """
    pred = np.asarray(pred, bool).ravel()
    truth = np.asarray(truth, bool).ravel()
    if pred.shape != truth.shape:
        raise ValueError(f"pred has {pred.size} positions, truth {truth.size}")
    n = pred.size
    hits = int(np.sum(pred & truth))
    n_pred, n_true = int(pred.sum()), int(truth.sum())
    p = hits / n_pred if n_pred else 0.0
    r = hits / n_true if n_true else 0.0
    rate = n_pred / n if n else 0.0
    true_rate = n_true / n if n else 0.0
    return BoundaryScore(p, r, _f1(p, r), rate, true_rate, _f1(true_rate, rate))
