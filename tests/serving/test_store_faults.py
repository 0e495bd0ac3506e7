"""A state store that hangs or dies holds no response up, and loses nothing it acknowledged (issue 22).

Real redis-server processes paused with SIGSTOP or killed with SIGKILL, real server processes.
"""

import asyncio
import time

import grpc
import redis as redis_client

from hmlstm.model.data import builtin_text
from hmlstm.serving.store import decode_record
from tests.serving.durable import OpenStream, RedisProcess, ServerProcess, fold, health, store_health, unary, wait_for
from tests.serving.test_durability import needs_redis

TEXT = builtin_text()[20_000:]


def stored_end(port: int, stream_id: str) -> int | None:
    """The offset a stream's stored record reaches (its base plus the chunks after it), or None."""
    raw = redis_client.Redis(port=port).get("hmlstm:stream:" + stream_id)
    if raw is None:
        return None
    r = decode_record(raw)
    return r["processed"] + sum(len(t) for _, t in r["texts"])


@needs_redis
def test_a_paused_store_holds_no_response_up():
    """SIGSTOP Redis for 6 s under 8 running streams: responses go on at once (durable = false), the store's
    health name says NOT_SERVING while the server stays SERVING; after SIGCONT saving resumes.
    Before saver.py every save waited out a 2 s socket timeout behind one store thread: about one response
    every 2 s for the whole server, and chunks waited up to 16 s. (A 20 s pause gave the same picture:
    48,557 responses, the slowest 0.258 s.)"""
    redis = RedisProcess()
    server = ServerProcess("--state-store", redis.url, "--store-timeout", "0.25")
    pause_s, chunk = 6.0, 8

    async def run():
        phase = {"now": "before"}
        log: list[tuple[str, float, bool]] = []  # (phase, latency, durable) per response
        stop = asyncio.Event()

        async def one(i: int, ch):
            s = OpenStream(ch, f"paused-{i}")
            text = TEXT[i * 50_000 :]
            while not stop.is_set():
                t0 = time.perf_counter()
                r = await s.send(text[s.offset : s.offset + chunk])
                log.append((phase["now"], time.perf_counter() - t0, r.durable))
            await s.close()

        async with grpc.aio.insecure_channel(server.target) as ch:
            tasks = [asyncio.create_task(one(i, ch)) for i in range(8)]
            await asyncio.to_thread(wait_for, lambda: sum(p == "before" and d for p, _, d in log) >= 16,
                                    "durable responses before the pause")
            redis.pause()
            phase["now"] = "paused"
            await asyncio.sleep(pause_s)  # the fault's length, not a timing assertion
            statuses = await asyncio.to_thread(lambda: (store_health(server.target), health(server.target)))
            redis.cont()
            phase["now"] = "after"
            await asyncio.to_thread(wait_for, lambda: sum(p == "after" and d for p, _, d in log) >= 16,
                                    "durable responses after the store came back")
            stop.set()
            await asyncio.gather(*tasks)
        return log, statuses

    try:
        log, statuses = asyncio.run(run())
    finally:
        server.stop()
        redis.stop()
    paused = [(lat, d) for p, lat, d in log if p == "paused"]
    assert statuses == ("NOT_SERVING", "SERVING")
    # Thousands of responses come back while the store hangs (about 2,400 a second here; before: one every
    # 2 s), none durable, and none waited anywhere near the old 2-16 s: the bound is 12x --store-timeout, for
    # a loaded 2-core machine. The count also fails a saver that keeps its timeout but never treats the
    # store as down (at most 8 x 6 s / 0.25 s = 192 responses) or one that ignores the timeout (48).
    assert len(paused) >= 5 * 8 * pause_s / 0.25, len(paused)
    assert max(lat for lat, _ in paused) < 3.0, sorted(lat for lat, _ in paused)[-5:]
    assert sum(d for _, d in paused) <= 8  # at most the saves that finished as the pause began


@needs_redis
def test_acknowledged_during_an_outage_is_saved_when_the_store_returns():
    """Stream a is saved at 120; Redis is killed; a is acknowledged at 160 and stream b starts (both not
    durable); Redis comes back empty and no chunk follows; the server is killed with -9. Both streams
    resume on a new server from every acknowledged offset, and their output equals the unary answer."""
    redises = [RedisProcess()]
    port, url = redises[0].port, redises[0].url
    first = ServerProcess("--state-store", url)
    a_text, b_text = TEXT[:400], TEXT[5_000:5_300]

    async def before_kill():
        async with grpc.aio.insecure_channel(first.target) as ch:
            a = OpenStream(ch, "a")
            for i in range(3):
                assert (await a.send(a_text[i * 40 : (i + 1) * 40])).durable
            assert stored_end(port, "a") == 120
            redises[0].kill9()
            r = await a.send(a_text[120:160])
            assert r.processed_chars == 160 and not r.durable
            b = OpenStream(ch, "b")
            for i in range(2):
                r = await b.send(b_text[i * 25 : (i + 1) * 25])
            assert r.processed_chars == 50 and not r.durable
            redises.append(RedisProcess(port=port))  # back, empty; neither stream sends another chunk
            await asyncio.to_thread(wait_for, lambda: (stored_end(port, "a"), stored_end(port, "b")) == (160, 50),
                                    "both streams' acknowledged state in the store")
            first.kill9()  # with both calls still open
            return a.responses, b.responses

    async def resume(target, sid, text, offset):
        async with grpc.aio.insecure_channel(target) as ch:
            s = OpenStream(ch, sid, resume=True, offset=offset)
            for i in range(offset, len(text), 40):
                await s.send(text[i : i + 40])
            return await s.close()

    second = None
    try:
        a_before, b_before = asyncio.run(before_kill())
        second = ServerProcess("--state-store", url)
        a_after = asyncio.run(resume(second.target, "a", a_text, 160))
        b_after = asyncio.run(resume(second.target, "b", b_text, 50))
        assert fold(a_before + a_after) == unary(second.target, a_text)
        assert fold(b_before + b_after) == unary(second.target, b_text)
    finally:
        first.stop()
        if second is not None:
            second.stop()
        for r in redises:
            r.stop()
