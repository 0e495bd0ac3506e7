"""The ``hmlstm`` command: parse flags, build a config, call one function.

User mistakes (``UserError``) print one line, ``hmlstm: error: ...``, and exit
2 with no traceback. TensorFlow is imported only by the subcommands that need
it, with its start-up chatter silenced.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
import tempfile
from pathlib import Path

import hmlstm
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
    p.add_argument("--layers", type=int, default=3, help="how many HM-LSTM layers (a count; `segment --layers` picks "
                   "layers to report)")
    p.add_argument("--units", type=int, default=128, help="hidden units per layer")
    p.add_argument("--embed-dim", type=int, default=64, help="character embedding size")
    p.add_argument("--output-dim", type=int, default=256, help="output embedding size before the softmax")
    p.add_argument("--top-boundary", action="store_true",
                   help="give the top layer its own boundary detector (default: off)")
    p.add_argument("--layer-norm", action="store_true", help="layer normalisation of the gate pre-activations")
    p.add_argument("--batch-size", type=int, default=32, help="streams of text trained side by side")
    p.add_argument("--seq-len", type=int, default=100, help="characters per step (truncated BPTT window)")
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate")
    p.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip")
    p.add_argument("--epochs", type=int, default=10, help="passes over the training text (unless --steps)")
    p.add_argument("--steps", type=int, default=None,
                   help="train this many steps in all, instead of --epochs (a resumed run counts its earlier ones)")
    p.add_argument("--minutes", type=float, default=None, help="stop after this many minutes")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and of the synthetic corpus")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of a text file held out for validation (builtin holds out a fixed tenth)")
    p.add_argument("--slope-rate", type=float, default=0.04, help="slope a += rate per epoch")
    p.add_argument("--slope-max", type=float, default=5.0, help="the boundary slope a grows to at most this")
    p.add_argument("--slope-per-step", action="store_true",
                   help="anneal the slope at every step (fractional epochs), not once per epoch")
    p.add_argument("--rate-targets", default="",
                   help="comma-separated firing-rate target per boundary layer, e.g. 0.2,0.08")
    p.add_argument("--rate-penalty", type=float, default=1.0, help="weight of the firing-rate penalty")
    p.add_argument("--entropy-target", type=float, default=0.0,
                   help="weight of a self-supervised boundary target: fire after the model's own entropy peaks")
    p.add_argument("--peak-fractions", default="",
                   help="with --entropy-target: per layer, the share of the highest entropy peaks it is taught, "
                        "e.g. 0.7,0.25,0.08 (default: layer 1 alone, every peak)")
    p.add_argument("--peak-window", type=int, default=0, metavar="CHARS",
                   help="rank layer 1's peaks by their height above the mean entropy of this many characters "
                        "around them (0: by height)")
    p.add_argument("--strip-delimiters", default=None, metavar="CHARS",
                   help="train on the text with these characters removed, e.g. --strip-delimiters=' ' "
                        "('\\n' and '\\t' allowed); the removed positions are the boundary truth")
    p.add_argument("--strip-whitespace", action="store_true",
                   help="the same as --strip-delimiters=' \\n\\t'")
    p.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar: a progress line every 30 s and at each validation instead (also what "
                        "happens without a terminal, so that no \\r goes into a log)")
    p.add_argument("--strategy", default=None, choices=["mirrored", "multiworker"],
                   help="tf.distribute: mirrored (several GPUs) or multiworker (several hosts, TF_CONFIG)")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="a named recipe: its settings become the defaults, and flags given beside it still win. "
                        "shipped: the shipped model's (" + " ".join(
                            f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
                            for k, v in PRESETS["shipped"].items()) + "); without it the defaults are the paper's")
    p.set_defaults(func=cmd_train)


# Named training recipes for `train --preset` (argparse destinations -> values). "shipped" is the recipe of
# hmlstm/assets/default.onnx, as its card's provenance.command records it.
PRESETS = {
    "shipped": {"strip_whitespace": True, "top_boundary": True, "entropy_target": 1.0,
                "peak_fractions": "0.7,0.25,0.08", "peak_window": 9, "steps": 10000, "seed": 0},
}


def _layer_list(text: str) -> list[int]:
    try:
        layers = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers such as 1,2, got {text!r}") from None
    if not layers or min(layers) < 1:
        raise argparse.ArgumentTypeError(f"layer numbers start at 1, got {text!r}")
    return layers


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UserError(f"expected comma-separated numbers, got {text!r}") from None


def _unescape(chars: str | None) -> str | None:
    """Let '\\n' and '\\t' on the command line mean newline and tab."""
    return None if chars is None else chars.replace("\\n", "\n").replace("\\t", "\t")


def _strip_chars(args) -> str | None:
    """--strip-delimiters / --strip-whitespace, refusing a value that is really the next argument."""
    chars = args.strip_delimiters
    if chars is not None and args.strip_whitespace:
        raise UserError("give --strip-delimiters or --strip-whitespace, not both")
    if args.strip_whitespace:
        return " \n\t"
    if chars == "":
        raise UserError("--strip-delimiters needs at least one character, e.g. --strip-delimiters=' '")
    if chars is not None and len(chars) > 1 and Path(chars).exists():
        raise UserError(f"--strip-delimiters takes the characters to remove, and {chars!r} looks like a file "
                        "name (the corpus?): write --strip-delimiters=CHARS, or --strip-whitespace")
    return _unescape(chars)


def _check_model_fits(args, vocab: int = 256) -> None:
    """Refuse, before any work, a model whose weights and Adam's two moments would not fit in memory."""
    units, layers = args.units, args.layers
    params = vocab * args.embed_dim + args.output_dim * (units * layers + vocab) + units * layers
    for l in range(layers):
        below = args.embed_dim if l == 0 else units
        params += (below + units + (units if l + 1 < layers else 0) + 1) * (4 * units + 1)
    need = 4 * 4 * params  # float32 weights, gradients and two Adam moments
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if need > memory:
        raise UserError(f"--units {units} --embed-dim {args.embed_dim} --layers {layers}: the model would have about "
                        f"{params:,} parameters, {need / 2**30:,.0f} GiB with Adam's state, more than this machine's "
                        f"{memory / 2**30:,.0f} GiB; choose smaller sizes")


def _check_text_is_text(text: str, name: str) -> None:
    """A training text made mostly of control characters (NUL bytes: a binary file) is refused."""
    import unicodedata

    sample = text[:200_000]
    control = sum(1 for c in sample if c not in "\n\r\t" and unicodedata.category(c).startswith("C"))
    if sample and control > 0.3 * len(sample):
        raise UserError(f"{name} is {control / len(sample):.0%} control characters (NUL bytes?): it looks like a "
                        "binary file, not text to train on")


def cmd_train(args) -> int:
    quiet_tensorflow()
    from hmlstm.model.config import TrainConfig
    from hmlstm.model.data import load_corpus
    from hmlstm.model.train import train

    for flag, value in (("--layers", args.layers), ("--units", args.units), ("--embed-dim", args.embed_dim),
                        ("--output-dim", args.output_dim)):
        if value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise UserError(f"--out {args.out} is a file; give a directory for the run")
    try:
        cfg = TrainConfig(
            batch_size=args.batch_size, seq_len=args.seq_len, learning_rate=args.lr,
            clip_norm=args.clip, epochs=args.epochs, max_steps=args.steps,
            max_minutes=args.minutes, seed=args.seed, val_fraction=args.val_fraction,
            slope_rate=args.slope_rate, slope_max=args.slope_max,
            checkpoint_every=args.checkpoint_every, slope_per_step=args.slope_per_step,
            rate_targets=_floats(args.rate_targets), rate_penalty=args.rate_penalty,
            entropy_target=args.entropy_target, peak_fractions=_floats(args.peak_fractions),
            peak_window=args.peak_window,
        )
    except ValueError as e:
        raise UserError(f"{e}; fix the flag and run again") from None
    detectors = args.layers if args.top_boundary else args.layers - 1
    if len(cfg.rate_targets) > detectors:
        raise UserError(f"--rate-targets gives {len(cfg.rate_targets)} rates, but the model has {detectors} layer(s) "
                        f"with a boundary detector; give at most {detectors} (--top-boundary gives the top layer one)")
    if cfg.peak_fractions and not cfg.entropy_target:
        raise UserError("--peak-fractions says which entropy peaks each layer is taught, which only --entropy-target "
                        "does; add --entropy-target (e.g. 1) or drop --peak-fractions")
    _check_model_fits(args)
    corpus = load_corpus(args.corpus, args.format, seed=args.seed, strip=_strip_chars(args))
    _check_text_is_text(corpus.text, corpus.name)
    out = args.out or Path("runs") / Path(args.corpus).stem
    model_kwargs = dict(embed_dim=args.embed_dim, num_units=(args.units,) * args.layers,
                        output_dim=args.output_dim, top_boundary=args.top_boundary,
                        layer_norm=args.layer_norm)
    print(f"training on {corpus.name} ({len(corpus.text):,} chars) -> {out}", file=sys.stderr)
    from hmlstm.model.distributed import make_strategy

    strategy = make_strategy(getattr(args, "strategy", None))
    result = train(corpus, model_kwargs, cfg, out, progress=not args.no_progress, strategy=strategy,
                   preset=args.preset)
    bpc = result.val_bpc[-1][1] if result.val_bpc else float("nan")
    print(f"stopped at step {result.step} ({result.stopped_by}); validation BPC {bpc:.3f}")
    for name, e in result.boundary.items():
        if name == f"layer{args.layers}" and not args.top_boundary:
            print(f"  {name}: no boundary detector (--top-boundary gives the top layer one)")
            continue
        line = f"  {name}: fires at {e['rate']:.1%} of characters"
        if "word_ends" in e:
            w = e["word_ends"]
            line += f"; word-end P {w['precision']:.2f} R {w['recall']:.2f} F1 {w['f1']:.2f}"
            if "word_starts" in e:
                line += f", on word starts F1 {e['word_starts']['f1']:.2f}"
            line += f" (random at that rate: F1 {w['random_f1']:.2f})"
        if "phrase_starts" in e and name != "layer1":
            p = max((e["phrase_ends"], e["phrase_starts"]), key=lambda x: x["f1"])
            line += f"; phrases F1 {p['f1']:.2f} (random {p['random_f1']:.2f})"
        print(line)
    if result.skipped_steps:
        print(f"  {result.skipped_steps} step(s) skipped for a non-finite loss or gradient")
    # The conventional statuses of a process ended by SIGINT and SIGTERM, as schedulers expect.
    return {"interrupted": 130, "terminated": 143}.get(result.stopped_by, 0)


# ---------------------------------------------------------------- plot


def _add_plot(sub) -> None:
    p = sub.add_parser("plot", help="PNG of a text with each layer's boundaries marked",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="run directory written by `hmlstm train`, or an exported .onnx")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text", help="the text to segment (default: a sentence of Python's docs)")
    src.add_argument("--file", type=Path, help="a UTF-8 file whose start is segmented")
    p.add_argument("--chars", type=int, default=320, help="how many characters to show")
    p.add_argument("--out", type=Path, default=Path("boundaries.png"), help="the PNG to write")
    p.add_argument("--allow-unknown", action="store_true",
                   help="read characters the vocabulary lacks as the unknown character")
    p.add_argument("--keep-delimiters", action="store_true",
                   help="keep the characters the model was trained without (removed by default, as `segment` does)")
    p.set_defaults(func=cmd_plot)


DEFAULT_PLOT_TEXT = (
    "The for statement is used to iterate over the elements of a sequence "
    "(such as a string, tuple or list) or other iterable object."
)


def _model_vocabulary(path: Path):
    """(vocabulary, characters the model was trained without, provenance) of a run directory or an
    exported model; the provenance names the training corpus and holds train_config."""
    if path.is_file():
        from hmlstm.serving.model import ModelLoadError, load_model

        try:
            model = load_model(path, "cpu")
        except ModelLoadError as e:
            raise UserError(str(e)) from None
        return model.vocab, model.provenance.get("strip_delimiters") or "", model.provenance
    quiet_tensorflow()
    from hmlstm.model.checkpoint import load_network

    _, info = load_network(path)  # UserError if it is not a run or its weights cannot be restored
    return info.vocab, info.meta.get("strip_delimiters") or "", {**info.meta, "train_config": info.train.to_dict()}


def cmd_plot(args) -> int:
    if args.chars < 1:
        raise UserError(f"--chars must be at least 1, got {args.chars}")
    if args.out.is_dir():
        raise UserError(f"--out {args.out} is a directory; give a file name such as {args.out / 'boundaries.png'}")
    if args.out.suffix.lower() not in ("", ".png", ".pdf", ".svg"):
        raise UserError(f"--out {args.out}: plot writes .png, .pdf or .svg (by the extension), not {args.out.suffix}")
    if not args.out.parent.exists():
        raise UserError(f"output folder {args.out.parent} does not exist")
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


# ---------------------------------------------------------------- evaluate


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="boundary quality of a model against a text's true segmentation",
                       description="Score each layer's boundaries (both alignments, random baseline at the same "
                       "rate) and the language model's entropy baselines against true unit ends.")
    p.add_argument("model", type=Path, help="a training run directory or an exported .onnx file")
    p.add_argument("text", help="'builtin', 'synthetic', or a UTF-8 file")
    p.add_argument("--strip-delimiters", default=None, metavar="CHARS",
                   help="remove these characters, e.g. --strip-delimiters=' '; the removed positions are the truth")
    p.add_argument("--strip-whitespace", action="store_true",
                   help="the same as --strip-delimiters=' \\n\\t'")
    p.add_argument("--keep-delimiters", action="store_true",
                   help="score the text as is; by default the characters the model was trained without are "
                        "removed (as `segment` does), and the removed positions are the truth")
    p.add_argument("--format", default="auto", choices=["auto", "text", "ptb", "lines"],
                   help="lines: one unit per line (a segmented file)")
    p.add_argument("--sep", default=None, help="units separated by this symbol (a segmented file)")
    p.add_argument("--all", action="store_true",
                   help="builtin/synthetic: score the whole text, not only the part training held out")
    p.add_argument("--max-chars", type=int, default=200_000, help="score at most this many characters")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic text")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--allow-unknown", action="store_true",
                   help="score even when over 5%% of the text is outside the model's vocabulary")
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args) -> int:
    import json

    if args.max_chars < 2:
        raise UserError(f"--max-chars must be at least 2 (bits per character need a next character), "
                        f"got {args.max_chars}")
    if args.model.is_dir():
        quiet_tensorflow()
    from hmlstm.evaluation import evaluate, format_report
    from hmlstm.model.data import Corpus, load_corpus, read_segmented, strip_delimiters, training_part

    strip = _strip_chars(args)
    vocab, trained_without, provenance = _model_vocabulary(args.model)
    if strip is not None and args.keep_delimiters:
        raise UserError("--keep-delimiters keeps the text as is, and --strip-delimiters/--strip-whitespace removes "
                        "characters; give one of them")
    if args.sep is not None and args.format != "auto":
        raise UserError(f"--sep reads a file segmented by that symbol, so --format {args.format} would be ignored; "
                        "give one of them")
    if strip is None and trained_without and not args.keep_delimiters:  # what the model never saw, as segment does
        strip = trained_without
        print(f"[the model was trained on text without {trained_without!r}: removed them, and their positions are "
              "the truth; --keep-delimiters keeps them]", file=sys.stderr)
    if args.sep is not None:
        corpus = read_segmented(args.text, args.sep)
        if strip:
            text, ends, _ = strip_delimiters(corpus.text, strip, corpus.word_ends)
            corpus = Corpus(corpus.name, text, ends)
    else:
        corpus = load_corpus(args.text, args.format, seed=args.seed, strip=strip)
    if args.text in ("builtin", "synthetic") and not args.all:  # what training held out
        corpus = corpus.part(corpus.held_out_start(0.1), None, "held out")
    if len(corpus.text) > args.max_chars:
        corpus = corpus.part(0, args.max_chars, f"first {args.max_chars:,} chars")
    unknown = vocab.encode_counting(corpus.text)[1]
    if unknown > 0.05 * len(corpus.text) and not args.allow_unknown:
        shown = "".join(sorted(vocab.unknown_chars(corpus.text)))[:20]
        raise UserError(f"{unknown:,} of {len(corpus.text):,} characters ({unknown / len(corpus.text):.0%}) are "
                        f"outside the model's vocabulary ({shown!r}...): its scores would mean little. Evaluate "
                        "on text like its training text, or pass --allow-unknown")
    report = evaluate(args.model, corpus, training_part(provenance),
                      log=lambda m: print(f"[{m}]", file=sys.stderr, flush=True))
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


# ---------------------------------------------------------------- export


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="convert a trained run to ONNX (time loop kept) and validate it",
                       description="Convert a training run's streaming step function to ONNX with the "
                       "time loop kept as one Loop, prove it equal to TensorFlow, and write it with a "
                       "JSON model card beside it. A model that fails validation is not written.")
    p.add_argument("checkpoint", type=Path,
                   help="run directory written by `hmlstm train`, or an exported .onnx to export again with "
                        "this version's exporter (its weights are recovered and checked first)")
    p.add_argument("--out", type=Path, default=Path("model.onnx"),
                   help="the .onnx to write (the sparse graph; the dense one goes beside it as OUT.dense.onnx, "
                        "the model card as OUT.card.json)")
    p.add_argument("--engines", default="sparse,dense", metavar="LIST",
                   help="graphs to write, the first at --out and each other beside it (OUT.dense.onnx): sparse "
                        "computes layers above the first only where they UPDATE or FLUSH; dense computes every row")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset, 13-18 (default 17)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="validate on CPU, plus CUDA where it works (auto)")
    p.add_argument("--quick", action="store_true",
                   help="validate on a smaller grid (time 1, 7, 333; batch 1, 3)")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest |ONNX - TensorFlow| on logits and states (default 1e-4)")
    p.add_argument("--strict", action="store_true",
                   help="the tolerance is absolute: no value beyond it is explained by TensorFlow's own "
                        "float32 spread (see docs/export.md)")
    p.add_argument("--no-validate", action="store_true", help="skip validation (not recommended)")
    p.add_argument("--eval-text", default=None, metavar="FILE",
                   help="also evaluate on this text file from another source (stripped like the training text) "
                        "and put the report in the model card beside the held-out one")
    p.add_argument("--triton-instance", choices=["gpu", "cpu"], default="gpu",
                   help="the Triton instance kind: gpu (KIND_GPU, the dense graph) or cpu (KIND_CPU, the sparse one)")
    p.add_argument("--triton-max-sequences", type=int, default=256, metavar="N",
                   help="sequences Triton batches together per instance; more wait in its backlog (default 256)")
    p.add_argument("--triton", type=Path, default=None, metavar="REPO",
                   help="also write a Triton Inference Server model repository for it (REPO/hmlstm/1/model.onnx "
                        "and config.pbtxt: ONNX Runtime backend, sequence batching with implicit state)")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    if not args.tolerance > 0:  # checked before the minutes of conversion, not after
        raise UserError(f"--tolerance must be a positive number, got {args.tolerance}")
    if args.triton_max_sequences < 1:
        raise UserError(f"--triton-max-sequences must be at least 1, got {args.triton_max_sequences}")
    quiet_tensorflow()
    from hmlstm.export.convert import ExportConfig, export
    from hmlstm.export.validate import ValidationError
    from hmlstm.model.data import read_text_file

    kw = dict(times=(1, 7, 333), batches=(1, 3)) if args.quick else {}
    if args.strict:
        kw["explain_factor"] = 0.0
    if args.eval_text is not None:
        read_text_file(args.eval_text)  # a missing or unreadable file is refused before the export's work
    engines = tuple(e.strip() for e in args.engines.split(",") if e.strip())
    cfg = ExportConfig(opset=args.opset, validate=not args.no_validate, device=args.device,
                       tolerance=args.tolerance, eval_text=args.eval_text, engines=engines, **kw)
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="hmlstm-recovered-") as tmp:
        run = args.checkpoint
        if run.suffix == ".onnx" and run.is_file():
            from hmlstm.export.recover import recover_run

            run = recover_run(run, Path(tmp) / run.stem, log=log)
        try:
            result = export(run, args.out, cfg, log=log)
        except ValidationError as e:
            print(f"hmlstm: error: export refused, nothing written: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
    others = [e["file"] for e in result.card["engines"].values() if e["file"] != result.path.name]
    print(f"wrote {result.path} ({result.card['engine']} engine, {result.card['size_bytes'] / 1e6:.2f} MB)"
          + "".join(f", {result.path.with_name(f)}" for f in others) + f" and {result.card_path}")
    if args.triton is not None:
        from hmlstm.export.triton import write_repository

        config = write_repository(result.path, args.triton, instance=args.triton_instance,
                                  max_sequences=args.triton_max_sequences)
        print(f"wrote {config} (Triton model repository {args.triton}, {args.triton_instance} instance)")
    return 0


# ---------------------------------------------------------------- serve


def _add_serve(sub) -> None:
    from hmlstm.serving.config import ServeConfig

    d = ServeConfig()
    p = sub.add_parser("serve", help="serve streaming segmentation over gRPC",
                       description="Serve an exported model (the shipped default when none is named) over "
                       "gRPC, with health checking, reflection and Prometheus metrics.")
    p.add_argument("model", nargs="?", default=None, help="an .onnx file written by `hmlstm export`")
    p.add_argument("--host", default=d.host, help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=d.port, help="gRPC port (0: any free port)")
    p.add_argument("--metrics-port", type=int, default=d.metrics_port, help="Prometheus port; -1 turns it off")
    p.add_argument("--device", default=d.device, choices=["auto", "tensorrt", "cuda", "cpu"],
                   help="auto: TensorRT where its libraries load, else CUDA where it works, else the CPU; "
                        "tensorrt or cuda: refuse to start without it")
    p.add_argument("--engine", default=d.engine, choices=["auto", "sparse", "dense"],
                   help="sparse: layers above the first compute only the streams that UPDATE or FLUSH at a step "
                        "(faster on the CPU); dense: every stream at every step; auto: sparse on the CPU, dense "
                        "on a GPU. The export writes both (MODEL.onnx sparse, MODEL.dense.onnx dense)")
    p.add_argument("--trt-cache", default=d.trt_cache, metavar="DIR",
                   help="where TensorRT keeps the engines it builds (the first start builds them)")
    p.add_argument("--trt-fp16", action="store_true", help="let TensorRT compute in half precision")
    p.add_argument("--device-tolerance", type=float, default=d.device_tolerance,
                   help="largest |TensorRT - CPU| accepted at start-up; a model beyond it is refused "
                        "(FP16 usually needs more)")
    p.add_argument("--max-streams", type=int, default=d.max_streams,
                   help="concurrent streams per process; more get RESOURCE_EXHAUSTED")
    p.add_argument("--max-chunk-chars", type=int, default=d.max_chunk_chars, help="longest chunk a client may send")
    p.add_argument("--idle-timeout", type=float, default=d.idle_timeout_s, help="seconds")
    p.add_argument("--grace", type=float, default=d.grace_s, help="seconds open streams get on SIGTERM")
    p.add_argument("--tls-cert", default=os.environ.get("HMLSTM_TLS_CERT") or None,
                   help="PEM certificate (with --tls-key); default $HMLSTM_TLS_CERT, which `hmlstm health` follows")
    p.add_argument("--tls-key", default=os.environ.get("HMLSTM_TLS_KEY") or None,
                   help="PEM private key; default $HMLSTM_TLS_KEY")
    p.add_argument("--auth-token-env", default=None, metavar="VAR",
                   help="require 'authorization: Bearer $VAR' on every call")
    p.add_argument("--workers", type=int, default=d.workers,
                   help="server processes sharing the port, each with its own ONNX Runtime session and batcher; "
                        "worker i serves metrics on --metrics-port + i; resume across workers needs a shared "
                        "--state-store")
    p.add_argument("--call-threads", type=int, default=d.call_threads,
                   help="threads for unbatched model calls (--no-batching)")
    p.add_argument("--state-store", default=d.state_store,
                   help="where resumable streams live: memory, sqlite:PATH, or redis://HOST:PORT/DB")
    p.add_argument("--store-optional", action="store_true",
                   help="start even if --state-store does not answer (streams go on without durability until it "
                        "does); without it an unreachable store is refused at start")
    p.add_argument("--persist-depth", type=int, default=d.persist_depth,
                   help="how many responses back a stream restored from the state store can resume (its stored "
                        "rewind window; a live stream's is 32)")
    p.add_argument("--no-batching", action="store_true", help="one model call per stream piece")
    p.add_argument("--max-batch", type=int, default=d.max_batch,
                   help="streams' pieces per batched call (0: every pending piece, up to --max-streams)")
    p.add_argument("--max-wait-us", type=int, default=d.max_wait_us,
                   help="how long a piece may wait for others to join its batch")
    p.add_argument("--max-wait-fraction", type=float, default=d.max_wait_fraction,
                   help="...or, if longer, this fraction of the previous batched call's time (keeps busy "
                        "closed-loop streams in one batch; 0 turns it off)")
    p.add_argument("--ort-threads", type=int, default=d.ort_threads,
                   help="ONNX Runtime intra-op threads (default: one per core)")
    p.add_argument("--ort-spinning", choices=["on", "off"], default="on" if d.ort_spinning else "off",
                   help="whether ONNX Runtime's idle threads spin between the Loop's steps (default off: as fast "
                        "at 64 streams on half the model's CPU; on lowers one stream's latency a little)")
    p.add_argument("--io-binding", default=d.io_binding, choices=["auto", "on", "off"],
                   help="keep recurrent state on the device between calls (auto: with CUDA)")
    p.set_defaults(func=cmd_serve)


def _serve_config(args):
    from hmlstm.serving.config import ServeConfig

    token = None
    if args.auth_token_env:
        token = os.environ.get(args.auth_token_env)
        if not token:
            raise UserError(f"--auth-token-env {args.auth_token_env}: that environment variable is empty or unset")
    for f in (args.tls_cert, args.tls_key):
        if f and not Path(f).is_file():
            raise UserError(f"TLS file {f} does not exist")
    if args.tls_cert and args.tls_key:  # a certificate that is not one is named here, not as "cannot listen"
        import ssl

        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(args.tls_cert, args.tls_key)
        except (ssl.SSLError, OSError, ValueError) as e:
            why = getattr(e, "reason", None) or str(e).strip() or type(e).__name__
            raise UserError(f"--tls-cert {args.tls_cert} with --tls-key {args.tls_key} cannot be used: they are not "
                            f"a PEM certificate and its matching private key (ssl: {why})") from None
    try:
        return ServeConfig(
            host=args.host, port=args.port, metrics_port=None if args.metrics_port == -1 else args.metrics_port,
            device=args.device, max_streams=args.max_streams, max_chunk_chars=args.max_chunk_chars,
            idle_timeout_s=args.idle_timeout, grace_s=args.grace, tls_cert=args.tls_cert, tls_key=args.tls_key,
            auth_token=token, workers=args.workers, call_threads=args.call_threads, batching=not args.no_batching,
            max_batch=args.max_batch,
            max_wait_us=args.max_wait_us, max_wait_fraction=args.max_wait_fraction, state_store=args.state_store,
            persist_depth=args.persist_depth,
            io_binding=args.io_binding, ort_threads=args.ort_threads, trt_cache=args.trt_cache,
            trt_fp16=args.trt_fp16, device_tolerance=args.device_tolerance, engine=args.engine,
            ort_spinning=args.ort_spinning == "on")
    except ValueError as e:
        raise UserError(str(e)) from None


def _load_model(path, device, threads=None, spinning=None, config=None):
    from hmlstm.serving.model import ModelLoadError, load_model

    trt = dict(trt_cache=config.trt_cache, trt_fp16=config.trt_fp16, tolerance=config.device_tolerance,
               engine=config.engine) if config is not None else {}
    try:
        return load_model(path, device, threads, spinning, **trt)
    except ModelLoadError as e:
        raise UserError(str(e)) from None


def cmd_serve(args) -> int:
    import asyncio
    import logging

    from hmlstm.serving.server import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    from hmlstm.serving.store import StoreUnavailable, open_store

    config = _serve_config(args)
    try:
        store = open_store(config.state_store)
    except (ValueError, StoreUnavailable) as e:
        raise UserError(str(e)) from None
    if store is not None:
        try:
            store.load("hmlstm-start-up-probe")  # reachable now? (Redis: a 2 s connect timeout)
        except StoreUnavailable as e:
            if not args.store_optional:
                raise UserError(f"--state-store is unreachable ({e}); start it, or pass --store-optional to serve "
                                "without durability until it answers") from None
            print(f"hmlstm: warning: --state-store is unreachable ({e}); serving without durability until it "
                  "answers (--store-optional)", file=sys.stderr)
        finally:
            store.close()
    if config.workers > 1:
        from hmlstm.serving.workers import run_workers

        if config.metrics_port:  # worker i serves its metrics on --metrics-port + i: all must be free now
            import socket

            for i in range(config.workers):
                with socket.socket() as probe:
                    try:
                        probe.bind((config.host, config.metrics_port + i))
                    except OSError:
                        raise UserError(f"metrics port {config.metrics_port + i} (worker {i}'s: --metrics-port + {i}) "
                                        f"on {config.host} is taken; choose another --metrics-port, or -1 for "
                                        "none") from None

        _load_model(args.model, config.device, config.ort_threads, config.ort_spinning, config)  # fail here, once
        try:
            return run_workers(args.model, config)
        except OSError as e:
            raise UserError(f"cannot serve: {e}") from None
    model = _load_model(args.model, config.device, config.ort_threads, config.ort_spinning, config)
    try:
        asyncio.run(serve(model, config))
    except OSError as e:
        raise UserError(f"cannot serve: {e}") from None
    return 0


# ---------------------------------------------------------------- health


def _add_health(sub) -> None:
    p = sub.add_parser("health", help="exit 0 if a server answers SERVING (for container health checks)",
                       description="Ask a server's gRPC health service. TLS follows the server's own setting in a "
                       "container: with $HMLSTM_TLS_CERT set (what `hmlstm serve` reads), the check uses TLS and "
                       "trusts $HMLSTM_TLS_CA, or that certificate itself when no CA is given.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--server", "--target", dest="target", default="127.0.0.1:50051",
                   help="host:port of the server (--server, as in `segment`; --target also works)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds")
    p.add_argument("--tls", action="store_true", help="use TLS (implied by --tls-ca or $HMLSTM_TLS_CERT)")
    p.add_argument("--tls-ca", default=os.environ.get("HMLSTM_TLS_CA") or None,
                   help="PEM root certificate(s) to verify the server with (default $HMLSTM_TLS_CA, else the "
                        "server's own $HMLSTM_TLS_CERT, else the system's roots)")
    p.add_argument("--server-name", default=os.environ.get("HMLSTM_TLS_SERVER_NAME") or None,
                   help="the name the certificate must carry, when it is not the target's host (default "
                        "$HMLSTM_TLS_SERVER_NAME)")
    p.set_defaults(func=cmd_health)


def _quiet_fd2(fn):
    """fn() with file descriptor 2 captured (C libraries' log lines); returns (result, captured text)."""
    import tempfile

    with tempfile.TemporaryFile(mode="w+b") as tmp:
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            result = fn()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        tmp.seek(0)
        return result, tmp.read().decode("utf-8", "replace")


def _health_reason(error, tls: bool) -> str:
    """Why a health check failed, in words; the TLS hint only where TLS may be the reason."""
    details = (error.details() or "").replace("\n", " ")
    low = details.lower()
    if "wrong_version_number" in low or "wrong version number" in low or (tls and "ssl" in low):
        return "the TLS handshake failed: the server may not use TLS (drop --tls and --tls-ca)"
    if "connection refused" in low:
        return "connection refused: nothing listens at that address"
    if any(w in low for w in ("dns resolution failed", "name or service not known", "errors resolving")):
        return "the host name does not resolve"
    reason = details[:160] or "no answer"
    return reason if tls else f"{reason} (if the server uses TLS: --tls-ca, or $HMLSTM_TLS_CERT as in its container)"


def cmd_health(args) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    own_cert = os.environ.get("HMLSTM_TLS_CERT") or None
    ca = args.tls_ca or own_cert
    tls = args.tls or bool(ca)
    if ca and not Path(ca).is_file():
        raise UserError(f"TLS root certificate {ca} does not exist")
    options = [("grpc.ssl_target_name_override", args.server_name)] if args.server_name else []
    if tls:
        creds = grpc.ssl_channel_credentials(root_certificates=Path(ca).read_bytes() if ca else None)
        channel = grpc.secure_channel(args.target, creds, options)
    else:
        channel = grpc.insecure_channel(args.target, options)
    def check():
        with channel as ch:
            return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=args.timeout)

    try:
        r, _ = _quiet_fd2(check)  # gRPC's C core logs TLS handshake failures on stderr: boiled down below
    except grpc.RpcError as e:
        print(f"{args.target}: {e.code().name}: {_health_reason(e, tls)}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
    print(f"{args.target}: {status}")
    return 0 if r.status == health_pb2.HealthCheckResponse.SERVING else 1


# ---------------------------------------------------------------- segment


def _add_segment(sub) -> None:
    p = sub.add_parser("segment", help="stream a file or stdin to a server and print its segments live")
    p.add_argument("file", help="a UTF-8 text file, or - for standard input")
    p.add_argument("--server", default=None, help="host:port of `hmlstm serve` (default 127.0.0.1:50051)")
    p.add_argument("--local", action="store_true", help="run the model in this process; no server")
    p.add_argument("--model", default=None, help="with --local: an .onnx file (default: the shipped model)")
    p.add_argument("--chunk-chars", type=int, default=64, help="characters per chunk sent")
    p.add_argument("--layers", type=_layer_list, default=[], metavar="L1,L2",
                   help="comma-separated boundary layers to report, e.g. --layers 1,2 (default: all)")
    p.add_argument("--jsonl", action="store_true", help="print closed segments as JSON lines instead")
    p.add_argument("--token-env", default=None, metavar="VAR", help="bearer token from this variable")
    p.add_argument("--tls-ca", default=None, help="PEM root certificate: connect with TLS")
    p.add_argument("--keep-delimiters", action="store_true",
                   help="send the text as is, even the characters the model was trained without "
                        "(by default they are removed before sending, and a note says so)")
    p.set_defaults(func=cmd_segment)


def _check_utf8(path: Path, block: int = 1 << 20) -> None:
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    try:
        with path.open("rb") as f:
            while raw := f.read(block):
                decoder.decode(raw)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text") from None


def _read_chunks(path: str, size: int):
    """Check the source now (before anything connects); return a generator of its text in pieces."""
    import codecs

    if size < 1:
        raise UserError("--chunk-chars must be at least 1")
    if path != "-":
        p = Path(path)
        if not p.is_file():
            raise UserError(f"{path} does not exist or is not a file")
        _check_utf8(p)  # a file can be checked whole before anything is sent; standard input cannot
    name = "standard input" if path == "-" else path

    def pieces():
        # Bytes, decoded strictly: a non-UTF-8 input is one clean error, never a surrogate printed later.
        stream = sys.stdin.buffer if path == "-" else open(path, "rb")  # noqa: SIM115
        decoder = codecs.getincrementaldecoder("utf-8")("strict")
        pending = ""
        try:
            while True:
                raw = stream.read(size)
                pending += decoder.decode(raw, final=not raw)
                while len(pending) >= size or (not raw and pending):
                    yield pending[:size]
                    pending = pending[size:]
                if not raw:
                    return
        except UnicodeDecodeError:
            raise UserError(f"{name} is not UTF-8 text") from None
        finally:
            if stream is not sys.stdin.buffer:
                stream.close()

    return pieces()


class _Original:
    """The text as read and the text as sent (less the characters the model was trained without), with where
    each sent character stands in the original: what `segment` prints, its line breaks and delimiters kept."""

    def __init__(self, strip: str):
        self.table = str.maketrans("", "", strip)
        self.strip = set(strip)
        self.original: list[str] = []
        self.sent: list[str] = []
        self.kept: list[int] = []  # sent index -> original index
        self.length = 0
        self.shown = 0  # original characters printed so far

    def add(self, chunk: str) -> str:
        self.original.append(chunk)
        self.kept.extend(self.length + i for i, ch in enumerate(chunk) if ch not in self.strip)
        self.length += len(chunk)
        sent = chunk.translate(self.table)
        self.sent.append(sent)
        return sent

    def text(self) -> str:
        if len(self.original) > 1:
            self.original[:] = ["".join(self.original)]
        return self.original[0] if self.original else ""

    def span(self, start: int, end: int) -> tuple[int, int]:
        """Sent characters [start, end) -> the original [first, last + 1)."""
        return self.kept[start], self.kept[end - 1] + 1


def _print_result(r, orig: _Original, jsonl: bool, printed: int, marker) -> int:
    """Print what ``r`` adds, in the original text; returns the sent characters printed."""
    import json

    if jsonl:
        for s in r.segments:
            if s.final and s.end > s.start:
                a, b = orig.span(s.start, s.end)
                print(json.dumps({"layer": s.layer, "start": a, "end": b, "text": orig.text()[a:b],
                                  "sent_start": s.start, "sent_end": s.end, "sent_text": s.text},
                                 ensure_ascii=False), flush=True)
        return r.processed_chars
    if r.processed_chars > printed:
        b = {lb.layer: list(lb.offsets) for lb in r.boundaries}
        marks = marker.marks(r.processed_chars - printed, printed, b)
        text, out = orig.text(), []
        for i, m in enumerate(marks):
            at = orig.kept[printed + i]
            out += [text[orig.shown : at], m, text[at]]  # the delimiters before it, its mark, the character
            orig.shown = at + 1
        sys.stdout.write("".join(out))
    if r.final:
        sys.stdout.write(orig.text()[orig.shown :] + marker.close())
        orig.shown = orig.length
    sys.stdout.flush()
    return max(printed, r.processed_chars)


def _note_stripping(chars: str, keep: bool) -> str:
    """What is removed before sending ("" when nothing), said once on stderr."""
    if not chars or keep:
        return ""
    print(f"[the model was trained on text without {chars!r}: removing them before sending (the output shows the "
          "text as read); --keep-delimiters sends the text as is]", file=sys.stderr)
    return chars


def _check_segment_flags(args) -> None:
    """Flags that conflict, or that this way of running would ignore, are refused by name."""
    if args.local:
        for flag, value in (("--server", args.server), ("--token-env", args.token_env), ("--tls-ca", args.tls_ca)):
            if value is not None:
                raise UserError(f"{flag} and --local: --local runs the model in this process, with no server; "
                                "give one of them")
        return
    if args.model is not None:
        raise UserError("--model works only with --local (a server serves its own model); add --local or drop --model")
    if args.token_env is not None and not os.environ.get(args.token_env):
        raise UserError(f"--token-env {args.token_env}: that environment variable is empty or unset")
    args.server = args.server or "127.0.0.1:50051"
    host, sep, port = args.server.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise UserError(f"--server {args.server}: give host:port with a port 1-65535")


def cmd_segment(args) -> int:
    from hmlstm.serving.render import Marker, legend

    _check_segment_flags(args)
    chunks = _read_chunks(args.file, args.chunk_chars)
    orig = _Original("")
    failed: list[UserError] = []

    def tee():
        # A mistake found while reading (a non-UTF-8 byte) ends the request stream cleanly and is
        # reported after it, instead of surfacing as the server's "Exception iterating requests".
        try:
            for c in chunks:
                sent = orig.add(c)
                if sent:  # a chunk of delimiters only sends nothing
                    yield sent
        except UserError as e:
            failed.append(e)

    def done() -> int:
        if failed:
            raise failed[0]
        if not orig.kept:
            print(f"0 characters: {args.file if args.file != '-' else 'standard input'} is empty", file=sys.stderr)
        elif not args.jsonl and not orig.text().endswith("\n"):
            print()
        return 0

    printed = 0
    if args.local:
        from hmlstm.serving.messages import response_pb
        from hmlstm.serving.runner import process_chunk_sync
        from hmlstm.serving.stream import StreamState

        model = _load_model(args.model, "auto")
        orig = _Original(_note_stripping(model.provenance.get("strip_delimiters") or "", args.keep_delimiters))
        layers = sorted(set(args.layers)) or model.boundary_layers
        bad = [l for l in layers if l not in model.boundary_layers]
        if bad:
            raise UserError(f"layer(s) {bad} cannot report boundaries; this model's are {model.boundary_layers}")
        if not args.jsonl:
            print(f"[{legend(layers)}]", file=sys.stderr)
        st = StreamState(model.zero_state(1), layers, 0, alignment=model.alignment)
        marker = Marker(model.alignment)
        for c in tee():
            r = response_pb(process_chunk_sync(model, st, st.processed, c, 4096))
            printed = _print_result(r, orig, args.jsonl, printed, marker)
        _print_result(response_pb(st.finish()), orig, args.jsonl, printed, marker)
        return done()

    import grpc

    from hmlstm.serving.client import SegmenterClient

    token = os.environ.get(args.token_env) if args.token_env else None
    with SegmenterClient(args.server, token=token, root_cert=args.tls_ca) as client:
        try:
            info = client.describe()
            orig = _Original(_note_stripping(info.trained_without, args.keep_delimiters))
            marker = Marker(dict(zip(info.boundary_layers, info.boundary_alignment)))
            layers = sorted(set(args.layers)) or list(info.boundary_layers)
            if not args.jsonl:
                print(f"[{legend(layers)}]", file=sys.stderr)
            for r in client.stream(tee(), layers=layers):
                printed = _print_result(r, orig, args.jsonl, printed, marker)
        except grpc.RpcError as e:
            if failed:
                raise failed[0] from None
            raise UserError(f"server {args.server}: {e.code().name}: {e.details()}") from None
    return done()


# ---------------------------------------------------------------- demo

DEMO_TEXT = (
    "The for statement is used to iterate over the elements of a sequence (such as a string, tuple or "
    "list) or other iterable object. The expression list is evaluated once; it should yield an iterable "
    "object. An iterator is created for the result of that iterable."
)


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="start a server, stream a built-in text through it, print the segments")
    p.add_argument("--model", default=None, help="an .onnx file (default: the shipped model)")
    p.add_argument("--chunk-chars", type=int, default=24, help="characters per chunk the demo streams")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    import json
    import textwrap
    import time

    from hmlstm.serving.background import BackgroundServer
    from hmlstm.serving.client import SegmenterClient
    from hmlstm.serving.config import ServeConfig
    from hmlstm.serving.render import Marker, cut_original, legend
    from hmlstm.serving.segments import cut

    if args.chunk_chars < 1:
        raise UserError(f"--chunk-chars must be at least 1, got {args.chunk_chars}")
    model = _load_model(args.model, "auto")
    config = ServeConfig(port=0, metrics_port=None)
    with BackgroundServer(model, config) as srv:
        print(f"server on {srv.target}: {model.path.name}, {model.runtime.note}")
        with SegmenterClient(srv.target) as client:
            info = client.describe()
            prov = json.loads(info.provenance_json or "{}")
            print(f"model: {info.num_layers} layers x {list(info.units)} units, vocabulary {info.vocab_size}, "
                  f"trained on {prov.get('corpus', '?')} (validation BPC {prov.get('val_bpc', '?')})")
            layers = list(info.boundary_layers)
            marker = Marker(dict(zip(info.boundary_layers, info.boundary_alignment)))
            text = DEMO_TEXT
            strip = info.trained_without
            if strip:  # the model reads text without delimiters: send it so
                text = "".join(ch for ch in DEMO_TEXT if ch not in strip)
                print(f"the model was trained on text without {strip!r}: streaming the text with them removed")
            print(f"streaming {len(text)} characters in chunks of {args.chunk_chars}   [{legend(layers)}]\n")
            chunks = [text[i : i + args.chunk_chars] for i in range(0, len(text), args.chunk_chars)]
            t0 = time.perf_counter()
            segments: dict[int, list[str]] = {l: [] for l in layers}
            cuts: dict[int, list[int]] = {l: [] for l in layers}
            for r in client.stream(chunks, layers=layers, top_k=3):
                if not r.final:
                    b = {lb.layer: list(lb.offsets) for lb in r.boundaries}
                    for l, offsets in b.items():
                        cuts[l].extend(cut(o, marker.alignment.get(l, "end")) for o in offsets)
                    sys.stdout.write(marker.feed(text[r.chunk_offset : r.processed_chars], r.chunk_offset, b))
                    sys.stdout.flush()
                for s in r.segments:
                    if s.final:
                        segments[s.layer].append(s.text)
            sys.stdout.write(marker.close())
            elapsed = time.perf_counter() - t0
    print(f"\n\n{len(text)} characters in {elapsed * 1e3:.0f} ms over gRPC. Each layer's segments, cut in the "
          "original text:")
    kept = [i for i, ch in enumerate(DEMO_TEXT) if ch not in (strip or "")]
    quality = _held_out_quality(model.path)
    for l in layers:
        seg = segments[l]
        mean = sum(map(len, seg)) / max(1, len(seg))
        print(f"\nlayer {l}: {len(seg)} segments, mean {mean:.1f} characters")
        print(textwrap.fill(cut_original(DEMO_TEXT, kept, cuts[l]), width=100, initial_indent="    ",
                            subsequent_indent="    "))
        for line in quality.get(l, []):
            print(f"  {line}")
    return 0


def _held_out_quality(model_path: Path) -> dict[int, list[str]]:
    """Per layer, what its boundaries are worth on each text the model card evaluated (the held-out
    part of the training text, another text): layer 1 against words, the layers above against phrases
    or sentences (the one they find best), each against a random detector at the layer's rate."""
    import json

    from hmlstm import spec
    from hmlstm.evaluation import text_label

    try:
        evaluations = json.loads(spec.card_path(model_path).read_text(encoding="utf-8"))["evaluation"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    lines: dict[int, list[str]] = {}
    for key, where in (("held_out", "held-out text"), ("other_text", "another text")):
        report = evaluations.get(key)
        if not isinstance(report, dict):
            continue
        for name, e in report.get("layers", {}).items():
            meant = ("words",) if name == "layer1" else ("phrases", "sentences")  # what each layer is taught
            scores = [(unit, align, s) for unit in meant if unit in e for align, s in e[unit].items()]
            if not scores:
                continue
            unit, align, s = max(scores, key=lambda x: x[2]["f1"] - x[2]["random_f1"])
            useful = s["f1"] >= s["random_f1"] + 0.10
            verdict = f"finds {unit}" if useful else "within 0.10 of a random detector: not a useful segmenter"
            lines.setdefault(int(name.removeprefix("layer")), []).append(
                f"{where} ({text_label(report['text'])}): {unit[:-1]}-{align} F1 {s['f1']:.2f} against "
                f"{s['random_f1']:.2f} for random firing at its rate: {verdict}")
    return lines


# ---------------------------------------------------------------- info


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="what an exported model is: recipe, vocabulary, engines, evaluations (its card)")
    p.add_argument("model", nargs="?", type=Path, default=None,
                   help="an .onnx written by `hmlstm export` (default: the shipped model)")
    p.add_argument("--json", action="store_true", help="print the whole model card as JSON")
    p.set_defaults(func=cmd_info)


def _card_or_metadata(path: Path) -> dict:
    """The model card beside ``path``, or for a file without one, what its metadata says."""
    import json

    from hmlstm import spec

    card = spec.card_path(path)
    if card.is_file():
        try:
            return json.loads(card.read_text(encoding="utf-8"))
        except ValueError:
            raise UserError(f"{card} is not valid JSON; export the model again to rewrite it") from None
    from hmlstm.serving.model import ModelLoadError, load_model

    try:
        model = load_model(path, "cpu")
    except ModelLoadError as e:
        raise UserError(str(e)) from None
    return {"model_config": model.config, "vocabulary_size": len(model.vocab), "provenance": model.provenance,
            "boundary_alignment": {str(k): v for k, v in model.alignment.items()}, "engine": model.engine,
            "vocabulary": model.vocab.chars, "evaluation": {}}


def cmd_info(args) -> int:
    import json

    from hmlstm.serving.model import DEFAULT_MODEL

    path = args.model or DEFAULT_MODEL
    if not path.is_file():
        raise UserError(f"{path} is not a file; give an .onnx written by `hmlstm export`")
    card = _card_or_metadata(path)
    if args.json:
        print(json.dumps(card, indent=2, ensure_ascii=False))
        return 0
    cfg, prov = card.get("model_config", {}), card.get("provenance") or {}
    engines = card.get("engines") or {}
    beside = [e["file"] for name, e in engines.items() if e.get("file") != path.name]
    lines = [f"{path.name}: {len(cfg.get('num_units', []))} layers x "
             f"{'/'.join(map(str, cfg.get('num_units', [])))} units, embedding {cfg.get('embed_dim')}, "
             f"vocabulary {card.get('vocabulary_size')} characters; {card.get('engine', 'dense')} engine"
             + (f" ({', '.join(beside)} beside it)" if beside else "")]
    if prov.get("command"):
        preset = f" (preset {prov['preset']})" if prov.get("preset") else ""
        command = prov["command"] if prov["command"].startswith("hmlstm ") else f"hmlstm {prov['command']}"
        lines.append(f"recipe: {command}{preset}")
    if prov.get("step") is not None:
        lines.append(f"trained: {prov['step']:,} steps on {prov.get('corpus', '?')}, "
                     f"validation BPC {prov.get('val_bpc')}")
    strip = prov.get("strip_delimiters")
    lines.append(f"trained without: {strip!r} (segment, plot and evaluate remove these; --keep-delimiters keeps "
                 "them)" if strip else "trained without: nothing (the text as it is)")
    if card.get("boundary_alignment"):
        lines.append("boundaries: " + ", ".join(f"layer {l} fires on a unit's {'first' if a == 'start' else 'last'} "
                                                "character" for l, a in card["boundary_alignment"].items()))
    for layer, quality in sorted(_held_out_quality(path).items()):
        for q in quality:
            lines.append(f"layer {layer}, {q}")
    v = card.get("validation") or {}
    if v:
        flips = len(v.get("boundary_flips_explained", []))
        lines.append(f"validated against TensorFlow: {len(v.get('cases', []))} cases, max |diff| logits "
                     f"{v.get('max_abs_diff', {}).get('logits')}, {flips} explained boundary flips in "
                     f"{v.get('boundaries_compared', 0):,}")
    print("\n".join(lines))
    return 0


# ---------------------------------------------------------------- main


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where its help already says it or there is none to show."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, [], "") or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse, with "did you mean --steps?" for a misspelt flag of the command given."""

    commands: dict = {}
    _argv: list[str] = []

    def parse_args(self, args=None, namespace=None):
        self._argv = list(sys.argv[1:] if args is None else args)
        return super().parse_args(args, namespace)

    def error(self, message):
        if message.startswith("unrecognized arguments:"):
            command = next((self.commands[a] for a in self._argv if a in self.commands), None)
            known = [o for a in (command._actions if command else self._actions) for o in a.option_strings]
            for token in message.split(":", 1)[1].split():
                close = difflib.get_close_matches(token.split("=")[0], known, n=1, cutoff=0.6) \
                    if token.startswith("--") else []
                if close:
                    message += f" (did you mean {close[0]}?)"
                    break
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="hmlstm", description="Streaming sequence segmentation with a Hierarchical Multiscale LSTM.")
    sub = parser.add_subparsers(dest="command", required=True)
    parser.commands = sub.choices
    parser.add_argument("--version", action="version", version=f"hmlstm {hmlstm.__version__}")
    _add_parser = sub.add_parser

    def add_parser(name, **kw):  # every command's --help shows its defaults
        kw["formatter_class"] = _HelpFormatter
        return _add_parser(name, **kw)

    sub.add_parser = add_parser
    _add_train(sub)
    _add_plot(sub)
    _add_evaluate(sub)
    _add_export(sub)
    _add_serve(sub)
    _add_health(sub)
    _add_segment(sub)
    _add_demo(sub)
    _add_info(sub)
    return parser


# Modules of the [train] extra (pyproject.toml): a server-only install lacks them.
TRAIN_EXTRA = ("tensorflow", "tensorboard", "tf2onnx", "onnx", "tqdm", "matplotlib")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "preset", None):  # the preset's settings as defaults; the flags given on the line still win
        parser.commands[args.command].set_defaults(**PRESETS[args.preset])
        args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"hmlstm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hmlstm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `hmlstm segment ... | head`: the reader left; no traceback
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # as a process killed by SIGPIPE
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in TRAIN_EXTRA:
            raise
        print(f"hmlstm: error: `hmlstm {args.command}` needs {e.name.split('.')[0]}, which the server-only install "
              "leaves out; install training, export and plots with: pip install 'hmlstm[train]'", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
