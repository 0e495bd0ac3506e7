"""Cross-stream batching: same results as running each stream alone, fair, in order."""

import asyncio

import numpy as np
import pytest

from hmlstm import spec
from hmlstm.model.data import synthetic_corpus
from hmlstm.serving.batching import BatchingRunner
from hmlstm.serving.runner import Runner, process_chunk_sync
from hmlstm.serving.stream import StreamState


def new_stream(model):
    return StreamState(model.zero_state(1), model.boundary_layers, top_k=3)


def alone(model, text, size):
    st = new_stream(model)
    out = [process_chunk_sync(model, st, o, text[o : o + size], 4096) for o in range(0, len(text), size)]
    return out, st


async def streamed(runner, text, size, start_delay=0.0):
    await asyncio.sleep(start_delay)
    st = new_stream(runner.model)
    out = []
    for o in range(0, len(text), size):
        out.append(await runner.process_chunk(st, o, text[o : o + size], 4096))
    return out, st


def assert_same(a, b):
    (ra, sa), (rb, sb) = a, b
    assert len(ra) == len(rb)
    for x, y in zip(ra, rb):
        assert x.boundaries == y.boundaries and x.segments == y.segments
        assert x.processed_chars == y.processed_chars
        assert [c for c, _ in x.next_chars] == [c for c, _ in y.next_chars]
        np.testing.assert_allclose([p for _, p in x.next_chars], [p for _, p in y.next_chars], atol=1e-5)
    for k in sa.state:
        np.testing.assert_allclose(sa.state[k], sb.state[k], atol=1e-5)


def test_batched_streams_equal_each_stream_alone(tiny_model):
    texts = [synthetic_corpus(seed=40 + i, n_chars=400).text[: 150 + 37 * i] for i in range(6)]
    sizes = [1, 3, 16, 5, 64, 2]  # mixed chunk sizes: ragged rows in every batch
    delays = [0, 0, 0, 0.05, 0, 0.1]  # two streams join while the others are mid-way
    expected = [alone(tiny_model, t, s) for t, s in zip(texts, sizes)]

    async def main():
        runner = BatchingRunner(tiny_model, max_batch=8, max_wait_us=2000)
        try:
            got = await asyncio.gather(*(streamed(runner, t, s, d) for t, s, d in zip(texts, sizes, delays)))
            return got, runner.batches, runner.rows
        finally:
            runner.close()

    got, batches, rows = asyncio.run(main())
    for g, e in zip(got, expected):
        assert_same(g, e)  # streams that end early (short texts) and join late included
    assert rows / batches > 1.5, "pieces were not actually batched"


def test_batch_rows_are_ragged_and_padding_changes_nothing(tiny_model):
    """Each row of a ragged batch, read with the rest, is what its piece gives alone: boundaries read from
    the row by the tracker's own one-row reader, the next state, and the top-k from the last step's logits."""
    from hmlstm.serving.batching import _Pending
    from hmlstm.serving.runner import Piece
    from hmlstm.serving.segments import SegmentTracker

    runner = BatchingRunner(tiny_model, max_batch=4, max_wait_us=200)
    rng = np.random.default_rng(0)
    texts = [tiny_model.vocab.decode(rng.integers(1, len(tiny_model.vocab), n)) for n in (1, 9, 4)]
    streams = [new_stream(tiny_model) for _ in texts]
    streams[1].top_k = 0  # a row that asked for no top-k between two that did
    batch = [_Pending(Piece.of(tiny_model, st, t, encode=False), t, None, 0.0) for st, t in zip(streams, texts)]
    got = runner._run_batch(batch)
    for st, text, (row, unknown) in zip(streams, texts, got):
        ids = np.array([tiny_model.vocab.encode(text)], np.int32)
        ref = tiny_model.run(ids, np.array([len(text)], np.int32), tiny_model.zero_state(1))
        assert unknown == 0
        assert row.fired == SegmentTracker.fired(ref[spec.BOUNDARIES][0], -tiny_model.lookahead)
        for out, name in tiny_model.state_map.items():
            assert row.state[name].shape == ref[out].shape
            np.testing.assert_allclose(row.state[name], ref[out], atol=1e-5)
        p = np.exp(ref[spec.LOGITS][0, -1] - ref[spec.LOGITS][0, -1].max())
        p /= p.sum()
        want = [tiny_model.vocab.chars[i] for i in np.argsort(-p, kind="stable")[: st.top_k]]
        assert [c for c, _ in row.next_chars] == want
        np.testing.assert_allclose([q for _, q in row.next_chars], np.sort(p)[::-1][: st.top_k], atol=1e-5)
    assert runner.binder is None  # state returns to the host unless IO binding is asked for
    runner.close()
    with pytest.raises(RuntimeError):  # closing shuts its thread down: nothing more can run on it
        runner.pool.submit(int)


def test_a_batch_reads_only_its_rows_own_steps_and_places_them_at_their_offsets():
    """Steps past a row's length (the padding of a ragged batch) never count, however they fired; each row's
    offsets start at its own base (negative: steps that speak of no character yet, for the tracker to drop);
    top-k is read at each row's own last step, for the rows that asked."""
    from hmlstm.serving.batch import read_rows

    z = np.ones((3, 4, 2), np.float32)
    z[2, 1, 0] = 0
    logits = np.zeros((3, 4, 3), np.float32)
    logits[1, 1, 2] = 1.0  # row 1's last step (of 2) favours "c"; its padding steps favour nothing
    outputs = {spec.BOUNDARIES: z, spec.LOGITS: logits, "s": np.arange(3.0)[:, None]}
    rows = read_rows(outputs, np.array([4, 2, 3]), [10, -3, 0], [0, 1, 0], ["a", "b", "c"], {"s": "in"})
    assert [r.fired for r in rows] == [[[10, 11, 12, 13]] * 2, [[-3, -2]] * 2, [[0, 2], [0, 1, 2]]]
    assert [r.state["in"].tolist() for r in rows] == [[[0.0]], [[1.0]], [[2.0]]]
    e = np.e / (np.e + 2)
    assert [r.next_chars for r in rows] == [[], [("c", pytest.approx(e))], []]  # only the row that asked, k = 1


def test_a_batch_gathers_each_rows_own_state_from_calls_and_plain_states():
    """A stream's next state is its row of the call's outputs; the next batch stacks every row's state in the
    order given: rows of one call in any order, rows of two calls interleaved, and plain states (a new stream's
    zeros, a stored one) among them."""
    from hmlstm.serving.batch import StateRow, gather

    call1 = {"a": np.arange(8.0).reshape(4, 2), "b": -np.arange(4.0)[:, None]}
    call2 = {"a": 100 + np.arange(6.0).reshape(3, 2), "b": -100 - np.arange(3.0)[:, None]}
    row = StateRow(call1, 2)
    assert dict(row).keys() == {"a", "b"} and len(row) == 2
    assert row["a"].tolist() == [[4.0, 5.0]] and row["b"].shape == (1, 1)  # a [1, ...] view of its row
    buffers = {"a": np.full((6, 2), np.nan), "b": np.full((6, 1), np.nan)}

    def want(states):
        return {k: np.concatenate([np.asarray(s[k]) for s in states]) for k in buffers}

    plain = {"a": np.array([[7.0, 7.0]]), "b": np.array([[7.0]])}
    for states in ([StateRow(call1, i) for i in (3, 0, 2, 1)],  # one call, reordered: one take per input
                   [StateRow(call2, 1), StateRow(call1, 0), StateRow(call2, 0), StateRow(call1, 3)],
                   [StateRow(call1, 1), plain, StateRow(call2, 2), StateRow(call1, 1)],
                   [plain]):
        got = gather(states, buffers)
        for k, v in want(states).items():
            np.testing.assert_array_equal(got[k], v)
            assert np.shares_memory(got[k], buffers[k])  # in the reused buffers


def test_no_starvation_under_a_hot_stream(tiny_model):
    """A cold stream's piece is served within the next two model pieces, however busy a hot stream is."""

    async def main():
        runner = BatchingRunner(tiny_model, max_batch=4, max_wait_us=0)
        hot = new_stream(tiny_model)
        stop = asyncio.Event()

        async def hot_loop():
            o = 0
            while not stop.is_set():
                await runner.process_chunk(hot, o, "abcdefgh" * 8, 4096)
                o += 64

        hot_task = asyncio.create_task(hot_loop())
        waits = []
        for _ in range(5):
            await asyncio.sleep(0.01)
            cold = new_stream(tiny_model)
            before = runner.batches
            await runner.process_chunk(cold, 0, "xyz", 4096)
            waits.append(runner.batches - before)
        stop.set()
        await hot_task
        runner.close()
        return waits, hot.processed

    waits, hot_processed = asyncio.run(main())
    assert hot_processed > 0
    assert max(waits) <= 2, waits


def test_each_stream_sees_its_responses_in_order(tiny_model):
    async def main():
        runner = BatchingRunner(tiny_model, max_batch=16, max_wait_us=500)
        texts = [synthetic_corpus(seed=i, n_chars=200).text[:120] for i in range(12)]
        got = await asyncio.gather(*(streamed(runner, t, 1 + i % 5) for i, t in enumerate(texts)))
        runner.close()
        return got

    for results, st in asyncio.run(main()):
        ends = [r.processed_chars for r in results]
        assert ends == sorted(ends) and len(set(ends)) == len(ends) and ends[-1] == st.processed == 120
        assert [r.chunk_offset for r in results] == [0, *ends[:-1]]


def test_unbatched_runner_gives_the_same_answers_and_counts_its_characters(tiny_model):
    from hmlstm.serving.metrics import Metrics

    text = synthetic_corpus(seed=9, n_chars=300).text[:200]
    metrics = Metrics()

    async def main():
        runner = Runner(tiny_model, workers=2, metrics=metrics)
        out = await streamed(runner, text, 7)
        runner.close()
        return out

    assert_same(asyncio.run(main()), alone(tiny_model, text, 7))
    assert metrics.registry.get_sample_value("hmlstm_chars_processed_total") == 200


def test_bad_batching_settings(tiny_model):
    with pytest.raises(ValueError):
        BatchingRunner(tiny_model, max_batch=0, max_wait_us=200)
    with pytest.raises(ValueError):
        BatchingRunner(tiny_model, max_batch=4, max_wait_us=-1)
    BatchingRunner(tiny_model, max_batch=1, max_wait_us=0).close()  # a batch of one is a valid setting


def test_a_full_batch_runs_at_once_counts_its_rows_and_close_leaves_no_task(tiny_model):
    """With every attached stream's piece queued the batch is full: it runs without waiting out max_wait_us
    (10 minutes here; the deadline below is 60 s), and rows counts exactly the pieces run."""
    async def main():
        from hmlstm.serving.metrics import Metrics

        metrics = Metrics()
        runner = BatchingRunner(tiny_model, max_batch=4, max_wait_us=600_000_000, attached=lambda: 2,
                                metrics=metrics)
        sts = [new_stream(tiny_model) for _ in range(2)]
        await asyncio.wait_for(asyncio.gather(*(runner.process_chunk(st, 0, "abc", 4096) for st in sts)), 60)
        counts = runner.batches, runner.rows
        # the server's histograms: one batch of 2, and each of the 2 pieces' wait in the queue
        observed = {m.name: {s.name: s.value for s in m.samples} for m in metrics.registry.collect()}
        assert observed["hmlstm_batch_size"]["hmlstm_batch_size_count"] == 1
        assert observed["hmlstm_batch_size"]["hmlstm_batch_size_sum"] == 2
        assert observed["hmlstm_queue_wait_seconds"]["hmlstm_queue_wait_seconds_count"] == 2
        assert 0 <= observed["hmlstm_queue_wait_seconds"]["hmlstm_queue_wait_seconds_sum"] < 60  # waits, not times
        assert observed["hmlstm_chars_processed"]["hmlstm_chars_processed_total"] == 6  # counted once per call
        runner.close()
        await asyncio.sleep(0)  # let the cancellation land
        left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        return counts, left

    (batches, rows), left = asyncio.run(main())
    assert (batches, rows) == (1, 2)
    assert left == []  # the scheduler task ended with close()


# ------------------------------------------------ state kept where the model ran (IO binding)


def test_bound_batched_streams_equal_each_stream_alone(tiny_model):
    """IO binding (forced on for the CPU): same answers, and a steady cohort reuses its state in place."""
    texts = [synthetic_corpus(seed=60 + i, n_chars=400).text[: 120 + 29 * i] for i in range(5)]
    sizes = [1, 3, 16, 5, 2]
    delays = [0, 0, 0, 0.05, 0]  # one joins mid-way; short ones end early
    expected = [alone(tiny_model, t, s) for t, s in zip(texts, sizes)]

    async def main():
        runner = BatchingRunner(tiny_model, max_batch=8, max_wait_us=2000, io_binding=True)
        try:
            got = await asyncio.gather(*(streamed(runner, t, s, d) for t, s, d in zip(texts, sizes, delays)))
            return got, runner.binder.reused, runner.binder.gathered
        finally:
            runner.close()

    got, reused, gathered = asyncio.run(main())
    for g, e in zip(got, expected):
        assert_same(g, e)
    assert reused > 0 and gathered > 0, (reused, gathered)


def test_a_batch_of_one_calls_rows_in_another_order_binds_them_in_place(tiny_model):
    from hmlstm.serving.batching import _Pending
    from hmlstm.serving.device_state import RowRef, host_state
    from hmlstm.serving.runner import Piece
    from hmlstm.serving.segments import SegmentTracker

    runner = BatchingRunner(tiny_model, max_batch=4, max_wait_us=200, io_binding=True)
    rng = np.random.default_rng(1)
    streams = [new_stream(tiny_model) for _ in range(3)]

    def pending(st, n):
        text = tiny_model.vocab.decode(rng.integers(1, len(tiny_model.vocab), n))
        return _Pending(Piece.of(tiny_model, st, text, encode=False), text, None, 0.0)

    first = [pending(st, n) for st, n in zip(streams, (3, 7, 5))]
    for st, (row, _) in zip(streams, runner._run_batch(first)):
        st.state = row.state
    assert runner.binder.gathered == 1 and isinstance(streams[0].state["state_c1"], RowRef)
    second = [pending(streams[i], n) for i, n in ((2, 4), (0, 1), (1, 6))]  # the same streams, in another order
    got = [row for row, _ in runner._run_batch(second)]
    assert runner.binder.reused == 1
    for p, row in zip(second, got):  # each piece gets its own answer, as if run alone from host state
        ids = np.array([tiny_model.vocab.encode(p.text)], np.int32)
        ref = tiny_model.run(ids, np.array([len(p.text)], np.int32), host_state(p.piece.state))
        assert row.fired == SegmentTracker.fired(ref[spec.BOUNDARIES][0], p.piece.base)
        best = np.argsort(-ref[spec.LOGITS][0, -1], kind="stable")[:3]
        assert [c for c, _ in row.next_chars] == [tiny_model.vocab.chars[i] for i in best]
        np.testing.assert_allclose(np.asarray(row.state["state_h2"]), ref["next_state_h2"], atol=1e-5)
    runner._run_batch(second[:2])  # a subset is not one call's rows: gathered on the host
    assert runner.binder.gathered == 2
    runner.close()


def test_unbatched_bound_runner_and_a_stored_record_see_host_state(tiny_model):
    from hmlstm.serving.store import decode_record

    text = synthetic_corpus(seed=11, n_chars=300).text[:150]

    async def main():
        runner = Runner(tiny_model, workers=1, io_binding=True)
        st = StreamState(tiny_model.zero_state(1), tiny_model.boundary_layers, top_k=3, stream_id="s")
        out = []
        for o in range(0, len(text), 9):
            out.append(await runner.process_chunk(st, o, text[o : o + 9], 4096))
        runner.close()
        return (out, st), runner.binder.reused

    got, reused = asyncio.run(main())
    assert_same(got, alone(tiny_model, text, 9))
    assert reused == len(range(0, len(text), 9)) - 1  # every call after the first reused the last one's state
    record = decode_record(got[1].record(8))
    assert all(isinstance(v, np.ndarray) and v.shape[0] == 1 for v in record["state"].values())


def test_io_binding_setting_is_checked():
    from hmlstm.serving.config import ServeConfig

    with pytest.raises(ValueError, match="io_binding"):
        ServeConfig(io_binding="sometimes")


@pytest.mark.parametrize("fraction, min_mean, max_mean", [(1.0, 6.5, 8.0), (0.0, 1.0, 5.0)])
def test_closed_loop_streams_stay_in_one_batch_with_a_wait_fraction(tiny_model, fraction, min_mean, max_mean):
    """Each stream sends its next piece a few event-loop turns after its answer (stream i: 3i turns, not a
    sleep, so a loaded machine staggers them the same way). With max_wait_us=0 alone, the first to come back
    runs by itself and the rest queue behind it (cohorts); waiting up to a fraction of the previous call
    (milliseconds, against microseconds of turns) keeps all 8 together. Measured here: 6.86 (a first batch
    of 1 from the cold start, then 7 and 8s) against 4.00 (two alternating cohorts of 4), the same each run."""
    text = synthetic_corpus(seed=5, n_chars=3000).text[:2048]

    async def main():
        runner = BatchingRunner(tiny_model, max_batch=8, max_wait_us=0, attached=lambda: 8,
                                max_wait_fraction=fraction)

        async def client(i):
            st = new_stream(tiny_model)
            for o in range(0, 6 * 1024, 1024):
                for _ in range(3 * i):  # the client's turnaround, different for each stream
                    await asyncio.sleep(0)
                await runner.process_chunk(st, o, text[: 1024] if o % 2048 == 0 else text[1024:], 4096)

        try:
            await asyncio.gather(*(client(i) for i in range(8)))
            return runner.rows / runner.batches
        finally:
            runner.close()

    mean = asyncio.run(main())
    assert min_mean <= mean <= max_mean, mean


def test_wait_fraction_must_be_a_fraction(tiny_model):
    with pytest.raises(ValueError):
        BatchingRunner(tiny_model, max_batch=4, max_wait_us=200, max_wait_fraction=1.5)


def test_a_piece_waits_up_to_max_wait_us_for_the_other_attached_streams(tiny_model):
    """Two attached streams, the second sends a few event-loop turns after the first: with max_wait_us long
    (60 s; they arrive microseconds apart) and no fraction of a previous call, both run in one batch."""
    async def main():
        runner = BatchingRunner(tiny_model, max_batch=4, max_wait_us=60_000_000, attached=lambda: 2,
                                max_wait_fraction=0.0)
        a, b = new_stream(tiny_model), new_stream(tiny_model)

        async def late():
            for _ in range(5):
                await asyncio.sleep(0)
            return await runner.process_chunk(b, 0, "xyz", 4096)

        await asyncio.wait_for(asyncio.gather(runner.process_chunk(a, 0, "abc", 4096), late()), 60)
        runner.close()
        return runner.batches, runner.rows

    assert asyncio.run(main()) == (1, 2)


def test_a_failed_model_call_fails_every_piece_in_it_and_the_runner_goes_on(tiny_model):
    async def main():
        runner = BatchingRunner(tiny_model, max_batch=4, max_wait_us=60_000_000, attached=lambda: 2)
        good, bad = new_stream(tiny_model), new_stream(tiny_model)
        bad.state = {k: v[:, :-1] for k, v in bad.state.items()}  # a state of the wrong width: the call fails
        results = await asyncio.wait_for(asyncio.gather(runner.process_chunk(good, 0, "abc", 4096),
                                                        runner.process_chunk(bad, 0, "abc", 4096),
                                                        return_exceptions=True), 60)
        runner.attached = lambda: 1
        again = await asyncio.wait_for(runner.process_chunk(new_stream(tiny_model), 0, "abc", 4096), 60)
        runner.close()
        return results, again

    results, again = asyncio.run(main())
    assert all(isinstance(r, Exception) for r in results), results  # both pieces shared the failed call
    assert again.processed_chars == 3  # and the scheduler kept going


def test_text_pieces_are_encoded_with_their_batch_and_count_their_own_unknown_characters(tiny_model):
    """The batch encodes its text pieces in one lookup; each row gets its own ids and its own count of
    characters the vocabulary lacks, beside a piece that came as ids (the look-ahead's padding)."""
    from hmlstm.serving.batching import _Pending
    from hmlstm.serving.runner import Piece
    from hmlstm.serving.segments import SegmentTracker

    runner = BatchingRunner(tiny_model, max_batch=8, max_wait_us=200)
    known = "".join(tiny_model.vocab.chars[1:8])
    texts = [known[:3], "\u2603" + known[:4] + "\u2603\u2603", known[2:3], "\ufffd" + known]  # U+FFFD is in it
    zero = tiny_model.zero_state(1)
    for with_ids in (False, True):
        batch = [_Pending(Piece.of(tiny_model, new_stream(tiny_model), t, encode=False), t, None, 0.0) for t in texts]
        if with_ids:
            padding = Piece(np.zeros((1, 3), np.int32), 3, zero, 5, 0, 0)
            batch.append(_Pending(padding, None, None, 0.0))
        got = runner._run_batch(batch)
        for p, (row, unknown) in zip(batch, got):
            ids, want = (p.piece.tokens[0], 0) if p.text is None else tiny_model.vocab.encode_counting(p.text)
            ref = tiny_model.run(ids[None, :], np.array([len(ids)], np.int32), zero)
            assert unknown == want
            assert row.fired == SegmentTracker.fired(ref[spec.BOUNDARIES][0], p.piece.base)
            np.testing.assert_allclose(row.state["state_h1"], ref["next_state_h1"], atol=1e-5)
        assert [u for _, u in got[:4]] == [0, 3, 0, 0]
    runner.close()


def test_a_held_stream_keeps_only_its_own_rows_of_the_calls_it_was_in(tiny_model):
    """Each stream's next state is a view of its call's outputs (every row of the call). Once its call lets go
    and the stream is held for a resume, it and each of its snapshots own just their rows, with the same
    values; a stream still attached, or one that finished, is left as it is."""
    from hmlstm.serving.stream import StreamRegistry

    async def main():
        runner = BatchingRunner(tiny_model, max_batch=4, max_wait_us=2000, attached=lambda: 3)
        reg = StreamRegistry(8, 60)
        sts = [reg.open(lambda i=i: StreamState(tiny_model.zero_state(1), tiny_model.boundary_layers, 0, f"s{i}"),
                        f"s{i}", False) for i in range(3)]
        for o in (0, 5, 10):
            await asyncio.gather(*(runner.process_chunk(st, o, "abcde", 4096) for st in sts))
        runner.close()
        return reg, sts

    reg, (held, attached, done) = asyncio.run(main())
    states = lambda st: [st.state] + [h[1] for h in st._history]  # noqa: E731
    before = [{k: np.array(v) for k, v in s.items()} for s in states(held)]
    assert all(v.base is not None for v in held.state.values())  # views of the last call's outputs
    reg.detach(held, finished=False)
    reg.detach(done, finished=True)
    for s, want in zip(states(held), before):
        for k, v in s.items():
            assert v.base is None and v.shape == want[k].shape, k  # its own row, not a view of a call's rows
            np.testing.assert_array_equal(v, want[k])
    assert all(v.base is not None for v in attached.state.values())
    assert all(v.base is not None for v in done.state.values())  # forgotten: no copies made for it
    assert not reg.held("s2") and reg.held("s0")
