"""A real server on a free loopback port, the real exported model, real clients."""

import asyncio
import json
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from hmlstm.model.data import synthetic_corpus
from hmlstm.serving.background import BackgroundServer
from hmlstm.serving.client import AsyncSegmenterClient, SegmenterClient
from hmlstm.serving.config import ServeConfig
from hmlstm.serving.model import ModelLoadError, load_model
from hmlstm.v1 import segmenter_pb2 as pb
from hmlstm.v1 import segmenter_pb2_grpc as pb_grpc
from tests.serving.durable import wait_for

TEXT = synthetic_corpus(seed=5, n_chars=700).text[:700]


def chunked(text, size):
    return [text[i : i + size] for i in range(0, len(text), size)]


def collect(responses):
    """Fold streamed responses into (boundaries per layer, final segments), checking order."""
    bounds, segs, processed = {}, [], 0
    for r in responses:
        assert r.processed_chars >= processed
        processed = r.processed_chars
        for lb in r.boundaries:
            bounds.setdefault(lb.layer, []).extend(lb.offsets)
        segs += [(s.layer, s.start, s.end, s.text) for s in r.segments if s.final]
    return bounds, sorted(segs)


def unary(client, text):
    r = client.segment(text)
    return {lb.layer: list(lb.offsets) for lb in r.boundaries}, sorted(
        (s.layer, s.start, s.end, s.text) for s in r.segments)


def retry_aborted(fn, attempts: int = 50):
    """What a client does on ABORTED after a reconnect: the server has not yet seen the old call end."""
    for i in range(attempts):
        try:
            return fn()
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.ABORTED or i == attempts - 1:
                raise
            time.sleep(0.02)


def code_of(fn):
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code(), e.value.details()


def test_describe_model(server, tiny_model):
    with SegmenterClient(server.target) as c:
        info = c.describe()
    assert info.format == "hmlstm-stream/1" and info.num_layers == 2 and list(info.units) == [12, 10]
    assert list(info.boundary_layers) == [1] and info.vocab_size == len(tiny_model.vocab)
    assert list(info.providers) == ["CPUExecutionProvider"]
    assert json.loads(info.provenance_json)["corpus"].startswith("synthetic")


@pytest.fixture(scope="module")
def tf_layer1_boundaries(tiny_run):
    from hmlstm.model.checkpoint import load_network
    from hmlstm.model.plot import text_boundaries

    net, info = load_network(tiny_run)
    return np.flatnonzero(text_boundaries(net, info.vocab.encode(TEXT))[:, 0]).tolist()


@pytest.mark.parametrize("size", [1, 7, 64, 500])
def test_streaming_in_any_chunking_equals_unary_and_tensorflow(server, tf_layer1_boundaries, size):
    with SegmenterClient(server.target) as c:
        streamed = collect(c.stream(chunked(TEXT, size)))
        assert streamed == unary(c, TEXT)
    assert streamed[0][1] == tf_layer1_boundaries
    assert "".join(s[3] for s in streamed[1] if s[0] == 1) == TEXT  # layer-1 segments tile the text


def test_responses_carry_progress_open_segments_top_k_and_a_final_flush(server):
    with SegmenterClient(server.target) as c:
        rs = list(c.stream(chunked(TEXT[:60], 20), top_k=3))
    assert [r.chunk_offset for r in rs] == [0, 20, 40, 60]
    assert [r.processed_chars for r in rs] == [20, 40, 60, 60]
    assert rs[-1].final and not any(r.final for r in rs[:-1])
    for r in rs[:-1]:
        assert len(r.next_chars) == 3
        probs = [p.probability for p in r.next_chars]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
        open_ = [s for s in r.segments if not s.final]
        assert all(s.text == "" and s.end == r.processed_chars for s in open_)
    assert rs[-1].segments and all(s.final and s.end == 60 for s in rs[-1].segments)


def test_32_concurrent_streams_each_get_their_own_results(server):
    texts = [synthetic_corpus(seed=100 + i, n_chars=300).text[:300] for i in range(32)]
    with SegmenterClient(server.target) as c:
        expected = [unary(c, t) for t in texts]

    async def one(client, text, size):
        return collect([r async for r in client.stream(chunked(text, size))])

    async def main():
        async with AsyncSegmenterClient(server.target) as client:
            return await asyncio.gather(*(one(client, t, 5 + i % 7) for i, t in enumerate(texts)))

    got = asyncio.run(main())
    assert got == expected
    assert len({json.dumps(g) for g in got}) == 32  # really 32 different answers


@pytest.mark.parametrize("batching", [True, False])
def test_a_server_that_keeps_state_on_the_device_gives_the_same_answers(tiny_model, batching):
    """--io-binding on (CUDA's default, forced here on the CPU) changes no answer, batched or not."""
    texts = [synthetic_corpus(seed=300 + i, n_chars=200).text[:160] for i in range(6)]
    plain = ServeConfig(port=0, metrics_port=None, io_binding="off", batching=False)
    with BackgroundServer(tiny_model, plain) as ref, SegmenterClient(ref.target) as c:  # the host-state path
        expected = [unary(c, t) for t in texts]
    config = ServeConfig(port=0, metrics_port=None, io_binding="on", batching=batching, piece_chars=64)
    with BackgroundServer(tiny_model, config) as srv:
        assert srv.server.runner.binder is not None

        async def one(client, text, size):
            return collect([r async for r in client.stream(chunked(text, size))])

        async def main():
            async with AsyncSegmenterClient(srv.target) as client:
                return await asyncio.gather(*(one(client, t, 3 + i) for i, t in enumerate(texts)))

        assert asyncio.run(main()) == expected
        assert srv.server.runner.binder.reused > 0


def test_resent_chunks_before_the_resume_point_are_acknowledged_and_skipped(server):
    with SegmenterClient(server.target) as c:
        call = c.stream(held_open(["abcdef", "ghij"], __import__("threading").Event()), stream_id="resend")
        it = iter(call)
        assert next(it).processed_chars == 6 and next(it).processed_chars == 10
        call.cancel()
        rs = retry_aborted(lambda: _raw_stream(server, [cfg(stream_id="resend", resume=True, resume_offset=10),
                                                        chunk(0, "abcdefghij"), chunk(10, "kl")]))
    assert rs[0].duplicate and rs[0].processed_chars == 10
    assert rs[1].chunk_offset == 10 and rs[1].processed_chars == 12 and not rs[1].duplicate


def test_resume_after_a_dropped_connection_loses_and_duplicates_nothing(server):
    chunks = chunked(TEXT, 50)
    with SegmenterClient(server.target) as c:
        expected = unary(c, TEXT)
        call = c.stream(iter(chunks[:14]), stream_id="resume-me")
        first = []
        for r in call:
            first.append(r)
            if len(first) == 4:
                call.cancel()  # the connection drops after 4 acknowledged chunks
                break
        received = first[-1].processed_chars
        assert received == 200  # the server may well have processed more than the client saw
        second = retry_aborted(lambda: list(c.stream(chunked(TEXT[received:], 50), stream_id="resume-me",
                                                     resume=True, start_offset=received)))
    assert second[0].chunk_offset == 200 and not second[0].duplicate
    assert collect(first + second) == expected
    # Finished streams are forgotten: resuming again is NOT_FOUND.
    with SegmenterClient(server.target) as c:
        code, _ = code_of(lambda: list(c.stream(["x"], stream_id="resume-me", resume=True)))
    assert code == grpc.StatusCode.NOT_FOUND


def _raw_stream(server, requests, timeout=10):
    with grpc.insecure_channel(server.target) as ch:
        return list(pb_grpc.SegmenterStub(ch).StreamSegment(iter(requests), timeout=timeout))


def cfg(**kw):
    return pb.SegmentRequest(config=pb.StreamConfig(**kw))


def chunk(offset, text):
    return pb.SegmentRequest(chunk=pb.TextChunk(offset=offset, text=text))


@pytest.mark.parametrize("requests, code, words", [
    ([chunk(0, "abc")], grpc.StatusCode.FAILED_PRECONDITION, "first message must be a StreamConfig"),
    ([cfg(), chunk(0, "abc"), cfg()], grpc.StatusCode.FAILED_PRECONDITION, "only be the first"),
    ([cfg(), chunk(0, "abc"), chunk(1, "bcd")], grpc.StatusCode.INVALID_ARGUMENT, "goes backwards"),
    ([cfg(), chunk(0, "abc"), chunk(5, "fgh")], grpc.StatusCode.OUT_OF_RANGE, "leaves a gap"),
    ([cfg(), chunk(3, "abc")], grpc.StatusCode.OUT_OF_RANGE, "must start at 0"),
    ([cfg(), chunk(0, "")], grpc.StatusCode.INVALID_ARGUMENT, "is empty"),
    ([cfg(), chunk(0, "a" * 501)], grpc.StatusCode.INVALID_ARGUMENT, "over the limit of 500"),
    ([cfg(stream_id="nobody", resume=True)], grpc.StatusCode.NOT_FOUND, "no stream 'nobody'"),
    ([cfg(layers=[2])], grpc.StatusCode.INVALID_ARGUMENT, "cannot report boundaries"),
    ([cfg(top_k=51)], grpc.StatusCode.INVALID_ARGUMENT, "top_k 51"),
])
def test_bad_input_gets_a_precise_status_and_the_server_keeps_going(server, requests, code, words):
    import threading
    release = threading.Event()
    with SegmenterClient(server.target) as c:
        it = iter(c.stream(held_open(chunked(TEXT[:200], 20), release)))  # open across the bad one
        next(it)
        got, details = code_of(lambda: _raw_stream(server, requests))
        assert got == code and words in details
        release.set()
        rest = list(it)
        assert rest[-1].final and rest[-1].processed_chars == 200  # the other stream finishes normally
        assert c.segment("abc").chars == 3


def test_message_over_the_grpc_limit_is_resource_exhausted(tiny_model):
    with BackgroundServer(tiny_model, ServeConfig(port=0, metrics_port=None, max_message_bytes=1000)) as srv:
        with SegmenterClient(srv.target) as c:
            code, _ = code_of(lambda: c.segment("a" * 5000))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_unknown_characters_are_reported_not_fatal(server):
    with SegmenterClient(server.target) as c:
        rs = list(c.stream(["abc ZZ€ def"]))
        assert rs[0].unknown_chars == 3 and rs[0].processed_chars == 11
        assert c.segment("ZZ€").unknown_chars == 3


def held_open(chunks, release):
    """Yield chunks, then keep the call open until ``release`` is set."""
    yield from chunks
    release.wait(10)


def test_too_many_streams_is_resource_exhausted_and_others_unaffected(tiny_model):
    import threading
    config = ServeConfig(port=0, metrics_port=None, max_streams=2)
    release_a, release_b = threading.Event(), threading.Event()
    with BackgroundServer(tiny_model, config) as srv, SegmenterClient(srv.target) as c:
        a = iter(c.stream(held_open(["abc"], release_a)))
        b = iter(c.stream(held_open(chunked(TEXT[:40], 10), release_b)))
        next(a)
        next(b)
        code, details = code_of(lambda: list(c.stream(["abc"])))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit of 2" in details
        release_b.set()
        assert [r.processed_chars for r in b][-1] == 40  # the accepted stream is unaffected
        assert list(c.stream(["abc"]))[-1].final  # capacity is back
        release_a.set()
        assert list(a)[-1].final


def test_cancellation_and_deadline_free_the_stream_at_once(server):
    def gen(stop_after):
        yield "abc"
        time.sleep(stop_after)
        yield "def"

    with SegmenterClient(server.target) as c:
        call = c.stream(gen(2.0))
        next(iter(call))
        assert server.server.registry.active >= 1
        call.cancel()
        wait_for(lambda: server.server.registry.active == 0, "the cancelled call's stream to be freed")
    release = threading.Event()

    def stalled():
        yield "abc"
        release.wait(60)  # the client goes quiet until its deadline has ended the call

    with SegmenterClient(server.target, timeout=0.3) as c:
        code, _ = code_of(lambda: list(c.stream(stalled())))
        release.set()
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(lambda: server.server.registry.active == 0, "the expired call's stream to be freed")


def test_idle_call_is_closed_and_its_stream_can_be_resumed(tiny_model):
    config = ServeConfig(port=0, metrics_port=None, idle_timeout_s=0.4)
    ended = threading.Event()

    def slow():
        yield "abcd"
        ended.wait(60)  # silent until the server has ended the call (a condition, not a race with a sleep)
        yield "efgh"

    with BackgroundServer(tiny_model, config) as srv, SegmenterClient(srv.target) as c:
        seen = []
        with pytest.raises(grpc.RpcError) as e:
            try:
                for r in c.stream(slow(), stream_id="sleepy"):
                    seen.append(r)
            finally:
                ended.set()
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "idle" in e.value.details()
        assert seen[0].processed_chars == 4
        rs = retry_aborted(lambda: list(c.stream(["efgh"], stream_id="sleepy", resume=True, start_offset=4)))
        assert rs[-1].final and rs[-1].processed_chars == 8
        with SegmenterClient(srv.target) as c2:  # a resume point the server never answered at
            call = c2.stream(held_open(["abcd"], __import__("threading").Event()), stream_id="other")
            next(iter(call))
            call.cancel()
            code, details = code_of(lambda: retry_aborted(
                lambda: list(c2.stream(["x"], stream_id="other", resume=True, start_offset=2))))
            assert code == grpc.StatusCode.OUT_OF_RANGE and "cannot resume at offset 2" in details


def test_health_and_reflection_answer(server):
    with grpc.insecure_channel(server.target) as ch:
        h = health_pb2_grpc.HealthStub(ch)
        assert h.Check(health_pb2.HealthCheckRequest(service="")).status == health_pb2.HealthCheckResponse.SERVING
        assert h.Check(health_pb2.HealthCheckRequest(service="hmlstm.v1.Segmenter")).status == \
            health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        reply = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in reply.list_services_response.service}
        assert {"hmlstm.v1.Segmenter", "grpc.health.v1.Health"} <= names
        reply = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="hmlstm.v1.Segmenter")])))
        assert reply.file_descriptor_response.file_descriptor_proto


def test_metrics_scrape(server):
    """Counters are read as deltas around the action: the module's server has served other tests."""
    def scrape():
        url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
        return urllib.request.urlopen(url, timeout=5).read().decode()

    def counted(body, name):
        return float(next(l for l in body.splitlines() if l.startswith(name)).split()[1])

    before = scrape()
    with SegmenterClient(server.target) as c:
        list(c.stream(["hello ", "world"]))  # two chunks, 11 characters, streamed
        c.segment("unary text")  # 10 more, in one call
    body = scrape()
    for name in ("hmlstm_active_streams", "hmlstm_chars_processed_total", "hmlstm_chunk_latency_seconds_bucket",
                 "hmlstm_errors_total", "hmlstm_requests_total"):
        assert name in body
    chars = counted(body, "hmlstm_chars_processed_total") - counted(before, "hmlstm_chars_processed_total")
    assert chars == 21


def test_bearer_token_auth(tiny_model):
    config = ServeConfig(port=0, metrics_port=None, auth_token="s3cret")
    with BackgroundServer(tiny_model, config) as srv:
        with SegmenterClient(srv.target) as c:
            code, details = code_of(lambda: c.describe())
            assert code == grpc.StatusCode.UNAUTHENTICATED and "bearer token" in details
            code, _ = code_of(lambda: list(c.stream(["abc"])))
            assert code == grpc.StatusCode.UNAUTHENTICATED
        with SegmenterClient(srv.target, token="wrong") as c:
            assert code_of(lambda: c.segment("abc"))[0] == grpc.StatusCode.UNAUTHENTICATED
        with SegmenterClient(srv.target, token="s3cret") as c:
            assert c.segment("abc").chars == 3 and list(c.stream(["abc"]))[-1].final
        with grpc.insecure_channel(srv.target) as ch:  # probes and reflection (grpcurl) need no token
            r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
            assert r.status == health_pb2.HealthCheckResponse.SERVING
            refl = reflection_pb2_grpc.ServerReflectionStub(ch)
            reply = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
            assert "hmlstm.v1.Segmenter" in {s.name for s in reply.list_services_response.service}


def test_tls(tiny_model, tmp_path):
    import subprocess
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True)
    config = ServeConfig(port=0, metrics_port=None, tls_cert=str(cert), tls_key=str(key))
    with BackgroundServer(tiny_model, config) as srv:
        target = f"localhost:{srv.port}"
        with SegmenterClient(target, root_cert=cert) as c:
            assert c.segment("abc").chars == 3
        with SegmenterClient(target) as c:  # plaintext against TLS fails
            assert code_of(lambda: c.describe())[0] == grpc.StatusCode.UNAVAILABLE


def test_a_file_that_is_not_an_hmlstm_model_is_refused(tmp_path, capsys):
    import onnx
    h = onnx.helper
    g = h.make_graph([h.make_node("Relu", ["x"], ["y"])], "g", [h.make_tensor_value_info("x", 1, [2])],
                     [h.make_tensor_value_info("y", 1, [2])])
    other = tmp_path / "other.onnx"
    onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8), str(other))
    with pytest.raises(ModelLoadError, match="not an exported hmlstm model"):
        load_model(other)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not onnx at all")
    with pytest.raises(ModelLoadError, match="not a loadable ONNX model"):
        load_model(junk)
    from hmlstm.cli import main
    assert main(["serve", str(other), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not an exported hmlstm model" in err[0]


def test_a_resume_takes_over_a_stream_whose_old_call_still_looks_attached(server):
    """A client whose connection broke without the server noticing resumes at once: the old call is
    ended with ABORTED, and the stream continues from the last response the client received."""
    import threading

    release = threading.Event()
    with SegmenterClient(server.target) as c:
        expected = unary(c, TEXT[:120])
        old = c.stream(held_open(chunked(TEXT[:60], 20), release), stream_id="takeover")
        first = [next(iter(old)) for _ in range(3)]  # the old call is still open after 60 characters
        assert first[-1].processed_chars == 60
        new = list(c.stream(chunked(TEXT[60:120], 20), stream_id="takeover", resume=True, start_offset=60))
        with pytest.raises(grpc.RpcError) as e:
            list(old)
        release.set()
    assert e.value.code() == grpc.StatusCode.ABORTED and "took it over" in e.value.details()
    assert new[0].chunk_offset == 60 and new[-1].final
    assert collect(first + new) == expected
    assert server.server.metrics.registry.get_sample_value("hmlstm_stream_takeovers_total") >= 1


def test_a_refused_resume_changes_nothing_not_even_who_is_attached(server):
    """Issue 30, item 33: a resume at an offset the stream never answered (past processed_chars, or between
    responses) is refused OUT_OF_RANGE, and the call attached to the stream goes on, untouched."""
    import threading

    release = threading.Event()
    with SegmenterClient(server.target) as c:
        expected = unary(c, TEXT[:120])
        live = c.stream(held_open(chunked(TEXT[:120], 20), release), stream_id="refused-resume")
        it = iter(live)
        got = [next(it) for _ in range(3)]
        assert got[-1].processed_chars == 60
        for bad in (500, 30):  # past what was processed; not a response's end
            with pytest.raises(grpc.RpcError) as e:
                list(c.stream(chunked(TEXT[bad:bad + 20], 20), stream_id="refused-resume", resume=True,
                              start_offset=bad))
            assert e.value.code() == grpc.StatusCode.OUT_OF_RANGE, e.value.details()
        release.set()
        got += list(it)  # the attached call was not taken over: it finishes its text
    assert got[-1].final and collect(got) == expected


def test_a_client_that_stops_reading_is_ended_after_the_idle_timeout_and_frees_its_slot(tiny_model):
    """The client keeps writing and reads nothing: once its unread responses fill the flow-control
    window (kept small here: no BDP probing) the server's write waits, and the watchdog ends the
    call. Its slot is free at once; the status waits behind the responses the client has not read."""
    config = ServeConfig(port=0, metrics_port=None, idle_timeout_s=0.5, max_streams=1, max_top_k=50)

    async def stops_reading(target, srv):
        async with grpc.aio.insecure_channel(target, options=[("grpc.http2.bdp_probe", 0)]) as ch:
            call = pb_grpc.SegmenterStub(ch).StreamSegment(
                pb.SegmentRequest(chunk=pb.TextChunk(offset=16 * i, text=TEXT[:16])) if i >= 0 else
                pb.SegmentRequest(config=pb.StreamConfig(stream_id="deaf", top_k=50)) for i in range(-1, 10**6))
            t0 = time.monotonic()
            while (held := srv.server.registry.get("deaf")) is None or held.attached:
                await asyncio.sleep(0.05)
                assert time.monotonic() - t0 < 30, "the stalled call was never ended"
            assert srv.server.registry.active == 0
            read = 0
            with pytest.raises(grpc.aio.AioRpcError) as e:
                async for _ in call:
                    read += 1
            return read, e.value

    with BackgroundServer(tiny_model, config) as srv:
        read, err = asyncio.run(stops_reading(srv.target, srv))
        assert read > 10  # the responses it had not read still arrive, then the status
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "did not read its responses" in err.details()
        assert srv.server.metrics.errors.labels("DEADLINE_EXCEEDED")._value.get() == 1
        with SegmenterClient(srv.target) as c:  # the one slot is free again
            assert list(c.stream(["abc"]))[-1].final


def test_metrics_split_the_process_cpu_into_model_calls_and_the_rest(server):
    with SegmenterClient(server.target) as c:
        c.segment(TEXT)
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics").read().decode()
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values["hmlstm_model_cpu_seconds_total"] > 0
    assert values["process_cpu_seconds_total"] >= values["hmlstm_model_cpu_seconds_total"]
    assert values["process_resident_memory_bytes"] > 1e6 and values["process_open_fds"] > 0


def _invalid_utf8(message) -> bytes:
    raw = message.SerializeToString()
    assert raw.count(b"ab") == 1
    return raw.replace(b"ab", b"\xff\xfe")  # same length: still well-formed protobuf, but not UTF-8


def test_undecodable_messages_are_invalid_argument_without_a_traceback(server, caplog):
    errors = server.server.metrics.errors.labels("INVALID_ARGUMENT")
    before = errors._value.get()
    with grpc.insecure_channel(server.target) as ch:
        unary = ch.unary_unary("/hmlstm.v1.Segmenter/Segment")  # raw bytes in, raw bytes out
        with pytest.raises(grpc.RpcError) as e:
            unary(_invalid_utf8(pb.SegmentTextRequest(text="ab")), timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "UTF-8" in e.value.details()
        stream = ch.stream_stream("/hmlstm.v1.Segmenter/StreamSegment")
        requests = [pb.SegmentRequest(config=pb.StreamConfig()).SerializeToString(),
                    pb.SegmentRequest(chunk=pb.TextChunk(offset=0, text="xy")).SerializeToString(),
                    _invalid_utf8(pb.SegmentRequest(chunk=pb.TextChunk(offset=2, text="ab")))]
        got = []
        with pytest.raises(grpc.RpcError) as e:
            for r in stream(iter(requests), timeout=10):
                got.append(r)
        assert len(got) == 1 and e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "could not be decoded as SegmentRequest" in e.value.details()
    assert errors._value.get() == before + 2
    assert not [r for r in caplog.records if r.levelno >= 40], "the server logged an error"


def test_an_empty_request_after_the_config_says_what_was_wrong(server):
    with grpc.insecure_channel(server.target) as ch:
        call = pb_grpc.SegmenterStub(ch).StreamSegment(iter([pb.SegmentRequest(config=pb.StreamConfig()),
                                                              pb.SegmentRequest()]))
        code, details = code_of(lambda: list(call))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "empty SegmentRequest" in details


def test_every_client_cancel_is_counted(server):
    cancelled = server.server.metrics.errors.labels("CANCELLED")
    before = cancelled._value.get()
    n = 30

    async def cancel_after(i):
        async with grpc.aio.insecure_channel(server.target) as ch:
            call = pb_grpc.SegmenterStub(ch).StreamSegment(
                pb.SegmentRequest(chunk=pb.TextChunk(offset=10 * k, text=TEXT[10 * k : 10 * k + 10])) if k >= 0
                else pb.SegmentRequest(config=pb.StreamConfig()) for k in range(-1, 60))
            for _ in range(i % 5 + 1):  # cancel at different points of the stream
                await call.read()
            call.cancel()

    async def all_of_them():
        await asyncio.gather(*(cancel_after(i) for i in range(n)))

    asyncio.run(all_of_them())
    deadline = time.monotonic() + 10
    while cancelled._value.get() < before + n and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cancelled._value.get() == before + n
    assert server.server.registry.active == 0


def test_the_advertised_unary_limit_works_and_one_more_is_refused_before_any_work(tiny_model):
    config = ServeConfig(port=0, metrics_port=None, max_text_chars=1_000_000, max_message_bytes=1 << 20)
    with BackgroundServer(tiny_model, config) as srv, SegmenterClient(srv.target) as c:
        limit = c.describe().max_text_chars
        assert 10_000 < limit < 1_000_000  # lowered so that any answer fits a 1 MiB message
        text = (TEXT * (limit // len(TEXT) + 1))[:limit]
        r = c.segment(text)
        assert r.chars == limit and r.ByteSize() < 1 << 20
        chars = srv.server.metrics.chars._value.get
        before = chars()
        code, details = code_of(lambda: c.segment(text + "x"))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and f"limit of {limit:,}" in details
        assert chars() == before  # refused before the model ran: not one character went through it


def test_health_checks_a_tls_server_with_its_ca_or_the_containers_own_certificate(tiny_model, tmp_path):
    import os
    import subprocess
    import sys
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=hmlstm.internal",
                    "-addext", "subjectAltName=DNS:hmlstm.internal"], check=True, capture_output=True)
    config = ServeConfig(port=0, metrics_port=None, tls_cert=str(cert), tls_key=str(key))

    def health(*args, **env):
        return subprocess.run([sys.executable, "-m", "hmlstm.cli", "health", "--target", target, *args],
                              capture_output=True, text=True, timeout=60,
                              env={k: v for k, v in {**os.environ, **env}.items() if not k.startswith("HMLSTM_")
                                   or k in env})

    with BackgroundServer(tiny_model, config) as srv:
        target = f"127.0.0.1:{srv.port}"
        plain = health()
        assert plain.returncode == 1 and "UNAVAILABLE" in plain.stderr and "--tls-ca" in plain.stderr
        ok = health("--tls-ca", str(cert), "--server-name", "hmlstm.internal")
        assert ok.returncode == 0 and "SERVING" in ok.stdout, ok.stderr
        # In the container, serve and health read the same variables: health follows the server's TLS.
        assert health(HMLSTM_TLS_CERT=str(cert), HMLSTM_TLS_SERVER_NAME="hmlstm.internal").returncode == 0
        wrong_name = health("--tls-ca", str(cert), "--server-name", "other.name")
        assert wrong_name.returncode == 1
        # Issue 30, item 19: the real cause, in one line, and no gRPC core log line (ssl_transport_security.cc)
        other_key, other = tmp_path / "other-key.pem", tmp_path / "other.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(other_key),
                        "-out", str(other), "-days", "1", "-subj", "/CN=someone.else"], check=True, capture_output=True)
        says = {
            "untrusted": (health("--tls-ca", str(other), "--server-name", "hmlstm.internal"), "is not trusted"),
            "self-signed": (health("--tls", "--server-name", "hmlstm.internal"), "is not trusted"),
            "name": (wrong_name, "does not carry the name"),
            "plaintext": (plain, "it probably expects TLS"),
        }
        for what, (r, needle) in says.items():
            lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
            assert len(lines) == 1 and needle in lines[0] and ".cc:" not in r.stderr, (what, r.stderr)
        text = tmp_path / "t.txt"
        text.write_text("abc")
        for flags, needle in ((["--tls-ca", str(other)], "is not trusted"), ([], "it probably expects TLS")):
            r = subprocess.run([sys.executable, "-m", "hmlstm.cli", "segment", str(text), "--server", target, *flags],
                               capture_output=True, text=True, timeout=60)
            lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
            assert r.returncode == 1 and len(lines) == 1 and needle in lines[0], r.stderr


def test_the_bearer_scheme_is_case_insensitive(tiny_model):
    config = ServeConfig(port=0, metrics_port=None, auth_token="s3cret")
    with BackgroundServer(tiny_model, config) as srv, grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.SegmenterStub(ch)
        for scheme in ("bearer", "BEARER", "Bearer"):
            assert stub.DescribeModel(pb.DescribeModelRequest(), metadata=(("authorization", f"{scheme} s3cret"),))
        with pytest.raises(grpc.RpcError) as e:
            stub.DescribeModel(pb.DescribeModelRequest(), metadata=(("authorization", "Basic s3cret"),))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_health_lists_its_services_and_reflection_answers_as_v1_and_v1alpha(server):
    with grpc.insecure_channel(server.target) as ch:
        listed = health_pb2_grpc.HealthStub(ch).List(health_pb2.HealthListRequest(), timeout=5)
        assert listed.statuses["hmlstm.v1.Segmenter"].status == health_pb2.HealthCheckResponse.SERVING
        assert "" in listed.statuses
        for name in ("grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"):
            call = ch.stream_stream(f"/{name}/ServerReflectionInfo",
                                    request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                    response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
            (answer,) = list(call(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
            services = {s.name for s in answer.list_services_response.service}
            assert {"hmlstm.v1.Segmenter", "grpc.reflection.v1.ServerReflection"} <= services, name


def test_streams_held_after_a_disconnect_storm_are_forgotten_and_their_memory_freed(tiny_model):
    """100 streams with ids send a chunk and go away: the server holds each for a resume, then forgets it at
    the idle timeout, and what its code allocated for them (states, rewind history, trackers: Python and NumPy
    memory, traced, the client's own left out) is freed. benchmarks/memory.py measures the process's RSS. The
    idle timeout is long, so none expires during the storm; the registry is then asked to expire as its
    watchdog would after the timeout (test_faults waits for the watchdog itself)."""
    import gc
    import threading
    import tracemalloc

    server_side = [tracemalloc.Filter(True, "*/hmlstm/serving/*", all_frames=True)]

    def traced() -> int:
        gc.collect()
        return sum(t.size for t in tracemalloc.take_snapshot().filter_traces(server_side).traces)

    config = ServeConfig(port=0, metrics_port=None, idle_timeout_s=600.0, max_streams=400)
    with BackgroundServer(tiny_model, config) as srv, SegmenterClient(srv.target) as c:
        def held():
            async def count():
                return len(srv.server.registry)
            return srv.call(count())

        assert held() == 0
        tracemalloc.start(8)
        try:
            before = traced()
            releases = []
            for i in range(100):
                releases.append(threading.Event())
                call = c.stream(held_open(["abcdefgh"], releases[-1]), stream_id=f"storm-{i}")
                next(iter(call))
                call.cancel()
            for r in releases:  # the client's request generators end
                r.set()
            deadline = time.monotonic() + 30
            while held() < 100 and time.monotonic() < deadline:  # each detach lands on the server's loop
                time.sleep(0.05)
            assert held() == 100
            holding = traced() - before

            async def idle_timeout_passes():  # what the watchdog does once idle_timeout_s has passed
                return srv.server.registry.expire(now=time.monotonic() + config.idle_timeout_s + 1)

            assert srv.call(idle_timeout_passes()) == 100 and held() == 0
            left = traced() - before
        finally:
            tracemalloc.stop()
    assert holding > 0 and left < 0.1 * holding, (holding, left)


def test_only_resent_chunks_are_marked_duplicate(server):
    """A chunk longer than the server's piece size (its answer merged from several model calls) and the final
    response are new, not duplicates."""
    with SegmenterClient(server.target) as c:
        rs = list(c.stream([TEXT[:200], TEXT[200:230]]))
    assert [r.processed_chars for r in rs] == [200, 230, 230] and rs[-1].final
    assert [r.duplicate for r in rs] == [False, False, False]


def test_a_call_that_has_not_opened_its_stream_when_the_grace_ends_gets_the_named_status(tiny_model):
    """Issue 30, item 34: a call in no registry yet (its config not read) when the grace period ends gets the
    shutdown's UNAVAILABLE at once, not gRPC's "Cancelling all calls" seconds later; the log has no traceback."""
    import logging
    import threading

    config = ServeConfig(port=0, metrics_port=None)
    srv = BackgroundServer(tiny_model, config).start()
    release = threading.Event()
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger().addHandler(handler)
    try:
        with grpc.insecure_channel(srv.target) as ch:
            stub = pb_grpc.SegmenterStub(ch)

            def nothing_yet():  # connected, and silent: the server waits for the StreamConfig
                release.wait(30)
                yield from ()

            call = stub.StreamSegment(nothing_yet())
            deadline = time.monotonic() + 30
            while not srv.call(_count_calls(srv)) and time.monotonic() < deadline:
                time.sleep(0.02)
            t0 = time.monotonic()
            srv.stop(grace=0.2)
            with pytest.raises(grpc.RpcError) as e:
                next(call)
            assert time.monotonic() - t0 < 4.0  # before gRPC's own grace (0.2 + 5 s) could cancel it
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value.details()
            assert "grace period ended before this call had opened its stream" in e.value.details()
    finally:
        release.set()
        logging.getLogger().removeHandler(handler)
        if srv.server is not None:
            srv.stop(grace=0)
    assert not any(r.exc_info for r in records), [r.getMessage() for r in records if r.exc_info]


async def _count_calls(srv) -> int:
    return len(srv.server.servicer.calls)
