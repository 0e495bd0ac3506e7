"""Text with each layer's segment boundaries marked, for people reading a terminal."""

from __future__ import annotations

from hmlstm.serving.segments import cut

MARKS = {1: "|", 2: "‖", 3: "⦀"}


class Marker:
    """Marks a stream's text piece by piece: where a layer's boundary cuts it, the highest layer's mark.

    The cut is after the character a boundary fired on (end-aligned layers) or before it
    (start-aligned). A cut at a piece's end waits for the next piece (or ``close``), so a
    cut that two layers make from either side of a chunk border shows once, and every
    chunking prints the same.
    """

    def __init__(self, alignment: dict[int, str] | None = None, marks: dict[int, str] | None = None):
        self.alignment = alignment or {}
        self.chosen = marks or {}  # layer -> its mark, where not MARKS's
        self._cuts: dict[int, int] = {}  # position -> highest layer cutting there, not yet printed

    def feed(self, text: str, offset: int, boundaries: dict[int, list[int]]) -> str:
        for layer, offsets in boundaries.items():
            for o in offsets:
                c = cut(o, self.alignment.get(layer, "end"))
                self._cuts[c] = max(self._cuts.get(c, 0), layer)
        out = []
        for i, ch in enumerate(text):
            layer = self._cuts.pop(offset + i, 0)
            if layer and offset + i > 0:  # no mark before the stream's first character
                out.append(_mark(layer, self.chosen))
            out.append(ch)
        return "".join(out)

    def marks(self, length: int, offset: int, boundaries: dict[int, list[int]]) -> list[str]:
        """Like ``feed``, but the mark to print before each of the ``length`` characters from ``offset``
        ("" for none), for a caller that prints another text around them (the original, delimiters kept)."""
        for layer, offsets in boundaries.items():
            for o in offsets:
                c = cut(o, self.alignment.get(layer, "end"))
                self._cuts[c] = max(self._cuts.get(c, 0), layer)
        out = []
        for i in range(length):
            layer = self._cuts.pop(offset + i, 0)
            out.append(_mark(layer, self.chosen) if layer and offset + i > 0 else "")
        return out

    def close(self) -> str:
        """The marks left at the end of the text fed so far."""
        layer = max(self._cuts.values(), default=0)
        self._cuts.clear()
        return _mark(layer, self.chosen) if layer else ""


def mark(text: str, offset: int, boundaries: dict[int, list[int]], alignment: dict[int, str] | None = None) -> str:
    """One whole text, starting at stream ``offset``, with its boundaries marked."""
    m = Marker(alignment)
    return m.feed(text, offset, boundaries) + m.close()


def cut_original(original: str, kept: list[int], cuts: list[int], sep: str = " | ") -> str:
    """``original`` with ``sep`` wherever a layer cut the text that was sent: ``kept[i]`` is where
    character i of the sent text (``original`` less its stripped delimiters) stands in ``original``.
    ``cuts`` are positions in the sent text (``segments.cut``): a cut at i falls before character i."""
    at = sorted({kept[c] for c in cuts if 0 < c < len(kept)})
    pieces = [original[a:b].strip() for a, b in zip([0, *at], [*at, len(original)])]
    return sep.join(p for p in pieces if p)


def _mark(layer: int, marks: dict[int, str] | None = None) -> str:
    return (marks or {}).get(layer) or MARKS.get(layer, "‖" * layer)


def legend(layers: list[int], marks: dict[int, str] | None = None) -> str:
    return "  ".join(f"{_mark(l, marks)} layer {l}" for l in layers)
