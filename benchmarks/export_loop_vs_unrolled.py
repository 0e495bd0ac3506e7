"""The time loop kept as an ONNX Loop, against the same model unrolled at fixed T.

For one model (a fresh 3x128 HM-LSTM on the built-in vocabulary, or --checkpoint
RUN), exports: the Loop model once (any length), and unrolled graphs at
T = 10, 100, 1000 (a Python loop over the cell, traced per length). Reports
side by side, in one process: ONNX file size, export time, session load time,
and run time per character at batch 1 and batch 16 over T characters (the
Loop model runs the same T). Writes the "export_loop_vs_unrolled" section of
docs/benchmarks.md and docs/export_loop_vs_unrolled.png.

    python benchmarks/export_loop_vs_unrolled.py [--lengths 10 100 1000] [--checkpoint RUN] [--budget 600]

Each unrolled export runs in a child process with a time budget: tf2onnx's time
grows faster than linearly in T, and an export that runs out of budget is
reported as not finished rather than waited for.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

from hmlstm.cli import quiet_tensorflow  # noqa: E402

tf = quiet_tensorflow()
import tf2onnx  # noqa: E402

from benchmarks.report import DOCS, NOT_WRITTEN, add_write_docs, write_section  # noqa: E402
from hmlstm import spec  # noqa: E402
from hmlstm.export.convert import stream_function, tf_signature  # noqa: E402
from hmlstm.export.validate import make_feeds  # noqa: E402
from hmlstm.model.cell import HMLSTMState  # noqa: E402
from hmlstm.model.config import ModelConfig  # noqa: E402
from hmlstm.model.data import Vocabulary, builtin_text  # noqa: E402
from hmlstm.model.network import HMLSTMNetwork  # noqa: E402


def unrolled_function(net, steps: int):
    """Same inputs and outputs as the Loop model, but time fixed at ``steps`` and unrolled."""
    cfg = net.config
    sig = tf_signature(cfg.num_units, cfg.vocab_size)
    sig[0] = tf.TensorSpec([None, steps], tf.int32, name=spec.TOKENS)

    @tf.function(input_signature=sig)
    def fn(tokens, lengths, *flat):
        state = tuple(HMLSTMState(*flat[3 * l : 3 * l + 3]) for l in range(cfg.num_layers))
        x = tf.gather(net.embedding, tokens)
        hs, zs, pres = [], [], []
        for t in range(steps):  # Python loop: unrolled into the graph
            outs, new = net.cell(x[:, t], state, net.slope)
            live = tf.cast(tf.expand_dims(t < lengths, -1), tf.float32)
            state = tf.nest.map_structure(lambda n, p, m=live: m * n + (1.0 - m) * p, new, state)
            hs.append([o.h * live for o in outs])
            zs.append(tf.concat([s.z for s in new], -1) * live)
            pres.append(tf.concat([o.z_pre for o in outs], -1) * live)
        per_layer = tuple(tf.stack([h[l] for h in hs], 1) for l in range(cfg.num_layers))
        result = {spec.LOGITS: net.output_logits(per_layer), spec.BOUNDARIES: tf.stack(zs, 1),
                  spec.BOUNDARY_LOGITS: tf.stack(pres, 1)}
        for l, s in enumerate(state, start=1):
            for part in spec.STATE_PARTS:
                result[spec.state_output(part, l)] = tf.identity(getattr(s, part))
        return result

    return fn, sig


def export_timed(fn, sig):
    t0 = time.perf_counter()
    model, _ = tf2onnx.convert.from_function(fn, input_signature=sig, opset=17)
    import onnx
    model.ir_version = onnx.helper.find_min_ir_version_for(list(model.opset_import))
    data = model.SerializeToString()
    return data, time.perf_counter() - t0


def time_runs(data: bytes, feeds_by_batch, repeats: int):
    t0 = time.perf_counter()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    load_s = time.perf_counter() - t0
    per_char = {}
    for batch, feeds in feeds_by_batch.items():
        sess.run(None, feeds)  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            sess.run(None, feeds)
            times.append(time.perf_counter() - t0)
        per_char[batch] = float(np.median(times)) / feeds[spec.TOKENS].size
    return load_s, per_char


def load_net(checkpoint):
    if checkpoint:
        from hmlstm.model.checkpoint import load_network
        return load_network(checkpoint)[0]
    return HMLSTMNetwork(ModelConfig(vocab_size=len(Vocabulary.from_text(builtin_text()))))


def export_unrolled_in_child(checkpoint, steps: int, budget: float, out: str):
    """(bytes, seconds) of an unrolled export done by a child process, or None past the budget."""
    import subprocess
    cmd = [sys.executable, __file__, "--child", str(steps), "--child-out", out]
    if checkpoint:
        cmd += ["--checkpoint", checkpoint]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=budget)
    except subprocess.TimeoutExpired:
        return None
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-2000:])
    return Path(out).read_bytes(), float(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--budget", type=float, default=600, help="seconds an unrolled export may take")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    add_write_docs(ap)
    args = ap.parse_args()

    net = load_net(args.checkpoint)
    if args.child is not None:  # child: export one unrolled length, print the seconds it took
        data, secs = export_timed(*unrolled_function(net, args.child))
        Path(args.child_out).write_bytes(data)
        print(secs)
        return
    import tempfile
    cfg = net.config
    rng = np.random.default_rng(0)
    loop_data, loop_export = export_timed(stream_function(net), tf_signature(cfg.num_units, cfg.vocab_size))
    rows = []
    for steps in args.lengths:
        feeds = {b: make_feeds(rng, cfg.num_units, cfg.vocab_size, b, steps, None, False, False) for b in (1, 16)}
        with tempfile.TemporaryDirectory() as tmp:
            done = export_unrolled_in_child(args.checkpoint, steps, args.budget, f"{tmp}/u.onnx")
        loop_load, loop_char = time_runs(loop_data, feeds, args.repeats)
        if done is None:
            rows.append({"T": steps, "unrolled": None, "loop": (len(loop_data), loop_export, loop_load, loop_char)})
            print(f"T={steps}: unrolled export did not finish within {args.budget:.0f}s", flush=True)
            continue
        data, export_s = done
        load_s, per_char = time_runs(data, feeds, args.repeats)
        rows.append({"T": steps, "unrolled": (len(data), export_s, load_s, per_char),
                     "loop": (len(loop_data), loop_export, loop_load, loop_char)})
        print(f"T={steps}: unrolled {len(data) / 1e6:.2f} MB export {export_s:.1f}s load {load_s:.2f}s "
              f"{per_char[1] * 1e6:.1f} us/char; loop {len(loop_data) / 1e6:.2f} MB load {loop_load:.2f}s "
              f"{loop_char[1] * 1e6:.1f} us/char", flush=True)

    units = "x".join(str(u) for u in cfg.num_units)
    lines = [
        "## ONNX Loop vs unrolled (`benchmarks/export_loop_vs_unrolled.py`)", "",
        f"HM-LSTM {units}, vocabulary {cfg.vocab_size}, opset 17, ONNX Runtime CPU provider. The Loop model "
        "is exported once and serves every length; an unrolled model is exported per length T and "
        "runs only that T. Run time is the median of "
        f"{args.repeats} calls over T characters, per character.", "",
        "| T | model | file MB | export s | load s | us/char batch 1 | us/char batch 16 |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        for kind in ("unrolled", "loop"):
            if r[kind] is None:
                lines.append(f"| {r['T']} | {kind} | | > {args.budget:.0f} (not finished) | | | |")
                continue
            size, ex, load, pc = r[kind]
            lines.append(f"| {r['T']} | {kind} | {size / 1e6:.2f} | {ex:.1f} | {load:.2f} | "
                         f"{pc[1] * 1e6:.1f} | {pc[16] * 1e6:.2f} |")
    big = [r for r in rows if r["unrolled"] is not None][-1]
    lines += ["", f"At T = {big['T']} the unrolled file is {big['unrolled'][0] / big['loop'][0]:.1f}x the "
              f"Loop file, takes {big['unrolled'][1] / big['loop'][1]:.0f}x as long to export and "
              f"{big['unrolled'][2] / max(big['loop'][2], 1e-9):.0f}x as long to load; per character at batch 1 "
              f"the Loop model takes {big['loop'][3][1] / big['unrolled'][3][1]:.2f}x the unrolled model's time. "
              "The Loop model's file is the same for every T."
              + ("".join(f" At T = {r['T']} the unrolled export did not finish within the {args.budget:.0f} s "
                         "budget." for r in rows if r["unrolled"] is None)),
              "", "![loop vs unrolled](export_loop_vs_unrolled.png)"]
    plot(rows, DOCS / "export_loop_vs_unrolled.png")
    print("\n".join(lines))
    if not args.write_docs:
        print(NOT_WRITTEN)
        return
    print(f"\nwrote {write_section('export_loop_vs_unrolled', chr(10).join(lines))}")


def plot(rows, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["unrolled"] is not None]
    ts = [r["T"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, idx, title, scale in ((axes[0], 0, "file size (MB)", 1e-6), (axes[1], 1, "export time (s)", 1),
                                  (axes[2], 3, "run time per char, batch 1 (us)", 1e6)):
        for kind, style in (("unrolled", "o-"), ("loop", "s--")):
            vals = [r[kind][idx][1] if idx == 3 else r[kind][idx] for r in rows]
            ax.plot(ts, [v * scale for v in vals], style, label=kind)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("T (characters)")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
