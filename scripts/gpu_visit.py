"""The GPU visit: the offline kit packed for the device's transfer rules, and the calls that run the check there.

    python scripts/gpu_visit.py kit [--cpu]          build the kit into .gpu/kit/p1 ... pN (git-ignored)
    python scripts/gpu_visit.py plan [--cpu] [--json]  the calls in order: what each carries, its command,
                                                       its limit and its expected time

The device machine (docs/benchmarks.md, "GPU") gets, with every call, a copy of the working tree: the files
git tracks and the untracked ones it does not ignore, plus the ignored paths the call names in `carry`, at
most 64 MiB in all; ignored paths carried by earlier calls stay there while the machine is warm (30 s after
each call). So the kit lives under an ignored folder, in parts of at most 56 MiB (room for the tree to
grow), one part per call, back to back; the last part's call installs it, and the check's other steps
follow. Each step copies the report and its logs into $OUT, which comes back. tests/test_gpu_visit.py runs
this very sequence against a stand-in of those rules.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20
# The device tool's rules (the limits of /work/.library/device/README.md, as the brief states them).
TREE_LIMIT = 64 * MiB  # the working tree and everything carried, per call
COMMAND_LIMIT_S = 600  # one command
MAX_CARRY = 8  # paths named in one call's carry
COMMAND_CHARS = 2000
BUDGET_S = 15 * 60  # device time for a session, machine start included
START_S = 180  # a machine's start, counted in it
OUT_FILES, OUT_FILE_BYTES = 8, 16 * MiB  # what $OUT may bring back
# This project's choices.
PART_LIMIT = int(os.environ.get("HMLSTM_VISIT_PART_MB", "56")) * MiB  # per part: headroom for the tree
KIT = ".gpu/kit"  # where the parts go (/.gpu/ is in .gitignore)
OUT = ".gpu/out"  # the installed kit and the reports, on the device (kept between calls)


@dataclass
class Call:
    carry: list[str] = field(default_factory=list)
    command: str = "true"
    timeout_s: int = 60
    expected_s: int = 30  # what it should take there, machine start and transfer included
    what: str = ""


def parts(root: Path = ROOT) -> list[str]:
    found = sorted((root / KIT).glob("p[0-9]*"), key=lambda p: int(p.name[1:]))
    return [str(p.relative_to(root)) for p in found]


def plan(cpu: bool = False, root: Path = ROOT) -> list[Call]:
    """The calls of one visit, in order, for the kit built under ``root``."""
    kit = parts(root)
    if not kit:
        raise SystemExit(f"no kit under {KIT}: build it first (python scripts/gpu_visit.py kit)")
    check = f"bash scripts/gpu_check.sh {KIT} {OUT}" + (" --cpu" if cpu else " --gpu")
    calls = [Call([p], f"ls -l {p}", 120, START_S + 30 if i == 0 else 30,
                  "machine start, then the first part" if i == 0 else "a part")
             for i, p in enumerate(kit[:-1])]
    calls.append(Call([kit[-1]], f"{check} --step install", 300, (START_S if len(kit) == 1 else 0) + 90,
                      "the last part; host check, verify, install"))
    calls.append(Call([], f"{check} --step tests", 240, 60, "tests/gpu: every GPU test runs, none may skip"))
    calls.append(Call([], f"{check} --step bench", 420, 230, "benchmarks/gpu_bench.py: direct ORT and the server"))
    return calls


def check_plan(calls: list[Call], budget: bool = True) -> list[str]:
    """What the device would refuse or run out of time for: [] when the whole visit fits (``budget``: the
    calls' expected times within a session's device time too)."""
    problems = []
    for n, c in enumerate(calls, 1):
        if len(c.carry) > MAX_CARRY:
            problems.append(f"call {n} carries {len(c.carry)} paths (at most {MAX_CARRY})")
        if len(c.command) > COMMAND_CHARS:
            problems.append(f"call {n}'s command is {len(c.command)} characters (at most {COMMAND_CHARS})")
        if not 1 <= c.timeout_s <= COMMAND_LIMIT_S or c.expected_s > c.timeout_s + START_S:
            problems.append(f"call {n}: limit {c.timeout_s} s (1-{COMMAND_LIMIT_S}), expected {c.expected_s} s")
    total = sum(c.expected_s for c in calls)
    if budget and total > BUDGET_S:
        problems.append(f"the visit is expected to take {total} s, over the {BUDGET_S} s a session has")
    return problems


def tree_files(root: Path = ROOT) -> list[Path]:
    """What travels with every call: the files git tracks and the untracked ones it does not ignore."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         capture_output=True, check=True).stdout.decode()
    return [root / f for f in out.split("\0") if f and (root / f).is_file()]


def size(paths) -> int:
    total = 0
    for p in paths:
        p = Path(p)
        total += sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
    return total


def build_kit(cpu: bool = False, root: Path = ROOT, python: str = "3.12") -> list[str]:
    """scripts/gpu_kit.sh into a staging folder, then its files packed into KIT/p1..pN of at most PART_LIMIT
    each (a file larger than that is already split by gpu_kit.sh). Returns the part folders."""
    kit = root / KIT
    if kit.exists():
        shutil.rmtree(kit)
    with tempfile.TemporaryDirectory() as stage:
        env = {**os.environ, "HMLSTM_KIT_PART_MB": str(PART_LIMIT // 1_000_000)}  # decimal MB: below PART_LIMIT
        subprocess.run(["bash", str(ROOT / "scripts/gpu_kit.sh"), stage, "--python", python,
                        *(["--cpu"] if cpu else [])], check=True, env=env, cwd=ROOT)
        files = sorted(Path(stage).iterdir(), key=lambda f: f.stat().st_size, reverse=True)
        bins: list[list[Path]] = []
        for f in files:  # first fit, largest first
            home = next((b for b in bins if size(b) + f.stat().st_size <= PART_LIMIT), None)
            if home is None:
                bins.append(home := [])
            home.append(f)
        for i, b in enumerate(bins, 1):
            (kit / f"p{i}").mkdir(parents=True)
            for f in b:
                shutil.copy(f, kit / f"p{i}" / f.name)
    return parts(root)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["kit", "plan"])
    ap.add_argument("--cpu", action="store_true", help="the CPU onnxruntime and the check's CPU mode (a rehearsal)")
    ap.add_argument("--json", action="store_true", help="plan: one JSON object per call")
    args = ap.parse_args()
    if args.what == "kit":
        built = build_kit(args.cpu)
        tree = size(tree_files())
        for p in built:
            print(f"{p}: {size([ROOT / p]) / MiB:.1f} MiB (+ the tree's {tree / MiB:.1f} MiB per call)")
        return 0
    calls = plan(args.cpu)
    for n, c in enumerate(calls, 1):
        if args.json:
            print(json.dumps(asdict(c)))
        else:
            print(f"{n}. carry {c.carry or 'nothing'}, timeout_s {c.timeout_s}, about {c.expected_s} s "
                  f"({c.what}):\n   {c.command}")
    problems = check_plan(calls)
    for p in problems:
        print(f"gpu_visit: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
