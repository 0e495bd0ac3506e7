"""`hmlstm evaluate`: boundary quality of a model against a text's true segmentation."""

from __future__ import annotations

import sys
from pathlib import Path

from hmlstm.cli.common import _model_vocabulary, _strip_chars, quiet_tensorflow
from hmlstm.errors import UserError


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

    if args.sep == "":
        raise UserError("--sep needs at least one character: the symbol between units, e.g. --sep '|'")
    if args.text not in ("builtin", "synthetic"):
        for flag, given in (("--all", args.all), ("--seed", args.seed != 0)):
            if given:
                raise UserError(f"{flag} applies to the builtin and synthetic texts only (a file is scored as it "
                                "is, up to --max-chars); drop it")
    elif args.text == "builtin" and args.seed != 0:
        raise UserError("--seed chooses the synthetic text; the builtin text has none. Drop it")
    from hmlstm.model.config import seed_error

    if seed_error(args.seed):  # as train's --seed
        raise UserError(seed_error(args.seed))
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
    segmented = args.sep is not None or args.format == "lines"  # a file that carries its own truth: units
    note = None
    if strip is None and trained_without and not args.keep_delimiters and not segmented:  # as segment does
        strip = trained_without
        note = (f"[the model was trained on text without {trained_without!r}: removed them, and their positions "
                "are the truth; --keep-delimiters keeps them]")
    if args.sep is not None:
        corpus = read_segmented(args.text, args.sep)
        if strip:
            text, ends, _ = strip_delimiters(corpus.text, strip, corpus.word_ends)
            corpus = Corpus(corpus.name, text, ends)
    else:
        corpus = load_corpus(args.text, args.format, seed=args.seed, strip=strip)
    if note:  # once the text is read: a text that cannot be read is refused in one line
        print(note, file=sys.stderr)
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
