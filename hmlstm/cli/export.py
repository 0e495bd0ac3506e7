"""`hmlstm export`: a training run, or an earlier export, to ONNX (both engines), validated."""

from __future__ import annotations

import math
import sys
import tempfile
from pathlib import Path

from hmlstm.cli.common import quiet_tensorflow
from hmlstm.errors import UserError


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
    p.add_argument("--tolerance", type=float, default=None,
                   help="largest |ONNX - TensorFlow| on logits and states (default 1e-4; exporting an .onnx again: "
                        "the tolerance its card says it was exported with, if larger)")
    p.add_argument("--strict", action="store_true",
                   help="the tolerance is absolute: no value beyond it is explained by TensorFlow's own "
                        "float32 spread (see docs/export.md)")
    p.add_argument("--no-validate", action="store_true", help="skip validation (not recommended)")
    p.add_argument("--eval-text", default=None, metavar="FILE",
                   help="also evaluate on this text file from another source (stripped like the training text) "
                        "and put the report in the model card beside the held-out one")
    p.add_argument("--triton-instance", choices=["gpu", "cpu"], default=None,
                   help="with --triton: the Triton instance kind, gpu (KIND_GPU, the dense graph; the default) or cpu "
                        "(KIND_CPU, the sparse one)")
    p.add_argument("--triton-max-sequences", type=int, default=None, metavar="N",
                   help="with --triton: sequences Triton batches together per instance; more wait in its backlog "
                        "(default 256)")
    p.add_argument("--triton", type=Path, default=None, metavar="REPO",
                   help="also write a Triton Inference Server model repository for it (REPO/hmlstm/1/model.onnx "
                        "and config.pbtxt: ONNX Runtime backend, sequence batching with implicit state)")
    p.set_defaults(func=cmd_export)


DEFAULT_TOLERANCE = 1e-4


def _exported_tolerance(path: Path) -> float | None:
    """The validation tolerance an exported file's card records, where it is larger than the default: a model
    whose logits drift further over long sequences keeps validating as it did when it was written."""
    import json

    from hmlstm import spec

    if not path.is_file():
        return None
    try:
        tol = float((json.loads(spec.card_path(path).read_text(encoding="utf-8")).get("validation") or {})
                    ["tolerance"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return tol if tol > DEFAULT_TOLERANCE and tol < 1.0 else None


def cmd_export(args) -> int:
    # Every check that needs no TensorFlow comes first, so that a mistake is answered at once, not after the
    # conversion's minutes.
    from hmlstm import spec
    from hmlstm.cli.common import check_output, need
    from hmlstm.model.data import read_text_file

    need("tensorflow", "tf2onnx", "onnx")

    if args.tolerance is not None and not (math.isfinite(args.tolerance) and args.tolerance > 0):
        raise UserError(f"--tolerance must be a positive number, got {args.tolerance}"
                        + (" (a finite one; --no-validate skips validation)" if args.tolerance == math.inf else ""))
    if args.triton is None:
        for flag, value in (("--triton-instance", args.triton_instance),
                            ("--triton-max-sequences", args.triton_max_sequences)):
            if value is not None:
                raise UserError(f"{flag} shapes the Triton repository that --triton REPO writes, and none is asked "
                                "for; add --triton REPO or drop it")
    args.triton_instance = args.triton_instance or "gpu"
    args.triton_max_sequences = 256 if args.triton_max_sequences is None else args.triton_max_sequences
    if args.triton_max_sequences < 1:
        raise UserError(f"--triton-max-sequences must be at least 1, got {args.triton_max_sequences}")
    engines = tuple(e.strip() for e in args.engines.split(",") if e.strip())
    why = spec.export_choice_error(engines, args.opset)
    if why:
        raise UserError(f"--{why}")  # "--engines ...", "--opset ...": the flag's own name
    if args.no_validate:
        ignored = [f for f, on in (("--strict", args.strict), ("--quick", args.quick),
                                   ("--tolerance", args.tolerance is not None), ("--device", args.device != "auto"))
                   if on]
        if ignored:
            raise UserError(f"{', '.join(ignored)} set{'s' if len(ignored) == 1 else ''} how validation runs, and "
                            "--no-validate skips it; give one or the other")
    if not args.checkpoint.exists():
        raise UserError(f"{args.checkpoint} does not exist; give a run directory written by `hmlstm train`, or an "
                        "exported .onnx")
    check_output(args.out, "--out")
    if args.triton is not None:
        check_output(args.triton, "--triton", folder=True)
    if args.device == "cuda":
        from hmlstm.runtime import device_unavailable

        why = device_unavailable("cuda")
        if why:
            raise UserError(f"--device cuda: CUDA cannot be used here ({why}); validate with --device cpu, or auto "
                            "(the CPU, plus CUDA where it works)")
    if args.eval_text is not None:
        read_text_file(args.eval_text)  # a missing or unreadable file is refused before the export's work
    quiet_tensorflow()
    from hmlstm.export.convert import ExportConfig, export
    from hmlstm.export.validate import ValidationError

    tolerance = args.tolerance or _exported_tolerance(args.checkpoint) or DEFAULT_TOLERANCE
    if args.tolerance is None and tolerance != DEFAULT_TOLERANCE and not args.no_validate:
        print(f"validating at {tolerance:g}, the tolerance {args.checkpoint.name} was exported with (its card); "
              "--tolerance sets another", file=sys.stderr)
    kw = dict(times=(1, 7, 333), batches=(1, 3)) if args.quick else {}
    if args.strict:
        kw["explain_factor"] = 0.0
    cfg = ExportConfig(opset=args.opset, validate=not args.no_validate, device=args.device,
                       tolerance=tolerance, eval_text=args.eval_text, engines=engines, **kw)
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="hmlstm-recovered-") as tmp:  # removed on Ctrl-C and SIGTERM too
        run, keep = args.checkpoint, None
        if run.suffix == ".onnx" and run.is_file():
            from hmlstm.export.recover import recover_run

            run = recover_run(run, Path(tmp) / run.stem, log=log)
            keep = _earlier_evaluations(args.checkpoint)
        try:
            result = export(run, args.out, cfg, log=log, keep_evaluations=keep)
        except ValidationError as e:
            print(f"hmlstm: error: export refused, nothing written: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
        except RuntimeError as e:  # a provider that loads and then fails (CUDA without a usable device)
            raise UserError(f"export stopped, nothing written: {e}") from None
    others = [e["file"] for e in result.card["engines"].values() if e["file"] != result.path.name]
    print(f"wrote {result.path} ({result.card['engine']} engine, {result.card['size_bytes'] / 1e6:.2f} MB)"
          + "".join(f", {result.path.with_name(f)}" for f in others) + f" and {result.card_path}")
    if args.triton is not None:
        from hmlstm.export.triton import write_repository

        config = write_repository(result.path, args.triton, instance=args.triton_instance,
                                  max_sequences=args.triton_max_sequences)
        print(triton_written(config, args.triton, args.triton_instance))
    return 0


def triton_written(config: Path, repo: Path, instance: str) -> str:
    """What the export says of the Triton repository it wrote: which graph the instance got, and why where it is
    not the one it usually gets (the dense for a GPU, the sparse for a CPU: --engines left that one out)."""
    from hmlstm import spec
    from hmlstm.export.triton import read_metadata

    engine = read_metadata(config.parent / "1" / "model.onnx").get(spec.META_ENGINE, "dense")
    usual = "dense" if instance == "gpu" else "sparse"
    why = "" if engine == usual else f"; --engines left out the {usual} graph it usually gets"
    return f"wrote {config} (Triton model repository {repo}, {instance} instance, the {engine} graph{why})"


def _earlier_evaluations(model: Path) -> dict:
    """The evaluations of an earlier export's card (texts scored then: --eval-text's among them)."""
    import json

    from hmlstm import spec

    try:
        return dict(json.loads(spec.card_path(model).read_text(encoding="utf-8")).get("evaluation") or {})
    except (OSError, ValueError, AttributeError, TypeError):
        return {}
