"""Boundaries of a trained network on a text, and the figure that shows them."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np

from hmlstm.errors import UserError
from hmlstm.vocabulary import Vocabulary


def encode_checked(vocab: Vocabulary, text: str, allow_unknown: bool) -> np.ndarray:
    """Encode ``text``; UserError naming the characters the vocabulary lacks."""
    unknown = vocab.unknown_chars(text)
    if unknown and not allow_unknown:
        shown = "".join(sorted(unknown))[:20]
        raise UserError(
            f"the text has {len(unknown)} character(s) the model's vocabulary lacks ({shown!r}); "
            "pass --allow-unknown to read them as the unknown character"
        )
    return vocab.encode(text)


def text_boundaries(network, ids: np.ndarray) -> np.ndarray:
    """z of every layer at every character, from the zero state: [T, L] int."""
    import tensorflow as tf

    tokens = tf.constant(ids[None, :], tf.int32)
    out = network(tokens, network.initial_state(1))
    return out.boundaries.numpy()[0].astype(int)


FORMATS = ("png", "pdf", "svg")  # by the file name's extension


def plot_boundaries(text: str, z: np.ndarray, path: str | Path, width: int = 64,
                    title: str | None = None, truth=None) -> Path:
    """A picture of ``text`` with each layer's boundaries marked under it, like the paper's figures: PNG,
    PDF or SVG by ``path``'s extension (none: PNG).

    The text is cut into lines of ``width`` characters. Under each character,
    one row per layer: a filled cell where that layer's boundary detector fired
    (the segment ends after this character). ``truth`` (bool per character, optional):
    a last row, in grey, of where the true boundaries are (the removed delimiters).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = max(1, min(width, len(text)))
    n_layers = z.shape[1]
    n_lines = max(1, -(-len(text) // width))
    rows_per_line = n_layers + 2 + (1 if truth is not None else 0)
    fig_h = 0.22 * rows_per_line * n_lines + 0.6
    fig, ax = plt.subplots(figsize=(0.16 * width + 1.4, fig_h))
    colors = plt.get_cmap("tab10")
    for line in range(n_lines):
        chunk = text[line * width : (line + 1) * width]
        y0 = -line * rows_per_line
        for i, ch in enumerate(chunk):
            shown = {"\n": "⏎", " ": "␣", "\t": "⇥"}.get(ch, ch)
            ax.text(i + 0.5, y0, shown, ha="center", va="center", fontsize=8, family="monospace")
            for l in range(n_layers):
                if z[line * width + i, l]:
                    ax.add_patch(plt.Rectangle((i + 0.1, y0 - 1.45 - l), 0.8, 0.8,
                                               color=colors(l), lw=0))
        for l in range(n_layers):
            ax.text(-0.6, y0 - 1.05 - l, f"z{l + 1}", ha="right", va="center", fontsize=7,
                    color=colors(l))
        if truth is not None:
            for i in range(len(chunk)):
                if truth[line * width + i]:
                    ax.add_patch(plt.Rectangle((i + 0.1, y0 - 1.45 - n_layers), 0.8, 0.8, color="0.6", lw=0))
            ax.text(-0.6, y0 - 1.05 - n_layers, "truth", ha="right", va="center", fontsize=7, color="0.4")
    ax.set_xlim(-2.5, width + 0.5)
    ax.set_ylim(-n_lines * rows_per_line + 1, 1)
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=9)
    from matplotlib.patches import Patch

    handles = [Patch(color=colors(l), label=f"z{l + 1}: layer {l + 1} fired") for l in range(n_layers)]
    if truth is not None:
        handles.append(Patch(color="0.6", label="truth: a removed delimiter was there"))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=len(handles), fontsize=7,
              frameon=False)
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".") or "png"
    if fmt not in FORMATS:
        raise ValueError(f"{path}: the picture formats are {', '.join(FORMATS)}")
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        import warnings

        with warnings.catch_warnings(record=True) as seen:  # one per character the font lacks: said once below
            warnings.simplefilter("always")
            fig.tight_layout()
            fig.savefig(tmp, dpi=110, format=fmt)
        _say_missing_glyphs(seen)
        tmp.replace(path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)  # nothing half-written is left behind
    return path


def _say_missing_glyphs(seen) -> None:
    """matplotlib warns once per character its font lacks: one note instead; other warnings as they were."""
    import warnings

    missing = set()
    for w in seen:
        m = re.search(r"Glyph (\d+) .* missing from font", str(w.message))
        if m:
            missing.add(chr(int(m.group(1))))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if missing:
        print(f"note: the font has no glyph for {len(missing)} character(s) ({''.join(sorted(missing))[:20]}); "
              "they are drawn as boxes", file=sys.stderr)
