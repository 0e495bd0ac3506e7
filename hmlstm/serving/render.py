"""Text with each layer's segment boundaries marked, for people reading a terminal."""

from __future__ import annotations

MARKS = {1: "|", 2: "‖", 3: "⦀"}


def mark(text: str, offset: int, boundaries: dict[int, list[int]]) -> str:
    """``text`` starts at stream ``offset``; after each boundary insert the highest layer's mark."""
    top: dict[int, int] = {}
    for layer, offsets in boundaries.items():
        for o in offsets:
            top[o] = max(top.get(o, 0), layer)
    out = []
    for i, ch in enumerate(text):
        out.append(ch)
        layer = top.get(offset + i)
        if layer:
            out.append(MARKS.get(layer, "‖" * layer))
    return "".join(out)


def legend(layers: list[int]) -> str:
    return "  ".join(f"{MARKS.get(l, '‖' * l)} layer {l}" for l in layers)
