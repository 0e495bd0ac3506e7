"""TensorFlow -> ONNX: the streaming step function, with the time loop kept as a Loop.

``export(run_dir, out, config)`` loads a trained run, converts its streaming
step function with ``tf2onnx.convert.from_function``, names the dynamic
axes, writes its description into the model's metadata, validates it (see
``validate.py``) and only then writes it, atomically, with a JSON model card
beside it. A model that fails validation is never written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import onnx
import tensorflow as tf

import hmlstm
from hmlstm import spec
from hmlstm.errors import UserError
from hmlstm.export.functions import stream_function, tf_float_spread, tf_reference, tf_signature
from hmlstm.export.inference import inference_function
from hmlstm.export.passes import loop_body_nodes, optimize
from hmlstm.export.recover import weight_map
from hmlstm.export.validate import ValidationReport, check_structure, validate
from hmlstm.model.checkpoint import atomic_write_bytes, atomic_write_text, load_network
from hmlstm.model.config import TrainConfig, dumps
from hmlstm.model.data import builtin_text, load_corpus


@dataclass(frozen=True)
class ExportConfig:
    opset: int = 17
    validate: bool = True
    times: tuple[int, ...] = (1, 7, 333, 5000)
    batches: tuple[int, ...] = (1, 3, 17)
    tolerance: float = 1e-4
    boundary_threshold: float = 1e-4
    # A value beyond the tolerance passes only within this many times TensorFlow's
    # own float32 spread at that place (validate.py); 0 = the tolerance is absolute.
    explain_factor: float = 2.0
    spread_runs: int = 3
    device: str = "auto"  # which ORT providers validation runs on: auto = CPU, plus CUDA if present
    # graphs to write: the first at --out, each other one beside it (spec.engine_path: model.dense.onnx)
    engines: tuple[str, ...] = ("sparse", "dense")
    eval_text: str | None = None  # a text file from another source, evaluated for the card beside the held-out part

    def __post_init__(self) -> None:
        why = spec.export_choice_error(self.engines, self.opset)
        if why:
            raise UserError(why)


@dataclass(frozen=True)
class ExportResult:
    path: Path
    card_path: Path
    card: dict


def _name_axes(model: onnx.ModelProto, num_units: tuple[int, ...], vocab_size: int) -> None:
    """Give the dynamic axes their documented names (tf2onnx calls them unk__N)."""
    ins, outs = spec.io_spec(num_units, vocab_size)
    by_name = {s.name: s for s in (*ins, *outs)}
    for vi in (*model.graph.input, *model.graph.output):
        s = by_name.get(vi.name)
        if s is None:
            continue
        for dim, want in zip(vi.type.tensor_type.shape.dim, s.shape):
            if isinstance(want, str):
                dim.dim_param = want
            else:
                dim.dim_value = want
        vi.doc_string = s.doc


def convert(network, vocab_chars: list[str], provenance: dict, opset: int = 17,
            optimized: bool = True, engine: str = "sparse") -> onnx.ModelProto:
    """The network's streaming step as an ONNX model with metadata (not validated).

    optimized: export ``inference.inference_function`` with ``engine`` ("sparse", the default:
    layers >= 2 compute only their active rows; or "dense"), else the training network's own
    forward pass, ``stream_function`` (dense).
    """
    import tf2onnx

    cfg = network.config
    fn = inference_function(network, engine) if optimized else stream_function(network)
    model, _ = tf2onnx.convert.from_function(
        fn, input_signature=tf_signature(cfg.num_units, cfg.vocab_size), opset=opset)
    # onnx >= 1.23 would stamp IR 14, which ONNX Runtime 1.31 refuses: use the
    # lowest IR version the opsets need.
    model.ir_version = onnx.helper.find_min_ir_version_for(list(model.opset_import))
    optimize(model)
    _name_axes(model, cfg.num_units, cfg.vocab_size)
    ins, outs = spec.io_spec(cfg.num_units, cfg.vocab_size)
    model.doc_string = spec.__doc__
    model.producer_name = "hmlstm"
    model.producer_version = hmlstm.__version__
    trained = TrainConfig(**provenance.get("train_config") or {})
    meta = {
        spec.META_FORMAT: spec.FORMAT,
        spec.META_CONFIG: json.dumps(cfg.to_dict()),
        spec.META_VOCAB: json.dumps(vocab_chars, ensure_ascii=False),
        spec.META_STATE_MAP: json.dumps(spec.state_map(cfg.num_layers)),
        spec.META_IO: json.dumps({"inputs": [s.to_dict() for s in ins],
                                  "outputs": [s.to_dict() for s in outs]}),
        spec.META_VERSIONS: json.dumps(versions(opset)),
        spec.META_PROVENANCE: json.dumps(provenance, ensure_ascii=False),
        spec.META_ALIGNMENT: json.dumps(spec.boundary_alignment(cfg.num_layers, cfg.top_boundary,
                                                                trained.start_aligned)),
        spec.META_LOOKAHEAD: json.dumps(trained.lookahead),
        spec.META_ENGINE: engine if optimized else "dense",
    }
    weights = weight_map(network, model)
    if weights is not None:
        meta[spec.META_WEIGHTS] = json.dumps(weights)
    del model.metadata_props[:]
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    return model


def versions(opset: int) -> dict[str, str | int]:
    import onnxruntime
    import tf2onnx

    return {"hmlstm": hmlstm.__version__, "tensorflow": tf.__version__, "tf2onnx": tf2onnx.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "opset": opset}


def read_metadata(model: onnx.ModelProto) -> dict[str, object]:
    """The metadata written by ``convert``, JSON-decoded (format stays a string)."""
    props = {p.key: p.value for p in model.metadata_props}
    return {k: (v if k in (spec.META_FORMAT, spec.META_ENGINE) else json.loads(v)) for k, v in props.items()
            if k.startswith("hmlstm.")}


def _check_output_path(out: Path) -> None:
    if out.is_dir():
        raise UserError(f"output path {out} is a directory; give a file name such as {out}/model.onnx")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"output folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise UserError(f"output folder {parent} is not writable")


def _validation_text(corpus_name: str | None) -> str:
    """Real text for validation: the run's own corpus where it can be read again."""
    if corpus_name and corpus_name.startswith(("file:", "ptb-chars:")):
        try:
            return load_corpus(corpus_name.split(":", 1)[1]).text
        except UserError:
            pass
    if corpus_name and corpus_name.startswith("synthetic"):
        return load_corpus("synthetic").text
    return builtin_text()


def export(run_dir: str | Path, out: str | Path, config: ExportConfig = ExportConfig(),
           log=print, keep_evaluations: dict | None = None) -> ExportResult:
    """Convert, validate, evaluate, then write OUT, its companions and its card, all or nothing.
    ``keep_evaluations``: an earlier card's evaluations, kept for every text this export does not score
    again (re-exporting an earlier export)."""
    from hmlstm.runtime import make_session

    out = Path(out)
    _check_output_path(out)
    if len(config.engines) > 1 and spec.engine_path(out, "dense") == out:
        raise UserError(f"--out {out} is the name of a dense companion file; give the main name, e.g. "
                        f"{spec.engine_path(out, 'sparse')}")
    log(f"loading {run_dir}")
    network, info = load_network(run_dir)
    metrics_file = info.path / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
    provenance = {
        "run": info.meta.get("run") or info.path.name, "corpus": info.meta.get("corpus"),
        "strip_delimiters": info.meta.get("strip_delimiters"),
        "source": info.meta.get("source"), "corpus_sha256": info.meta.get("corpus_sha256"),
        "held_out_chars": info.meta.get("held_out_chars"),
        "command": info.meta.get("command"), "preset": info.meta.get("preset"),
        "created": info.meta.get("created"), "train_config": info.train.to_dict(),
        "step": metrics.get("step"), "val_bpc": (metrics.get("val_bpc") or [[None, None]])[-1][1],
    }
    if info.meta.get("recovered_from"):  # exported again from an earlier export (recover.py)
        provenance["recovered_from"] = info.meta["recovered_from"]
    log(f"converting the {' and '.join(config.engines)} graph{'s' if len(config.engines) > 1 else ''} with tf2onnx")
    t0 = time.perf_counter()
    models = {e: convert(network, info.vocab.chars, provenance, config.opset, engine=e) for e in config.engines}
    convert_s = time.perf_counter() - t0
    model = models[config.engines[0]]
    paths = {e: out if e == config.engines[0] else spec.engine_path(out, e) for e in config.engines}
    log(f"converted in {convert_s:.1f}s: " + "; ".join(
        f"{e} engine {loop_body_nodes(m)} nodes per step" for e, m in models.items())
        + f", opset {config.opset}")
    data = {e: m.SerializeToString() for e, m in models.items()}

    report = ValidationReport()
    if config.validate:
        sessions = {}
        for e in config.engines:
            check_structure(models[e])
            # small cases: one thread, not spinning, spends the least CPU (see evaluation._run_onnx)
            sessions[f"CPUExecutionProvider {e}"] = make_session(data[e], "cpu", threads=1, spinning=False).session
            if config.device != "cpu":
                rt = make_session(data[e], config.device)
                if rt.on_cuda:
                    sessions[f"CUDAExecutionProvider {e}"] = rt.session
                log(rt.note)
        text_ids = info.vocab.encode(_validation_text(info.meta.get("corpus"))[:200_000])
        log(f"validating against TensorFlow on {len(config.times) * len(config.batches) + 2} cases "
            f"({', '.join(sessions)})")
        t0 = time.perf_counter()
        fn = stream_function(network)
        spread = tf_float_spread(network, fn, info.model.num_units, config.spread_runs) \
            if config.explain_factor > 0 else None
        detectors = [f"layer{l}" for l in range(2, info.model.num_detectors + 1)]  # layers >= 2 with a detector
        report = validate(model, sessions, tf_reference(fn, info.model.num_units),
                          info.model.num_units, info.model.vocab_size, text_ids, config.times,
                          config.batches, config.tolerance, config.boundary_threshold,
                          spread=spread, explain_factor=config.explain_factor,
                          require_extremes=detectors if "sparse" in config.engines else (), log=log)
        log(f"validated in {time.perf_counter() - t0:.1f}s: "
            f"{len(report.cases)} cases, max |diff| logits {report.max_abs_diff.get(spec.LOGITS, 0):.2g}, "
            f"{len(report.boundary_flips_explained)} explained boundary flip(s) in "
            f"{report.boundaries_compared:,} boundaries; streaming chunks {report.streaming_chunks} equal; "
            + ", ".join(f"{k} active on {v['active_fraction']:.0%} of rows (none on {v['none_active']} steps, "
                        f"all on {v['all_active']})" for k, v in report.activity.items()))
        for v in report.values_explained:
            log(f"  {v['values']} {v['output']} value(s) beyond {config.tolerance:g} (up to {v['max_abs_diff']:.3g}) "
                f"explained: TensorFlow itself moves by up to {v['reference_spread']:.3g} there with its weights "
                f"one float32 ulp away ({v['case']})")

    meta = read_metadata(model)
    card = {
        "format": spec.FORMAT, "model_config": info.model.to_dict(), "vocabulary_size": len(info.vocab),
        "io": meta[spec.META_IO],
        "state_map": spec.state_map(info.model.num_layers), "versions": versions(config.opset),
        "boundary_alignment": meta[spec.META_ALIGNMENT],
        "boundary_learning": info.train.boundary_learning(info.model.num_detectors),
        "lookahead_chars": info.train.lookahead,
        "engine": config.engines[0],
        "engines": {e: {"file": paths[e].name, "loop_body_nodes": loop_body_nodes(m), "size_bytes": len(data[e])}
                    for e, m in models.items()},
        "provenance": provenance, "evaluation": {"val_bpc": provenance["val_bpc"],
                                                 "boundaries": metrics.get("boundary", {})},
        "validation": report.to_dict() if config.validate else None,
        "export_seconds": round(convert_s, 2), "size_bytes": len(data[config.engines[0]]),
    }
    # Everything is written into a hidden folder beside OUT and evaluated there; the files take their names
    # only once all of them exist. An interrupt or an error anywhere before leaves nothing under those names.
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        staged = {e: stage / paths[e].name for e in config.engines}
        for e in config.engines:
            atomic_write_bytes(staged[e], data[e])
        log("evaluating for the model card (the held-out text" + (", and --eval-text" if config.eval_text else "")
            + ")")
        for key, report in card_evaluations(staged[config.engines[0]], info, config.eval_text, log=log).items():
            card["evaluation"][key] = report
            w = report["layers"].get("layer1", {}).get("words", {})
            if w:
                log(f"{report['text']} ({report['chars']:,} characters): BPC {report['bpc']:.3f}"
                    + (f" (unigram {report['unigram_bpc']:.3f})" if "unigram_bpc" in report else "")
                    + f", layer-1 word F1 {max(w['end']['f1'], w['start']['f1']):.2f} "
                    f"(random {w['end']['random_f1']:.2f}, "
                    f"entropy peaks {report['baselines']['entropy_peaks']['words']['f1']:.2f})")
        for key, report in (keep_evaluations or {}).items():  # an earlier card's, on texts not scored again
            card["evaluation"].setdefault(key, report)
        card_path = spec.card_path(out)
        atomic_write_text(stage / card_path.name, dumps(card))
        for e in config.engines[1:]:  # the companions and the card first, the main file last: a reader of it
            os.replace(staged[e], paths[e])  # finds what belongs to it beside it
        os.replace(stage / card_path.name, card_path)
        os.replace(staged[config.engines[0]], out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    for e in set(spec.ENGINES) - set(config.engines):  # a companion left by an earlier export is not this model's
        stale = spec.engine_path(out, e)
        if stale != out and stale.is_file():
            stale.unlink()
            log(f"removed {stale}: an earlier export's {e} graph, not this model's")
    return ExportResult(out, card_path, card)


def card_evaluations(model_path: Path, info, eval_text: str | None = None, max_chars: int = 200_000,
                     log=lambda m: None) -> dict:
    """The evaluator's reports for the card: ``held_out`` (the part of the training text that training
    held out) where that very text can be read again (its sha256 is the one training recorded), and
    ``other_text`` (``eval_text``, a file from another source, its first ``max_chars`` characters once
    stripped the way the training text was)."""
    from hmlstm.evaluation import evaluate
    from hmlstm.model.data import run_corpus, training_part

    meta = {**info.meta, "train_config": info.train.to_dict()}
    corpus = run_corpus(meta)
    recorded = meta.get("corpus_sha256")
    if corpus is not None and recorded and corpus.sha256 and corpus.sha256 != recorded:
        log(f"not scoring the held-out text: {meta.get('corpus')} reads differently here (sha256 "
            f"{corpus.sha256[:12]}, training's {recorded[:12]}: another Python's standard library, or the file "
            "changed), so its last part is not what this model held out")
        corpus = None
    training = training_part(meta, corpus) if corpus is not None else None
    reports = {}
    if corpus is not None and corpus.word_ends is not None:
        start = corpus.held_out_start(info.train.val_fraction)
        held = corpus.part(start, start + max_chars, "held out" + (f", first {max_chars:,} chars"
                                                                   if len(corpus.text) - start > max_chars else ""))
        reports["held_out"] = evaluate(model_path, held, training, log=log)
    if eval_text is not None:
        other = load_corpus(eval_text, strip=info.meta.get("strip_delimiters"))
        if len(other.text) > max_chars:
            other = other.part(0, max_chars, f"first {max_chars:,} chars")
        reports["other_text"] = evaluate(model_path, other, training, log=log)
    return reports
