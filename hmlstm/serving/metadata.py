"""An exported model's metadata (ONNX ``ModelProto.metadata_props``), read without a session.

Which engine a file holds, and whether a companion file is the same model, decide which graph to open:
read here from the file's bytes, so that ``load_model`` opens one ONNX Runtime session, not two (on CUDA a
session costs seconds; on TensorRT it includes an engine build). The server does not depend on the ``onnx``
package, so this reads the protobuf wire format of the one field it needs.
"""

from __future__ import annotations

from pathlib import Path

METADATA_PROPS = 14  # ModelProto.metadata_props: repeated StringStringEntryProto {key = 1; value = 2}


def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise ValueError("truncated or malformed varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7


def _fields(buf: memoryview):
    """(field number, wire type, value) of each top-level field; length-delimited values as memoryviews."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i : i + 8], i + 8
        elif wire == 2:
            n, i = _varint(buf, i)
            if i + n > len(buf):
                raise ValueError("truncated field")
            value, i = buf[i : i + n], i + n
        elif wire == 5:
            value, i = buf[i : i + 4], i + 4
        else:
            raise ValueError(f"wire type {wire} is not a protobuf of this kind")
        yield field, wire, value


def read_metadata(path: str | Path) -> dict[str, str]:
    """The model's metadata_props as a dict; ValueError if the file is not an ONNX model this can read."""
    data = memoryview(Path(path).read_bytes())
    meta = {}
    for field, wire, value in _fields(data):
        if field == METADATA_PROPS and wire == 2:
            entry = {f: bytes(v).decode("utf-8") for f, w, v in _fields(value) if w == 2}
            meta[entry.get(1, "")] = entry.get(2, "")
    return meta
