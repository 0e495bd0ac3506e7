"""Proof that an exported model is the TensorFlow model: structure, interface, numbers.

``validate(model, reference, ...)`` raises a ``ValidationError`` subclass
naming what failed by how much, or returns a report of what it measured.
Checks run in order: structure, then names, shapes and dtypes, then values on
a grid of batch sizes and lengths that differ from anything traced, then
streaming (chunks with state fed back equal one run).

Boundaries are compared exactly. z = 1 iff the pre-activation s_z > 0, so
ONNX Runtime and TensorFlow, which sum in different orders, may disagree where
|s_z| is within float error of 0. Such a flip is *explained* and reported;
after it that row's trajectories legitimately differ, so the row is left out
of the value comparison from that step on. A flip with a larger |s_z| fails.

Values are compared against an absolute tolerance (1e-4 by default). A value
beyond it is *explained*, in the same spirit, only where TensorFlow's own
answer is that uncertain in float32: ``spread(feeds, expected)`` re-runs the
reference with every weight moved one float32 ulp (a few random directions)
and returns how far TensorFlow moves from itself. A value passes if it is
within ``explain_factor`` times that spread near the same place (same row,
within ``SPREAD_WINDOW`` steps) and within ``explain_cap`` times the
tolerance. Both are reported. Where the moved reference flips a boundary, its
spread is not used from that step on, so a diverged trajectory explains
nothing. A real export bug (a wrong op, a wrong weight) moves values by orders
of magnitude more than one ulp of the weights does, and still fails.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from hmlstm import spec


class ValidationError(ValueError):
    """The exported model is not proven equal to the TensorFlow one."""


class StructureError(ValidationError):
    pass


class NameMismatchError(ValidationError):
    pass


class ShapeMismatchError(ValidationError):
    pass


class DtypeMismatchError(ValidationError):
    pass


class ValueMismatchError(ValidationError):
    def __init__(self, output: str, max_abs_diff: float, tolerance: float, case: str,
                 reference_spread: float | None = None):
        self.output, self.max_abs_diff, self.tolerance, self.case = output, max_abs_diff, tolerance, case
        self.reference_spread = reference_spread
        why = "" if reference_spread is None else \
            f"; TensorFlow itself moves by only {reference_spread:.3g} there under float32 rounding"
        super().__init__(f"output {output!r} differs by {max_abs_diff:.3g} > tolerance {tolerance:g}{why} ({case})")


class BoundaryMismatchError(ValidationError):
    def __init__(self, count: int, position: tuple[int, int, int], s_z: float, threshold: float, case: str):
        self.count, self.position, self.s_z = count, position, s_z
        super().__init__(
            f"{count} boundary flip(s) not explained by float error ({case}); first at "
            f"(row, step, layer) = {position} with s_z = {s_z:.3g}, |s_z| > {threshold:g}")


class StreamingMismatchError(ValueMismatchError):
    pass


@dataclass
class ValidationReport:
    providers: list[str] = field(default_factory=list)
    tolerance: float = 0.0
    boundary_threshold: float = 0.0
    cases: list[str] = field(default_factory=list)
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    boundaries_compared: int = 0
    boundary_flips_explained: list[dict] = field(default_factory=list)
    values_explained: list[dict] = field(default_factory=list)
    explain_factor: float | None = None
    streaming_chunks: list[int] = field(default_factory=list)
    streaming_max_abs_diff: float = 0.0
    loops: int = 0
    nodes: int = 0
    # per layer >= 2, over every case: steps, steps where no row / every row was active (UPDATE or
    # FLUSH: what the sparse engine computes), and the active fraction of live rows
    activity: dict[str, dict] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["max_abs_diff"] = {k: float(f"{v:.3g}") for k, v in self.max_abs_diff.items()}
        d["streaming_max_abs_diff"] = float(f"{self.streaming_max_abs_diff:.3g}")
        return d


def _all_nodes(graph):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)
            for g in attr.graphs:
                yield from _all_nodes(g)


def check_structure(model: onnx.ModelProto, report: ValidationReport | None = None) -> None:
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:  # onnx raises several types
        raise StructureError(f"onnx.checker rejected the model: {str(e).splitlines()[0][:300]}") from None
    try:
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as e:
        raise StructureError(f"shape inference failed: {str(e).splitlines()[0][:300]}") from None
    loops = sum(n.op_type == "Loop" for n in model.graph.node)
    if loops != 1:
        raise StructureError(f"expected exactly one top-level Loop (the time loop), found {loops}")
    nodes = list(_all_nodes(model.graph))
    bad = sorted({n.op_type for n in nodes if "TensorList" in n.op_type or "TensorArray" in n.op_type})
    if bad:
        raise StructureError(f"TensorList/TensorArray ops left in the graph: {bad}")
    foreign = sorted({n.domain for n in nodes if n.domain not in ("", "ai.onnx")})
    if foreign:
        raise StructureError(f"nodes from non-standard op domains {foreign}: ONNX Runtime may lack them")
    for vi in model.graph.input:
        if vi.name == spec.TOKENS:
            dims = vi.type.tensor_type.shape.dim
            fixed = [d.dim_value for d in dims if d.HasField("dim_value")]
            if fixed:
                raise StructureError(f"tokens has a fixed axis of size {fixed}: the model depends on "
                                     "a sequence length or batch size")
    if report is not None:
        report.loops, report.nodes = loops, len(nodes)


_ORT_TYPES = {"tensor(float)": "float32", "tensor(int32)": "int32", "tensor(int64)": "int64"}


def check_interface(session, inputs: Sequence[spec.IOSpec], outputs: Sequence[spec.IOSpec]) -> None:
    for kind, actual, expected in (("input", session.get_inputs(), inputs),
                                   ("output", session.get_outputs(), outputs)):
        got = {a.name: a for a in actual}
        missing = [e.name for e in expected if e.name not in got]
        extra = sorted(set(got) - {e.name for e in expected})
        if missing or extra:
            raise NameMismatchError(f"{kind} names differ: missing {missing}, unexpected {extra}")
        for e in expected:
            a = got[e.name]
            dtype = _ORT_TYPES.get(a.type, a.type)
            if dtype != e.dtype:
                raise DtypeMismatchError(f"{kind} {e.name!r} is {dtype}, expected {e.dtype}")
            if len(a.shape) != len(e.shape):
                raise ShapeMismatchError(f"{kind} {e.name!r} has rank {len(a.shape)}, expected {len(e.shape)}")
            for ad, ed in zip(a.shape, e.shape):
                if isinstance(ed, int) and ad != ed:
                    raise ShapeMismatchError(f"{kind} {e.name!r} has shape {a.shape}, expected {e.shape}")
                if isinstance(ed, str) and isinstance(ad, int):
                    raise ShapeMismatchError(f"{kind} {e.name!r} axis {ed!r} is fixed at {ad}; "
                                             "it must be dynamic")


Feeds = dict[str, np.ndarray]
Reference = Callable[[Feeds], dict[str, np.ndarray]]
# (feeds, the reference's outputs) -> per output, |reference' - reference| where
# reference' is the same model with its weights moved by float32 rounding.
Spread = Callable[[Feeds, dict[str, np.ndarray]], dict[str, np.ndarray]]


def make_feeds(rng: np.random.Generator, num_units: Sequence[int], vocab_size: int, batch: int, time: int,
               text_ids: np.ndarray | None, ragged: bool, random_state: bool) -> Feeds:
    """Inputs for one case: rows alternate random ids and windows of real text."""
    tokens = rng.integers(0, vocab_size, (batch, time), dtype=np.int32)
    if text_ids is not None and len(text_ids) > time:
        for b in range(1, batch, 2):
            start = int(rng.integers(0, len(text_ids) - time))
            tokens[b] = text_ids[start : start + time]
    lengths = np.full(batch, time, np.int32)
    if ragged and batch > 1:
        lengths = rng.integers(0, time + 1, batch).astype(np.int32)
        lengths[0], lengths[1] = time, 0  # a full row and an empty row, always
    feeds: Feeds = {spec.TOKENS: tokens, spec.LENGTHS: lengths}
    for l, units in enumerate(num_units, start=1):
        scale = 0.5 if random_state else 0.0
        feeds[spec.state_input("c", l)] = (scale * rng.normal(size=(batch, units))).astype(np.float32)
        feeds[spec.state_input("h", l)] = (scale * np.tanh(rng.normal(size=(batch, units)))).astype(np.float32)
        z = rng.integers(0, 2, (batch, 1)) if random_state else np.zeros((batch, 1))
        feeds[spec.state_input("z", l)] = z.astype(np.float32)
    return feeds


SPREAD_WINDOW = 8  # steps either side in which the reference's own spread explains a value


def local_max(x: np.ndarray) -> np.ndarray:
    """Per row, the largest value within SPREAD_WINDOW steps ([B, T, ...]) or in the row ([B, ...])."""
    if x.ndim < 3:
        return np.broadcast_to(x.reshape(len(x), -1).max(-1).reshape((-1,) + (1,) * (x.ndim - 1)), x.shape)
    m = x.reshape(x.shape[0], x.shape[1], -1).max(-1)
    padded = np.pad(m, ((0, 0), (SPREAD_WINDOW, SPREAD_WINDOW)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, 2 * SPREAD_WINDOW + 1, axis=1)
    return np.broadcast_to(windows.max(-1).reshape(m.shape + (1,) * (x.ndim - 2)), x.shape)


def compare(expected: dict[str, np.ndarray], actual: dict[str, np.ndarray], lengths: np.ndarray,
            tolerance: float, threshold: float, case: str, report: ValidationReport,
            spread: Callable[[], dict[str, np.ndarray]] | None = None,
            explain_factor: float = 2.0, explain_cap: float = 100.0) -> None:
    """Compare one case's outputs; update the report or raise.

    spread() (optional, called only when a value is beyond the tolerance) gives,
    per output, how far the reference moves from itself under float32 rounding.
    """
    for name, e in expected.items():
        a = actual[name]
        if a.shape != e.shape:
            raise ShapeMismatchError(f"output {name!r} has shape {a.shape}, TensorFlow {e.shape} ({case})")
        if a.dtype != e.dtype:
            raise DtypeMismatchError(f"output {name!r} is {a.dtype}, TensorFlow {e.dtype} ({case})")
    eb, ab = expected[spec.BOUNDARIES], actual[spec.BOUNDARIES]
    s_z = expected[spec.BOUNDARY_LOGITS]
    flips = np.argwhere(eb != ab)
    unexplained = [tuple(int(i) for i in f) for f in flips if abs(s_z[tuple(f)]) > threshold]
    if unexplained:
        raise BoundaryMismatchError(len(unexplained), unexplained[0], float(s_z[unexplained[0]]),
                                    threshold, case)
    report.boundaries_compared += int(np.sum(lengths)) * eb.shape[-1]
    diverged_from = {}
    for b, t, l in flips:
        diverged_from[int(b)] = min(int(t), diverged_from.get(int(b), 1 << 30))
        report.boundary_flips_explained.append(
            {"case": case, "row": int(b), "step": int(t), "layer": int(l) + 1, "s_z": float(s_z[b, t, l])})
    keep_rows = np.array([b not in diverged_from for b in range(len(lengths))])
    spreads: dict[str, np.ndarray] = {}
    for name, e in expected.items():
        a = actual[name]
        if name == spec.BOUNDARIES:  # judged above: every difference is a flip
            continue
        if name in (spec.LOGITS, spec.BOUNDARY_LOGITS):
            e, a = e.copy(), a.copy()
            for b, t in diverged_from.items():
                e[b, t:], a[b, t:] = 0.0, 0.0
            rows = slice(None)
        else:  # state: only rows that did not diverge
            rows = keep_rows
            e, a = e[rows], a[rows]
        d = np.abs(e - a)
        diff = float(d.max()) if d.size else 0.0
        report.max_abs_diff[name] = max(report.max_abs_diff.get(name, 0.0), diff)
        if diff <= tolerance:
            continue
        if spread is None or diff > explain_cap * tolerance:
            raise ValueMismatchError(name, diff, tolerance, case)
        if not spreads:
            spreads.update(spread())
        near = local_max(spreads[name][rows])
        beyond = d > tolerance
        ratio = d[beyond] / np.maximum(near[beyond], np.finfo(np.float32).tiny)
        worst = int(np.argmax(ratio))
        if ratio[worst] > explain_factor:
            raise ValueMismatchError(name, float(d[beyond][worst]), tolerance, case,
                                     reference_spread=float(near[beyond][worst]))
        report.explain_factor = explain_factor
        report.values_explained.append({
            "case": case, "output": name, "values": int(beyond.sum()), "max_abs_diff": float(f"{diff:.3g}"),
            "reference_spread": float(f"{float(near[beyond].max()):.3g}"),
            "max_ratio_to_spread": float(f"{float(ratio.max()):.3g}")})


def active_rows(feeds: Feeds, outputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(active [L-1, B, T], live [B, T]): where each layer l >= 2 UPDATEs or FLUSHes (fired at t-1, or
    the layer below fired at t) while its row runs; the rows the sparse engine computes."""
    z = outputs[spec.BOUNDARIES] > 0.5  # [B, T, L]
    batch, steps, layers = z.shape
    live = np.arange(steps)[None, :] < feeds[spec.LENGTHS][:, None]
    before = np.concatenate([np.stack([feeds[spec.state_input("z", l)][:, 0] > 0.5 for l in range(1, layers + 1)],
                                      -1)[:, None, :], z[:, :-1]], axis=1)  # z^l at t-1
    active = (before[:, :, 1:] | z[:, :, :-1]) & live[:, :, None]
    return np.moveaxis(active, -1, 0), live


def _count_activity(report: ValidationReport, feeds: Feeds, expected: dict[str, np.ndarray]) -> None:
    active, live = active_rows(feeds, expected)
    for l, a in enumerate(active, start=2):
        r = report.activity.setdefault(f"layer{l}", {"steps": 0, "none_active": 0, "all_active": 0,
                                                     "active": 0, "live": 0})
        per_step = a.sum(0)
        r["steps"] += a.shape[1]
        r["none_active"] += int((per_step == 0).sum())
        r["all_active"] += int((per_step == a.shape[0]).sum())
        r["active"] += int(a.sum())
        r["live"] += int(live.sum())


def run_session(session, feeds: Feeds) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def check_streaming(session, num_units: Sequence[int], vocab_size: int, ids: np.ndarray,
                    chunks: Sequence[int], tolerance: float, report: ValidationReport) -> None:
    """Chunks of each size, state fed back, equal one run over the whole sequence."""
    rng = np.random.default_rng(1)
    n = len(ids)
    feeds = make_feeds(rng, num_units, vocab_size, 1, n, None, False, False)
    feeds[spec.TOKENS] = ids[None, :].astype(np.int32)
    full = run_session(session, feeds)
    smap = spec.state_map(len(num_units))
    for size in chunks:
        state = {k: v for k, v in feeds.items() if k.startswith("state_")}
        pieces: dict[str, list[np.ndarray]] = {spec.LOGITS: [], spec.BOUNDARIES: [], spec.BOUNDARY_LOGITS: []}
        for start in range(0, n, size):
            piece = ids[start : start + size]
            out = run_session(session, {spec.TOKENS: piece[None, :].astype(np.int32),
                                        spec.LENGTHS: np.array([len(piece)], np.int32), **state})
            for k in pieces:
                pieces[k].append(out[k])
            state = {smap[k]: v for k, v in out.items() if k in smap}
        got = {k: np.concatenate(v, axis=1) for k, v in pieces.items()}
        got.update({k: out[k] for k in smap})
        for name, e in full.items():
            diff = float(np.max(np.abs(e - got[name])))
            report.streaming_max_abs_diff = max(report.streaming_max_abs_diff, diff)
            if diff > tolerance:
                raise StreamingMismatchError(name, diff, tolerance, f"chunks of {size} vs one run of {n}")
        report.streaming_chunks.append(size)


def validate(model: onnx.ModelProto, sessions: dict[str, object], reference: Reference,
             num_units: Sequence[int], vocab_size: int, text_ids: np.ndarray | None = None,
             times: Sequence[int] = (1, 7, 333, 5000), batches: Sequence[int] = (1, 3, 17),
             tolerance: float = 1e-4, boundary_threshold: float = 1e-4,
             stream_chunks: Sequence[int] = (1, 3, 64), seed: int = 0,
             spread: Spread | None = None, explain_factor: float = 2.0,
             require_extremes: Sequence[str] = (), log=None) -> ValidationReport:
    """Validate ``model`` run by each of ``sessions`` (label -> ORT session) against ``reference``.

    reference(feeds) must return TensorFlow's outputs under the same names.
    spread, when given, may explain values beyond the tolerance (module docstring);
    without it the tolerance is absolute. require_extremes: layers ("layer2", ...) whose steps with no
    active row and with every row active the grid must have reached (StructureError otherwise); the
    grid includes a case where no row runs and one where every row FLUSHes first, which reach both in
    every layer with a boundary detector.
    """
    report = ValidationReport(providers=list(sessions), tolerance=tolerance,
                              boundary_threshold=boundary_threshold)
    check_structure(model, report)
    ins, outs = spec.io_spec(tuple(num_units), vocab_size)
    for session in sessions.values():
        check_interface(session, ins, outs)
    rng = np.random.default_rng(seed)
    cases = [(f"batch {b} x time {t}", make_feeds(rng, num_units, vocab_size, b, t, text_ids, ragged=True,
                                                  random_state=bool(i % 2)))
             for i, (t, b) in enumerate((t, b) for t in times for b in batches)]
    # Steps where no row is active (no row runs) and where every row is (each fired at the last step, so
    # each FLUSHes): the sparse engine's empty and full gathers.
    idle = make_feeds(rng, num_units, vocab_size, 3, 7, text_ids, ragged=False, random_state=True)
    idle[spec.LENGTHS][:] = 0
    flush = make_feeds(rng, num_units, vocab_size, 5, 9, text_ids, ragged=False, random_state=True)
    for l in range(1, len(num_units) + 1):
        flush[spec.state_input("z", l)][:] = 1.0
    cases += [("batch 3 x time 7, no row runs", idle), ("batch 5 x time 9, every row FLUSHes first", flush)]
    for n, (label_case, feeds) in enumerate(cases, 1):
        if log is not None:  # the long cases take tens of seconds: say which one runs
            log(f"  case {n} of {len(cases)}: {label_case}")
        batch, time = feeds[spec.TOKENS].shape
        expected = reference(feeds)
        _count_activity(report, feeds, expected)
        cached: dict[str, np.ndarray] = {}

        def case_spread(feeds=feeds, expected=expected, cached=cached):
            if not cached:
                cached.update(spread(feeds, expected))
            return cached

        for label, session in sessions.items():
            case = f"{label}, batch {batch}, time {time}, lengths {feeds[spec.LENGTHS].tolist()[:5]}"
            compare(expected, run_session(session, feeds), feeds[spec.LENGTHS], tolerance,
                    boundary_threshold, case, report, case_spread if spread else None, explain_factor)
        report.cases.append(label_case)
    for layer, r in report.activity.items():
        r["active_fraction"] = round(r.pop("active") / max(r.pop("live"), 1), 4)
        if layer in require_extremes and (r["none_active"] == 0 or r["all_active"] == 0):
            raise StructureError(f"the validation grid never had {'no' if r['none_active'] == 0 else 'every'} "
                                 f"row of {layer} active: the sparse engine's gathers were not all tested")
    ids = text_ids[:200] if text_ids is not None and len(text_ids) >= 200 else \
        rng.integers(0, vocab_size, 200, dtype=np.int32)
    for session in sessions.values():
        check_streaming(session, num_units, vocab_size, ids, stream_chunks, tolerance, report)
    return report
