"""The saver's rules on a real SQLite store whose writes the test can hold (saver.py)."""

import asyncio
import threading

from hmlstm.serving.metrics import Metrics
from hmlstm.serving.runner import process_chunk_sync
from hmlstm.serving.saver import Saver
from hmlstm.serving.store import SQLiteStore, decode_record
from hmlstm.serving.stream import StreamState


class GatedStore(SQLiteStore):
    """SQLite, but each save waits until the test opens the gate; it records what it wrote."""

    def __init__(self, path):
        super().__init__(path)
        self.gate = threading.Event()
        self.writes: list[tuple[str, int]] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self._lock = threading.Lock()

    def save(self, stream_id, record, ttl_s):
        with self._lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        self.gate.wait(30)
        super().save(stream_id, record, ttl_s)
        with self._lock:
            self.in_flight -= 1
            self.writes.append((stream_id, end(record)))


def end(record) -> int:
    """The offset a record reaches: its base snapshot plus the chunks after it."""
    r = decode_record(record)
    return r["processed"] + sum(len(t) for _, t in r["texts"])


def stream(model, sid):
    return StreamState(model.zero_state(1), model.boundary_layers, 0, sid)


def step(model, st, text):
    process_chunk_sync(model, st, st.processed, text, 4096)


def test_saves_coalesce_to_the_latest_state_and_run_concurrently_across_streams(tiny_model, tmp_path):
    store = GatedStore(tmp_path / "s.db")

    async def run():
        saver = Saver(store, 60, 0.05, Metrics(), depth=8, down_after=10)
        a, b = stream(tiny_model, "a"), stream(tiny_model, "b")
        results = []
        for text in ("abc ", "def ", "ghi ", "jkl "):  # a's first write is held; three more chunks meanwhile
            step(tiny_model, a, text)
            results.append(await saver.save(a))
        step(tiny_model, b, "xyz ")
        results.append(await saver.save(b))
        await asyncio.to_thread(lambda: _wait(lambda: store.in_flight == 2))  # a's and b's writes at once
        assert not any(results)  # each response waited 0.05 s, then said not durable
        assert saver.unsaved == 2 and not saver.durable(a)
        store.gate.set()
        await asyncio.to_thread(lambda: _wait(lambda: saver.unsaved == 0))
        assert saver.durable(a) and saver.durable(b)
        await saver.close()

    asyncio.run(run())
    # a was written twice: the state it had when its first write began, then only its latest (16)
    assert sorted(w for w in store.writes if w[0] == "a") == [("a", 4), ("a", 16)]
    assert store.most_in_flight == 2
    assert end(store.load("a")) == 16


def test_a_finished_stream_is_deleted_after_its_last_write(tiny_model, tmp_path):
    store = GatedStore(tmp_path / "s.db")

    async def run():
        saver = Saver(store, 60, 0.05, Metrics(), depth=8)
        a = stream(tiny_model, "a")
        step(tiny_model, a, "abc ")
        await saver.save(a)  # held at the gate
        saver.finished("a")  # the delete must not overtake the write still under way
        store.gate.set()
        await asyncio.to_thread(lambda: _wait(lambda: not saver._writers))
        await saver.close()

    asyncio.run(run())
    assert store.writes == [("a", 4)] and store.load("a") is None


def _wait(condition, timeout=60.0):
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)
