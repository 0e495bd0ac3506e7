"""`hmlstm plot`: a picture of a text with each layer's boundaries (and the truth, where known)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hmlstm.cli.common import _model_vocabulary
from hmlstm.errors import UserError


def _add_plot(sub) -> None:
    p = sub.add_parser("plot", help="a picture (PNG, PDF or SVG) of a text with each layer's boundaries marked",
                       description="Draw a text with each layer's boundaries marked, and where the model was "
                       "trained without delimiters, a row of where they were (the truth).",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="run directory written by `hmlstm train`, or an exported .onnx")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text", help="the text to segment (default: a sentence of Python's docs)")
    src.add_argument("--file", type=Path, help="a UTF-8 file whose start is segmented")
    p.add_argument("--chars", type=int, default=320, help="how many characters to show")
    p.add_argument("--out", type=Path, default=Path("boundaries.png"),
                   help="the picture to write: .png, .pdf or .svg, by its extension")
    p.add_argument("--allow-unknown", action="store_true",
                   help="read characters the vocabulary lacks as the unknown character")
    p.add_argument("--keep-delimiters", action="store_true",
                   help="keep the characters the model was trained without (removed by default, as `segment` does)")
    p.set_defaults(func=cmd_plot)


DEFAULT_PLOT_TEXT = (
    "The for statement is used to iterate over the elements of a sequence "
    "(such as a string, tuple or list) or other iterable object."
)


def cmd_plot(args) -> int:
    if args.chars < 1:
        raise UserError(f"--chars must be at least 1, got {args.chars}")
    if args.out.is_dir():
        raise UserError(f"--out {args.out} is a directory; give a file name such as {args.out / 'boundaries.png'}")
    if args.out.suffix.lower() not in (".png", ".pdf", ".svg"):
        raise UserError(f"--out {args.out}: plot writes .png, .pdf or .svg, chosen by the extension, and "
                        + (f"not {args.out.suffix}" if args.out.suffix else "this name has none")
                        + f"; e.g. --out {args.out.with_suffix('.png')}")
    from hmlstm.cli.common import check_output

    check_output(args.out, "--out")
    if not args.checkpoint.exists():
        raise UserError(f"{args.checkpoint} does not exist; give a training run directory or an exported .onnx")
    vocab, trained_without, _ = _model_vocabulary(args.checkpoint)
    from hmlstm.evaluation import run_model
    from hmlstm.model.data import read_text_file, strip_delimiters
    from hmlstm.model.plot import encode_checked, plot_boundaries

    text = args.text if args.text is not None else (
        read_text_file(args.file) if args.file else DEFAULT_PLOT_TEXT)
    truth = None
    if trained_without and not args.keep_delimiters:
        # the removed delimiters are the truth the model's layer 1 is measured against: a row of its own
        text, ends, _ = strip_delimiters(text, trained_without)
        print(f"[the model was trained on text without {trained_without!r}: removed them, and the truth row marks "
              "where they were; --keep-delimiters keeps them]", file=sys.stderr)
        truth = ends[: args.chars] if ends is not None else None
    text = text[: args.chars]
    if not text:
        raise UserError("the text to plot is empty")
    encode_checked(vocab, text, args.allow_unknown)
    out = run_model(args.checkpoint, text)
    z = out.boundaries.astype(int)
    if truth is not None and out.alignment.get(1) == "start":  # the unit's first character, as layer 1 fires
        truth = [False, *truth[:-1]]
    plot_boundaries(text, z, args.out, title=f"{args.checkpoint.name}", truth=truth)
    rates = ", ".join(f"layer {l + 1} {z[:, l].mean():.0%}" for l in range(z.shape[1]))
    print(f"wrote {args.out} ({len(text)} chars; boundary rate {rates})")
    return 0
