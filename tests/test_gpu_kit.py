"""The offline GPU kit and check, end to end on this CPU machine, so that a GPU run never dies on packaging."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import missing

ROOT = Path(__file__).resolve().parents[1]


def _bare_python(tmp_path: Path) -> tuple[str, str]:
    """(version, interpreter): a new venv of Python 3.12 (the GPU host's; pyenv has 3.12.1 here), else of this
    Python, with nothing installed but pip, so that the check can only use what the kit brings."""
    candidates = [Path.home() / ".pyenv" / "versions" / "3.12.1" / "bin" / "python3.12", shutil.which("python3.12")]
    base = next((str(c) for c in candidates if c and Path(c).exists()), sys.executable)
    version = subprocess.run([base, "-c", "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')"],
                             capture_output=True, text=True, check=True).stdout.strip()
    subprocess.run([base, "-m", "venv", str(tmp_path / "bare")], check=True, capture_output=True, timeout=300)
    return version, str(tmp_path / "bare" / "bin" / "python")


@pytest.mark.slow
def test_a_kit_built_here_installs_without_an_index_and_the_check_runs_in_cpu_mode(tmp_path):
    kit, out = tmp_path / "kit", tmp_path / "out"
    version, bare = _bare_python(tmp_path)
    gone = subprocess.run([bare, "-c", "import numpy"], capture_output=True)
    assert gone.returncode != 0  # the bare interpreter has nothing the kit must bring
    build_env = {**os.environ, "HMLSTM_KIT_PART_MB": "5", "PYTHON": sys.executable}  # small parts: reassembly runs
    env = {**os.environ, "PYTHON": bare}
    env.pop("VIRTUAL_ENV", None)
    built = subprocess.run(["bash", "scripts/gpu_kit.sh", str(kit), "--python", version, "--cpu"], cwd=ROOT,
                           env=build_env, capture_output=True, text=True, timeout=600)
    if built.returncode != 0 and "Could not find" in built.stderr:
        missing(f"the package index is unreachable: {built.stderr.strip().splitlines()[-1][:200]}")
    assert built.returncode == 0, built.stderr
    manifest = (kit / "MANIFEST").read_text().splitlines()
    files = [ln.split()[2] for ln in manifest if ln.startswith("file ")]
    assert any(f.startswith("onnxruntime-") for f in files) and any(f.startswith("hmlstm-") for f in files)
    assert any(".part-01" in ln for ln in manifest)  # something was split, so reassembly is exercised
    assert all((kit / ln.split()[2]).stat().st_size <= 5_000_000 for ln in manifest if ln.startswith("part "))
    check = subprocess.run(["bash", "scripts/gpu_check.sh", str(kit), str(out), "--cpu"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)
    assert check.returncode == 0, check.stdout + check.stderr
    report = (out / "gpu-report.md").read_text()
    assert report.startswith("All steps run so far passed.")
    assert "kit verified" in report and "step tests: exit 0" in report and "step bench: exit 0" in report
    assert f"Python {version}" in report and "numpy 2.4" in report  # the bare interpreter, the kit's numpy
    for engine in ("dense", "sparse"):  # the bench measures both engines on the device
        assert f"| ONNX Runtime direct, {engine} | | 64 | 16 |" in report
    assert "| faster engine on cpu: **" in report and "| server, --device cpu --engine " in report
    # One step per invocation, on the kit installed by an earlier one; a step that fails exits 1 and the
    # report's first line names it with its error.
    again = subprocess.run(["bash", "scripts/gpu_check.sh", str(kit), str(out), "--cpu", "--step", "tests"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    broken = subprocess.run(["bash", "scripts/gpu_check.sh", str(kit), str(out), "--cpu", "--step", "tests"],
                            cwd=ROOT, env={**env, "PYTHON": "false"}, capture_output=True, text=True,
                            timeout=300)  # an interpreter that fails: the tests step fails
    first = (out / "gpu-report.md").read_text().splitlines()[0]
    assert broken.returncode == 1 and first.startswith("FAILED step tests: exit "), (broken.stdout, first)
    # A corrupted part is caught before anything is installed.
    part = next(kit.glob("*.part-00"))
    part.write_bytes(b"x" + part.read_bytes()[1:])
    bad = subprocess.run(["bash", "scripts/gpu_check.sh", str(kit), str(tmp_path / "bad")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "does not match MANIFEST" in bad.stdout
