"""A model call's outputs, read for all of its rows at once.

What a stream needs from a call is its next state, where each layer fired,
and (if it asked) the most likely next characters. ``read_rows`` reads these
for every row of a call with a fixed number of NumPy calls, however many
streams the call served: one threshold and ``nonzero`` over the whole
boundary tensor, one softmax and sort over the rows that asked for top-k,
and each row's next state as a reference to its row of the call's outputs
(``StateRow``), which the next batch gathers with one take per input
(``gather``). What is left per stream is its tracker's bookkeeping over the
few boundaries that fired, and its response.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from hmlstm import spec


class StateRow(Mapping):
    """A stream's next state: row ``row`` of one call's state outputs. As a mapping, input name -> that row as a
    [1, ...] view, made when read; a batch of such rows from one call is gathered with one take per input."""

    __slots__ = ("arrays", "row")

    def __init__(self, arrays: dict[str, np.ndarray], row: int):
        self.arrays = arrays  # input name -> the call's output [B, ...] that feeds it; shared by the call's rows
        self.row = row

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name][self.row : self.row + 1]

    def __iter__(self):
        return iter(self.arrays)

    def __len__(self) -> int:
        return len(self.arrays)


def gather(states: list[Mapping], buffers: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The rows' states stacked into ``buffers`` (input name -> [max_batch, ...], reused for every call): per input,
    one take for each earlier call the rows come from (a busy server's batch is the rows of one call), and one
    copy for each other row (a new stream's zeros, a state loaded from a store)."""
    b = len(states)
    calls: dict[int, tuple[dict, list[int], list[int]]] = {}  # id(call's arrays) -> (arrays, positions, rows)
    others = []
    for pos, s in enumerate(states):
        if type(s) is StateRow:
            entry = calls.get(id(s.arrays))
            if entry is None:
                entry = calls[id(s.arrays)] = (s.arrays, [], [])
            entry[1].append(pos)
            entry[2].append(s.row)
        else:
            others.append((pos, s))
    out = {}
    for name, buf in buffers.items():
        dst = out[name] = buf[:b]
        for arrays, positions, rows in calls.values():
            if len(positions) == b:  # every row from one call
                np.take(arrays[name], rows, axis=0, out=dst)
            else:
                dst[positions] = arrays[name][rows]
        for pos, s in others:
            dst[pos] = s[name][0]
    return out


@dataclass
class Row:
    state: Mapping  # the stream's next state: input name -> [1, ...] (a StateRow of the call's outputs)
    fired: list[list[int]]  # per boundary column (layer l's is l - 1): ascending offsets where it fired
    next_chars: list[tuple[str, float]]  # top-k after the row's last step ([] where none was asked)


def read_rows(outputs: dict[str, np.ndarray], lengths: np.ndarray, bases, top_k, chars: list[str],
              state_map: dict[str, str], states: list[dict] | None = None) -> list[Row]:
    """Every row of one call. ``outputs``: the call's outputs, [B, T, ...] for the per-step ones; ``lengths``:
    each row's steps; ``bases``: the stream offset each row's step 0 speaks of (the chunk's offset less the
    look-ahead); ``top_k``: per row, how many next characters it asked for; ``states``: the rows' next states
    where the caller holds them (IO binding), else rows of the outputs named by ``state_map`` (output ->
    input)."""
    b = len(lengths)
    if states is None:
        arrays = {i: outputs[o] for o, i in state_map.items()}
        states = [StateRow(arrays, i) for i in range(b)]
    fired = _fired(outputs[spec.BOUNDARIES], lengths, np.asarray(bases, np.int64))
    asked = [i for i, k in enumerate(top_k) if k]
    best = {}
    if asked:
        last = outputs[spec.LOGITS][asked, lengths[asked] - 1]  # [R, V]: after each asking row's last step
        best = dict(zip(asked, next_chars(last, [top_k[i] for i in asked], chars)))
    return [Row(states[i], fired[i], best.get(i, [])) for i in range(b)]


def _fired(z: np.ndarray, lengths: np.ndarray, bases: np.ndarray) -> list[list[list[int]]]:
    """Per row and column of z [B, T, L], the offsets (base + step) where it fired, within the row's steps."""
    b, _, n = z.shape
    row, col, step = (z.transpose(0, 2, 1) > 0.5).nonzero()  # ordered by row, column, step
    if (lengths < z.shape[1]).any():  # ragged rows: steps past a row's length are padding
        keep = step < lengths[row]
        row, col, step = row[keep], col[keep], step[keep]
    offsets = (step + bases[row]).tolist()
    cuts = np.searchsorted(row * n + col, np.arange(b * n + 1)).tolist()  # where each (row, column) starts
    return [[offsets[cuts[i * n + c] : cuts[i * n + c + 1]] for c in range(n)] for i in range(b)]


def next_chars(logits: np.ndarray, ks: list[int], chars: list[str]) -> list[list[tuple[str, float]]]:
    """Per row of logits [R, V], its ks[i] most likely next characters and their probabilities: one softmax
    and one sort for all rows."""
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    order = np.argsort(-p, axis=1, kind="stable")[:, : max(ks)]
    return [[(chars[j], float(p[i, j])) for j in order[i, :k].tolist()] for i, k in enumerate(ks)]
