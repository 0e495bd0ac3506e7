"""Mutation report: plant bugs where a silent one costs users most, and see whether the tests notice.

    python benchmarks/mutation.py                 # every target; writes nothing
    python benchmarks/mutation.py --write-docs    # ...and docs/testing.md
    python benchmarks/mutation.py --only segments --list   # the mutants of one target, not run

For each target module, every mutant below is planted in a copy of the checkout, one at a time, and the
tests that cover that module run against it (``pytest -x``, fastest first). A mutant is killed when they fail
(or hang past a limit), and survives when they pass. Survivors are listed with the line they changed; each one
is either explained in EXPLAINED (an equivalent mutant: no input can tell it apart) or a gap in the tests.

Mutants (on the syntax tree, one change each): a comparison flipped or loosened (< <=, == !=, in / not in,
is / is not), and/or swapped, a `not` dropped, + and - swapped, * and / swapped, an integer constant moved by
one, True/False swapped, an augmented assignment's sign flipped, and a call statement deleted. Strings,
docstrings and log or error messages are left alone. This is a report, not part of CI: it takes about an hour
on 2 cores.
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Target:
    name: str
    path: str  # the module, relative to the repository root
    tests: tuple[str, ...]  # what covers it, fastest first
    # Only lines between a line containing ``start`` and one containing ``end`` (both included), per region.
    regions: tuple[tuple[str, str], ...] = ()


TARGETS = (
    Target("boundary_scores", "hmlstm/boundary_scores.py",
           ("tests/test_boundary_scores.py",
            "tests/test_evaluation.py::test_evaluator_numbers_on_hand_made_detectors")),
    Target("segments", "hmlstm/serving/segments.py",
           ("tests/serving/test_segments.py", "tests/serving/test_fuzz.py")),
    Target("train: skip and rollback", "hmlstm/model/train.py",
           ("tests/model/test_train.py::test_non_finite_step_is_skipped_and_changes_no_weight",
            "tests/model/test_train.py::test_three_non_finite_steps_in_a_row_roll_back_to_the_checkpoint_with_half_"
            "the_learning_rate",
            "tests/model/test_train.py::test_rollbacks_that_keep_failing_stop_training_as_diverged",
            "tests/test_careless_user.py::test_ctrl_c_exits_130_with_a_checkpoint_that_the_same_command_resumes"),
           regions=(("        def skip():", "        applied = tf.cond(ok, apply, skip)"),
                    ("            if not bool(applied):", "                consecutive_bad = rollbacks = 0"),
                    ("            if step % cfg.checkpoint_every == 0 or step == total or pending_save:",
                     "                        manager.save(checkpoint_number=step)"),
                    ("        bad_weights = consecutive_bad > 0", "            manager.latest_checkpoint is None or"))),
    Target("batching", "hmlstm/serving/batching.py",
           ("tests/serving/test_batching.py", "tests/serving/test_engines.py")),
    Target("batch rows", "hmlstm/serving/batch.py",
           ("tests/serving/test_batching.py", "tests/serving/test_segments.py", "tests/serving/test_lookahead.py")),
    Target("store", "hmlstm/serving/store.py",
           ("tests/serving/test_durability.py", "tests/serving/test_saver.py", "tests/serving/test_store_faults.py")),
    Target("stream", "hmlstm/serving/stream.py",
           ("tests/serving/test_segments.py", "tests/serving/test_durability.py", "tests/serving/test_batching.py",
            "tests/serving/test_server.py", "tests/serving/test_faults.py")),
)

# Survivors no test can kill: the mutant behaves like the original on every input. Keyed by
# (target name, the source line as written, stripped; what changed), so that edits elsewhere do not move them.
EXPLAINED: dict[tuple[str, str, str], str] = {
    ("stream", "super().__init__(message)", "delete call super().__init__(...)"):
        "equivalent: BaseException.__new__ already stores the arguments, so str(error) is the message either way",
    ("stream", "self.taken_over = False", "False -> True"):
        "equivalent: claim() sets taken_over to False when a call attaches, before anything reads it",
    ("segments", "which, where = (z.T > 0.5).nonzero()", "> -> >="):
        "equivalent: z holds the model's boundaries, exactly 0.0 or 1.0, never 0.5",
    ("segments", "return self._buffer[start - self._buffer_start : end - self._buffer_start]", "- -> +"):
        "equivalent for the slice's end (the survivor of the two): its only caller, flush(), reads to the end of "
        "what was fed, which is the buffer's end, and a slice end past it is clamped to it",
    ("batching", "super().__init__(model, 1, io_binding, metrics)", "1 -> 2"):
        "equivalent: the scheduler awaits each model call before it starts the next, so a second thread in the "
        "pool would never run anything",
    ("store", 'conn.execute("PRAGMA synchronous=NORMAL")', "delete call conn.execute(...)"):
        "equivalent in behaviour: without it SQLite syncs at every commit (FULL, slower); with WAL, NORMAL loses "
        "nothing when the process dies, which is what the server needs (the SIGKILL tests pass either way)",
    ("store", "if row is None or row[1] < time.time():", "< -> <="):
        "equivalent: the two differ only when a record's expiry equals the clock's float exactly",
    ("store", "self._call(self._redis.set, self.PREFIX + stream_id, record, px=max(1, int(ttl_s * 1000)))", "1 -> 2"):
        "equivalent in use: the floor only matters for an idle timeout under 2 ms (a record that expires before "
        "any resume could reach it either way); it exists because Redis refuses a time to live of 0",
    ("store", "self._call(self._redis.set, self.PREFIX + stream_id, record, px=max(1, int(ttl_s * 1000)))",
     "1000 -> 1001"):
        "equivalent in use: a time to live 0.1% longer than the idle timeout",
    ("store", "conn = sqlite3.connect(self.path, timeout=5, isolation_level=None)", "5 -> 6"):
        "equivalent unless another process holds the database's lock for between 5 and 6 s: a tuning value",
    ("store", 'head = json.dumps(header, ensure_ascii=False).encode("utf-8")', "False -> True"):
        "equivalent: JSON escapes decode to the same text; only the record's size changes",
    ("batching", "for name, arr in model.zero_state(1).items()}", "1 -> 2"):
        "equivalent: the buffers take only the state's shape after the batch axis, the same for a batch of 2",
    ("batching", "@dataclass(slots=True)", "True -> False"):
        "equivalent in behaviour: slots only save each pending piece's memory and refuse attributes the class "
        "does not declare, and none are set",
    ("batching", "timer.cancel()", "delete call timer.cancel(...)"):
        "equivalent in every answer: a timer left running sets the arrival event at a stale deadline; every wait "
        "re-checks the queue and its own deadline when it wakes, so a stray wake costs one turn of the loop",
    ("batching", "queue.append(_Pending(Piece.of(self.model, st, piece, encode=False), piece, fut, "
                 "time.perf_counter()))",
     "False -> True"):
        "equivalent in every answer: the piece is then also encoded on its own and those ids go unused, since "
        "the batch encodes every text piece's text with the rest",
    ("batch rows", "@dataclass(slots=True)", "True -> False"):
        "equivalent in behaviour: slots only save each row's memory and refuse attributes the class does not "
        "declare, and none are set",
    ("batch rows", "asked = [i for i, k in enumerate(top_k) if k > 0]", "> -> >="):
        "equivalent in every answer: every row then counts as asking, and a row with k = 0 gets the empty "
        "ranking it got before (one softmax over more rows, no other change)",
    ("batch rows", "row, col, step = (z.transpose(0, 2, 1) > 0.5).nonzero()", "> -> >="):
        "equivalent: z holds the model's boundaries, exactly 0.0 or 1.0, never 0.5",
    ("batch rows", "if (lengths < z.shape[1]).any():", "< -> <="):
        "equivalent in every answer: the filter then always runs, and where every row is as long as the batch "
        "it keeps every step",
    ("batch rows", "cuts = np.searchsorted(row * n + col, np.arange(b * n + 1)).tolist()", "1 -> 2"):
        "equivalent: one more cut past the last (row, column), which no slice reads",
    ("batch rows", 'order = np.argsort(-p, axis=1, kind="stable")[:, : max(ks, default=0)]', "0 -> 1"):
        "equivalent in use: the default applies only to no rows at all, and read_rows calls it only for the "
        "rows that asked, at least one",
    ("stream", "@dataclass(slots=True)", "True -> False"):
        "equivalent in behaviour: slots only save each result's memory and refuse attributes the class does not "
        "declare, and none are set",
    ("stream", "decided_chars: int = 0", "0 -> 1"):
        "equivalent in use: every ChunkResult is made with decided_chars given, so the default is never read",
    ("batching", "if remaining <= 0:", "<= -> <"):
        "equivalent: the two differ only when a perf_counter float lands exactly on the deadline",
    ("batching", "self._arrival.clear()", "delete call self._arrival.clear(...)"):
        "equivalent in every answer: without the clear, the wait for more pieces spins until the batch fills or "
        "its deadline (max_wait_us) passes, costing CPU time but no result; only a CPU measurement (the serving "
        "benchmark's) would show it",
    ("stream", "self._history: deque = deque(maxlen=replay_depth) if stream_id else deque(maxlen=1)", "1 -> 2"):
        "equivalent in behaviour: a stream without an id is never rewound or stored, so its one snapshot is "
        "never read; the bound only limits its memory",
    ("stream", "if st.waiting and now - st.waiting_since > self.idle_timeout_s]", "> -> >="):
        "equivalent: the two differ only when a monotonic-clock float equals the deadline exactly, at an instant "
        "the watchdog (which looks every quarter timeout) never samples",
    ("stream", "if not st.attached and now - st.last_seen > self.idle_timeout_s]", "> -> >="):
        "equivalent: as above, for a detached stream's deadline",
}


# ------------------------------------------------------------------ planting mutants

SWAP_CMP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
            ast.NotEq: ast.Eq, ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is}
SWAP_BIN = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult}
SYMBOL = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!=", ast.In: "in",
          ast.NotIn: "not in", ast.Is: "is", ast.IsNot: "is not", ast.Add: "+", ast.Sub: "-", ast.Mult: "*",
          ast.Div: "/", ast.And: "and", ast.Or: "or"}


@dataclass
class Mutant:
    line: int
    what: str
    source: str


def _in_message(node: ast.AST, parents: dict) -> bool:
    """Inside a string formatting, a log call or an exception's arguments: text, not behaviour."""
    p = parents.get(node)
    while p is not None:
        if isinstance(p, ast.JoinedStr):
            return True
        if isinstance(p, ast.Call):
            f = p.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if name in ("log", "info", "warning", "debug", "error", "print") or name.endswith("Error"):
                return True
        if isinstance(p, ast.Raise):
            return True
        p = parents.get(p)
    return False


def mutants(source: str, lines: set[int] | None) -> list[Mutant]:
    tree = ast.parse(source)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    found: list[Mutant] = []
    targets = [n for n in ast.walk(tree) if hasattr(n, "lineno") and (lines is None or n.lineno in lines)]

    def plant(node: ast.AST, change, what: str) -> None:
        clone = copy.deepcopy(tree)
        twin = next(n for n in ast.walk(clone) if type(n) is type(node) and ast.dump(n, include_attributes=True)
                    == ast.dump(node, include_attributes=True))
        change(twin, parents_of(clone).get(twin))
        found.append(Mutant(node.lineno, what, ast.unparse(clone)))

    for node in targets:
        if _in_message(node, parents) or id(node) in docstrings:
            continue
        if isinstance(node, ast.Compare):
            for i, op in enumerate(node.ops):
                if type(op) in SWAP_CMP:
                    new = SWAP_CMP[type(op)]
                    plant(node, lambda n, _p, i=i, new=new: n.ops.__setitem__(i, new()),
                          f"{SYMBOL[type(op)]} -> {SYMBOL[new]}")
        elif isinstance(node, ast.BoolOp):
            new = ast.Or if isinstance(node.op, ast.And) else ast.And
            plant(node, lambda n, _p, new=new: setattr(n, "op", new()), f"{SYMBOL[type(node.op)]} -> {SYMBOL[new]}")
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            plant(node, _drop_not, "not x -> x")
        elif isinstance(node, (ast.BinOp, ast.AugAssign)) and type(node.op) in SWAP_BIN:
            new = SWAP_BIN[type(node.op)]
            plant(node, lambda n, _p, new=new: setattr(n, "op", new()),
                  f"{SYMBOL[type(node.op)]}{'=' if isinstance(node, ast.AugAssign) else ''} -> "
                  f"{SYMBOL[new]}{'=' if isinstance(node, ast.AugAssign) else ''}")
        elif isinstance(node, ast.Constant) and type(node.value) is bool:
            plant(node, lambda n, _p: setattr(n, "value", not n.value), f"{node.value} -> {not node.value}")
        elif isinstance(node, ast.Constant) and type(node.value) is int:
            plant(node, lambda n, _p: setattr(n, "value", n.value + 1), f"{node.value} -> {node.value + 1}")
        elif isinstance(node, ast.Expr) and isinstance(node.value, (ast.Call, ast.Await)):
            call = node.value.value if isinstance(node.value, ast.Await) else node.value
            f = call.func if isinstance(call, ast.Call) else None
            name = ast.unparse(f) if f is not None else "await"
            if name.split(".")[-1] in ("log", "info", "warning", "debug", "print"):
                continue
            plant(node, _to_pass, f"delete call {name}(...)")
    return found


def parents_of(tree: ast.AST) -> dict:
    return {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}


def _drop_not(node: ast.UnaryOp, parent: ast.AST) -> None:
    for field, value in ast.iter_fields(parent):
        if value is node:
            setattr(parent, field, node.operand)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                if v is node:
                    value[i] = node.operand


def _to_pass(node: ast.Expr, _parent) -> None:
    node.value = ast.Constant(None)


def region_lines(source: str, regions) -> set[int] | None:
    if not regions:
        return None
    lines = source.splitlines()
    out: set[int] = set()
    for start, end in regions:
        a = next(i for i, ln in enumerate(lines) if start in ln)
        b = next(i for i in range(a, len(lines)) if end in lines[i])
        out.update(range(a + 1, b + 2))
    return out


# ------------------------------------------------------------------ running them


def make_copy() -> Path:
    work = Path(tempfile.mkdtemp(prefix="hmlstm-mutation-"))
    for name in ("hmlstm", "tests", "protos", "pyproject.toml", "deploy", "Dockerfile", "Dockerfile.gpu", "Makefile",
                 "README.md", "benchmarks", "docs", "scripts"):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, work / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy2(src, work / name)
    return work


def run_tests(work: Path, tests, timeout: float, cache: Path) -> tuple[str, float]:
    env = dict(os.environ, PYTHONPATH=str(work), HMLSTM_TEST_CACHE=str(cache), TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONDONTWRITEBYTECODE="1")
    t0 = time.monotonic()
    # Its own process group, killed whole on a hang: a hung mutant's pytest (and any server it started) must not
    # outlive its turn (one was found still running an hour later).
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests], cwd=work,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return "killed (hung)", time.monotonic() - t0
    return ("survived" if code == 0 else "killed"), time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=None, help="targets whose name contains this (comma-separated: any of them)")
    ap.add_argument("--list", action="store_true", help="print the mutants and run nothing")
    ap.add_argument("--limit", type=int, default=0, help="at most this many mutants per target (a trial)")
    ap.add_argument("--results", type=Path, default=ROOT / "build" / "mutation.jsonl",
                    help="one JSON line per mutant, appended; a rerun skips mutants already there")
    ap.add_argument("--retest", action="store_true",
                    help="run again the mutants that survived last time (after adding tests that should kill them)")
    ap.add_argument("--report", action="store_true", help="only format the results already in --results")
    ap.add_argument("--write-docs", action="store_true", help="write docs/testing.md from the results")
    args = ap.parse_args()

    targets = [t for t in TARGETS if args.only is None or any(w in t.name for w in args.only.split(","))]
    if args.list:
        for t in targets:
            source = (ROOT / t.path).read_text()
            for m in mutants(source, region_lines(source, t.regions)):
                print(f"{t.name}:{m.line}: {m.what}")
        return
    args.results.parent.mkdir(parents=True, exist_ok=True)
    done = {}
    if args.results.exists():
        for line in args.results.read_text().splitlines():
            r = json.loads(line)
            done[(r["target"], r["line"], r["what"], r["n"])] = r
    if not args.report:
        run_all(targets, args, done)
    report = format_report([r for r in done.values() if any(r["target"] == t.name for t in targets)])
    print(report)
    if args.write_docs:
        (ROOT / "docs" / "testing.md").write_text(report)


def run_all(targets, args, done: dict) -> None:
    """Plant and run every target's mutants not yet in ``done``; each result is appended to --results."""
    work = make_copy()
    cache = work / ".tiny-cache"
    cache.mkdir()
    try:
        for t in targets:
            source = (ROOT / t.path).read_text()
            planted = mutants(source, region_lines(source, t.regions))[: args.limit or None]
            status, base_s = run_tests(work, t.tests, 1800, cache)  # unmutated: must pass, and sets the time limit
            if status != "survived":
                sys.exit(f"{t.name}: the tests fail without any mutant; fix that first")
            print(f"{t.name}: {len(planted)} mutants; its tests take {base_s:.0f} s unmutated", flush=True)
            seen: dict[tuple[int, str], int] = {}
            for m in planted:
                n = seen[(m.line, m.what)] = seen.get((m.line, m.what), -1) + 1
                key = (t.name, m.line, m.what, n)
                if key in done and not (args.retest and done[key]["status"] == "survived"):
                    continue
                (work / t.path).write_text(m.source)
                try:
                    status, secs = run_tests(work, t.tests, 3 * base_s + 60, cache)
                finally:
                    (work / t.path).write_text(source)
                record = {"target": t.name, "path": t.path, "line": m.line, "what": m.what, "n": n,
                          "status": status, "seconds": round(secs, 1)}
                done[key] = record
                with args.results.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                print(f"  {t.path}:{m.line} {m.what}: {status} ({secs:.0f} s)", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def format_report(results: list[dict]) -> str:
    out = ["# Testing: the mutation report", "",
           "Written by `python benchmarks/mutation.py --write-docs` (not part of CI: about an hour on 2 cores).",
           "Each mutant is one planted bug (see the script's docstring for the kinds), run against the tests",
           "that cover its module. Killed: the tests failed (or hung). Survived: they passed, so the mutant is",
           "either equivalent (explained below: no input tells it apart) or a gap in the tests.", "",
           "| module | mutants | killed | survived: equivalent | survived: not explained | killed, % |",
           "|---|---:|---:|---:|---:|---:|"]
    by_target: dict[str, list[dict]] = {}
    for r in results:
        by_target.setdefault(r["target"], []).append(r)
    total = killed_all = 0
    for t in TARGETS:
        rs = by_target.get(t.name, [])
        if not rs:
            continue
        killed = sum(r["status"].startswith("killed") for r in rs)
        survivors = [r for r in rs if r["status"] == "survived"]
        equivalent = [r for r in survivors if explained(t, r)]
        total += len(rs)
        killed_all += killed
        out.append(f"| {t.name} (`{t.path}`) | {len(rs)} | {killed} | {len(equivalent)} | "
                   f"{len(survivors) - len(equivalent)} | {100 * killed / len(rs):.1f} |")
    out.append(f"| **all** | {total} | {killed_all} | | | **{100 * killed_all / max(total, 1):.1f}** |")
    out += ["", "## Survivors", ""]
    for t in TARGETS:
        for r in sorted(by_target.get(t.name, []), key=lambda r: r["line"]):
            if r["status"] == "survived":
                why = (explained(t, r) or "NOT EXPLAINED: a gap in the tests") + (
                    f" ({r['note']})" if r.get("note") else "")
                out.append(f"- {t.path}:{r['line']} `{source_line(t, r['line'])}`, `{r['what']}`: {why}")
    return "\n".join(out) + "\n"


def source_line(t: Target, line: int) -> str:
    """The line as written, without its trailing comment."""
    return (ROOT / t.path).read_text().splitlines()[line - 1].split("  # ")[0].strip()


def explained(t: Target, r: dict) -> str | None:
    return EXPLAINED.get((t.name.split(":")[0], source_line(t, r["line"]), r["what"]))


if __name__ == "__main__":
    main()
