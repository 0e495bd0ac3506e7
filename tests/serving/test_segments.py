import numpy as np
import pytest

from hmlstm.serving.batch import next_chars
from hmlstm.serving.segments import SegmentTracker, Span
from hmlstm.serving.stream import StreamError, StreamRegistry, StreamState

TEXT = "abcdefghij"
Z = np.zeros((10, 2))
Z[[2, 5, 6], 0] = 1  # layer 1 closes "abc", "def", "g"
Z[[5], 1] = 1  # layer 2 closes "abcdef"


def run(chunks, max_chars=1000, alignment=None):
    tr = SegmentTracker([1, 2], max_chars, alignment)
    closed, bounds, pos = [], {1: [], 2: []}, 0
    for size in chunks:
        b, c = tr.feed(pos, TEXT[pos : pos + size], Z[pos : pos + size])
        for l in b:
            bounds[l] += b[l]
        closed += c
        pos += size
    return bounds, sorted(closed + tr.flush()[1], key=lambda s: (s.layer, s.start))


def test_segments_and_boundaries():
    bounds, spans = run([10])
    assert bounds == {1: [2, 5, 6], 2: [5]}
    assert [(s.layer, s.text) for s in spans] == [(1, "abc"), (1, "def"), (1, "g"), (1, "hij"), (2, "abcdef"),
                                                  (2, "ghij")]
    assert all(s.final for s in spans)


@pytest.mark.parametrize("chunks", [[1] * 10, [3, 3, 4], [7, 3], [2, 8]])
@pytest.mark.parametrize("alignment", [None, {1: "start", 2: "end"}])
def test_any_chunking_gives_the_same_segments(chunks, alignment):
    assert run(chunks, alignment=alignment) == run([10], alignment=alignment)


def test_a_start_aligned_layer_cuts_before_the_character_it_fired_on():
    bounds, spans = run([10], alignment={1: "start", 2: "end"})
    assert bounds == {1: [2, 5, 6], 2: [5]}  # boundary offsets are where z fired, whatever the alignment
    assert [(s.layer, s.text) for s in spans] == [(1, "ab"), (1, "cde"), (1, "f"), (1, "ghij"), (2, "abcdef"),
                                                  (2, "ghij")]


def test_a_start_aligned_boundary_on_the_first_character_makes_no_empty_segment():
    tr = SegmentTracker([1], alignment={1: "start"})
    z = np.zeros((6, 1))
    z[[0, 3], 0] = 1
    _, closed = tr.feed(0, "thecat", z)
    assert [s.text for s in closed + tr.flush()[1]] == ["the", "cat"]


def test_alignment_survives_the_persistent_form():
    tr = SegmentTracker([1, 2], alignment={1: "start"})
    back = SegmentTracker.from_dict(tr.to_dict())
    assert back.alignment == {1: "start", 2: "end"} and tr.copy().alignment == back.alignment


def test_marks_go_after_an_end_aligned_boundary_and_before_a_start_aligned_one():
    from hmlstm.serving.render import mark

    assert mark("the cat", 0, {1: [2]}) == "the| cat"
    assert mark("thecatsat", 0, {1: [0, 3, 6]}, {1: "start"}) == "the|cat|sat"
    assert mark("catsat", 3, {1: [3, 6]}, {1: "start"}) == "|cat|sat"  # a later chunk may open with a cut
    assert mark("thecat", 0, {1: [2], 2: [3]}, {1: "end", 2: "start"}) == "the‖cat"


@pytest.mark.parametrize("chunks", [[10], [1] * 10, [4, 6]])
@pytest.mark.parametrize("alignment", [None, {2: "start"}])
def test_long_segment_is_closed_at_the_limit_whatever_the_chunking(chunks, alignment):
    _, spans = run(chunks, max_chars=3, alignment=alignment)
    layer2 = [s.text for s in spans if s.layer == 2]
    assert layer2 == (["abc", "def", "ghi", "j"] if alignment is None else ["abc", "de", "fgh", "ij"])


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


def top_k_chars(logits, chars, k):
    return next_chars(np.asarray(logits)[None], [k], chars)[0]


def test_top_k_chars_are_probabilities_in_order():
    got = top_k_chars(np.array([0.0, 2.0, 1.0]), ["?", "a", "b"], 2)
    assert [c for c, _ in got] == ["a", "b"]
    p = np.exp([0.0, 2.0, 1.0]) / np.exp([0.0, 2.0, 1.0]).sum()
    assert got[0][1] == pytest.approx(p[1]) and got[1][1] == pytest.approx(p[2])
    assert top_k_chars(np.array([0.0, 2.0, 1.0]), ["?", "a", "b"], 1) == [("a", pytest.approx(p[1]))]
    assert top_k_chars(np.array([0.0, 2.0, 1.0]), ["?", "a", "b"], 0) == []
    # several rows at once, each with its own k: each as it would be alone
    rows = np.array([[0.0, 2.0, 1.0], [3.0, 1.0, 2.0], [0.0, 0.0, 5.0]])
    together = next_chars(rows, [2, 0, 3], ["?", "a", "b"])
    assert together == [top_k_chars(r, ["?", "a", "b"], k) for r, k in zip(rows, [2, 0, 3])]
    assert [c for c, _ in together[2]] == ["b", "?", "a"]  # ties keep the vocabulary's order


def test_top_k_chars_stay_finite_for_large_logits():
    """Softmax subtracts the largest logit first: exp(1000) alone would overflow to inf, and inf / inf is nan."""
    got = top_k_chars(np.array([1000.0, 999.0, 0.0], np.float32), ["a", "b", "c"], 3)
    assert [c for c, _ in got] == ["a", "b", "c"] and all(np.isfinite(p) for _, p in got)
    assert got[0][1] == pytest.approx(1 / (1 + np.exp(-1.0)), rel=1e-5)


@pytest.mark.parametrize("sizes", [[6], [3, 3], [1] * 6, [4, 2]])
def test_marking_in_pieces_prints_the_same_as_marking_the_whole(sizes):
    """An end-aligned cut at a piece's end and a start-aligned one at the next piece's start are one cut."""
    from hmlstm.serving.render import Marker, mark

    bounds = {1: [2], 2: [3]}  # layer 1 fires on "e" (end-aligned), layer 2 on "c" (start-aligned)
    alignment = {1: "end", 2: "start"}
    m, out, pos = Marker(alignment), "", 0
    for n in sizes:
        out += m.feed("thecat"[pos : pos + n], pos, {l: [o for o in offs if pos <= o < pos + n]
                                                     for l, offs in bounds.items()})
        pos += n
    assert out + m.close() == mark("thecat", 0, bounds, alignment) == "the‖cat"


def test_a_copy_is_equal_and_independent():
    """StreamState snapshots the tracker with copy() after every response; a resume rewinds to one."""
    tr = SegmentTracker([1, 2], 1000)
    tr.feed(0, TEXT[:4], Z[:4])
    snap = tr.copy()
    assert snap.to_dict() == tr.to_dict()
    tr.feed(4, TEXT[4:], Z[4:])
    assert snap.end == 4 and snap.open_start == {1: 3, 2: 0} and snap._text(0, 4) == "abcd"
    fresh = SegmentTracker([1, 2], 1000)
    fresh.feed(0, TEXT[:4], Z[:4])
    assert snap.feed(4, TEXT[4:], Z[4:]) == fresh.feed(4, TEXT[4:], Z[4:])  # the snapshot goes on as the original


def test_the_default_segment_limit_is_65536_characters():
    tr = SegmentTracker([1])
    _, closed = tr.feed(0, "x" * 65_537, np.zeros((65_537, 1)))
    assert [(s.start, s.end) for s in closed] == [(0, 65_536)]


def test_a_segment_that_reaches_the_limit_exactly_is_closed_at_once():
    tr = SegmentTracker([1], max_segment_chars=4)
    _, closed = tr.feed(0, "abcd", np.zeros((4, 1)))
    assert [(s.start, s.end, s.text, s.final) for s in closed] == [(0, 4, "abcd", True)]
    assert tr.open_spans() == [] and tr.flush() == ({}, [])


def test_no_empty_segment_is_open_or_flushed_after_a_boundary_on_the_last_character():
    tr = SegmentTracker([1], 1000)
    z = np.zeros((4, 1))
    z[3] = 1  # "abcd" closes at its last character: nothing is open
    _, closed = tr.feed(0, "abcd", z)
    assert [s.text for s in closed] == ["abcd"]
    assert tr.open_spans() == [] and tr.flush() == ({}, [])


def test_flush_reads_the_open_text_after_the_buffer_has_moved_on():
    """Closed segments drop out of the tracker's buffer, so the open one's text starts past offset 0."""
    tr = SegmentTracker([1], 1000)
    z = np.zeros((10, 1))
    z[5] = 1
    tr.feed(0, TEXT[:8], z[:8])
    tr.feed(8, TEXT[8:], z[8:])
    assert tr._buffer_start == 6
    assert [(s.start, s.end, s.text) for s in tr.flush()[1]] == [(6, 10, "ghij")]


def test_a_refused_rewind_changes_nothing_and_what_it_names_as_held_stays_resumable(tiny_model):
    from hmlstm.serving.runner import process_chunk_sync

    st = StreamState(tiny_model.zero_state(1), tiny_model.boundary_layers, 0, "r")
    for off in range(0, 20, 2):  # responses end at 2, 4, ..., 20
        process_chunk_sync(tiny_model, st, off, "ab cd ef gh ij kl mn"[off : off + 2], 4096)
    at_4 = {k: v.copy() for k, v in st._history[2][1].items()}  # after the start (0), 2 and 4
    with pytest.raises(StreamError, match=r"offset 5: .*held: 0\.\.20"):
        st.rewind(5)
    assert st.processed == 20
    st.rewind(4)  # named as held: it is
    assert st.processed == 4 and all(np.array_equal(st.state[k], at_4[k]) for k in at_4)


def test_a_resumed_stream_is_attached_and_counts_against_the_limit():
    reg = StreamRegistry(max_streams=1, idle_timeout_s=60)
    make = lambda: StreamState({}, [1], 0, "a")  # noqa: E731
    a = reg.open(make, "a", resume=False)
    reg.detach(a, finished=False)
    b = reg.open(lambda: StreamState({}, [1], 0, "b"), "b", resume=False)  # the one slot is taken again
    with pytest.raises(StreamError) as e:
        reg.open(make, "a", resume=True)
    assert e.value.code == "RESOURCE_EXHAUSTED"
    reg.detach(b, finished=True)
    again = reg.open(make, "a", resume=True)
    assert again is a and a.attached and reg.active == 1
    assert reg.expire(now=a.last_seen + 3600) == 0  # an attached stream never expires
    with pytest.raises(StreamError) as e:  # a second call on it: the first has not let go
        reg.open(make, "a", resume=True)
    assert e.value.code in ("ABORTED", "RESOURCE_EXHAUSTED")


def test_next_chars_are_the_models_prediction_after_the_chunks_last_character(tiny_model):
    from hmlstm import spec
    from hmlstm.serving.runner import process_chunk_sync

    text = "abcab cabc"
    st = StreamState(tiny_model.zero_state(1), tiny_model.boundary_layers, 3, "n")
    got = process_chunk_sync(tiny_model, st, 0, text, 4096).next_chars
    ids = np.array([[tiny_model.vocab.encode(text)]], np.int32).reshape(1, -1)
    logits = tiny_model.run(ids, np.array([len(text)], np.int32), tiny_model.zero_state(1))[spec.LOGITS][0, -1]
    want = top_k_chars(logits, tiny_model.vocab.chars, 3)
    assert [c for c, _ in got] == [c for c, _ in want]
    assert [p for _, p in got] == pytest.approx([p for _, p in want], abs=1e-5)


def test_a_detached_stream_is_forgotten_only_after_the_idle_timeout():
    reg = StreamRegistry(max_streams=4, idle_timeout_s=60)
    st = reg.open(lambda: StreamState({}, [1], 0, "idle"), "idle", resume=False)
    reg.detach(st, finished=False)
    assert reg.expire(now=st.last_seen + 30) == 0 and reg.held("idle")
    assert reg.expire(now=st.last_seen + 61) == 1 and not reg.held("idle")


def _lookahead_run(z_steps, z_pad, chunks, k, max_chars, roundtrip=False):
    """Feed TEXT in ``chunks`` to a tracker with look-ahead k (z_steps: the model's rows per step, z_pad: its
    rows for the k padding steps), optionally through the persistent form after every chunk."""
    tr = SegmentTracker([1, 2], max_chars, {1: "start", 2: "end"}, lookahead=k)
    bounds, closed, decided, pos = {1: [], 2: []}, [], [], 0
    for size in chunks:
        b, c = tr.feed(pos, TEXT[pos : pos + size], z_steps[pos : pos + size])
        pos += size
        for l in b:
            bounds[l] += b[l]
        closed += c
        decided.append(tr.decided)
        assert tr.decided == max(0, pos - k) and all(s.end <= tr.decided for s in tr.open_spans())
        if roundtrip:
            tr = SegmentTracker.from_dict(tr.to_dict()).copy()
    b, c = tr.flush(z_pad)
    assert [s.layer for s in c] == sorted(s.layer for s in c)  # per layer, as every response's segments are
    for l in b:
        bounds[l] += b[l]
    return bounds, sorted(closed + c, key=lambda s: (s.layer, s.start)), decided


@pytest.mark.parametrize("k", [1, 3, 12])  # 12: more than the whole text
@pytest.mark.parametrize("chunks", [[10], [1] * 10, [3, 3, 4], [2, 8], [7, 1, 2]])
@pytest.mark.parametrize("max_chars", [1000, 3])
def test_look_ahead_decides_each_character_k_steps_later_whatever_the_chunking(k, chunks, max_chars):
    """A model with look-ahead k outputs at step t the boundaries of character t - k (and the last k come from
    padding steps after the end): any chunking, and a save and load after every chunk, gives exactly what
    a tracker without look-ahead gives on the rows realigned to their characters."""
    rng = np.random.default_rng(k * 100 + len(chunks))
    decided_rows = (rng.random((10, 2)) < 0.35).astype(float)
    steps = np.concatenate([np.zeros((k, 2)), decided_rows])  # step t says what row t - k decided
    z_steps, z_pad = steps[:10], steps[10:]
    assert len(z_pad) == k
    tr = SegmentTracker([1, 2], max_chars, {1: "start", 2: "end"})
    b, c = tr.feed(0, TEXT, decided_rows)
    want = (b, sorted(c + tr.flush()[1], key=lambda s: (s.layer, s.start)))
    for roundtrip in (False, True):
        bounds, spans, _ = _lookahead_run(z_steps, z_pad, chunks, k, max_chars, roundtrip)
        assert (bounds, spans) == want
        assert "".join(s.text for s in spans if s.layer == 1) == TEXT


def test_the_end_of_a_stream_with_undecided_characters_needs_the_padding_steps():
    tr = SegmentTracker([1], lookahead=2)
    tr.feed(0, "abc", np.zeros((3, 1)))
    assert (tr.decided, tr.undecided) == (1, 2)
    with pytest.raises(ValueError, match="2 undecided character.*2 padding steps"):
        tr.flush()
    tr2 = SegmentTracker([1], lookahead=2)  # a record written before look-ahead loads as a model without it
    old = {k: v for k, v in tr2.to_dict().items() if k not in ("lookahead", "decided")}
    assert SegmentTracker.from_dict(old).lookahead == 0


@pytest.mark.parametrize("layers", [[2], [1, 3], [3, 1], [2, 3]])
def test_each_reported_layer_reads_its_own_column_of_boundaries(layers):
    """Layers reported out of the model's order, or not from its first, take their own column of z."""
    z = np.zeros((10, 3))
    z[2, 0] = z[5, 1] = z[7, 2] = 1  # layer 1 fires at 2, layer 2 at 5, layer 3 at 7
    tr = SegmentTracker(layers, alignment={1: "start", 2: "start", 3: "start"})
    bounds, closed = tr.feed(0, TEXT, z)
    assert bounds == {l: [{1: 2, 2: 5, 3: 7}[l]] for l in layers}
    assert sorted((s.layer, s.text) for s in closed) == sorted((l, TEXT[: {1: 2, 2: 5, 3: 7}[l]]) for l in layers)


def test_a_resume_rewinds_the_held_stream_to_the_offset_it_names(tiny_model):
    """The server may have run chunks whose responses the client never saw: a resume goes back to the last
    response the client names (its state, tracker and processed count), whatever was run after it."""
    from hmlstm.serving.runner import process_chunk_sync

    reg = StreamRegistry(max_streams=4, idle_timeout_s=60)
    st = reg.open(lambda: StreamState(tiny_model.zero_state(1), tiny_model.boundary_layers, 0, "r"), "r", False)
    after = {}
    for off in (0, 5, 10):
        process_chunk_sync(tiny_model, st, off, "abcde", 4096)
        after[st.processed] = (st.tracker.to_dict(), {k: np.array(v) for k, v in st.state.items()})
    reg.detach(st, finished=False)
    back = reg.open(None, "r", True, resume_offset=5)
    assert back is st and back.processed == 5 and back.tracker.to_dict() == after[5][0]
    for k, v in after[5][1].items():
        np.testing.assert_array_equal(back.state[k], v)


def test_a_stream_made_without_a_look_ahead_decides_every_character_it_was_fed(tiny_model):
    from hmlstm.serving.runner import process_chunk_sync

    st = StreamState(tiny_model.zero_state(1), tiny_model.boundary_layers, 0)
    r = process_chunk_sync(tiny_model, st, 0, "abcab", 4096)
    assert r.decided_chars == r.processed_chars == 5 and st.padding == 0
