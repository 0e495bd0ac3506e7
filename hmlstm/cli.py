"""The ``hmlstm`` command: parse flags, build a config, call one function.

User mistakes (``UserError``) print one line, ``hmlstm: error: ...``, and exit
2 with no traceback. TensorFlow is imported only by the subcommands that need
it, with its start-up chatter silenced.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from hmlstm.errors import UserError


def quiet_tensorflow():
    """Import TensorFlow without the C++ log lines it prints on CPU-only machines."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import tensorflow as tf
    finally:
        os.dup2(saved, 2)
        os.close(devnull)
        os.close(saved)
    tf.get_logger().setLevel("ERROR")
    return tf


# ---------------------------------------------------------------- train


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train an HM-LSTM character LM",
                       description="Train an HM-LSTM character language model. A run directory "
                       "that holds a run with the same settings is resumed.")
    p.add_argument("corpus", nargs="?", default="builtin",
                   help="'builtin' (Python's docs text, default), 'synthetic', or a UTF-8 text file")
    p.add_argument("--format", default="auto", choices=["auto", "text", "ptb"],
                   help="file format: plain text, or Penn Treebank characters ('a _ b')")
    p.add_argument("--out", type=Path, default=None, help="run directory (default runs/<corpus>)")
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--units", type=int, default=128, help="hidden units per layer")
    p.add_argument("--embed-dim", type=int, default=64)
    p.add_argument("--output-dim", type=int, default=256)
    p.add_argument("--top-boundary", action="store_true",
                   help="give the top layer its own boundary detector (default: off)")
    p.add_argument("--layer-norm", action="store_true")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=100)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--steps", type=int, default=None, help="stop after this many steps")
    p.add_argument("--minutes", type=float, default=None, help="stop after this many minutes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--slope-rate", type=float, default=0.04, help="slope a += rate per epoch")
    p.add_argument("--slope-max", type=float, default=5.0)
    p.add_argument("--checkpoint-every", type=int, default=200)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    quiet_tensorflow()
    from hmlstm.model.config import TrainConfig
    from hmlstm.model.data import load_corpus
    from hmlstm.model.train import train

    if args.layers < 1 or args.units < 1:
        raise UserError("--layers and --units must be at least 1")
    try:
        cfg = TrainConfig(
            batch_size=args.batch_size, seq_len=args.seq_len, learning_rate=args.lr,
            clip_norm=args.clip, epochs=args.epochs, max_steps=args.steps,
            max_minutes=args.minutes, seed=args.seed, val_fraction=args.val_fraction,
            slope_rate=args.slope_rate, slope_max=args.slope_max,
            checkpoint_every=args.checkpoint_every,
        )
    except ValueError as e:
        raise UserError(f"{e}; fix the flag and run again") from None
    corpus = load_corpus(args.corpus, args.format, seed=args.seed)
    out = args.out or Path("runs") / Path(args.corpus).stem
    model_kwargs = dict(embed_dim=args.embed_dim, num_units=(args.units,) * args.layers,
                        output_dim=args.output_dim, top_boundary=args.top_boundary,
                        layer_norm=args.layer_norm)
    print(f"training on {corpus.name} ({len(corpus.text):,} chars) -> {out}", file=sys.stderr)
    result = train(corpus, model_kwargs, cfg, out, progress=not args.no_progress)
    bpc = result.val_bpc[-1][1] if result.val_bpc else float("nan")
    print(f"stopped at step {result.step} ({result.stopped_by}); validation BPC {bpc:.3f}")
    for name, e in result.boundary.items():
        line = f"  {name}: fires at {e['rate']:.1%} of characters"
        if "word_ends" in e:
            w = e["word_ends"]
            line += f"; word-end P {w['precision']:.2f} R {w['recall']:.2f} F1 {w['f1']:.2f}"
            line += f" (random at that rate: F1 {w['random_f1']:.2f})"
        print(line)
    if result.skipped_steps:
        print(f"  {result.skipped_steps} step(s) skipped for a non-finite loss or gradient")
    return 0


# ---------------------------------------------------------------- plot


def _add_plot(sub) -> None:
    p = sub.add_parser("plot", help="PNG of a text with each layer's boundaries marked")
    p.add_argument("checkpoint", type=Path, help="run directory written by `hmlstm train`")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text", help="the text to segment")
    src.add_argument("--file", type=Path, help="a UTF-8 file whose start is segmented")
    p.add_argument("--chars", type=int, default=320, help="how many characters to show")
    p.add_argument("--out", type=Path, default=Path("boundaries.png"))
    p.add_argument("--allow-unknown", action="store_true",
                   help="read characters the vocabulary lacks as the unknown character")
    p.set_defaults(func=cmd_plot)


DEFAULT_PLOT_TEXT = (
    "The for statement is used to iterate over the elements of a sequence "
    "(such as a string, tuple or list) or other iterable object."
)


def cmd_plot(args) -> int:
    quiet_tensorflow()
    from hmlstm.model.checkpoint import load_network
    from hmlstm.model.data import read_text_file
    from hmlstm.model.plot import encode_checked, plot_boundaries, text_boundaries

    net, info = load_network(args.checkpoint)
    text = args.text if args.text is not None else (
        read_text_file(args.file) if args.file else DEFAULT_PLOT_TEXT)
    text = text[: args.chars]
    if not text:
        raise UserError("the text to plot is empty")
    if not args.out.parent.exists():
        raise UserError(f"output folder {args.out.parent} does not exist")
    ids = encode_checked(info.vocab, text, args.allow_unknown)
    z = text_boundaries(net, ids)
    plot_boundaries(text, z, args.out, title=f"{args.checkpoint} ({info.meta.get('corpus', '')})")
    rates = ", ".join(f"layer {l + 1} {z[:, l].mean():.0%}" for l in range(z.shape[1]))
    print(f"wrote {args.out} ({len(text)} chars; boundary rate {rates})")
    return 0


# ---------------------------------------------------------------- export


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="convert a trained run to ONNX (time loop kept) and validate it",
                       description="Convert a training run's streaming step function to ONNX with the "
                       "time loop kept as one Loop, prove it equal to TensorFlow, and write it with a "
                       "JSON model card beside it. A model that fails validation is not written.")
    p.add_argument("checkpoint", type=Path, help="run directory written by `hmlstm train`")
    p.add_argument("--out", type=Path, default=Path("model.onnx"))
    p.add_argument("--opset", type=int, default=17, help="ONNX opset, 13-18 (default 17)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="validate on CPU, plus CUDA where it works (auto)")
    p.add_argument("--quick", action="store_true",
                   help="validate on a smaller grid (time 1, 7, 333; batch 1, 3)")
    p.add_argument("--no-validate", action="store_true", help="skip validation (not recommended)")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    quiet_tensorflow()
    from hmlstm.export.convert import ExportConfig, export
    from hmlstm.export.validate import ValidationError

    kw = dict(times=(1, 7, 333), batches=(1, 3)) if args.quick else {}
    cfg = ExportConfig(opset=args.opset, validate=not args.no_validate, device=args.device, **kw)
    try:
        result = export(args.checkpoint, args.out, cfg, log=lambda m: print(m, file=sys.stderr))
    except ValidationError as e:
        print(f"hmlstm: error: export refused, nothing written: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"wrote {result.path} ({result.card['size_bytes'] / 1e6:.2f} MB) and {result.card_path}")
    return 0


# ---------------------------------------------------------------- demo


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="train a small model on the built-in text and plot it")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--minutes", type=float, default=3.0)
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    ns = argparse.Namespace(
        corpus="builtin", format="auto", out=args.out, layers=2, units=64, embed_dim=32,
        output_dim=128, top_boundary=False, layer_norm=False, batch_size=32, seq_len=100,
        lr=2e-3, clip=1.0, epochs=1000, steps=None, minutes=args.minutes, seed=0,
        val_fraction=0.1, slope_rate=0.04, slope_max=5.0, checkpoint_every=200, no_progress=False,
    )
    cmd_train(ns)
    return cmd_plot(argparse.Namespace(checkpoint=args.out, text=None, file=None, chars=320,
                                       out=args.out / "boundaries.png", allow_unknown=True))


# ---------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hmlstm", description="Streaming sequence segmentation with a Hierarchical Multiscale LSTM.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_plot(sub)
    _add_export(sub)
    _add_demo(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"hmlstm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hmlstm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
