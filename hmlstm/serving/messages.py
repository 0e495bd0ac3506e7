"""Plain conversions between the serving core's results and protobuf messages."""

from __future__ import annotations

import json
import os

from hmlstm.serving.model import LoadedModel
from hmlstm.serving.stream import ChunkResult
from hmlstm.v1 import segmenter_pb2 as pb


def _fill(out, boundaries: dict[int, list[int]], segments) -> None:
    """Add boundaries (by layer) and segments to a response's repeated fields.

    add() on the repeated fields is about 1.6x as fast as constructing each sub-message and passing
    lists (measured), and this runs for every chunk of every stream."""
    add = out.boundaries.add
    for layer in sorted(boundaries):
        offsets = boundaries[layer]
        if offsets:
            add(layer=layer, offsets=offsets)
        else:  # fewer arguments, the same message (the usual case for upper layers)
            add(layer=layer)
    add = out.segments.add
    for layer, start, end, text, final in segments:
        if final:
            add(layer=layer, start=start, end=end, text=text, final=True)
        else:  # an open segment: no text, not final (proto3 defaults)
            add(layer=layer, start=start, end=end)


def response_pb(r: ChunkResult, durable: bool = False) -> pb.SegmentResponse:
    out = pb.SegmentResponse(chunk_offset=r.chunk_offset, processed_chars=r.processed_chars,
                             decided_chars=r.decided_chars)
    # Set only what is not the default (proto3 sends no default value anyway): most are, for most chunks.
    if r.duplicate:
        out.duplicate = True
    if r.unknown_chars:
        out.unknown_chars = r.unknown_chars
    if r.final:
        out.final = True
    if durable:
        out.durable = True
    _fill(out, r.boundaries, r.segments)
    if r.next_chars:
        add = out.next_chars.add
        for c, p in r.next_chars:
            add(char=c, probability=p)
    return out


# The most a SegmentTextResponse can need per character and reported layer: a one-character Segment
# (layer, start, end < 2^28, up to 4 bytes of UTF-8, final, and its tag and length: 22 bytes) and one
# boundary offset (a varint of up to 4 bytes).
WORST_BYTES_PER_CHAR_AND_LAYER = 26


def max_unary_chars(max_message_bytes: int, layers: int) -> int:
    """The longest text whose whole answer fits in one message, whatever the model does with it."""
    return max(1, (max_message_bytes - 4096) // (WORST_BYTES_PER_CHAR_AND_LAYER * max(1, layers)))


def text_response_pb(results: list[ChunkResult], chars: int) -> pb.SegmentTextResponse:
    """The whole-text answer: the chunk result and the final flush, folded together."""
    boundaries: dict[int, list[int]] = {}
    segments = []
    for r in results:
        for l, offs in r.boundaries.items():
            boundaries.setdefault(l, []).extend(offs)
        segments.extend(s for s in r.segments if s.final)
    segments.sort(key=lambda s: (s.layer, s.start))
    out = pb.SegmentTextResponse(unknown_chars=sum(r.unknown_chars for r in results), chars=chars)
    _fill(out, boundaries, segments)
    return out


def model_info_pb(model: LoadedModel, max_chunk_chars: int, max_text_chars: int, worker: int = 0) -> pb.ModelInfo:
    return pb.ModelInfo(
        format="hmlstm-stream/1", num_layers=model.num_layers, units=model.units, vocab_size=len(model.vocab),
        top_boundary=bool(model.config.get("top_boundary")), boundary_layers=model.boundary_layers,
        providers=list(model.runtime.providers), model_path=str(model.path),
        model_config_json=json.dumps(model.config), provenance_json=json.dumps(model.provenance),
        max_chunk_chars=max_chunk_chars, max_text_chars=max_text_chars,
        trained_without=model.provenance.get("strip_delimiters") or "",
        boundary_alignment=[model.alignment[l] for l in model.boundary_layers],
        worker=worker, worker_pid=os.getpid(), lookahead_chars=model.lookahead,
    )
