"""`hmlstm train`: train an HM-LSTM character LM on a corpus, with presets and checks before any work."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from hmlstm.cli.common import _floats, _strip_chars, quiet_tensorflow
from hmlstm.errors import UserError


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train an HM-LSTM character LM",
                       description="Train an HM-LSTM character language model. A run directory "
                       "that holds a run with the same settings is resumed.")
    p.add_argument("corpus", nargs="?", default="builtin",
                   help="'builtin' (Python's docs text, default), 'synthetic', or a UTF-8 text file")
    p.add_argument("--format", default="auto", choices=["auto", "text", "ptb"],
                   help="file format: plain text, or Penn Treebank characters ('a _ b')")
    p.add_argument("--out", type=Path, default=None,
                   help="run directory (default runs/<corpus>, or runs/<corpus>-<preset> with --preset)")
    p.add_argument("--layers", type=int, default=3, help="how many HM-LSTM layers (a count; `segment --layers` picks "
                   "layers to report)")
    p.add_argument("--units", type=int, default=128, help="hidden units per layer")
    p.add_argument("--embed-dim", type=int, default=64, help="character embedding size")
    p.add_argument("--output-dim", type=int, default=256, help="output embedding size before the softmax")
    p.add_argument("--top-boundary", action=argparse.BooleanOptionalAction, default=False,
                   help="give the top layer its own boundary detector (default: off; --no-top-boundary turns off "
                        "a preset's)")
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
    p.add_argument("--boundary-targets", default="", metavar="UNITS",
                   help="teach the detectors where the stripped delimiters were, per layer bottom first: words, "
                        "phrases (punctuation then whitespace), sentences or none, e.g. words,phrases; needs "
                        "--strip-whitespace or --strip-delimiters (default: none, boundaries learned without labels; "
                        "none turns a preset's off)")
    p.add_argument("--boundary-weight", type=float, default=1.0,
                   help="weight of the --boundary-targets loss beside the language model's")
    p.add_argument("--lookahead", type=int, default=0, metavar="K",
                   help="decide each boundary K characters after the first character of the unit it starts "
                        "(0: at once); needs --boundary-targets for every layer with a detector. The server holds "
                        "a stream's last K characters until more text or the end comes")
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
    "shipped": {"strip_whitespace": True, "top_boundary": True, "boundary_targets": "words,phrases,sentences",
                "lookahead": 3, "steps": 8500, "seed": 0},
}


# Settings that are one choice between several flags, and settings that mean nothing once another is off:
# a flag given beside a preset replaces the preset's value of its whole group, and turning the head of a
# group off (--entropy-target 0) drops the preset's values of the settings that depend on it.
SAME_SETTING = (("strip_whitespace", "strip_delimiters"),)
DEPENDS_ON = {"entropy_target": ("peak_fractions", "peak_window"), "boundary_targets": ("boundary_weight", "lookahead")}


def preset_settings(name: str, given: set[str], args) -> dict:
    """The preset's settings that the flags given (argparse destinations, their values in ``args``) leave
    standing."""
    settings = dict(PRESETS[name])
    for group in SAME_SETTING:
        if given & set(group):
            for dest in group:
                settings.pop(dest, None)
    for head, dependents in DEPENDS_ON.items():
        if head in given and getattr(args, head) in (0, "", "none"):
            for dest in dependents:
                settings.pop(dest, None)
    for dest in given:
        settings.pop(dest, None)
    return settings


def given_settings(parser, command, argv) -> set[str]:
    """The settings (argparse destinations) of ``command`` given explicitly on the command line."""
    unset = object()
    defaults = {a.dest: a.default for a in command._actions if a.dest != "help"}
    command.set_defaults(**dict.fromkeys(defaults, unset))
    try:
        probe = parser.parse_args(argv)
    finally:
        command.set_defaults(**defaults)
    return {d for d in defaults if getattr(probe, d, unset) is not unset}


def default_run_dir(corpus: str, preset: str | None) -> Path:
    """runs/<corpus> (its file's stem), and runs/<corpus>-<preset> for a preset: a preset's run and the
    paper's default one never meet in one folder, where the second would be refused."""
    stem = Path(corpus).stem
    return Path("runs") / (f"{stem}-{preset}" if preset else stem)


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


def _out_of_memory(out: Path, args, existed: bool, resuming: bool) -> str:
    """The line for a training step that ran out of memory. A run this command began and never saved is removed:
    a retry with smaller sizes would otherwise be refused as another run's folder."""
    from hmlstm.model.checkpoint import latest_checkpoint, remove_run

    sizes = (f"{args.layers} layers x {args.units} units at batch {args.batch_size} x {args.seq_len} characters "
             f"per step")
    fix = "lower --batch-size or --seq-len (the memory grows with both), or --units"
    saved = latest_checkpoint(out)
    if saved is not None:
        return (f"out of memory training {sizes}, after checkpoint {Path(saved).name} was saved in {out}; {fix}, "
                "with another --out (these sizes are that run's own)")
    if resuming:
        return f"out of memory training {sizes}; {fix}, with another --out (these sizes are {out}'s own)"
    remove_run(out, folder_too=not existed)
    return f"out of memory training {sizes}, before anything was saved (nothing is left in {out}); {fix}"


def _check_text_is_text(text: str, name: str) -> None:
    """A training text made mostly of control characters (NUL bytes: a binary file) is refused."""
    import unicodedata

    sample = text[:200_000]
    control = sum(1 for c in sample if c not in "\n\r\t" and unicodedata.category(c).startswith("C"))
    if sample and control > 0.3 * len(sample):
        raise UserError(f"{name} is {control / len(sample):.0%} control characters (NUL bytes?): it looks like a "
                        "binary file, not text to train on")


def cmd_train(args) -> int:
    # Every check that needs no TensorFlow comes first: a mistake is answered in a fraction of a second.
    from hmlstm.cli.common import check_output, need
    from hmlstm.model.config import TrainConfig
    from hmlstm.model.data import load_corpus, size_problem

    need("tensorflow", "tensorboard", "tqdm")

    for flag, value in (("--layers", args.layers), ("--units", args.units), ("--embed-dim", args.embed_dim),
                        ("--output-dim", args.output_dim)):
        if value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
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
            boundary_targets=tuple(t.strip() for t in args.boundary_targets.split(",") if t.strip()),
            boundary_weight=args.boundary_weight, lookahead=args.lookahead,
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
    problem = cfg.detector_problem(detectors)
    if problem:
        raise UserError(problem)
    if args.boundary_weight != 1.0 and not cfg.supervised_layers:
        raise UserError("--boundary-weight weighs the --boundary-targets loss; add --boundary-targets or drop it")
    _check_model_fits(args)
    out = args.out or default_run_dir(args.corpus, args.preset)
    check_output(out, "--out", folder=True)
    corpus = load_corpus(args.corpus, args.format, seed=args.seed, strip=_strip_chars(args))
    _check_text_is_text(corpus.text, corpus.name)
    if cfg.supervised_layers:  # refused here, before TensorFlow loads: a text that keeps its delimiters, say
        corpus.unit_starts(tuple(u for _, u in cfg.supervised_layers))
    held_out = corpus.held_out_start(cfg.val_fraction)
    problem = size_problem(held_out, len(corpus.text) - held_out, cfg.batch_size, cfg.seq_len)
    if problem:  # (train() asks too, for callers of the API; here it is answered before TensorFlow loads)
        raise UserError(problem)
    if detectors == 0:
        print(f"hmlstm: warning: --layers {args.layers} without --top-boundary has no boundary detector: the model "
              "will learn the language but report no boundaries (add --top-boundary, or more --layers)",
              file=sys.stderr)
    model_kwargs = dict(embed_dim=args.embed_dim, num_units=(args.units,) * args.layers,
                        output_dim=args.output_dim, top_boundary=args.top_boundary,
                        layer_norm=args.layer_norm)
    existed, resuming = Path(out).exists(), (Path(out) / "config.json").exists()
    if resuming:  # a run to resume: one of other settings is refused before TensorFlow
        from hmlstm.model.checkpoint import refuse_another_run
        from hmlstm.model.config import ModelConfig
        from hmlstm.model.data import Vocabulary

        vocab = Vocabulary.from_text(corpus.text)
        try:
            model = ModelConfig(vocab_size=len(vocab), **model_kwargs)
        except ValueError as e:
            raise UserError(f"{e}; fix the flag and run again") from None
        refuse_another_run(Path(out), model, cfg, vocab, corpus.name)
    quiet_tensorflow()
    from hmlstm.model.train import train

    print(f"training on {corpus.name} ({len(corpus.text):,} chars) -> {out}", file=sys.stderr)
    from hmlstm.model.distributed import make_strategy

    strategy = make_strategy(getattr(args, "strategy", None))
    import tensorflow as tf

    try:
        result = train(corpus, model_kwargs, cfg, out, progress=not args.no_progress, strategy=strategy,
                       preset=args.preset)
    except tf.errors.ResourceExhaustedError:  # out of memory
        raise UserError(_out_of_memory(Path(out), args, existed, resuming)) from None
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
