"""`hmlstm info`: what an exported model is (its card)."""

from __future__ import annotations

from pathlib import Path

from hmlstm.cli.common import _held_out_quality
from hmlstm.errors import UserError


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="what an exported model is: recipe, vocabulary, engines, evaluations (its card)",
                       description="Say what an exported model is, from its model card (or its metadata where it "
                       "has none): its size, the command that trained it, what it was trained without, where each "
                       "layer fires and what its boundaries scored on held-out text, and its validation.")
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
    if path.is_dir():
        if (path / "config.json").is_file():
            return _run_info(path, args.json)
        raise UserError(f"{path} is a folder, not a training run (no config.json); give an .onnx written by "
                        "`hmlstm export`, or a run directory written by `hmlstm train`")
    if not path.exists():
        raise UserError(f"model file {path} does not exist; give an .onnx written by `hmlstm export`")
    if not path.is_file():
        raise UserError(f"{path} is not a regular file (a device or a pipe); give an .onnx written by `hmlstm export`")
    card = _card_or_metadata(path)
    if args.json:
        print(json.dumps(card, indent=2, ensure_ascii=False))
        return 0
    cfg, prov = card.get("model_config", {}), card.get("provenance") or {}
    from hmlstm import spec

    # the other engines' graphs actually beside this file (the card names the files as exported)
    beside = [spec.engine_path(path, e).name for e in (card.get("engines") or {})
              if spec.engine_path(path, e) != path and spec.engine_path(path, e).is_file()]
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
    lines += _learned(card.get("boundary_learning") or _learning(prov.get("train_config"), cfg))
    lines.append(_lookahead(card.get("lookahead_chars", (prov.get("train_config") or {}).get("lookahead", 0))))
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


def _learned(learning: dict[str, str]) -> list[str]:
    """The line that says how each layer with a detector learned its boundaries (none without a detector)."""
    return ["learned: " + ", ".join(f"layer {l} {how}" for l, how in learning.items())] if learning else []


def _lookahead(k: int) -> str:
    """The line that says when a boundary is decided."""
    if not k:
        return "look-ahead: none (each boundary is decided as its character is read)"
    return (f"look-ahead: {k} character{'s' if k > 1 else ''} (each boundary is decided {k} character"
            f"{'s' if k > 1 else ''} after it; a stream's last {k} wait for more text or its end)")


def _learning(train_config: dict | None, model_config: dict) -> dict[str, str]:
    """A card written before it said so: how each detector learned, from its recipe's training settings."""
    from hmlstm.model.config import ModelConfig, TrainConfig

    try:
        return TrainConfig(**train_config).boundary_learning(ModelConfig.from_dict(model_config).num_detectors)
    except (TypeError, ValueError):
        return {}


def _run_info(path: Path, as_json: bool) -> int:
    """What a training run is, from its files (no TensorFlow): settings, corpus, progress, boundaries."""
    import json

    from hmlstm.model.checkpoint import read_run_info

    info = read_run_info(path)
    try:
        metrics = json.loads((path / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        metrics = {}
    steps = sorted(int(f.name.split("-")[1].split(".")[0]) for f in (path / "ckpt").glob("ckpt-*.index")) \
        if (path / "ckpt").is_dir() else []
    if as_json:
        print(json.dumps({"model_config": info.model.to_dict(), "train_config": info.train.to_dict(),
                          "provenance": info.meta, "vocabulary_size": len(info.vocab), "checkpoints": steps,
                          "metrics": metrics}, indent=2, ensure_ascii=False))
        return 0
    m = info.model
    bpc = (metrics.get("val_bpc") or [[None, None]])[-1][1]
    lines = [f"{path.name}: training run, {m.num_layers} layers x {'/'.join(map(str, m.num_units))} units, embedding "
             f"{m.embed_dim}, vocabulary {len(info.vocab)} characters"
             + (", top layer with a boundary detector" if m.top_boundary else ""),
             f"corpus: {info.meta.get('corpus', '?')}" + (f" (preset {info.meta['preset']})"
                                                          if info.meta.get("preset") else "")]
    if info.meta.get("command"):
        lines.append(f"recipe: {info.meta['command']}")
    lines += _learned(info.train.boundary_learning(m.num_detectors))
    lines.append(_lookahead(info.train.lookahead))
    lines.append(f"trained: {metrics.get('step', 0):,} steps" + (f", validation BPC {bpc:.3f}" if bpc else "")
                 + (f"; checkpoints at steps {', '.join(map(str, steps[-3:]))}" if steps else "; no checkpoint yet"))
    for name, e in (metrics.get("boundary") or {}).items():
        w = e.get("word_starts") or e.get("word_ends")
        if name == f"layer{m.num_layers}" and not m.top_boundary:
            lines.append(f"{name}: no boundary detector (the top layer; --top-boundary gives it one)")
        elif w and "rate" in e:
            lines.append(f"{name}: fires at {e['rate']:.1%} of characters; word F1 {w['f1']:.2f} "
                         f"(random at that rate {w['random_f1']:.2f})")
    lines.append(f"export it: hmlstm export {path} --out model.onnx" if steps else
                 "nothing to export yet (no checkpoint): train it, with the recipe above to resume it, then export it")
    print("\n".join(lines))
    return 0
