"""Saving streams to the state store without letting a slow or absent store hold responses up.

The server saves a stream that has an id after every chunk it processes. A response waits
for that save at most ``timeout_s`` (``--store-timeout``); ``SegmentResponse.durable`` then
tells the client whether the state it acknowledges is in the store, which is what a resume
on another replica can rely on.

- Saves coalesce per stream: while one is being written, newer chunks only mark the stream
  dirty, and the next write takes its latest state. Different streams' saves run at once
  (a small thread pool), so one slow write does not queue the others behind it.
- A store that refuses, or that times out ``down_after`` times in a row, is *down*: no save
  is attempted, every response says ``durable = false`` at once, reads fail at once, and a
  probe asks the store every ``probe_s`` until it answers.
- When it answers, every stream whose acknowledged state is not saved is saved, streams
  that began during the outage included, and the finished streams whose delete failed are
  deleted.
- A watch pings the store every ``probe_s`` while it is up, whether or not anything saves,
  so an idle server's health and ``hmlstm_state_store_up`` notice a store that went away;
  ``start`` pings it once first, so a server that starts with the store down says so at once.
- Every failed read or write counts in ``hmlstm_state_store_errors_total``; a write that
  only timed out counts there when it finally fails (a late success counts as a success).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

from hmlstm.serving.metrics import Metrics
from hmlstm.serving.store import StateStore, StoreUnavailable
from hmlstm.serving.stream import StreamState

log = logging.getLogger("hmlstm.serve")


class Saver:
    def __init__(self, store: StateStore, ttl_s: float, timeout_s: float, metrics: Metrics, depth: int,
                 on_status: Callable[[bool], Awaitable[None]] | None = None, threads: int = 8,
                 down_after: int = 3, probe_s: float = 1.0, io_timeout_s: float = 1.0):
        self.store, self.ttl_s, self.timeout_s = store, ttl_s, timeout_s
        self.io_timeout_s = io_timeout_s  # the longest a read, the probe or the writes at close may take
        self.metrics, self.depth, self.on_status = metrics, depth, on_status
        self.down_after, self.probe_s = down_after, probe_s
        self.up = True
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="state-store")
        self._probe_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="state-store-probe")
        self._dirty: dict[str, StreamState] = {}  # streams whose acknowledged state is not known to be saved
        self._version: dict[str, int] = {}  # bumped at every save asked for; a write clears dirty only if current
        self._saved: dict[str, int] = {}  # the processed offset of the state last written, per stream
        self._deletes: set[str] = set()  # finished streams still to be deleted from the store
        self._writers: dict[str, asyncio.Task] = {}
        self._waiters: dict[str, list[tuple[int, asyncio.Future]]] = {}
        self._timeouts = 0
        self._probe: asyncio.Task | None = None
        self._watch: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()

    # ------------------------------------------------------------------ what the server calls
    async def start(self) -> None:
        """Ask the store now (the state the server starts with is the measured one), then keep asking it
        every ``probe_s`` while it is up."""
        await self._ping_or_go_down()
        self._watch = asyncio.get_running_loop().create_task(self._watch_loop())

    async def _ping_or_go_down(self) -> None:
        try:
            await asyncio.wait_for(self._run(self._probe_pool, self.store.ping), self.io_timeout_s)
        except (StoreUnavailable, asyncio.TimeoutError) as e:
            self.metrics.store_errors.inc()
            self._go_down(str(e) or f"the store did not answer a ping within {self.io_timeout_s:g}s")

    async def _watch_loop(self) -> None:
        while True:
            await asyncio.sleep(self.probe_s)
            if self.up:  # while it is down, the probe (_probe_loop) asks it instead
                await self._ping_or_go_down()


    async def save(self, st: StreamState) -> bool:
        """Save the stream's state as it is now; True when it is in the store within the timeout."""
        sid, target = st.stream_id, st.processed
        self._dirty[sid] = st
        self._version[sid] = self._version.get(sid, 0) + 1
        self._deletes.discard(sid)
        self._gauge()
        if not self.up:
            return False
        future = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(sid, []).append((target, future))
        self._kick(sid)
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.timeout_s)
        except asyncio.TimeoutError:
            self._timeouts += 1
            if self._timeouts >= self.down_after and self.up:
                self._go_down(f"{self._timeouts} saves in a row took longer than --store-timeout "
                              f"{self.timeout_s:g}s")
            return False

    def durable(self, st: StreamState) -> bool:
        """Whether the state the stream acknowledges now is the one last written."""
        return st.stream_id not in self._dirty and self._saved.get(st.stream_id) == st.processed

    async def load(self, stream_id: str) -> bytes | None:
        """The stored record; StoreUnavailable, counted as a store error, if it cannot be read (at once
        while the store is down)."""
        try:
            if not self.up:
                raise StoreUnavailable(f"the state store is down; a probe asks it every {self.probe_s:g}s")
            try:
                return await asyncio.wait_for(self._run(self._pool, self.store.load, stream_id), self.io_timeout_s)
            except asyncio.TimeoutError:
                raise StoreUnavailable(f"the state store did not answer a read within {self.io_timeout_s:g}s") \
                    from None
            except StoreUnavailable as e:
                self._go_down(str(e))
                raise
        except StoreUnavailable:
            self.metrics.store_errors.inc()
            raise

    def finished(self, stream_id: str) -> None:
        """The stream ended: delete it from the store (now, or once the store is back)."""
        self._dirty.pop(stream_id, None)
        self._version.pop(stream_id, None)
        self._saved.pop(stream_id, None)
        self._deletes.add(stream_id)
        self._gauge()
        if self.up:
            self._kick(stream_id)

    @property
    def unsaved(self) -> int:
        return len(self._dirty)

    async def close(self) -> None:
        for task in (self._probe, self._watch):
            if task is not None:
                task.cancel()
        writers = [t for t in self._writers.values() if not t.done()]
        if writers:  # let the writes under way finish (bounded: a hung store times out)
            await asyncio.wait(writers, timeout=self.io_timeout_s)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._probe_pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ writing

    async def _run(self, pool, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    def _kick(self, sid: str) -> None:
        task = self._writers.get(sid)
        if task is None or task.done():
            self._writers[sid] = asyncio.create_task(self._write_loop(sid))

    async def _write_loop(self, sid: str) -> None:
        """One stream's writes, in order: its latest state while dirty, then its delete if finished."""
        try:
            while self.up:
                st = self._dirty.get(sid)
                if st is not None:
                    version, processed = self._version[sid], st.processed
                    record = st.record(self.depth)
                    await self._run(self._pool, self.store.save, sid, record, self.ttl_s)
                    self._timeouts = 0
                    if self._version.get(sid) == version:
                        self._dirty.pop(sid, None)
                    if sid in self._version:  # not finished meanwhile
                        self._saved[sid] = processed
                    self._resolve(sid, processed, True)
                elif sid in self._deletes:
                    await self._run(self._pool, self.store.delete, sid)
                    self._deletes.discard(sid)
                else:
                    break
        except StoreUnavailable as e:
            self.metrics.store_errors.inc()
            self._go_down(str(e))
        finally:
            self._resolve(sid, None, False)
            self._gauge()
            if self._writers.get(sid) is asyncio.current_task():
                del self._writers[sid]

    def _resolve(self, sid: str, processed: int | None, ok: bool) -> None:
        """Answer the responses waiting on this stream: those the write covered, or all of them on failure."""
        waiting = self._waiters.get(sid)
        if not waiting:
            return
        keep = []
        for target, future in waiting:
            if future.done():
                continue
            if processed is None or target <= processed:
                future.set_result(ok and processed is not None)
            else:
                keep.append((target, future))
        if keep:
            self._waiters[sid] = keep
        else:
            self._waiters.pop(sid, None)

    def _gauge(self) -> None:
        self.metrics.unsaved_streams.set(len(self._dirty))

    # ------------------------------------------------------------------ outage

    def _go_down(self, why: str) -> None:
        if not self.up:
            return
        self.up = False
        self.metrics.store_up.set(0)
        log.warning("state store unreachable, streams go on without durability until it answers: %s", why)
        for sid in list(self._waiters):
            self._resolve(sid, None, False)
        self._status(False)
        self._probe = asyncio.get_running_loop().create_task(self._probe_loop())

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(self.probe_s)
            try:
                await asyncio.wait_for(self._run(self._probe_pool, self.store.ping), self.io_timeout_s)
            except (StoreUnavailable, asyncio.TimeoutError):
                continue
            break
        self.up = True
        self._timeouts = 0
        self.metrics.store_up.set(1)
        todo = set(self._dirty) | self._deletes
        log.info("state store reachable again; saving %d stream(s) whose state it lacks", len(todo))
        self._status(True)
        for sid in todo:
            self._kick(sid)

    def _status(self, up: bool) -> None:
        if self.on_status is not None:
            task = asyncio.get_running_loop().create_task(self.on_status(up))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
