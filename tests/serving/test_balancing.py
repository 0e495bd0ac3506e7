"""Streams spread over replicas, and a connection cut by its maximum age resumes on another (issue 22).

Two real servers on loopback share one real Redis store; the client is the package's own asyncio client
with gRPC's round_robin policy over a static two-address target, as over a headless Service's DNS.
"""

import asyncio

import grpc
import pytest

from hmlstm.model.data import builtin_text
from hmlstm.serving.background import BackgroundServer
from hmlstm.serving.client import AsyncSegmenterClient, channel_options
from hmlstm.serving.config import ServeConfig
from tests.serving.durable import OpenStream, RedisProcess, fold, unary, wait_for
from tests.serving.test_durability import needs_redis

TEXT = builtin_text()[40_000:]


def started(srv) -> int:
    return int(srv.server.metrics.requests.labels("StreamSegment")._value.get())


def described(srv) -> int:
    return int(srv.server.metrics.requests.labels("DescribeModel")._value.get())


@needs_redis
def test_sixteen_streams_from_one_client_spread_over_two_servers(tiny_model):
    redis = RedisProcess()
    config = ServeConfig(port=0, metrics_port=None, state_store=redis.url)
    texts = [TEXT[i * 700 : i * 700 + 300] for i in range(16)]
    try:
        with BackgroundServer(tiny_model, config) as a, BackgroundServer(tiny_model, config) as b:
            target = f"ipv4:127.0.0.1:{a.port},127.0.0.1:{b.port}"
            before = [0, 0]

            async def run():
                async with AsyncSegmenterClient(target, lb_policy="round_robin") as client:
                    # round_robin picks among the connections that are ready: until the second one connects,
                    # calls go to the first. A long-lived client has both; wait until each has answered.
                    for _ in range(400):
                        await client.describe()
                        if min(described(a), described(b)) > 0:
                            break
                    before[:] = started(a), started(b)

                    async def one(i):
                        chunks = [texts[i][j : j + 37] for j in range(0, len(texts[i]), 37)]
                        return [r async for r in client.stream(chunks, stream_id=f"rr-{i}")]
                    return await asyncio.gather(*(one(i) for i in range(16)))

            results = asyncio.run(run())
            spread = started(a) - before[0], started(b) - before[1]
            assert sum(spread) == 16 and min(spread) >= 4, spread  # round_robin: 8 and 8 when both are ready
            for text, responses in zip(texts, results):
                assert responses[-1].final and responses[-1].processed_chars == len(text)
                assert fold(responses) == unary(a.target, text)
    finally:
        redis.stop()


def test_pick_first_would_have_sent_them_all_to_one(tiny_model):
    """The contrast the test above relies on: gRPC's default policy uses one connection for every call."""
    config = ServeConfig(port=0, metrics_port=None)
    with BackgroundServer(tiny_model, config) as a, BackgroundServer(tiny_model, config) as b:
        target = f"ipv4:127.0.0.1:{a.port},127.0.0.1:{b.port}"

        async def run():
            async with AsyncSegmenterClient(target) as client:
                await asyncio.gather(*(client.segment(f"text {i}") for i in range(8)))

        asyncio.run(run())
        counts = sorted(int(s.server.metrics.requests.labels("Segment")._value.get()) for s in (a, b))
        assert counts == [0, 8]


def test_an_unknown_policy_is_refused_in_one_line():
    with pytest.raises(ValueError, match="load-balancing policy 'random'"):
        channel_options(lb_policy="random")


@needs_redis
def test_a_stream_cut_by_the_maximum_connection_age_resumes_on_another_server(tiny_model):
    """--max-connection-age sends GOAWAY; a call still open after the grace is cut. Its stream resumes by id
    on the other server from the last response received, and the whole output equals the unary answer."""
    redis = RedisProcess()
    aging = ServeConfig(port=0, metrics_port=None, state_store=redis.url, max_connection_age_s=1.0,
                        max_connection_age_grace_s=0.5)
    text = TEXT[:2_000]
    try:
        with BackgroundServer(tiny_model, aging) as a, \
                BackgroundServer(tiny_model, ServeConfig(port=0, metrics_port=None, state_store=redis.url)) as b:

            async def first_call():
                async with grpc.aio.insecure_channel(a.target) as ch:
                    s = OpenStream(ch, "aged")
                    try:
                        while s.offset < len(text):
                            await s.send(text[s.offset : s.offset + 20])
                            await asyncio.sleep(0.05)  # a slow client: the call outlives the connection
                    except (grpc.RpcError, EOFError) as e:
                        return s.responses, getattr(e, "code", lambda: None)()
                    return s.responses, None

            got, code = asyncio.run(first_call())
            assert code == grpc.StatusCode.UNAVAILABLE, code
            # counted as a cut by the connection's age, which is expected, not as a CANCELLED error (item 35)
            sample = a.server.metrics.registry.get_sample_value
            wait_for(lambda: sample("hmlstm_connection_age_cuts_total") == 1.0, "the cut counted")
            assert not sample("hmlstm_errors_total", {"code": "CANCELLED"})
            last = got[-1].processed_chars
            assert 0 < last < len(text) and got[-1].durable

            async def resume():
                async with grpc.aio.insecure_channel(b.target) as ch:
                    s = OpenStream(ch, "aged", resume=True, offset=last)
                    while s.offset < len(text):
                        await s.send(text[s.offset : s.offset + 20])
                    return await s.close()

            assert fold(got + asyncio.run(resume())) == unary(b.target, text)
    finally:
        redis.stop()
