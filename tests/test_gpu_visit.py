"""The GPU visit as documented, run here against a stand-in of the device's transfer rules, in CPU mode: the
kit built and packed, each call accepted and run in order on a copy of the tree, the report back in $OUT.

What a real visit would meet, and the stand-in enforces: every call sends the working tree (the files git
tracks and the untracked ones it does not ignore) plus the ignored paths named in `carry`, at most 64 MiB in
all, or the call is refused; ignored paths carried earlier stay on the warm machine; $OUT starts empty and
at most 8 files of 16 MiB come back from it; a command runs at most 600 s.
"""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import missing

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


visit = _load("gpu_visit")
host = _load("gpu_host")


class Refused(Exception):
    """What the device tool answers instead of running a call."""


class DeviceStandIn:
    """The device's transfer rules on this machine: ``local`` is where carried paths are read (the kit), the
    tree comes from the checkout, ``device`` is the machine's copy of the tree, kept between calls."""

    def __init__(self, local: Path, device: Path, env: dict):
        self.local, self.device, self.env = local, device, env
        self.sent: list[int] = []

    def run(self, call, out: Path) -> subprocess.CompletedProcess:
        if len(call.carry) > visit.MAX_CARRY or len(call.command) > visit.COMMAND_CHARS:
            raise Refused("carry or command too long")
        if not 1 <= call.timeout_s <= visit.COMMAND_LIMIT_S:
            raise Refused(f"timeout_s {call.timeout_s}")
        tree = visit.tree_files(ROOT)
        carried = [self.local / c for c in call.carry]
        for c in call.carry:
            ignored = subprocess.run(["git", "check-ignore", "-q", c], cwd=ROOT).returncode == 0
            if not ignored:  # it would travel with every call, named or not
                raise Refused(f"{c} is not git-ignored")
        sent = visit.size(tree) + visit.size([p for p in carried if p.exists()])
        self.sent.append(sent)
        if sent > visit.TREE_LIMIT:
            raise Refused(f"the working tree is larger than 64 MiB ({sent / visit.MiB:.1f} MiB)")
        for f in tree:
            dest = self.device / f.relative_to(ROOT)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dest)
        for c, src in zip(call.carry, carried):  # each named path replaces what is there (removed if absent)
            dest = self.device / c
            if dest.exists():
                shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
            if src.exists():
                shutil.copytree(src, dest) if src.is_dir() else shutil.copy2(src, dest)
        if out.exists():
            shutil.rmtree(out)
        out.mkdir()
        r = subprocess.run(["bash", "-c", call.command], cwd=self.device, env={**self.env, "OUT": str(out)},
                           capture_output=True, text=True, timeout=call.timeout_s)
        back = [f for f in out.rglob("*") if f.is_file()]
        assert len(back) <= visit.OUT_FILES and all(f.stat().st_size <= visit.OUT_FILE_BYTES for f in back)
        assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f.name) for f in back)
        return r


def _bare_python(tmp_path: Path) -> tuple[str, str]:
    """(version, interpreter): a new venv of Python 3.12 (the GPU host's; pyenv has 3.12.1 here), else of this
    Python, with nothing installed but pip, so that the check can only use what the kit brings."""
    candidates = [Path.home() / ".pyenv" / "versions" / "3.12.1" / "bin" / "python3.12", shutil.which("python3.12")]
    base = next((str(c) for c in candidates if c and Path(c).exists()), sys.executable)
    version = subprocess.run([base, "-c", "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')"],
                             capture_output=True, text=True, check=True).stdout.strip()
    subprocess.run([base, "-m", "venv", str(tmp_path / "bare")], check=True, capture_output=True, timeout=300)
    return version, str(tmp_path / "bare" / "bin" / "python")


def test_the_kit_folder_is_ignored_and_a_full_part_leaves_room_for_the_tree():
    assert subprocess.run(["git", "check-ignore", "-q", f"{visit.KIT}/p1"], cwd=ROOT).returncode == 0
    tree = visit.size(visit.tree_files(ROOT))
    assert visit.PART_LIMIT <= 56 * visit.MiB
    assert tree + 56 * visit.MiB <= visit.TREE_LIMIT, f"the tree is {tree / visit.MiB:.1f} MiB: parts must shrink"


def test_the_stand_in_refuses_what_the_device_would(tmp_path):
    """The stand-in can fail: 64 MiB plus one byte, a carried path git does not ignore, a 601 s command."""
    local = tmp_path / "local"
    big = local / visit.KIT / "p1"
    big.mkdir(parents=True)
    (big / "x").write_bytes(b"\0" * (visit.TREE_LIMIT + 1 - visit.size(visit.tree_files(ROOT))))
    dev = DeviceStandIn(local, tmp_path / "device", dict(os.environ))
    with pytest.raises(Refused, match="larger than 64 MiB"):
        dev.run(visit.Call([f"{visit.KIT}/p1"], "true", 60), tmp_path / "out")
    with pytest.raises(Refused, match="not git-ignored"):
        dev.run(visit.Call(["README.md"], "true", 60), tmp_path / "out")
    with pytest.raises(Refused, match="timeout_s 601"):
        dev.run(visit.Call([], "true", 601), tmp_path / "out")


def test_the_documented_visit_fits_and_the_docs_show_its_commands(tmp_path):
    """The docs' sequence is the plan's: every command of a visit of five parts appears there as shown."""
    for i in range(1, 6):
        (tmp_path / visit.KIT / f"p{i}").mkdir(parents=True)
    calls = visit.plan(root=tmp_path)
    assert visit.check_plan(calls) == []
    assert sum(c.expected_s for c in calls) <= visit.BUDGET_S - 120  # minutes left to rerun a step
    docs = (ROOT / "docs/benchmarks.md").read_text()
    for c in calls:
        assert c.command in docs, c.command
        for path in c.carry:
            assert path in docs, path


@pytest.mark.slow
def test_the_visit_runs_as_documented_against_the_devices_rules(tmp_path, monkeypatch):
    version, bare = _bare_python(tmp_path)
    assert subprocess.run([bare, "-c", "import numpy"], capture_output=True).returncode != 0
    local = tmp_path / "local"
    monkeypatch.setattr(visit, "PART_LIMIT", 5 * visit.MiB)  # small parts: several calls, and reassembly runs
    monkeypatch.setenv("PYTHON", sys.executable)  # gpu_kit.sh's pip
    try:
        parts = visit.build_kit(cpu=True, root=local, python=version)
    except subprocess.CalledProcessError as e:
        missing(f"the kit could not be built (package index unreachable?): {e}")
    assert len(parts) >= 3 and all(visit.size([local / p]) <= 5 * visit.MiB for p in parts)
    manifest = next((local / visit.KIT).glob("p*/MANIFEST")).read_text()
    assert ".part-01" in manifest and "onnxruntime-" in manifest and "hmlstm-" in manifest
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    device = DeviceStandIn(local, tmp_path / "device", {**env, "PYTHON": bare})
    calls = visit.plan(cpu=True, root=local)
    assert visit.check_plan(calls, budget=False) == []  # 5 MiB parts make many calls; the real kit's five fit
    outs = []
    for n, call in enumerate(calls, 1):
        out = tmp_path / f"out{n}"
        r = device.run(call, out)
        assert r.returncode == 0, (call.command, r.stdout[-3000:], r.stderr[-3000:])
        outs.append(out)
    assert max(device.sent) <= visit.TREE_LIMIT
    report = (outs[-1] / "gpu-report.md").read_text()  # it came back in $OUT
    first = report.splitlines()[0]
    assert re.fullmatch(r"All steps run so far passed: install, tests, bench; \d+ s in all over 3 invocation\(s\)\.",
                        first), first
    assert {"gpu-report.md", "check.log", "tests.log", "bench.log", "bench.md", "server.log"} <= {
        f.name for f in outs[-1].iterdir()}
    assert "host check" in report and "kit verified" in report and f"Python {version}" in report
    assert "numpy 2.4" in report  # the bare interpreter ran the kit's numpy
    for engine in ("dense", "sparse"):
        assert f"| ONNX Runtime direct, {engine} | | 64 | 16 |" in report
    assert "| faster engine on cpu: **" in report and "| server, --device cpu --engine " in report
    check = f"bash scripts/gpu_check.sh {visit.KIT} {visit.OUT} --cpu"

    def again(command: str, python: str = bare):
        d = DeviceStandIn(local, device.device, {**env, "PYTHON": python})
        out = tmp_path / "again"
        r = d.run(visit.Call([], command, 300), out)
        return r, (out / "gpu-report.md").read_text().splitlines()[0]

    # A failed step is named first; a passing rerun clears it; the time covers every invocation.
    r, first = again(f"{check} --step tests", python="false")
    assert r.returncode == 1 and first.startswith("FAILED step tests: exit "), first
    assert "passed: install, bench" in first and "over 4 invocation(s)" in first
    r, first = again(f"{check} --step tests")
    assert r.returncode == 0 and first.startswith("All steps run so far passed: install, bench, tests"), first
    # On a GPU visit a GPU test that skips (no CUDA here) fails the step and says why.
    r, first = again(f"bash scripts/gpu_check.sh {visit.KIT} {visit.OUT} --gpu --step tests")
    assert r.returncode == 1, first
    assert first.startswith("FAILED step tests: a GPU test skipped on a GPU visit: SKIPPED"), first
    # A part that was not carried, and a corrupted one, are caught before anything is installed.
    shutil.rmtree(device.device / parts[-1])
    r, first = again(f"{check} --step install")
    assert r.returncode == 1 and "is missing: a part was not carried" in first, first
    shutil.copytree(local / parts[-1], device.device / parts[-1])
    victim = next((device.device / visit.KIT).glob("p*/*.part-00"))
    victim.write_bytes(b"x" + victim.read_bytes()[1:])
    r, first = again(f"{check} --step install")
    assert r.returncode == 1 and "does not match MANIFEST" in first, first


@pytest.mark.parametrize("libs, driver, ok, says", [
    (["libcudart.so.13", "libcublasLt.so.13.0.1"], "580.65.06", True, "host check passed"),
    (["libcudart.so.12", "libcublasLt.so.12"], "575.51.03", False,
     "found libcudart.so.12; libcublasLt.so.12, driver 575"),
    (["libcudart.so.13", "libcublasLt.so.13"], "570.10", False, "an NVIDIA driver >= 580"),
    ([], None, False, "libcudart.so.(none)"),
])
def test_the_host_check_says_in_one_line_what_the_kit_needs_and_what_it_found(tmp_path, libs, driver, ok, says):
    for name in libs:
        (tmp_path / name).write_bytes(b"")
    proc = f"NVRM version: NVIDIA UNIX x86_64 Kernel Module  {driver}  Tue Jul  1 2025\n" if driver else ""
    got, line = host.verdict(host.cuda_majors([str(tmp_path)]), host.driver_version(proc) if driver else None)
    assert got is ok and says in line and "\n" not in line
    assert "the kit needs CUDA 13 libraries" in line


def test_the_bench_names_a_server_that_did_not_start_from_its_log(tmp_path):
    """Issue 29, item 5: the server's stderr is kept, and its last line is the failure the bench reports."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.serve_bench import start_server
    from hmlstm.serving.model import DEFAULT_MODEL

    log = tmp_path / "server.log"
    with pytest.raises(RuntimeError) as e:
        start_server(DEFAULT_MODEL, ["--max-batch", "-1"], log=log)
    assert "server exited with status 2" in str(e.value) and "--max-batch must be 0" in str(e.value)
    assert "--max-batch must be 0" in log.read_text()
