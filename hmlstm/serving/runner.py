"""Running a stream's characters through the model, off the event loop.

``process_chunk`` is the one place that turns a chunk's new text into a
``ChunkResult``: it cuts long text into pieces of at most ``piece_chars``
(bounding the logits held in memory), runs each through the model with the
stream's state, and merges what the pieces report. The blocking variant
serves ``hmlstm segment --local``; the async one the server.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np

from hmlstm import spec
from hmlstm.serving.batch import Row, read_rows
from hmlstm.serving.device_state import Binder, host_state, reusable
from hmlstm.serving.model import LoadedModel
from hmlstm.serving.stream import ChunkResult, StreamState


def _pieces(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def _merge(results: list[ChunkResult], chunk_offset: int) -> ChunkResult:
    if len(results) == 1:  # one piece (the usual case): already in order
        return results[0]
    last = results[-1]
    merged = ChunkResult(chunk_offset, last.processed_chars, next_chars=last.next_chars,
                         decided_chars=last.decided_chars)
    for r in results:
        for layer, offs in r.boundaries.items():
            merged.boundaries.setdefault(layer, []).extend(offs)
        merged.segments.extend(s for s in r.segments if s.final)
        merged.unknown_chars += r.unknown_chars
    merged.segments.sort(key=lambda s: (s.layer, s.start))
    merged.segments.extend(s for s in last.segments if not s.final)
    return merged


def _padding(steps: int) -> np.ndarray:
    """The look-ahead's padding steps at a stream's end (StreamState.finish), as ids [1, steps]."""
    return np.full((1, steps), spec.LOOKAHEAD_PAD_ID, np.int32)


class Piece(NamedTuple):
    """One piece of a stream through the model: what the call needs, read from the stream when it is made
    (on the event loop; a resume may rewind the stream while the call runs)."""
    tokens: np.ndarray | None  # [1, T]; None: text left for a batch to encode with the rest
    steps: int  # T
    state: Mapping  # input name -> [1, ...] (a dict, or a batch.StateRow)
    base: int  # the stream offset step 0 speaks of
    top_k: int
    unknown: int  # characters the vocabulary lacks

    @classmethod
    def of(cls, model: LoadedModel, st: StreamState, piece: str | None, encode: bool = True) -> Piece:
        """``piece`` of the stream's text, or None: its end's padding steps. ``encode=False``: the text is
        left for the caller to encode (tokens None, unknown 0)."""
        base = st.processed - model.lookahead
        if piece is None:
            return cls(_padding(st.padding), st.padding, st.state, base, 0, 0)
        ids, unknown = model.vocab.encode_counting(piece) if encode else (None, 0)
        return cls(None if ids is None else ids[None, :], len(piece), st.state, base, st.top_k, unknown)

    def run(self, model: LoadedModel, binder: Binder | None = None) -> tuple[Row, int]:
        """(the stream's row, unknown characters). With ``binder``, the state stays on the device."""
        lengths = np.array([self.steps], np.int32)
        if binder is None:
            outputs, states = model.run(self.tokens, lengths, self.state), None
        else:
            hit = reusable([self.state])
            outputs, bound = binder.run(self.tokens, lengths, hit[0] if hit else host_state(self.state))
            states = binder.states(bound)
        return read_rows(outputs, lengths, [self.base], [self.top_k], model.vocab.chars, model.state_map,
                         states)[0], self.unknown


def finish_sync(model: LoadedModel, st: StreamState) -> ChunkResult:
    return st.finish(Piece.of(model, st, None).run(model)[0] if st.padding else None)


def process_chunk_sync(model: LoadedModel, st: StreamState, chunk_offset: int, new_text: str,
                       piece_chars: int) -> ChunkResult:
    results = []
    for piece in _pieces(new_text, piece_chars):
        row, unknown = Piece.of(model, st, piece).run(model)
        results.append(st.apply(chunk_offset, piece, unknown, row))
    st.checkpoint(new_text)
    return _merge(results, chunk_offset)


class Runner:
    """Runs the model in a thread pool so the event loop never blocks on ONNX Runtime."""

    def __init__(self, model: LoadedModel, workers: int = 4, io_binding: bool = False, metrics=None):
        self.model = model
        self.metrics = metrics  # counts the characters run
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ort")
        self.binder = Binder(model) if io_binding else None  # state stays on the device (device_state.py)

    async def _row(self, st: StreamState, piece: str | None) -> tuple[Row, int]:
        """The stream's row for ``piece`` (None: its end's padding steps), and its unknown characters."""
        prepared = Piece.of(self.model, st, piece)
        out = await asyncio.get_running_loop().run_in_executor(self.pool, prepared.run, self.model, self.binder)
        if self.metrics is not None and piece:
            self.metrics.chars.inc(len(piece))
        return out

    async def process_chunk(self, st: StreamState, chunk_offset: int, new_text: str,
                            piece_chars: int) -> ChunkResult:
        results = []
        for piece in (new_text,) if len(new_text) <= piece_chars else _pieces(new_text, piece_chars):
            row, unknown = await self._row(st, piece)
            results.append(st.apply(chunk_offset, piece, unknown, row))
        st.checkpoint(new_text)
        return _merge(results, chunk_offset)

    async def finish(self, st: StreamState) -> ChunkResult:
        """The stream's final result, after deciding what its look-ahead left undecided."""
        return st.finish((await self._row(st, None))[0] if st.padding else None)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
