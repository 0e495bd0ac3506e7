"""Property-based fuzzing of the request stream: never a crash, never UNKNOWN."""

import grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hmlstm.v1 import segmenter_pb2 as pb
from hmlstm.v1 import segmenter_pb2_grpc as pb_grpc

ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
           grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS,
           grpc.StatusCode.ABORTED, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED}

configs = st.builds(
    pb.StreamConfig,
    layers=st.lists(st.integers(0, 4), max_size=3),
    top_k=st.integers(0, 60),
    stream_id=st.one_of(st.just(""), st.text(max_size=10), st.sampled_from(["fz1", "fz2"])),
    resume=st.booleans(),
    resume_offset=st.integers(0, 300),
)
texts = st.one_of(st.text(max_size=40), st.just(""), st.text(min_size=501, max_size=600),
                  st.text(alphabet="abcdefgh .", max_size=40))


@st.composite
def request_streams(draw):
    reqs = [pb.SegmentRequest(config=draw(configs))]  # permuted below: chunks may come before it
    offset = 0
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["good", "good", "good", "bad_offset", "config"]))
        if kind == "config":
            reqs.append(pb.SegmentRequest(config=draw(configs)))
            continue
        text = draw(texts)
        off = offset if kind == "good" else draw(st.integers(0, 1000))
        reqs.append(pb.SegmentRequest(chunk=pb.TextChunk(offset=off, text=text)))
        offset = off + len(text)
    if draw(st.booleans()):
        reqs = draw(st.permutations(reqs))
    return reqs, draw(st.one_of(st.none(), st.integers(0, 3)))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(case=request_streams())
def test_random_request_streams_never_crash_the_server_or_answer_unknown(server, case):
    reqs, cancel_after = case
    with grpc.insecure_channel(server.target) as ch:
        stub = pb_grpc.SegmenterStub(ch)
        call = stub.StreamSegment(iter(reqs), timeout=10)
        code = grpc.StatusCode.OK
        try:
            for i, _ in enumerate(call):
                if cancel_after is not None and i >= cancel_after:
                    call.cancel()
                    break
        except grpc.RpcError as e:
            code = e.code()
        assert code in ALLOWED, (code, call.details() if hasattr(call, "details") else "")
        # The server is alive and still correct.
        assert stub.Segment(pb.SegmentTextRequest(text="abc"), timeout=10).chars == 3
