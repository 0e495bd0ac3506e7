"""Committed stubs equal what grpcio-tools generates from the .proto now."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ("segmenter_pb2.py", "segmenter_pb2_grpc.py", "segmenter_pb2.pyi")


def _generated_version(text: str) -> str:
    found = re.search(r"^GRPC_GENERATED_VERSION = '([0-9.]+)'$", text, re.M)
    assert found, "no GRPC_GENERATED_VERSION line in the gRPC stub"
    return found.group(1)


def _without_generated_version(text: str) -> str:
    return re.sub(r"^GRPC_GENERATED_VERSION = .*$", "GRPC_GENERATED_VERSION = ...", text, flags=re.M)


def test_generated_stubs_match_the_proto(tmp_path):
    # The gRPC stub records the grpcio-tools release that wrote it, and a new patch release of the tools
    # is not a change to the contract: that one line is checked by the next test instead.
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'protos'}", f"--python_out={tmp_path}",
                    f"--grpc_python_out={tmp_path}", f"--pyi_out={tmp_path}", "hmlstm/v1/segmenter.proto"],
                   check=True, cwd=ROOT)
    for name in GENERATED:
        fresh = _without_generated_version((tmp_path / "hmlstm" / "v1" / name).read_text())
        committed = _without_generated_version((ROOT / "hmlstm" / "v1" / name).read_text())
        assert fresh == committed, f"hmlstm/v1/{name} is stale: run `make protos`"


def test_the_stubs_import_with_every_grpcio_the_package_admits():
    # The stub refuses to import under a grpcio older than the tools that generated it: that release must
    # not be newer than the lowest grpcio pyproject.toml lets pip install.
    stub = _generated_version((ROOT / "hmlstm" / "v1" / "segmenter_pb2_grpc.py").read_text())
    (floor,) = re.findall(r'^\s*"grpcio>=([0-9.]+),', (ROOT / "pyproject.toml").read_text(), re.M)
    as_tuple = lambda v: tuple(int(x) for x in v.split("."))  # noqa: E731
    assert as_tuple(stub) <= as_tuple(floor), (
        f"hmlstm/v1/segmenter_pb2_grpc.py needs grpcio>={stub} but pyproject.toml admits grpcio>={floor}: "
        f"raise the floor there, or regenerate the stubs with grpcio-tools=={floor}")


def test_proto_path_matches_import_path():
    from hmlstm.v1 import segmenter_pb2
    assert segmenter_pb2.DESCRIPTOR.name == "hmlstm/v1/segmenter.proto"
    assert segmenter_pb2.DESCRIPTOR.package == "hmlstm.v1"


def test_every_rpc_and_field_is_documented():
    text = (ROOT / "protos" / "hmlstm" / "v1" / "segmenter.proto").read_text().splitlines()
    for i, line in enumerate(text):
        s = line.strip()
        if s.startswith("rpc "):
            assert text[i - 1].strip().startswith("//"), f"undocumented rpc: {s}"
        elif s.endswith(";") and "=" in s and not s.startswith(("//", "syntax", "package")):
            documented = "//" in s or text[i - 1].strip().startswith("//")
            assert documented, f"undocumented field: {s}"
