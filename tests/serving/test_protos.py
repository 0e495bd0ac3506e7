"""Committed stubs equal what grpcio-tools generates from the .proto now."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ("segmenter_pb2.py", "segmenter_pb2_grpc.py", "segmenter_pb2.pyi")


def test_generated_stubs_match_the_proto(tmp_path):
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'protos'}", f"--python_out={tmp_path}",
                    f"--grpc_python_out={tmp_path}", f"--pyi_out={tmp_path}", "hmlstm/v1/segmenter.proto"],
                   check=True, cwd=ROOT)
    for name in GENERATED:
        fresh = (tmp_path / "hmlstm" / "v1" / name).read_text()
        committed = (ROOT / "hmlstm" / "v1" / name).read_text()
        assert fresh == committed, f"hmlstm/v1/{name} is stale: run `make protos`"


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
