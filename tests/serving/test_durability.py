"""State that survives: a SIGKILLed server, a dead replica, a store that goes away."""

import asyncio
import functools
import shutil

import numpy as np
import pytest

from hmlstm.model.data import builtin_text
from hmlstm.serving.runner import process_chunk_sync
from hmlstm.serving.store import SQLiteStore, StoreUnavailable, decode_record, open_store
from hmlstm.serving.stream import StreamError, StreamState
from tests.conftest import missing
from tests.serving.durable import (
    RedisProcess,
    ServerProcess,
    fold,
    health,
    store_health,
    stream_until_broken,
    unary,
    wait_for,
)

TEXT = builtin_text()
def needs_redis(test):
    """redis-server must be here; under CI its absence fails the test (tests.conftest.missing)."""
    @functools.wraps(test)
    def run(*args, **kwargs):
        if shutil.which("redis-server") is None:
            missing("redis-server is not installed (make test installs it with apt-get)")
        return test(*args, **kwargs)
    return run


def texts(n, length=240):
    return [TEXT[5000 + 3001 * i : 5000 + 3001 * i + length] for i in range(n)]


def test_record_round_trip_rebuilds_the_exact_stream(tiny_model):
    st = StreamState(tiny_model.zero_state(1), tiny_model.boundary_layers, 2, "rt")
    text = "abcdefghij klmnop qrstu vwxyz " * 4
    for off in range(0, 100, 10):
        process_chunk_sync(tiny_model, st, off, text[off : off + 10], 4096)
    record = st.record(depth=3)
    r = decode_record(record)
    assert r["processed"] == 70 and [o for o, _ in r["texts"]] == [70, 80, 90]
    back = StreamState.from_record(record)
    for off, t in back.pending:
        process_chunk_sync(tiny_model, back, off, t, 4096)
    assert back.processed == st.processed == 100 and back.tracker.to_dict() == st.tracker.to_dict()
    for k in st.state:
        np.testing.assert_array_equal(back.state[k], st.state[k])
    back.rewind(80)  # the rebuilt history reaches back as far as the record did...
    assert back.processed == 80
    back.rewind(70)  # ...to its base snapshot itself...
    assert back.processed == 70 and back.tracker.to_dict() == decode_record(record)["tracker"].to_dict()
    with pytest.raises(StreamError, match=r"held: 70\.\.70"):  # ...and no further (the record holds nothing older)
        back.rewind(40)


def test_records_carry_format_1_and_another_format_is_refused(tiny_model):
    """Replicas of different versions share one store during a rolling upgrade: the record format is part of
    the contract, so a change to it must be deliberate (a new number, and a refusal of the old one)."""
    import json as json_

    st = StreamState(tiny_model.zero_state(1), tiny_model.boundary_layers, 0, "fmt")
    process_chunk_sync(tiny_model, st, 0, "abc", 4096)
    record = st.record(8)
    n = int.from_bytes(record[:4], "big")
    header = json_.loads(record[4 : 4 + n])
    assert header["format"] == 1
    header["format"] = 2
    head = json_.dumps(header).encode()
    with pytest.raises(ValueError, match="format 2, expected 1"):
        decode_record(len(head).to_bytes(4, "big") + head + record[4 + n :])


def test_a_record_of_a_short_stream_starts_at_its_beginning(tiny_model):
    """Fewer responses than the depth: the record's base is the stream's start, so a restored stream can still
    rewind to offset 0."""
    st = StreamState(tiny_model.zero_state(1), tiny_model.boundary_layers, 0, "short")
    for off in (0, 5):
        process_chunk_sync(tiny_model, st, off, "abcdefghij"[off : off + 5], 4096)
    r = decode_record(st.record(8))
    assert r["processed"] == 0 and r["texts"] == [(0, "abcde"), (5, "fghij")]
    back = StreamState.from_record(r)
    for off, text in back.pending:
        process_chunk_sync(tiny_model, back, off, text, 4096)
    back.rewind(0)
    assert back.processed == 0


def test_a_live_stream_rewinds_to_any_of_its_last_32_responses_and_no_further(tiny_model):
    def stream_of(n):
        st = StreamState(tiny_model.zero_state(1), tiny_model.boundary_layers, 0, "deep")
        for off in range(n):
            process_chunk_sync(tiny_model, st, off, "abcdefghij klmnopqrstuvwxyz "[off % 28], 4096)
        return st

    st = stream_of(40)
    st.rewind(40 - 31)  # 32 responses held: those that ended at 9..40
    assert st.processed == 9
    with pytest.raises(StreamError, match=r"cannot resume at offset 8: .*held: 9\.\.40"):
        stream_of(40).rewind(8)


def test_store_specs(tmp_path):
    assert open_store("memory") is None and open_store(None) is None
    assert isinstance(open_store(f"sqlite:{tmp_path}/s.db"), SQLiteStore)
    with pytest.raises(ValueError, match="unknown state store"):
        open_store("postgres://x")
    with pytest.raises(StoreUnavailable):
        SQLiteStore(tmp_path / "no" / "such" / "dir" / "s.db")


def test_the_sqlite_store_writes_ahead_and_close_checkpoints_its_log(tmp_path):
    """WAL mode (so a server's worker processes read while one writes), kept in the file itself; close()
    closes the connection, and SQLite then folds the log back into the database and removes it."""
    import sqlite3

    path = tmp_path / "s.db"
    store = SQLiteStore(path)
    store.save("a", b"x", ttl_s=60)
    other = sqlite3.connect(path)
    assert other.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    other.close()
    assert path.with_name("s.db-wal").exists()
    store.close()
    assert not path.with_name("s.db-wal").exists()
    assert SQLiteStore(path).load("a") == b"x"


def test_sqlite_store_expires_entries(tmp_path):
    store = SQLiteStore(tmp_path / "s.db")
    store.save("a", b"x", ttl_s=60)
    store.save("b", b"y", ttl_s=-1)
    assert store.load("a") == b"x" and store.load("b") is None
    store.delete("a")
    assert store.load("a") is None
    import sqlite3  # a delete also purges what has expired: the file does not grow with dead streams

    assert sqlite3.connect(tmp_path / "s.db").execute("SELECT COUNT(*) FROM streams").fetchone() == (0,)


def run_streams(target, ids, bodies, chunk, pause):
    async def main():
        return await asyncio.gather(*(stream_until_broken(target, i, t, chunk, pause=pause)
                                      for i, t in zip(ids, bodies)))
    return asyncio.run(main())


def kill_midway_then_resume(first: ServerProcess, make_second, n_streams: int, tmp_text_len=240):
    """Start n streams on ``first``, SIGKILL it mid-stream, resume every stream on make_second()."""
    import threading
    ids = [f"s{i}" for i in range(n_streams)]
    bodies = texts(n_streams, tmp_text_len)
    killer = threading.Timer(1.0, first.kill9)
    killer.start()
    got = run_streams(first.target, ids, bodies, chunk=8, pause=0.05)
    killer.join()
    assert all(broke for _, broke in got), "the server was not killed mid-stream"
    second = make_second()
    try:
        async def resume_all():
            return await asyncio.gather(*(
                stream_until_broken(second.target, i, t, 8, start=rs[-1].processed_chars if rs else 0,
                                    resume=bool(rs))
                for i, t, (rs, _) in zip(ids, bodies, got)))
        resumed = asyncio.run(resume_all())
        for body, (before, _), (after, broke) in zip(bodies, got, resumed):
            assert not broke and after[-1].final
            assert 0 < before[-1].processed_chars < len(body)  # really interrupted mid-stream
            assert fold(before + after) == unary(second.target, body)  # nothing lost, nothing twice
    finally:
        second.stop()


def test_sigkill_mid_stream_and_restart_loses_nothing(tmp_path):
    db = f"sqlite:{tmp_path}/state.db"
    first = ServerProcess("--state-store", db)
    try:
        kill_midway_then_resume(first, lambda: ServerProcess("--state-store", db, port=first.port), 16)
    finally:
        first.stop()


def test_a_stream_stored_by_the_dense_engine_resumes_on_the_sparse_one(tmp_path):
    """The state the store keeps is the model's state (c, h, z per layer), whichever graph computed it: streams
    begun on a server running the dense graph (what the previous version served) and killed mid-stream resume
    on one running the sparse graph, with nothing lost or repeated."""
    db = f"sqlite:{tmp_path}/state.db"
    first = ServerProcess("--state-store", db, "--engine", "dense")
    try:
        kill_midway_then_resume(first, lambda: ServerProcess("--state-store", db, "--engine", "sparse"), 6)
    finally:
        first.stop()


@needs_redis
def test_kill_one_of_two_replicas_and_clients_finish_on_the_other():
    redis = RedisProcess()
    a = ServerProcess("--state-store", redis.url)
    b = ServerProcess("--state-store", redis.url)
    try:
        kill_midway_then_resume(a, lambda: b, 6)
    finally:
        a.stop()
        b.stop()
        redis.stop()


@needs_redis
def test_a_store_that_goes_away_and_comes_back(tiny_model):
    import threading

    import redis as redis_client

    from hmlstm.serving.background import BackgroundServer
    from hmlstm.serving.client import SegmenterClient
    from hmlstm.serving.config import ServeConfig

    redis = RedisProcess()
    port = redis.port
    # An idle timeout (the records' time to live) far past the test: a finished stream's record must go because
    # it was deleted, not because it expired.
    config = ServeConfig(port=0, metrics_port=None, state_store=redis.url, idle_timeout_s=3600)
    with BackgroundServer(tiny_model, config) as srv, SegmenterClient(srv.target) as c:
        errors = srv.server.metrics.store_errors._value.get
        rs = list(c.stream(["abc ", "def"], stream_id="x1"))
        assert [r.durable for r in rs] == [True, True, False]  # the final response: the stream is deleted
        assert store_health(srv.target) == "SERVING"
        redis.stop()  # the store goes away: streams keep working, without durability
        before = errors()
        rs = list(c.stream(["abc ", "def"], stream_id="x2"))
        assert rs[-1].final and rs[-1].processed_chars == 7
        assert not any(r.durable for r in rs)
        assert errors() - before >= 1
        assert store_health(srv.target) == "NOT_SERVING" and health(srv.target) == "SERVING"
        before = errors()
        code = None
        try:
            list(c.stream(["x"], stream_id="gone", resume=True))
        except Exception as e:  # a resume that needs the store says UNAVAILABLE, not UNKNOWN
            code = e.code().name
        assert code == "UNAVAILABLE"
        assert errors() - before == 1  # the failed read is counted
        redis = RedisProcess(port=port)  # it comes back, empty: the probe finds it, saving resumes
        wait_for(lambda: store_health(srv.target) == "SERVING", "the store's health to return to SERVING")
        release = threading.Event()

        def chunks():
            yield "ghi "
            release.wait(20)  # the stream stays open: its state is in the store, not yet deleted as finished
            yield "jkl"

        before = errors()
        call = iter(c.stream(chunks(), stream_id="x3"))
        first = next(call)
        assert first.processed_chars == 4 and first.durable  # acknowledged as saved
        assert redis_client.Redis(port=port).exists("hmlstm:stream:x3") == 1
        release.set()
        assert list(call)[-1].final
        assert errors() == before
        wait_for(lambda: redis_client.Redis(port=port).exists("hmlstm:stream:x3") == 0,
                 "the finished stream to be deleted from the store")
    redis.stop()


@needs_redis
def test_the_redis_store_pings_only_a_live_server_and_closes_its_connections():
    import redis as redis_client

    from hmlstm.serving.store import RedisStore
    from tests.serving.durable import free_port, wait_for

    with pytest.raises(StoreUnavailable):  # nothing listens there: the probe must not say it is back
        RedisStore(f"redis://127.0.0.1:{free_port()}/0", timeout_s=1).ping()
    redis = RedisProcess()
    try:
        admin = redis_client.Redis(port=redis.port)
        clients = lambda: admin.info("clients")["connected_clients"]  # noqa: E731
        before = clients()
        store = RedisStore(redis.url)
        store.ping()
        assert clients() == before + 1
        store.close()
        wait_for(lambda: clients() == before, "the store's connection to close")
    finally:
        redis.stop()
