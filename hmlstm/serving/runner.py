"""Running a stream's characters through the model, off the event loop.

``process_chunk`` is the one place that turns a chunk's new text into a
``ChunkResult``: it cuts long text into pieces of at most ``piece_chars``
(bounding the logits held in memory), runs each through the model with the
stream's state, and merges what the pieces report. The blocking variant
serves ``hmlstm segment --local``; the async one the server.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from hmlstm import spec
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


def _inputs(model: LoadedModel, piece: str):
    ids, unknown = model.vocab.encode_counting(piece)
    return ids[None, :], np.array([len(piece)], np.int32), unknown


def _padding(steps: int):
    """The look-ahead's padding steps at a stream's end (StreamState.finish)."""
    return np.full((1, steps), spec.LOOKAHEAD_PAD_ID, np.int32), np.array([steps], np.int32)


def finish_sync(model: LoadedModel, st: StreamState) -> ChunkResult:
    return st.finish(model.run(*_padding(st.padding), st.state) if st.padding else None)


def process_chunk_sync(model: LoadedModel, st: StreamState, chunk_offset: int, new_text: str,
                       piece_chars: int) -> ChunkResult:
    results = []
    for piece in _pieces(new_text, piece_chars):
        tokens, lengths, unknown = _inputs(model, piece)
        outputs = model.run(tokens, lengths, st.state)
        results.append(st.apply(chunk_offset, piece, unknown, outputs, model.state_map, model.vocab.chars))
    st.checkpoint(new_text)
    return _merge(results, chunk_offset)


class Runner:
    """Runs the model in a thread pool so the event loop never blocks on ONNX Runtime."""

    def __init__(self, model: LoadedModel, workers: int = 4, io_binding: bool = False):
        self.model = model
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ort")
        self.binder = Binder(model) if io_binding else None  # state stays on the device (device_state.py)

    async def run(self, tokens: np.ndarray, lengths: np.ndarray, state: dict[str, np.ndarray]):
        loop = asyncio.get_running_loop()
        fn = self.model.run if self.binder is None else self._run_bound
        return await loop.run_in_executor(self.pool, fn, tokens, lengths, state)

    def _run_bound(self, tokens: np.ndarray, lengths: np.ndarray, state: dict) -> dict:
        hit = reusable([state])
        host, bound = self.binder.run(tokens, lengths, hit[0] if hit else host_state(state))
        return self.binder.rows(host, bound, lengths)[0]

    async def run_text(self, piece: str, state: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
        """One piece of a stream's text through the model: (outputs, characters the vocabulary lacks)."""
        tokens, lengths, unknown = _inputs(self.model, piece)
        return await self.run(tokens, lengths, state), unknown

    async def process_chunk(self, st: StreamState, chunk_offset: int, new_text: str,
                            piece_chars: int) -> ChunkResult:
        results = []
        for piece in (new_text,) if len(new_text) <= piece_chars else _pieces(new_text, piece_chars):
            outputs, unknown = await self.run_text(piece, st.state)
            results.append(st.apply(chunk_offset, piece, unknown, outputs, self.model.state_map,
                                    self.model.vocab.chars))
        st.checkpoint(new_text)
        return _merge(results, chunk_offset)

    async def finish(self, st: StreamState) -> ChunkResult:
        """The stream's final result, after deciding what its look-ahead left undecided."""
        return st.finish(await self.run(*_padding(st.padding), st.state) if st.padding else None)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
