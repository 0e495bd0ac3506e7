"""Which training choices make boundaries that beat the baselines on text without delimiters.

Each configuration trains the same number of steps on the built-in text with all
whitespace removed (the removed positions are the truth), then is scored on the
held-out part by hmlstm.evaluation: per-layer F1 against word ends (both
alignments), a random detector at the same rate, and the language model's own
entropy peaks/rises. Writes docs/segmentation.md.

    python benchmarks/segmentation_experiments.py [--steps 600] [--only NAME ...]
    python benchmarks/segmentation_experiments.py --score runs/nodelim ...   # longer runs, already trained

``--score`` evaluates finished `hmlstm train` runs the same way and writes them
as a second table (the candidates for the shipped default), with each run's
command.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import NOT_WRITTEN, add_write_docs, write_section  # noqa: E402
from hmlstm.cli import quiet_tensorflow  # noqa: E402

quiet_tensorflow()  # before the trainer imports it: no C++ start-up chatter
from hmlstm.evaluation import evaluate, text_label  # noqa: E402
from hmlstm.model.config import TrainConfig  # noqa: E402
from hmlstm.model.data import Corpus, load_corpus  # noqa: E402
from hmlstm.model.train import train  # noqa: E402

STRIP = " \n\t"
BASE_MODEL = dict(embed_dim=64, num_units=(128, 128, 128), output_dim=256)
CONFIGS = {
    "paper": ({}, {}),
    "paper+top-boundary": (dict(top_boundary=True), {}),
    "rate-penalty": ({}, dict(rate_targets=(0.2, 0.1))),
    "rate-penalty-layer1": ({}, dict(rate_targets=(0.2,))),
    "rate-penalty+top-boundary": (dict(top_boundary=True), dict(rate_targets=(0.2, 0.1, 0.05))),
    "rate-penalty+layer-norm": (dict(layer_norm=True), dict(rate_targets=(0.2, 0.1))),
    "entropy-target": ({}, dict(entropy_target=1.0)),
    "entropy-target+top-boundary": (dict(top_boundary=True), dict(entropy_target=1.0)),
}


EVAL_CHARS = 200_000


def eval_corpus(path: str) -> Corpus:
    """Another text, stripped the same way, for cross-domain scores (its first EVAL_CHARS characters)."""
    c = load_corpus(path, strip=STRIP)
    return c.part(0, EVAL_CHARS, f"first {EVAL_CHARS:,}")


def with_eval(result: dict, model, other: Corpus | None, training: Corpus | None = None) -> dict:
    if other is not None:
        result["eval"] = {"text": other.name, "report": evaluate(model, other, training)}
    return result


def held_out(corpus: Corpus) -> Corpus:
    return corpus.part(corpus.held_out_start(0.1), None, "held out")


def training_of(corpus: Corpus) -> Corpus:
    return corpus.part(0, corpus.held_out_start(0.1), "training part")


def run(name: str, steps: int, out_root: Path, other: Corpus | None = None) -> dict:
    model_kw, train_kw = CONFIGS[name]
    corpus = load_corpus("builtin", strip=STRIP)
    cfg = TrainConfig(max_steps=steps, checkpoint_every=steps, seed=0, **train_kw)
    t0 = time.monotonic()
    result = train(corpus, {**BASE_MODEL, **model_kw}, cfg, out_root / name, progress=False)
    minutes = (time.monotonic() - t0) / 60
    report = evaluate(out_root / name, held_out(corpus), training_of(corpus))
    return with_eval({"name": name, "model": model_kw, "train": train_kw, "steps": steps,
                      "minutes": round(minutes, 1), "skipped_steps": result.skipped_steps, "report": report},
                     out_root / name, other, training_of(corpus))


def scored(run_dir: Path, other: Corpus | None = None) -> dict:
    """A finished training run, evaluated like the rows above."""
    import datetime

    meta = json.loads((run_dir / "config.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    seconds = metrics.get("train_seconds")
    if seconds is None:  # runs from before train_seconds: creation to the last checkpoint
        created = datetime.datetime.fromisoformat(meta["created"].replace("Z", "+00:00")).timestamp()
        seconds = max(p.stat().st_mtime for p in (run_dir / "ckpt").iterdir()) - created
    corpus = load_corpus(meta["source"], strip=meta.get("strip_delimiters"))
    report = evaluate(run_dir, held_out(corpus), training_of(corpus))
    return with_eval({"name": run_dir.name, "command": meta["command"], "steps": metrics["step"],
                      "minutes": round(seconds / 60, 1), "skipped_steps": metrics.get("skipped_steps", 0),
                      "report": report}, run_dir, other, training_of(corpus))


def write_scored(results: list[dict]) -> Path:
    path = ROOT / "docs" / "segmentation.md"
    texts = sorted({r["eval"]["text"] for r in results if "eval" in r})
    lines = [
        "## Longer runs against the targets", "",
        "Written by `benchmarks/segmentation_experiments.py --score`: finished `hmlstm train` runs (commands "
        "below), each scored on the built-in text's fixed held-out part"
        + (f" and on the first {EVAL_CHARS:,} characters of {', '.join(map(text_label, texts))} (`--eval-text`)"
           if texts else "")
        + ", whitespace removed. Minutes are the run's own wall clock on the 2-core machine, each run pinned to "
        "one core while another run or the test suite used the other.", "",
        "Cells: BPC (a unigram character model of the training text); layer 1: word F1 under its better "
        "alignment / the better entropy baseline from the same network (peaks or rises), with the margin / a "
        "random detector at its rate; upper: the upper layer and unit (phrases or sentences: punctuation "
        "followed by whitespace in the original text) with the largest margin over random, F1 / random.", "",
        "| run | steps | minutes | built-in BPC | layer 1 | upper | " + " | ".join(
            f"{text_label(t)} {c}" for t in texts for c in ("BPC", "layer 1", "upper"))
        + (" |" if texts else "|"),
        "|---|---:|---:|---:|---|---|" + "---:|---|---|" * len(texts),
    ]
    for r in results:
        cells = [r["name"], str(r["steps"]), f"{r['minutes']:.1f}", *target_cells(r["report"])]
        if "eval" in r:
            cells += target_cells(r["eval"]["report"])
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Commands:", ""]
    lines += [f"- `{r['name']}`: `{r['command']}`" + (f"; {r['skipped_steps']} non-finite steps skipped"
                                                      if r["skipped_steps"] else "") for r in results]
    write_section("segmentation-longer", "\n".join(lines), path)
    (ROOT / "docs" / "segmentation-longer.json").write_text(json.dumps(results, indent=1) + "\n")
    return path


def target_cells(rep: dict) -> list[str]:
    """BPC (unigram), layer 1 against words, the best upper layer against phrases or sentences."""
    bpc = f"{rep['bpc']:.3f}" + (f" ({rep['unigram_bpc']:.3f})" if "unigram_bpc" in rep else "")
    w = rep["layers"]["layer1"]["words"]
    align = max(("end", "start"), key=lambda a: w[a]["f1"])
    base = max(rep["baselines"][b]["words"]["f1"] for b in ("entropy_peaks", "entropy_rises"))
    layer1 = (f"{w[align]['f1']:.3f} ({align}) / {base:.3f} ({w[align]['f1'] - base:+.3f}) / "
              f"{w[align]['random_f1']:.3f}")
    upper = [(name, unit, a, e[unit][a]) for name, e in rep["layers"].items() if name != "layer1"
             for unit in ("phrases", "sentences") if unit in e for a in ("end", "start")]
    if not upper:
        return [bpc, layer1, ""]
    name, unit, a, sc = max(upper, key=lambda x: x[3]["f1"] - x[3]["random_f1"])
    return [bpc, layer1, f"{name} {unit} ({a}, fires {rep['layers'][name]['rate']:.1%}): "
                         f"{sc['f1']:.3f} / {sc['random_f1']:.3f}"]


def row(r: dict) -> str:
    rep = r["report"]
    cells = [r["name"], f"{r['minutes']:.1f}", f"{rep['bpc']:.3f}"]
    for l in ("layer1", "layer2"):
        e = rep["layers"].get(l)
        if e is None:
            cells.append("")
            continue
        w = e["words"]
        best = max(("end", "start"), key=lambda a: w[a]["f1"])
        cells.append(f"{e['rate']:.0%} / {w[best]['f1']:.2f} ({best}) / {w[best]['random_f1']:.2f}")
    peaks = rep["baselines"]["entropy_peaks"]["words"]
    rises = rep["baselines"]["entropy_rises"]["words"]
    cells += [f"{peaks['f1']:.2f}", f"{rises['f1']:.2f}"]
    if "eval" in r:  # the same model on the other text
        ev = r["eval"]["report"]
        w = ev["layers"]["layer1"]["words"]
        best = max(("end", "start"), key=lambda a: w[a]["f1"])
        cells += [f"{ev['bpc']:.3f}", f"{w[best]['f1']:.2f} ({best}) / {w[best]['random_f1']:.2f}",
                  f"{ev['baselines']['entropy_peaks']['words']['f1']:.2f}"]
    return "| " + " | ".join(cells) + " |"


def eval_columns(results: list[dict], header: str, rule: str) -> tuple[str, str, list[str]]:
    """The table's header and rule, widened for the other text's columns if the rows have them."""
    texts = sorted({r["eval"]["text"] for r in results if "eval" in r})
    if not texts:
        return header, rule, []
    header = header.rstrip(" |") + " | other text: BPC | layer 1 | entropy peaks F1 |"
    return header, rule + "---:|---|---:|", [f"Other text: {', '.join(texts)} (`--eval-text`), whitespace "
                                             "removed the same way."]


def write(results: list[dict], steps: int) -> Path:
    path = ROOT / "docs" / "segmentation.md"
    lines = [
        "## Measurements", "",
        "Written by `benchmarks/segmentation_experiments.py`. Every row: an HM-LSTM 3x128 (embedding 64, output "
        f"256) trained {steps} steps (batch 32 x 100 characters, Adam 2e-3, clip 1.0, seed 0) on the built-in "
        "text with all whitespace removed; scored on its held-out part against "
        "the removed positions (word ends). Minutes are wall-clock on the 2-core machine, with other work "
        "running beside some rows.", "",
        "Layer cells: firing rate / word-end F1 under the better alignment (end: the boundary on a word's last "
        "character; start: on the next word's first) / F1 of a random detector firing at the same rate. "
        "Baselines from the same network, which need no boundary detector: entropy peaks (the next-character "
        "entropy is a local maximum) and entropy rises.", "",
        *eval_columns(results, "| configuration | minutes | BPC | layer 1 | layer 2 | entropy peaks F1 | "
                      "entropy rises F1 |", "|---|---:|---:|---|---|---:|---:|")[:2],
    ]
    lines += [row(r) for r in results]
    lines += ["", *eval_columns(results, "", "")[2], "", "Configurations:", ""]
    for r in results:
        lines.append(f"- `{r['name']}`: model {json.dumps(r['model'])}, training {json.dumps(r['train'])}"
                     + (f"; {r['skipped_steps']} non-finite steps skipped" if r["skipped_steps"] else ""))
    write_section("segmentation", "\n".join(lines), path, "# Segmentation quality on text without delimiters\n")
    (ROOT / "docs" / "segmentation.json").write_text(json.dumps(results, indent=1) + "\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "segmentation")
    ap.add_argument("--score", type=Path, nargs="+", default=None, metavar="RUN_DIR",
                    help="evaluate these finished runs instead of training the configurations")
    ap.add_argument("--eval-text", default=None, metavar="PATH",
                    help="also score every run on this text (whitespace removed the same way), e.g. "
                         "../shared/data/tinyshakespeare.txt for English from another domain")
    add_write_docs(ap)
    args = ap.parse_args()
    other = eval_corpus(args.eval_text) if args.eval_text else None
    if args.score:
        results = [scored(d, other) for d in args.score]
        for r in results:
            print(r["name"], *target_cells(r["report"]), *(target_cells(r["eval"]["report"]) if "eval" in r else []),
                  sep=" | ", flush=True)
        print(f"wrote {write_scored(results)}" if args.write_docs else NOT_WRITTEN)
        return
    previous = ROOT / "docs" / "segmentation.json"
    results = json.loads(previous.read_text()) if previous.exists() and args.only else []
    for name in args.only or list(CONFIGS):
        results = [r for r in results if r["name"] != name]
        r = run(name, args.steps, args.runs, other)
        results.append(r)
        print(row(r), flush=True)
        if args.write_docs:  # after every run, so a long sweep that stops keeps what it measured
            write(sorted(results, key=lambda x: list(CONFIGS).index(x["name"])), args.steps)
    print(f"wrote {write(sorted(results, key=lambda x: list(CONFIGS).index(x['name'])), args.steps)}"
          if args.write_docs else NOT_WRITTEN)


if __name__ == "__main__":
    main()
