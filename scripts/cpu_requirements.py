"""The server's dependencies from pyproject.toml with ONNX Runtime's CPU wheel on every platform.

    python scripts/cpu_requirements.py requirements.txt

The core install takes onnxruntime-gpu on Linux x86_64 (about 256 MB); the CPU image installs these
requirements and then the package with --no-deps, so the GPU wheel is never downloaded.
"""

import re
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def cpu_requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    out = []
    for dep in deps:
        name = re.match(r"[A-Za-z0-9._-]+", dep).group(0).lower()
        if name == "onnxruntime-gpu":
            continue
        out.append(dep.split(";")[0].strip() if name == "onnxruntime" else dep)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__.strip().splitlines()[2].strip())
    Path(sys.argv[1]).write_text("\n".join(cpu_requirements()) + "\n")
