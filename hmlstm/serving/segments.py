"""From per-character boundary flags to boundary offsets and closed segments.

Pure Python and NumPy. A boundary of layer l at offset t cuts the stream
at t + 1 if the layer is end-aligned (z fires on a segment's last character,
the paper's reading) or at t if it is start-aligned (z fires on the next
segment's first character, as a layer trained with --entropy-target does):
the cut closes the layer's open segment and opens the next. The tracker keeps
the text of the oldest open segment so a closed segment can carry its text
even when it began chunks ago. A segment that reaches ``max_segment_chars``
without a boundary is closed there (so memory per stream stays bounded);
this depends only on positions, so every chunking gives the same segments.

A model with look-ahead K (train --lookahead) outputs at step t the boundaries
of character t - K: the tracker decides offsets up to ``decided`` = end - K,
holds the last K characters undecided, and decides them at ``flush`` from the
boundaries of K padding steps run after the stream's end.
"""

from __future__ import annotations

from bisect import bisect_left
from functools import partial
from typing import NamedTuple

import numpy as np


class Span(NamedTuple):  # a tuple: made by the thousand per second on the server's hot path
    layer: int  # 1-based
    start: int
    end: int  # one past the last character
    text: str
    final: bool


_span = partial(tuple.__new__, Span)  # Span(*fields) without the generated __new__ (a Python call per span)


def cut(t: int, alignment: str) -> int:
    """Where a boundary that fired at offset t splits the stream (the next segment's start)."""
    return t if alignment == "start" else t + 1


# A segment that reaches this many characters without a boundary is closed there (final = true) and the next
# one starts: the server holds at most this much text per layer and stream (segmenter.proto, Segment).
MAX_SEGMENT_CHARS = 65_536


class SegmentTracker:
    def __init__(self, layers: list[int], max_segment_chars: int = MAX_SEGMENT_CHARS,
                 alignment: dict[int, str] | None = None, lookahead: int = 0):
        self.layers = list(layers)
        self.max_segment_chars = max_segment_chars
        self.alignment = {l: (alignment or {}).get(l, "end") for l in self.layers}
        self.lookahead = lookahead
        self.open_start = {l: 0 for l in self.layers}
        self._buffer = ""  # text from offset self._buffer_start on
        self._buffer_start = 0
        self.end = 0  # characters fed so far
        self.decided = 0  # characters whose boundaries are known: end - lookahead (at least 0) until the flush

    def to_dict(self) -> dict:
        return {"layers": self.layers, "max_segment_chars": self.max_segment_chars,
                "alignment": {str(k): v for k, v in self.alignment.items()},
                "open_start": {str(k): v for k, v in self.open_start.items()}, "buffer": self._buffer,
                "buffer_start": self._buffer_start, "end": self.end, "lookahead": self.lookahead,
                "decided": self.decided}

    @classmethod
    def from_dict(cls, d: dict) -> SegmentTracker:
        t = cls(d["layers"], d["max_segment_chars"], {int(k): v for k, v in d.get("alignment", {}).items()},
                d.get("lookahead", 0))  # records written before look-ahead: none
        t.open_start = {int(k): v for k, v in d["open_start"].items()}
        t._buffer, t._buffer_start, t.end = d["buffer"], d["buffer_start"], d["end"]
        t.decided = d.get("decided", t.end)
        return t

    def copy(self) -> SegmentTracker:
        other = SegmentTracker.__new__(SegmentTracker)
        other.__dict__.update(self.__dict__)
        other.layers = list(self.layers)
        other.open_start = dict(self.open_start)
        other.alignment = dict(self.alignment)
        return other

    def _text(self, start: int, end: int) -> str:
        return self._buffer[start - self._buffer_start : end - self._buffer_start]

    def feed(self, offset: int, text: str, z: np.ndarray) -> tuple[dict[int, list[int]], list[Span]]:
        """Add a chunk; z [len(text), L] holds every layer's 0/1 boundary per step of the chunk (of the
        character ``lookahead`` steps earlier).

        Returns (boundary offsets per reported layer, segments closed, per layer in order), for the
        characters this chunk decided.
        """
        if len(text) != z.shape[0]:
            raise ValueError(f"{len(text)} characters but {z.shape[0]} boundary rows")
        return self.feed_fired(offset, text, self.fired(z, offset - self.lookahead))

    @staticmethod
    def fired(z: np.ndarray, base: int) -> list[list[int]]:
        """Per column of z [T, L] (layer l's is l - 1), the offsets (base + row) of the rows where it fired,
        with one NumPy call for all of them. (The server reads a whole batch's at once: ``batch.read_rows``.)"""
        which, where = (z.T > 0.5).nonzero()  # by column, then by row
        which, where = which.tolist(), (where + base).tolist()
        out, lo = [], 0
        for k in range(z.shape[1]):
            hi = bisect_left(which, k + 1, lo)
            out.append(where[lo:hi])
            lo = hi
        return out

    def feed_fired(self, offset: int, text: str, fired: list[list[int]]) -> tuple[dict[int, list[int]], list[Span]]:
        """``feed`` with the boundaries read already: ``fired[l - 1]``, ascending, the offsets at which layer l
        fired in this chunk's steps (step t speaks of offset + t - lookahead), for every layer reported."""
        if offset != self.end:
            raise ValueError(f"chunk at offset {offset}, but {self.end} characters were fed")
        self._buffer += text
        self.end = offset + len(text)
        # The chunk's steps decide the characters from the first undecided one to end - lookahead (none
        # while fewer than lookahead characters were fed).
        return self._decide(fired, max(self.decided, self.end - self.lookahead))

    def _decide(self, fired: list[list[int]], end: int) -> tuple[dict[int, list[int]], list[Span]]:
        """Decide the characters from ``decided`` to ``end`` given each layer's boundaries among them (offsets
        below ``decided`` are steps that spoke of no character yet, and are dropped). The server's hot path:
        plain loops over the few boundaries that fired."""
        buffer, base, decided = self._buffer, self._buffer_start, self.decided
        self.decided = end
        limit = self.max_segment_chars
        boundaries: dict[int, list[int]] = {}
        closed: list[Span] = []
        open_start = self.open_start
        for l in self.layers:
            ts = fired[l - 1]
            ts = boundaries[l] = ts[bisect_left(ts, decided) :]  # (an offset below decided spoke of no character)
            start = open_start[l]
            shift = cut(0, self.alignment[l])
            for t in ts + [None]:  # each boundary's cut, then the end of what is decided
                stop = end if t is None else t + shift  # the segment so far ends before stop
                while stop - start >= limit:  # forced close at the limit
                    closed.append(_span((l, start, start + limit, buffer[start - base : start + limit - base], True)))
                    start += limit
                if t is not None and stop > start:
                    closed.append(_span((l, start, stop, buffer[start - base : stop - base], True)))
                    start = stop
            open_start[l] = start
        keep_from = min(open_start.values(), default=end)  # open segments, and the undecided characters
        if keep_from != base:
            self._buffer = buffer[keep_from - base :]
            self._buffer_start = keep_from
        return boundaries, closed

    def open_spans(self) -> list[Span]:
        """The segment still open in each layer: its span so far (to ``decided``), no text."""
        decided = self.decided
        return [_span((l, s, decided, "", False)) for l, s in self.open_start.items() if s < decided]

    @property
    def undecided(self) -> int:
        """Characters fed whose boundaries wait for look-ahead."""
        return self.end - self.decided

    def flush(self, z_pad: np.ndarray | None = None) -> tuple[dict[int, list[int]], list[Span]]:
        """End of stream: decide the undecided characters from ``z_pad``, the boundaries of ``lookahead``
        padding steps run after the last character (needed only while some are undecided), then close every
        open segment. Returns the boundaries decided and the segments closed, per layer in order."""
        if z_pad is not None and len(z_pad) != self.lookahead:
            raise ValueError(f"{len(z_pad)} padding rows for a look-ahead of {self.lookahead}")
        return self.flush_fired(None if z_pad is None else self.fired(z_pad, self.end - self.lookahead))

    def flush_fired(self, fired: list[list[int]] | None = None) -> tuple[dict[int, list[int]], list[Span]]:
        """``flush`` with the padding steps' boundaries read already (as ``feed_fired`` takes them)."""
        boundaries: dict[int, list[int]] = {}
        closed: list[Span] = []
        if self.undecided:
            if fired is None:
                raise ValueError(f"{self.undecided} undecided character(s) need the boundaries of "
                                 f"{self.lookahead} padding steps")
            boundaries, closed = self._decide(fired, self.end)
        closed += [Span(l, s, self.end, self._text(s, self.end), True)
                   for l, s in self.open_start.items() if s < self.end]
        closed.sort(key=lambda s: s.layer)  # stable: each layer's in stream order
        for l in self.open_start:
            self.open_start[l] = self.end
        self._buffer, self._buffer_start = "", self.end
        return boundaries, closed
