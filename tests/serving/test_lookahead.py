"""A model with look-ahead (train --lookahead K) end to end: its K is recorded where clients look, and every
path (streamed in any chunking, unary, resumed, loaded from a state store, `segment --local` and `--server`)
decides exactly the boundaries of one pass over the whole text with K padding steps after it."""

import json
import threading

import numpy as np
import pytest

from hmlstm.serving.background import BackgroundServer
from hmlstm.serving.client import SegmenterClient
from hmlstm.serving.config import ServeConfig
from hmlstm.serving.model import load_model
from hmlstm.serving.segments import SegmentTracker
from tests.conftest import TINY_MODEL, shared_folder
from tests.serving.test_server import chunked, collect, held_open, retry_aborted, unary

K = 2


@pytest.fixture(scope="module")
def lookahead_onnx(tmp_path_factory):
    """A tiny model taught word starts K characters late, exported (a short validation grid)."""
    from hmlstm.export.convert import ExportConfig, export
    from hmlstm.model.config import TrainConfig
    from hmlstm.model.data import strip_corpus, synthetic_corpus
    from hmlstm.model.train import train

    with shared_folder(tmp_path_factory, "lookahead") as folder:
        out = folder / "lookahead.onnx"
        if not out.exists():
            cfg = TrainConfig(batch_size=8, seq_len=20, max_steps=30, checkpoint_every=30, learning_rate=3e-2,
                              boundary_targets=("words",), lookahead=K)
            train(strip_corpus(synthetic_corpus(seed=0, n_chars=8000), " "), TINY_MODEL, cfg, folder / "lookahead-run",
                  progress=False)
            export(folder / "lookahead-run", out, ExportConfig(times=(1, 7, 333), batches=(1, 3)), log=lambda m: None)
    return out


@pytest.fixture(scope="module")
def text():
    from hmlstm.model.data import strip_corpus, synthetic_corpus

    return strip_corpus(synthetic_corpus(seed=7, n_chars=900), " ").text[:600]


@pytest.fixture(scope="module")
def expected(lookahead_onnx, text):
    """One pass over the text and K padding steps (hmlstm.evaluation, not the server's code), each character's
    boundary taken from the step K later, cut into segments by a tracker without look-ahead."""
    from hmlstm.evaluation import run_model

    out = run_model(lookahead_onnx, text)
    assert out.boundaries.shape[0] == len(text)
    tr = SegmentTracker([1], alignment=out.alignment)
    bounds, closed = tr.feed(0, text, out.boundaries)
    segs = sorted((s.layer, s.start, s.end, s.text) for s in closed + tr.flush()[1])
    assert 5 < len(bounds[1]) < len(text) / 2  # a model that fires: the comparison means something
    return {1: bounds[1]}, segs


@pytest.fixture(scope="module")
def server(lookahead_onnx):
    config = ServeConfig(port=0, metrics_port=None, max_chunk_chars=500, piece_chars=64)
    with BackgroundServer(load_model(lookahead_onnx, "cpu"), config) as srv:
        yield srv


def test_k_is_part_of_the_model_card_info_describe_and_triton(lookahead_onnx, server, capsys, tmp_path):
    from hmlstm import spec
    from hmlstm.cli import main

    assert json.loads(spec.card_path(lookahead_onnx).read_text())["lookahead_chars"] == K
    assert load_model(lookahead_onnx, "cpu").lookahead == K
    assert main(["info", str(lookahead_onnx)]) == 0
    assert f"look-ahead: {K} characters" in capsys.readouterr().out
    with SegmenterClient(server.target) as c:
        assert c.describe().lookahead_chars == K
    from hmlstm.export.triton import write_repository

    config = write_repository(lookahead_onnx, tmp_path / "repo").read_text()
    assert 'key: "lookahead_chars"' in config and f'string_value: "{K}"' in config


@pytest.mark.parametrize("size", [1, 2, 3, 64, 500])
def test_every_chunking_and_unary_decide_what_one_pass_decides(server, text, expected, size):
    with SegmenterClient(server.target) as c:
        rs = list(c.stream(chunked(text, size)))
        assert unary(c, text) == expected
    assert collect(rs) == expected
    for r in rs[:-1]:  # the last K characters wait; nothing is reported beyond decided_chars
        assert r.decided_chars == max(0, r.processed_chars - K)
        assert all(o < r.decided_chars for lb in r.boundaries for o in lb.offsets)
        assert all(s.end <= r.decided_chars for s in r.segments)
    assert rs[-1].final and rs[-1].decided_chars == rs[-1].processed_chars == len(text)


def test_a_stream_resumed_mid_way_still_decides_exactly(server, text, expected):
    with SegmenterClient(server.target) as c:
        call = c.stream(iter(chunked(text, 7)), stream_id="look-resume")
        first = []
        for r in call:
            first.append(r)
            if len(first) == 5:
                call.cancel()
                break
        at = first[-1].processed_chars
        second = retry_aborted(lambda: list(c.stream(chunked(text[at:], 11), stream_id="look-resume", resume=True,
                                                     start_offset=at)))
    assert collect(first + second) == expected


def test_a_stream_saved_to_a_store_resumes_on_another_server_exactly(lookahead_onnx, text, expected, tmp_path):
    store = f"sqlite:{tmp_path / 'streams.db'}"
    config = ServeConfig(port=0, metrics_port=None, piece_chars=64, state_store=store)
    model = load_model(lookahead_onnx, "cpu")
    release = threading.Event()  # the request stream stays open: a half-close would end the stream for good
    with BackgroundServer(model, config) as one, SegmenterClient(one.target) as c:
        call = c.stream(held_open(chunked(text, 43)[:7], release), stream_id="look-store-2")
        first = []
        for r in call:
            first.append(r)
            if len(first) == 7:
                assert r.durable
                call.cancel()
                break
        release.set()
    at = first[-1].processed_chars
    with BackgroundServer(model, config) as two, SegmenterClient(two.target) as c:
        second = list(c.stream(chunked(text[at:], 43), stream_id="look-store-2", resume=True, start_offset=at))
    assert collect(first + second) == expected


@pytest.mark.parametrize("where", ["--local", "--server"])
def test_segment_prints_the_same_segments_locally_and_through_a_server(lookahead_onnx, server, text, expected,
                                                                       where, tmp_path, capsys):
    from hmlstm.cli import main

    f = tmp_path / "in.txt"
    f.write_text(text)
    run = ["segment", str(f), "--chunk-chars", "5"] + (
        ["--local", "--model", str(lookahead_onnx)] if where == "--local" else ["--server", server.target])
    assert main(run + ["--jsonl"]) == 0
    got = sorted((s["layer"], s["sent_start"], s["sent_end"], s["sent_text"])
                 for s in map(json.loads, capsys.readouterr().out.splitlines()))
    assert got == expected[1]
    assert main(run) == 0  # marked text: a mark before each word start but the text's first
    marked = capsys.readouterr().out
    assert marked.replace("|", "") == text
    assert marked.count("|") == len([o for o in expected[0][1] if o > 0])


def test_the_training_targets_move_k_characters_later():
    from hmlstm.model.data import delay

    a = np.arange(1, 7, dtype=np.float32)[:, None]
    np.testing.assert_array_equal(delay(a, 2)[:, 0], [0, 0, 1, 2, 3, 4])
    assert delay(a, 0) is a and delay(None, 3) is None
