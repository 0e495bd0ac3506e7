"""Cross-stream batching: many streams' pending pieces run as one ONNX Runtime call.

One stream at a time, each HM-LSTM step is a matrix-vector product bound by
memory and per-call overhead; many streams in one call make it a
matrix-matrix product. The scheduler keeps a FIFO queue of pending pieces.
When the model is free it takes up to ``max_batch`` of the oldest. It waits
for more to arrive only while some attached stream has nothing queued, and
never longer than the larger of ``max_wait_us`` from the oldest piece's
arrival and ``max_wait_fraction`` of the previous call's duration from the
moment the model became free. A lone stream pays no wait. The second bound
is what keeps closed-loop clients in one batch: while a call runs, the streams
it serves cannot send, so the others queue alone; without it, under load the
streams split into cohorts that alternate, each paying the per-step cost of
the loop for half a batch (measured at 64 streams of 16-character chunks:
batches of 31 with no such wait, 32-52 with a quarter of a call, 63 with half,
the default). It costs a stream at most that fraction of a call in latency. It runs them in
one call with the exported ``lengths``
input (rows may differ in length; each advances only its own), and hands each
stream its own row. The per-batch path, in the scheduler's thread:

    pieces -> one text lookup -> gathered state -> one model call
           -> every row's boundaries, top-k and next state (batch.read_rows)
           -> each stream's future

and per message, on the event loop: the stream's tracker takes its row's
boundaries and the handler builds and sends the response. The metrics are
observed per batch (a histogram that takes arrays, metrics.BatchHistogram).

- Order per stream: a stream awaits its piece before it sends the next, so it
  never has two in the queue.
- No starvation: the queue is FIFO and a batch takes the oldest pieces.
- Same result as alone: row b of a batch computes exactly what row b alone
  would (the masking in the model's loop); only the matmul kernels differ, so
  floats agree to ~1e-7, not bit for bit.
- State inputs are gathered into buffers preallocated for ``max_batch`` rows
  and reused for every call, one take per input for the rows of one earlier
  call; next states are handed out as references to their rows, no copies.
- The scheduler wakes when the first piece arrives, when a batch is full and
  at its deadline, not at every piece.
- With ``io_binding`` (on by default with CUDA; see ``device_state.py``) the
  state outputs stay on the device, and a batch made of exactly the rows of
  one earlier call (any order) binds them straight back: rows are put in that
  call's order, which changes nothing for any stream.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from hmlstm.serving.batch import Row, gather, read_rows
from hmlstm.serving.device_state import reusable
from hmlstm.serving.model import LoadedModel
from hmlstm.serving.runner import Piece, Runner
from hmlstm.serving.stream import StreamState


@dataclass
class _Pending:
    piece: Piece  # what the call needs from the stream (its tokens unused where ``text`` is set)
    text: str | None  # the piece's text, encoded with the rest of its batch; None: ``piece.tokens`` (padding)
    future: asyncio.Future
    arrived: float


class BatchingRunner(Runner):
    def __init__(self, model: LoadedModel, max_batch: int, max_wait_us: int, metrics=None, *, attached=None,
                 io_binding: bool = False, max_wait_fraction: float = 0.5):
        if max_batch < 1 or max_wait_us < 0 or not 0 <= max_wait_fraction <= 1:
            raise ValueError("max_batch must be >= 1, max_wait_us >= 0 and max_wait_fraction in [0, 1]")
        super().__init__(model, 1, io_binding, metrics)  # one thread: the scheduler awaits each call before the next
        self.max_batch = max_batch
        self.max_wait = max_wait_us / 1e6
        self.max_wait_fraction = max_wait_fraction
        self._last_call_s = 0.0
        self.attached = attached or (lambda: max_batch)  # streams that may send a piece soon
        self._queue: deque[_Pending] = deque()
        self._arrival: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._buffers = {name: np.zeros((max_batch, *arr.shape[1:]), arr.dtype)
                         for name, arr in model.zero_state(1).items()}
        self.batches = 0  # pieces made, for tests and reports
        self.rows = 0

    async def _row(self, st: StreamState, piece: str | None) -> tuple[Row, int]:
        """The stream's row from the next batch (its text encoded with the batch's)."""
        if self._task is None or self._task.done():
            self._arrival = asyncio.Event()
            self._task = asyncio.create_task(self._schedule())
        fut = asyncio.get_running_loop().create_future()
        queue = self._queue
        queue.append(_Pending(Piece.of(self.model, st, piece, encode=False), piece, fut, time.perf_counter()))
        if len(queue) == 1 or len(queue) >= min(self.max_batch, self.attached()):
            self._arrival.set()  # the scheduler waits for a first piece or a full batch, not for every piece
        return await fut

    async def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._arrival.clear()
                await self._arrival.wait()
            deadline = max(self._queue[0].arrived + self.max_wait,
                           time.perf_counter() + self.max_wait_fraction * self._last_call_s)
            while len(self._queue) < min(self.max_batch, self.attached()):
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._arrival.clear()
                timer = loop.call_later(remaining, self._arrival.set)  # (wait_for would make a task per wait)
                await self._arrival.wait()
                timer.cancel()
            batch = [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]
            batch = [p for p in batch if not p.future.cancelled()]
            if not batch:
                continue
            now = time.perf_counter()
            if self.metrics is not None:
                self.metrics.batch_size.observe(len(batch))
                self.metrics.queue_wait.observe_many(now - np.fromiter((p.arrived for p in batch), float, len(batch)))
            try:
                rows = await loop.run_in_executor(self.pool, self._run_batch, batch)
                self._last_call_s = time.perf_counter() - now
            except Exception as e:  # hand the failure to every caller; keep scheduling
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(e)
                continue
            for p, out in zip(batch, rows):
                if not p.future.done():
                    p.future.set_result(out)

    def _run_batch(self, batch: list[_Pending]) -> list[tuple[Row, int]]:
        """Run the pieces as one call; returns each piece's (row, unknown characters), in the order given."""
        hit = reusable([p.piece.state for p in batch]) if self.binder is not None else None
        order = np.argsort(hit[1]).tolist() if hit else list(range(len(batch)))  # the bound call's row order
        pieces, texts = [batch[i].piece for i in order], [batch[i].text for i in order]
        tokens, lengths, unknown = self._tokens(pieces, texts)
        outputs, states = self._call(tokens, lengths, pieces, hit)
        rows = read_rows(outputs, lengths, [p.base for p in pieces], [p.top_k for p in pieces],
                         self.model.vocab.chars, self.model.state_map, states)
        self.batches += 1
        self.rows += len(batch)
        if self.metrics is not None:
            self.metrics.chars.inc(sum(len(t) for t in texts if t))
        result: list = [None] * len(batch)
        for pos, i in enumerate(order):
            result[i] = (rows[pos], unknown[pos])
        return result

    def _tokens(self, pieces: list[Piece], texts: list[str | None]) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """The batch's tokens [B, T] (rows padded past their lengths), lengths [B], and unknown characters per
        row: every text piece encoded with one lookup."""
        b = len(pieces)
        lengths = np.fromiter((p.steps for p in pieces), np.int32, b)
        tokens = np.zeros((b, int(lengths.max())), np.int32)
        if None not in texts:  # text only (the usual batch): one lookup, one scatter
            ids, unknown = self.model.vocab.encode_rows(texts)
            tokens[np.arange(tokens.shape[1]) < lengths[:, None]] = ids
            return tokens, lengths, unknown.tolist()
        unknown = [0] * b
        for i, (p, text) in enumerate(zip(pieces, texts)):
            if text is None:  # the look-ahead's padding steps, as ids
                tokens[i, : lengths[i]] = p.tokens[0]
            else:
                tokens[i, : lengths[i]], unknown[i] = self.model.vocab.encode_counting(text)
        return tokens, lengths, unknown

    def _call(self, tokens: np.ndarray, lengths: np.ndarray, pieces: list[Piece], hit):
        """One model call from the rows' states, gathered into the reused buffers (or, where ``hit``, the earlier
        call's state still on the device); returns its outputs and, with IO binding, the rows' next states."""
        if hit:
            outputs, bound = self.binder.run(tokens, lengths, hit[0])
            return outputs, self.binder.states(bound)
        state = gather([p.state for p in pieces], self._buffers)
        if self.binder is None:
            return self.model.run(tokens, lengths, state), None
        outputs, bound = self.binder.run(tokens, lengths, state)
        return outputs, self.binder.states(bound)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        super().close()
