import numpy as np
import pytest

from hmlstm.serving.segments import SegmentTracker, Span
from hmlstm.serving.stream import StreamError, StreamRegistry, StreamState, top_k_chars

TEXT = "abcdefghij"
Z = np.zeros((10, 2))
Z[[2, 5, 6], 0] = 1  # layer 1 closes "abc", "def", "g"
Z[[5], 1] = 1  # layer 2 closes "abcdef"


def run(chunks, max_chars=1000):
    tr = SegmentTracker([1, 2], max_chars)
    closed, bounds, pos = [], {1: [], 2: []}, 0
    for size in chunks:
        b, c = tr.feed(pos, TEXT[pos : pos + size], Z[pos : pos + size])
        for l in b:
            bounds[l] += b[l]
        closed += c
        pos += size
    return bounds, sorted(closed + tr.flush(), key=lambda s: (s.layer, s.start))


def test_segments_and_boundaries():
    bounds, spans = run([10])
    assert bounds == {1: [2, 5, 6], 2: [5]}
    assert [(s.layer, s.text) for s in spans] == [(1, "abc"), (1, "def"), (1, "g"), (1, "hij"), (2, "abcdef"),
                                                  (2, "ghij")]
    assert all(s.final for s in spans)


@pytest.mark.parametrize("chunks", [[1] * 10, [3, 3, 4], [7, 3], [2, 8]])
def test_any_chunking_gives_the_same_segments(chunks):
    assert run(chunks) == run([10])


@pytest.mark.parametrize("chunks", [[10], [1] * 10, [4, 6]])
def test_long_segment_is_closed_at_the_limit_whatever_the_chunking(chunks):
    _, spans = run(chunks, max_chars=3)
    layer2 = [s.text for s in spans if s.layer == 2]
    assert layer2 == ["abc", "def", "ghi", "j"]


def test_open_spans_have_no_text():
    tr = SegmentTracker([1])
    tr.feed(0, "abcd", Z[:4, :1])
    assert tr.open_spans() == [Span(1, 3, 4, "", False)]


def test_tracker_refuses_out_of_order_feed():
    tr = SegmentTracker([1])
    with pytest.raises(ValueError):
        tr.feed(3, "x", np.zeros((1, 1)))


def _state():
    return StreamState({}, [1], 0, "s")


def test_accept_rules():
    st = _state()
    with pytest.raises(StreamError) as e:
        st.accept(0, "", 10)
    assert e.value.code == "INVALID_ARGUMENT"
    with pytest.raises(StreamError) as e:
        st.accept(0, "x" * 11, 10)
    assert e.value.code == "INVALID_ARGUMENT"
    with pytest.raises(StreamError) as e:
        st.accept(5, "abc", 10)
    assert e.value.code == "OUT_OF_RANGE"
    assert st.accept(0, "abc", 10) == "abc"
    st.processed = 3
    with pytest.raises(StreamError) as e:
        st.accept(1, "bc", 10)  # backwards within one call
    assert e.value.code == "INVALID_ARGUMENT"
    st.attach()  # a resumed call may resend from anywhere at or before processed
    assert st.accept(1, "bcde", 10) == "de"
    st.attach()
    assert st.accept(0, "ab", 10) == ""


def test_registry_resume_conflicts_and_capacity():
    reg = StreamRegistry(max_streams=1, idle_timeout_s=10)
    st = reg.open(_state, "s", False)
    with pytest.raises(StreamError) as e:
        reg.open(_state, "t", False)
    assert e.value.code == "RESOURCE_EXHAUSTED"
    with pytest.raises(StreamError) as e:
        reg.open(_state, "s", True)
    assert e.value.code == "ABORTED"
    reg.detach(st, finished=False)
    assert reg.open(_state, "s", True) is st
    reg.detach(st, finished=False)
    with pytest.raises(StreamError) as e:
        reg.open(_state, "s", False)
    assert e.value.code == "ALREADY_EXISTS"
    assert reg.expire(now=st.last_seen + 11) == 1
    with pytest.raises(StreamError) as e:
        reg.open(_state, "s", True)
    assert e.value.code == "NOT_FOUND"


def test_top_k_chars_are_probabilities_in_order():
    got = top_k_chars(np.array([0.0, 2.0, 1.0]), ["?", "a", "b"], 2)
    assert [c for c, _ in got] == ["a", "b"]
    p = np.exp([0.0, 2.0, 1.0]) / np.exp([0.0, 2.0, 1.0]).sum()
    assert got[0][1] == pytest.approx(p[1]) and got[1][1] == pytest.approx(p[2])
