"""The sparse engine against the dense one and TensorFlow, on real text, side by side in one run.

Engines, all with the same weights:
  sparse   MODEL.onnx (the shipped hmlstm/assets/default.onnx unless --model)
  dense    MODEL.dense.onnx, the companion the export writes beside it
  previous --baseline PATH (optional): an earlier dense export, e.g. the release before the sparse graph
           (`git show 703bc25:hmlstm/assets/default.onnx > prev.onnx`)
  TF       the project's TensorFlow network (``convert.stream_function``), its weights recovered from
           MODEL.onnx and proven equal to it (export/recover.py)
Texts: the built-in corpus's held-out part and Tiny Shakespeare (../shared/data/tinyshakespeare.txt,
or --text), stripped of what the model was trained without.

1. Speed at batch x steps 1x256, 64x16, 256x16, 64x256: B streams, each a different stretch of the
   text; every call feeds T more characters with each engine's own state carried, as the server does.
   Plain ``onnxruntime.InferenceSession`` (default options: ORT's own threads, spinning). Rounds are
   interleaved: each round runs every engine on the same chunk, in rotating order, so that a noisy
   neighbour slows all alike; each engine runs the chunk once untimed and then once timed, so that
   the previous engine's spinning threads have settled and its own are awake. Rates are medians over
   rounds, ratios the medians of per-round ratios.
2. The active-row fraction of each layer >= 2 (UPDATE or FLUSH: what the sparse engine computes) on
   each text.
3. Exactness: each whole text through the sparse and the dense graph, 64 streams fed chunks of 1-32
   characters (ragged lengths, as the server batches clients' chunks): boundaries compared exactly
   (every difference counted, with the dense graph's |s_z| there), h, c, z and logits by max |diff|.
4. Loop body nodes per engine, and where the sparse engine's time goes at 64x16 (ORT profiler, kernel
   time by op).

    python benchmarks/sparse_bench.py [--rounds 15] [--baseline prev.onnx] [--write-docs]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

from benchmarks.report import add_write_docs, publish  # noqa: E402
from hmlstm import spec  # noqa: E402
from hmlstm.export.passes import loop_body_nodes  # noqa: E402
from hmlstm.export.validate import active_rows  # noqa: E402
from hmlstm.serving.model import DEFAULT_MODEL  # noqa: E402
from hmlstm.vocabulary import Vocabulary  # noqa: E402

SHAPES = ((1, 256), (64, 16), (256, 16), (64, 256))
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def texts(strip: str, other: Path | None) -> dict[str, str]:
    from hmlstm.model.data import load_corpus

    corpus = load_corpus("builtin", strip=strip)
    out = {"built-in held-out": corpus.text[corpus.held_out_start(0.1):]}
    path = other or SHAKESPEARE
    if path.is_file():
        out[f"{path.name}"] = "".join(c for c in path.read_text(encoding="utf-8") if c not in strip)
    else:
        print(f"({path} not found: only the built-in text is measured)")
    return out


def zero_state(units, batch) -> dict[str, np.ndarray]:
    return {spec.state_input(p, l): np.zeros((batch, 1 if p == "z" else u), np.float32)
            for l, u in enumerate(units, start=1) for p in spec.STATE_PARTS}


class Engine:
    """Something that runs feeds -> outputs: an ORT session or the TensorFlow function."""

    def __init__(self, name, run):
        self.name, self.run = name, run


def ort_engine(name: str, path: Path, threads: int | None = None) -> Engine:
    """threads: ONNX Runtime's intra-op threads (None: its default, one per core, spinning); 1: one thread
    that never spins, what a check that measures no speed wants beside other work."""
    from hmlstm.runtime import session_options

    options = session_options(threads, spinning=False if threads == 1 else None)
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return Engine(name, lambda feeds: dict(zip(names, sess.run(names, feeds))))


def tf_engine(model_path: Path, units) -> Engine:
    from hmlstm.cli import quiet_tensorflow

    quiet_tensorflow()
    from hmlstm.export.convert import stream_function, tf_reference
    from hmlstm.export.recover import recover_run
    from hmlstm.model.checkpoint import load_network

    with tempfile.TemporaryDirectory() as tmp:
        run = recover_run(model_path, Path(tmp) / "run", log=lambda m: None)
        net, _ = load_network(run)
    return Engine("TensorFlow", tf_reference(stream_function(net), units))


def speed(engines: list[Engine], ids: np.ndarray, units, rounds: int) -> dict:
    """Per shape: median chars/s per engine and median per-round time ratios to the first engine."""
    smap = spec.state_map(len(units))
    result = {}
    for batch, steps in SHAPES:
        starts = (np.arange(batch) * (len(ids) // batch)).astype(np.int64)
        states = {e.name: zero_state(units, batch) for e in engines}
        times = defaultdict(list)
        for r in range(rounds + 2):  # two warm-up rounds
            pos = starts + r * steps
            tokens = np.stack([ids[p % (len(ids) - steps):][:steps] for p in pos]).astype(np.int32)
            feeds = {spec.TOKENS: tokens, spec.LENGTHS: np.full(batch, steps, np.int32)}
            order = engines[r % len(engines):] + engines[: r % len(engines)]
            for e in order:
                e.run({**feeds, **states[e.name]})  # untimed: the engine's own threads wake, the last one's settle
                t0 = time.perf_counter()
                out = e.run({**feeds, **states[e.name]})
                dt = time.perf_counter() - t0
                states[e.name] = {smap[k]: v for k, v in out.items() if k in smap}
                if r >= 2:
                    times[e.name].append(dt)
        first = engines[0].name
        result[f"{batch}x{steps}"] = {
            "rate": {n: batch * steps / float(np.median(t)) for n, t in times.items()},
            "ratio": {n: float(np.median(np.array(t) / np.array(times[first]))) for n, t in times.items()},
        }
    return result


def stream_text(engine: Engine, ids: np.ndarray, units, streams: int = 64, seed: int = 0):
    """The whole text as ``streams`` contiguous streams fed ragged chunks of 1-32 characters; returns
    per stream the concatenated boundaries, s_z and logits, and the final state."""
    rng = np.random.default_rng(seed)
    smap = spec.state_map(len(units))
    bounds = np.linspace(0, len(ids), streams + 1).astype(int)
    pos = bounds[:-1].copy()
    state = zero_state(units, streams)
    got = defaultdict(list)  # (stream, kind) -> pieces
    while (pos < bounds[1:]).any():
        want = np.minimum(rng.integers(1, 33, streams), bounds[1:] - pos)
        steps = int(want.max())
        tokens = np.zeros((streams, steps), np.int32)
        for b in range(streams):
            tokens[b, : want[b]] = ids[pos[b] : pos[b] + want[b]]
        out = engine.run({spec.TOKENS: tokens, spec.LENGTHS: want.astype(np.int32), **state})
        for b in np.nonzero(want)[0]:
            for k in (spec.BOUNDARIES, spec.BOUNDARY_LOGITS, spec.LOGITS):
                got[b, k].append(out[k][b, : want[b]])
        state = {smap[k]: v for k, v in out.items() if k in smap}
        pos += want
    merged = {k: np.concatenate([np.concatenate(got[b, k]) for b in range(streams)])
              for k in (spec.BOUNDARIES, spec.BOUNDARY_LOGITS, spec.LOGITS)}
    return merged, state


def exactness(sparse: Engine, dense: Engine, ids: np.ndarray, units) -> dict:
    a, sa = stream_text(sparse, ids, units)
    b, sb = stream_text(dense, ids, units)
    differ = np.argwhere(a[spec.BOUNDARIES] != b[spec.BOUNDARIES])
    return {
        "chars": len(ids), "boundaries": int(a[spec.BOUNDARIES].size), "differences": len(differ),
        "max_abs_s_z_at_differences": float(np.abs(b[spec.BOUNDARY_LOGITS][tuple(differ.T)]).max())
        if len(differ) else None,
        "logits": float(np.abs(a[spec.LOGITS] - b[spec.LOGITS]).max()),
        "s_z": float(np.abs(a[spec.BOUNDARY_LOGITS] - b[spec.BOUNDARY_LOGITS]).max()),
        "state": float(max(np.abs(sa[k] - sb[k]).max() for k in sa)),
    }


def activity(engine: Engine, ids: np.ndarray, units, batch: int = 64, steps: int = 256) -> list[float]:
    """Fraction of rows active in each layer >= 2 over ``batch`` streams x ``steps`` of the text."""
    starts = np.arange(batch) * (len(ids) // batch)
    tokens = np.stack([ids[s : s + steps] for s in starts]).astype(np.int32)
    feeds = {spec.TOKENS: tokens, spec.LENGTHS: np.full(batch, steps, np.int32), **zero_state(units, batch)}
    active, live = active_rows(feeds, engine.run(feeds))
    return [float(a.sum() / live.sum()) for a in active]


def profile(path: Path, ids: np.ndarray, units, batch=64, steps=16, calls=20) -> list[tuple[str, float, int]]:
    so = ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "sparse")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    smap = spec.state_map(len(units))
    state = zero_state(units, batch)
    for c in range(calls):
        tokens = np.stack([ids[(b * 997 + c * steps) % (len(ids) - steps):][:steps] for b in range(batch)])
        out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {
            spec.TOKENS: tokens.astype(np.int32), spec.LENGTHS: np.full(batch, steps, np.int32), **state})))
        state = {smap[k]: v for k, v in out.items() if k in smap}
    events = json.loads(Path(sess.end_profiling()).read_text())
    by_op, count = defaultdict(float), defaultdict(int)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["args"].get("op_name") != "Loop":
            by_op[e["args"]["op_name"]] += e["dur"]
            count[e["args"]["op_name"]] += 1
    total = sum(by_op.values())
    return [(op, d / total, count[op] // calls) for op, d in sorted(by_op.items(), key=lambda x: -x[1])]


TARGETS = {"dense": {"1x256": 1.3, "64x16": 1.4, "256x16": 1.7},
           "TensorFlow": {"64x16": 1.5, "256x16": 1.5, "64x256": 1.5}}


def targets(rows: dict, names: list[str]) -> list[str]:
    """The sparse engine's targets against the dense export and TensorFlow, met or not, with the margin."""
    out = []
    for other, wants in TARGETS.items():
        if other not in names:
            continue
        parts = [f"{shape} {rows[shape]['ratio'][other]:.2f} (>= {want}: "
                 f"{'met' if rows[shape]['ratio'][other] >= want else 'not met'})" for shape, want in wants.items()]
        out.append(f"Targets, sparse against {other}: " + "; ".join(parts) + ".")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="the sparse export (its .dense.onnx beside it)")
    ap.add_argument("--baseline", type=Path, default=None, help="an earlier dense export to measure beside")
    ap.add_argument("--text", type=Path, default=None, help="the second text (default: Tiny Shakespeare)")
    ap.add_argument("--rounds", type=int, default=15, help="timed rounds per shape")
    ap.add_argument("--no-tf", action="store_true", help="leave out TensorFlow")
    add_write_docs(ap)
    args = ap.parse_args()

    sparse_path, dense_path = args.model, spec.engine_path(args.model, "dense")
    meta = {p.key: p.value for p in onnx.load(str(sparse_path), load_external_data=False).metadata_props}
    units = json.loads(meta[spec.META_CONFIG])["num_units"]
    vocab = Vocabulary(json.loads(meta[spec.META_VOCAB]))
    strip = json.loads(meta[spec.META_PROVENANCE]).get("strip_delimiters") or ""
    engines = [ort_engine("sparse", sparse_path), ort_engine("dense", dense_path)]
    if args.baseline:
        engines.append(ort_engine("previous dense", args.baseline))
    if not args.no_tf:
        engines.append(tf_engine(sparse_path, units))
    names = [e.name for e in engines]
    nodes = {"sparse": loop_body_nodes(onnx.load(str(sparse_path))),
             "dense": loop_body_nodes(onnx.load(str(dense_path)))}
    if args.baseline:
        nodes["previous dense"] = loop_body_nodes(onnx.load(str(args.baseline)))

    lines = ["## Sparse engine (`benchmarks/sparse_bench.py`)", "",
             "Shipped model, plain `onnxruntime.InferenceSession` (default options) on the CPU, every engine with "
             "the same weights, rounds interleaved in one run. Rates in characters per second (median over "
             f"{args.rounds} rounds); `x sparse` is the median per-round time of that engine over the sparse "
             "engine's (higher: the sparse engine is faster by that factor).", "",
             "Loop body nodes per step: " + ", ".join(f"{k} {v}" for k, v in nodes.items()) + "."
             + (f" `previous dense`: {args.baseline.name}, an earlier dense export of the same weights."
                if args.baseline else ""), ""]
    corpora = texts(strip, args.text)
    for label, text in corpora.items():
        ids = np.array(vocab.encode(text), np.int32)
        print(f"{label}: {len(ids):,} characters", flush=True)
        fractions = activity(engines[0], ids, units)
        exact = exactness(engines[0], engines[1], ids, units)
        rows = speed(engines, ids, units, args.rounds)
        lines += [f"### {label} ({len(ids):,} characters)", "",
                  "Active rows (UPDATE or FLUSH, 64 streams x 256 steps): " + ", ".join(
                      f"layer {l} {f:.1%}" for l, f in enumerate(fractions, start=2)) + ".", "",
                  "| batch x steps | " + " | ".join(f"{n} (chars/s)" for n in names) + " | "
                  + " | ".join(f"{n} x sparse" for n in names[1:]) + " |",
                  "|---|" + "---:|" * (2 * len(names) - 1)]
        for shape, r in rows.items():
            lines.append(f"| {shape} | " + " | ".join(f"{r['rate'][n] / 1e3:.1f}k" for n in names) + " | "
                         + " | ".join(f"{r['ratio'][n]:.2f}" for n in names[1:]) + " |")
        lines += [""] + targets(rows, names)
        lines += ["", f"Exactness, the whole text through both graphs (64 streams, chunks of 1-32 characters): "
                  f"{exact['differences']} of {exact['boundaries']:,} boundaries differ"
                  + (f" (largest dense |s_z| there {exact['max_abs_s_z_at_differences']:.2g})"
                     if exact["differences"] else "")
                  + f"; max |sparse - dense| logits {exact['logits']:.2g}, s_z {exact['s_z']:.2g}, "
                  f"final state {exact['state']:.2g}.", ""]
        print("\n".join(lines[-(len(rows) + 5):]), flush=True)
    ids = np.array(vocab.encode(next(iter(corpora.values()))), np.int32)
    ops = profile(sparse_path, ids, units)
    lines += ["### Where the sparse engine's time goes (64 x 16, ORT profiler, kernel time by op, the Loop's "
              "own bookkeeping not included)", "", "| op | share | kernel runs per call |", "|---|---:|---:|"]
    lines += [f"| {op} | {share:.1%} | {n} |" for op, share, n in ops[:14]]
    publish("sparse", "\n".join(lines), args.write_docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
