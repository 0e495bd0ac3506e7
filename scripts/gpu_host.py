"""Does this host have what the GPU kit needs? One line, before anything is installed (scripts/gpu_check.sh).

The kit's onnxruntime-gpu 1.31.1 is built for CUDA 13 (its provider library needs libcudart.so.13 and
libcublasLt.so.13) and so needs an NVIDIA driver of the 580 series or newer. Standard library only: it runs
under the host's bare Python before the kit is installed.

    python scripts/gpu_host.py [--cpu]     exit 0 if the host fits (always, with --cpu: a rehearsal)
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys

NEED_CUDA = 13
NEED_DRIVER = 580
LIBS = ("libcudart", "libcublasLt")


def library_dirs() -> list[str]:
    """Where CUDA libraries may be: the NVIDIA pip packages on sys.path, LD_LIBRARY_PATH, the loader's cache."""
    dirs = []
    for base in sys.path:
        dirs += glob.glob(os.path.join(base, "nvidia", "*", "lib")) + glob.glob(os.path.join(base, "nvidia", "lib"))
    dirs += [d for d in os.environ.get("LD_LIBRARY_PATH", "").split(":") if d]
    try:
        cache = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=10).stdout
        dirs += sorted({os.path.dirname(p) for p in re.findall(r"=> (\S*(?:libcudart|libcublasLt)\S*)", cache)})
    except (OSError, subprocess.SubprocessError):
        pass
    return list(dict.fromkeys(d for d in dirs if os.path.isdir(d)))


def cuda_majors(dirs: list[str]) -> dict[str, set[int]]:
    """Library name -> the major versions found (libcudart.so.13 -> 13)."""
    found: dict[str, set[int]] = {lib: set() for lib in LIBS}
    for d in dirs:
        for name in os.listdir(d):
            m = re.fullmatch(r"(libcudart|libcublasLt)\.so\.(\d+)(?:\.[\d.]+)?", name)
            if m:
                found[m.group(1)].add(int(m.group(2)))
    return found


def driver_version(proc_text: str | None = None) -> str | None:
    """The NVIDIA driver's version, from /proc/driver/nvidia/version or nvidia-smi; None where neither says."""
    if proc_text is None:
        try:
            with open("/proc/driver/nvidia/version") as f:
                proc_text = f.read()
        except OSError:
            proc_text = ""
    m = re.search(r"Kernel Module(?: for \S+)?\s+(\d+\.\d+(?:\.\d+)?)", proc_text)
    if m:
        return m.group(1)
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.split()
        return out[0] if out else None
    except (OSError, subprocess.SubprocessError):
        return None


def verdict(majors: dict[str, set[int]], driver: str | None) -> tuple[bool, str]:
    need = f"the kit needs CUDA {NEED_CUDA} libraries (libcudart.so.{NEED_CUDA}, libcublasLt.so.{NEED_CUDA}) and " \
           f"an NVIDIA driver >= {NEED_DRIVER}"
    seen = "; ".join(f"{lib}.so.{'/'.join(map(str, sorted(v))) or '(none)'}" for lib, v in majors.items())
    have = f"found {seen}, driver {driver or 'not visible'}"
    missing = [lib for lib, v in majors.items() if NEED_CUDA not in v]
    old = driver is not None and int(driver.split(".")[0]) < NEED_DRIVER
    if missing or old:
        return False, f"host check FAILED: {need}; {have}"
    return True, f"host check passed: {have} ({need})"


def main() -> int:
    ok, line = verdict(cuda_majors(library_dirs()), driver_version())
    print(line)
    return 0 if ok or "--cpu" in sys.argv[1:] else 1


if __name__ == "__main__":
    sys.exit(main())
