"""The GPU host's CUDA libraries, found where the host keeps them: stub libraries in the NVIDIA pip packages'
layout (site-packages/nvidia/cu13/lib, nvidia/cudnn/lib), and a provider-like library that names them by
soname with no RUNPATH, as libonnxruntime_providers_cuda.so does. It loads only after ``preload_nvidia``."""

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# soname -> the folder the NVIDIA wheels for CUDA 13 and cuDNN 9 put it in
STUBS = {"libcudart.so.13": "cu13", "libcublasLt.so.13": "cu13", "libcublas.so.13": "cu13",
         "libcurand.so.10": "cu13", "libcudnn.so.9": "cudnn"}


def _cc(*args):
    subprocess.run(["gcc", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def host_layout(tmp_path_factory):
    if shutil.which("gcc") is None:
        pytest.fail("gcc is needed to build the stub libraries (the README's set-up installs it with Python)")
    root = tmp_path_factory.mktemp("host")
    site = root / "site-packages"
    for i, (soname, folder) in enumerate(STUBS.items(), start=1):
        lib = site / "nvidia" / folder / "lib"
        lib.mkdir(parents=True, exist_ok=True)
        src = root / f"{soname}.c"
        src.write_text(f"int stub_{soname.split('.')[0][3:]}(void) {{ return {i}; }}\n")
        # libcublas needs libcublasLt beside it, as the real one does (RUNPATH $ORIGIN, like NVIDIA's)
        extra = ["-L", str(lib), "-l:libcublasLt.so.13", "-Wl,-rpath,$ORIGIN"] if soname == "libcublas.so.13" else []
        _cc("-shared", "-fPIC", "-o", str(lib / soname), f"-Wl,-soname,{soname}", str(src), *extra)
    provider = root / "ort" / "libfake_providers_cuda.so"
    provider.parent.mkdir()
    src = root / "provider.c"
    calls = " + ".join(f"stub_{s.split('.')[0][3:]}()" for s in STUBS)
    src.write_text("".join(f"int stub_{s.split('.')[0][3:]}(void);\n" for s in STUBS)
                   + f"int probe(void) {{ return {calls}; }}\n")
    links = [f"-L{site / 'nvidia' / f / 'lib'}" for f in sorted(set(STUBS.values()))]
    _cc("-shared", "-fPIC", "-o", str(provider), str(src), *links, *(f"-l:{s}" for s in STUBS))
    return site, provider


def _load(site: Path, provider: Path, preload: bool) -> subprocess.CompletedProcess:
    code = textwrap.dedent(f"""
        import ctypes, sys
        sys.path.append({str(site)!r})  # the host interpreter's site-packages, after the kit's own folder
        from hmlstm.runtime import nvidia_library_dirs, preload_nvidia
        print("dirs", len(nvidia_library_dirs()))
        if {preload}:
            for line in preload_nvidia():
                print(line)
        print("probe", ctypes.CDLL({str(provider)!r}).probe())
    """)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})


def test_the_providers_cuda_libraries_load_from_the_hosts_site_packages_only_after_the_preload(host_layout):
    site, provider = host_layout
    without = _load(site, provider, preload=False)
    assert without.returncode != 0 and "cannot open shared object file" in without.stderr, without.stderr
    with_preload = _load(site, provider, preload=True)
    assert with_preload.returncode == 0, with_preload.stderr
    out = with_preload.stdout.splitlines()
    assert "dirs 2" in out and f"probe {sum(range(1, len(STUBS) + 1))}" in out
    loaded = [line for line in out if line.startswith("loaded ")]
    assert sorted(Path(line.split()[1]).name for line in loaded) == sorted(STUBS)
    assert not any(line.startswith("not loaded") for line in out)


def test_a_library_that_cannot_load_is_named_with_its_reason(tmp_path):
    from hmlstm.runtime import preload_nvidia

    lib = tmp_path / "nvidia" / "cu13" / "lib"
    lib.mkdir(parents=True)
    (lib / "libcublas.so.13").write_bytes(b"not an ELF file")
    (lib / "README.txt").write_text("not a library")
    lines = preload_nvidia([str(tmp_path)])
    assert len(lines) == 1 and lines[0].startswith(f"not loaded {lib / 'libcublas.so.13'}: ")
