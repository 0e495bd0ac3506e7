"""The serving commands as users run them: serve (a real process), segment, demo; the shipped model."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hmlstm.cli import main
from hmlstm.serving.background import BackgroundServer
from hmlstm.serving.client import SegmenterClient
from hmlstm.serving.config import ServeConfig
from hmlstm.serving.model import DEFAULT_MODEL, load_model
from tests.conftest import missing
from tests.serving.durable import free_port, wait_serving


@pytest.fixture(scope="module")
def default_model():
    return load_model(DEFAULT_MODEL, "cpu")


def test_shipped_model_streams_like_unary(default_model):
    text = "The for statement iterates over the items of any sequence, in the order they appear. " * 3
    with BackgroundServer(default_model, ServeConfig(port=0, metrics_port=None)) as srv, \
            SegmenterClient(srv.target) as c:
        info = c.describe()
        assert list(info.units) == default_model.units
        assert list(info.boundary_layers) == default_model.boundary_layers
        assert info.trained_without == (default_model.provenance.get("strip_delimiters") or "")
        from hmlstm.model.config import TrainConfig

        # layers taught a target (from the delimiters, or entropy peaks) fire on a unit's start
        taught = TrainConfig(**default_model.provenance["train_config"]).start_aligned
        assert list(info.boundary_alignment) == ["start" if l <= taught else "end" for l in info.boundary_layers]
        assert taught == 3
        whole = c.segment(text)
        for size in (1, 13, 100):
            chunks = [text[i : i + size] for i in range(0, len(text), size)]
            bounds = {}
            segs = []
            for r in c.stream(chunks):
                for lb in r.boundaries:
                    bounds.setdefault(lb.layer, []).extend(lb.offsets)
                segs += [(s.layer, s.start, s.end, s.text) for s in r.segments if s.final]
            assert bounds == {lb.layer: list(lb.offsets) for lb in whole.boundaries}
            assert sorted(segs) == sorted((s.layer, s.start, s.end, s.text) for s in whole.segments)


def _first_chunk_then_wait(release, seconds: float = 30):
    """A client's chunks: 18 characters, then nothing until ``release`` (the call stays open)."""
    yield "The for statement "
    release.wait(seconds)


def _serve(*flags):
    """A real `hmlstm serve` process on a free port (stderr piped), once it answers health checks."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "hmlstm.cli", "serve", "--port", str(port), "--metrics-port",
                             "-1", *flags], stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    target = f"127.0.0.1:{port}"
    try:
        wait_serving(target)
    except BaseException:
        proc.kill()
        raise
    return proc, target


def test_sigterm_lets_an_open_stream_finish_and_refuses_new_calls():
    proc, target = _serve("--grace", "10")
    try:
        release = threading.Event()

        def chunks():
            yield "The for statement "
            release.wait(20)
            yield "is used to iterate."

        with SegmenterClient(target) as c, grpc.insecure_channel(target) as ch:
            watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=""))
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            call = iter(c.stream(chunks()))
            assert next(call).processed_chars == 18
            proc.send_signal(signal.SIGTERM)
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            time.sleep(0.3)
            with SegmenterClient(target) as other, pytest.raises(grpc.RpcError) as e:
                other.segment("new calls are refused")
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            release.set()
            rest = list(call)
            assert rest[-1].final and rest[-1].processed_chars == 37
        assert proc.wait(timeout=30) == 143  # as every hmlstm command ends on SIGTERM, once the shutdown is done
        err = proc.stderr.read()
        assert "shutting down" in err and "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()


def test_serve_reports_cpu_fallback_in_one_clean_line():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "hmlstm.cli", "serve", "--port", str(port), "--metrics-port",
                             "-1"], stderr=subprocess.PIPE, text=True)
    try:
        wait_serving(f"127.0.0.1:{port}")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        lines = proc.stderr.read().splitlines()
        cuda = [l for l in lines if "CUDA" in l]
        assert len(cuda) == 1 and "ONNX Runtime on CPU" in cuda[0]
        assert not any("onnxruntime" in l.lower() and "error" in l.lower() for l in lines)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_segment_command_against_a_server_and_locally_agree(default_model, tmp_path, capsys):
    text = "An iterator is created for the result of the expression list.\n"
    f = tmp_path / "in.txt"
    f.write_text(text)
    with BackgroundServer(default_model, ServeConfig(port=0, metrics_port=None)) as srv:
        assert main(["segment", str(f), "--server", srv.target, "--chunk-chars", "7"]) == 0
        remote = capsys.readouterr().out
        assert main(["segment", str(f), "--server", srv.target, "--jsonl"]) == 0
        jsonl = capsys.readouterr().out
    assert main(["segment", str(f), "--local", "--chunk-chars", "50"]) == 0
    local = capsys.readouterr().out
    assert remote == local
    # what the model was trained without is removed before sending (the server strips nothing), and the output
    # is the text as read, its line breaks and spaces kept, with the marks between
    sent = text.translate(str.maketrans("", "", default_model.provenance.get("strip_delimiters") or ""))
    from hmlstm.serving.render import MARKS
    assert "".join(ch for ch in remote if ch not in MARKS.values()) == text
    import json
    rows = [json.loads(l) for l in jsonl.splitlines()]
    assert "".join(r["sent_text"] for r in rows if r["layer"] == 1) == sent
    assert all(text[r["start"] : r["end"]] == r["text"] for r in rows)  # offsets into the original
    assert all(sent[r["sent_start"] : r["sent_end"]] == r["sent_text"] for r in rows)  # ...and into what was sent
    assert rows[1]["start"] > rows[1]["sent_start"]  # a space was stripped before the second word
    assert main(["segment", str(f), "--local", "--keep-delimiters", "--jsonl"]) == 0
    rows = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    assert "".join(r["text"] for r in rows if r["layer"] == 1) == text


def test_segment_command_errors_are_one_line(tmp_path, capsys):
    assert main(["segment", str(tmp_path / "missing.txt"), "--local"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["segment", str(tmp_path), "--local"]) == 2
    assert f"{tmp_path} is a folder; name a text file" in capsys.readouterr().err
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # what `hmlstm segment <(...)` names: it cannot be checked whole before sending
    assert main(["segment", str(fifo), "--local"]) == 2
    assert f"is not a regular file (a pipe or a device, which cannot be checked before sending): send it through " \
           f"standard input, `hmlstm segment - < {fifo}`" in capsys.readouterr().err
    f = tmp_path / "in.txt"
    f.write_text("abc")
    assert main(["segment", str(f), "--server", f"127.0.0.1:{free_port()}"]) == 1  # the service failed it
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "UNAVAILABLE" in err[0]


def test_demo_runs_end_to_end(capsys):
    from hmlstm.cli import DEMO_TEXT

    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "server on 127.0.0.1:" in out and "characters in" in out and "layer 1:" in out
    # each layer's segments cut in the original text (spaces kept), and what the card says each layer finds
    layers = out.split("\nlayer ")[1:]
    assert [b.split(":")[0] for b in layers] == ["1", "2", "3"]
    for block in layers:  # the original text, spaces and all, cut where the layer fired
        text = " ".join(line.strip() for line in block.splitlines()[1:] if line.startswith("    "))
        assert text.replace(" | ", "").replace(" ", "") == DEMO_TEXT.replace(" ", "") and " | " in text
        assert " " in text.replace(" | ", "")  # the original's spaces are back inside the segments
    assert "held-out text (builtin): word-start F1" in layers[0] and "finds words" in layers[0]
    assert "another text (tinyshakespeare.txt)" in layers[0]  # the card's second evaluation
    assert "finds phrases" in layers[1] + layers[2]
    # The live line marks exactly the cuts the layers' blocks show (with look-ahead too: each response is
    # printed up to its decided_chars, and the last characters' boundaries come with the final response).
    live = out.split("]\n\n", 1)[1].split("\n\n")[0]
    marked, pos = set(), 0
    for ch in live:
        if ch in "|‖⦀":
            marked.add(pos)
        else:
            pos += 1
    blocks = set()
    for block in layers:
        text = " ".join(line.strip() for line in block.splitlines()[1:] if line.startswith("    "))
        ends = [len(seg.replace(" ", "")) for seg in text.split(" | ")]
        blocks |= {sum(ends[: i + 1]) for i in range(len(ends) - 1)}
    assert marked == blocks and len(marked) > 20


def test_the_nodejs_example_runs_against_the_server_and_prints_segments_from_zero():
    """docs/examples/segment.js with @grpc/grpc-js: a client this project did not write in Python."""
    import shutil

    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        missing("Node.js and npm are not installed (make test installs them with apt-get)")
    modules = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hmlstm-node-example"
    if not (modules / "node_modules" / "@grpc" / "proto-loader").exists():
        modules.mkdir(parents=True, exist_ok=True)
        r = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--loglevel=error", "--prefix", str(modules),
                            "@grpc/grpc-js@1", "@grpc/proto-loader@0"], capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            missing(f"npm could not install @grpc/grpc-js: {r.stderr.strip()[:200]}")
    root = Path(__file__).resolve().parents[2]
    model = load_model(None, "cpu")
    with BackgroundServer(model, ServeConfig(port=0, metrics_port=None)) as srv:
        r = subprocess.run([node, str(root / "docs/examples/segment.js"), srv.target, str(root / "protos"),
                            "The for statement is used to iterate. 😀 ok."], capture_output=True, text=True,
                           timeout=60, env={**os.environ, "NODE_PATH": str(modules / "node_modules")})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "undefined" not in r.stdout
    assert 'layer 1 [0, 3) "The"' in lines  # a segment that starts at 0 (proto3 leaves 0 off the wire)
    assert lines[-1] == "done: 35 characters"  # the text without the spaces the model was trained without


def test_health_says_why_in_one_line_and_hints_tls_only_where_it_may_be_the_reason(default_model):
    def health(*args):
        r = subprocess.run([sys.executable, "-m", "hmlstm.cli", "health", *args, "--timeout", "5"],
                           capture_output=True, text=True, timeout=60)
        return r.returncode, r.stdout + r.stderr

    rc, out = health("--target", f"127.0.0.1:{free_port()}")
    assert rc == 1 and "connection refused" in out and "TLS" not in out and len(out.strip().splitlines()) == 1
    with BackgroundServer(default_model, ServeConfig(port=0, metrics_port=None)) as srv:
        rc, out = health("--target", srv.target, "--tls")  # TLS against a plaintext server
        assert rc == 1 and "the TLS handshake failed: the server does not seem to use TLS" in out, out
        assert len(out.strip().splitlines()) == 1, out  # gRPC's own SSL log line does not leak
        assert health("--target", srv.target) == (0, f"{srv.target}: SERVING\n")


@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_streams_open_when_the_grace_period_ends_get_unavailable_saying_whether_they_resume(tmp_path, store):
    spec = "memory" if store == "memory" else f"sqlite:{tmp_path}/state.db"
    proc, target = _serve("--grace", "1", "--state-store", spec)
    try:
        release = threading.Event()
        with SegmenterClient(target) as c:
            calls = {sid: iter(c.stream(_first_chunk_then_wait(release), stream_id=sid)) for sid in ("kept", "")}
            for call in calls.values():
                assert next(call).processed_chars == 18
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            errors = {}
            for sid, call in calls.items():
                with pytest.raises(grpc.RpcError) as e:
                    list(call)
                errors[sid] = e.value
            waited = time.monotonic() - t0
            release.set()
        assert waited >= 0.9  # the grace period was given
        for e in errors.values():
            assert e.code() == grpc.StatusCode.UNAVAILABLE, (e.code(), e.details())
            assert "the server is shutting down and its 1s grace period ended with this stream open" in e.details()
        assert "it has no stream_id, so it cannot be resumed" in errors[""].details()
        assert ("the stream can be resumed by its id ('kept')" if store == "sqlite" else
                "held in this process only (--state-store memory)") in errors["kept"].details()
        assert proc.wait(timeout=30) == 143
        err = proc.stderr.read()
        assert "Traceback" not in err and "Exception not handled" not in err, err
        assert "2 stream(s) still open after 1s ended with UNAVAILABLE" in err
    finally:
        if proc.poll() is None:
            proc.kill()


def test_the_token_comes_from_a_file_as_mounted_from_a_secret(tmp_path, capsys):
    """`serve --auth-token-file` (the manifests mount the Secret's key there): its first line is the token."""
    token = tmp_path / "token"
    token.write_text("fr0m-a-file\n")
    proc, target = _serve("--auth-token-file", str(token))
    try:
        with SegmenterClient(target) as c:
            with pytest.raises(grpc.RpcError) as e:
                c.segment("abc")
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with SegmenterClient(target, token="fr0m-a-file") as c:
            assert c.segment("abc").chars == 3
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    empty = tmp_path / "empty"
    empty.write_text("")
    for path, says in ((tmp_path / "absent", "cannot read it"), (empty, "the file is empty")):
        assert main(["serve", "--auth-token-file", str(path), "--port", "0", "--metrics-port", "-1"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0] and str(path) in err[0], err
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--auth-token-file", str(token), "--auth-token-env", "X"])
    assert exit_.value.code == 2 and "not allowed with" in capsys.readouterr().err


def test_a_second_ctrl_c_ends_the_grace_period_at_once_with_the_named_status_and_exit_130():
    """`serve --grace 60`: the first Ctrl-C starts the grace period, the second ends it now. The open stream
    gets the documented UNAVAILABLE that names the shutdown, and the server exits 130 (as every command does
    after Ctrl-C) within seconds, not a minute later."""
    proc, target = _serve("--grace", "60")
    try:
        release = threading.Event()
        with SegmenterClient(target) as c:
            call = iter(c.stream(_first_chunk_then_wait(release, 60), stream_id="kept"))
            assert next(call).processed_chars == 18
            proc.send_signal(signal.SIGINT)
            time.sleep(0.5)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGINT)
            with pytest.raises(grpc.RpcError) as e:
                list(call)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value.details()
            assert "the server is shutting down" in e.value.details()
            assert proc.wait(timeout=30) == 130
            assert time.monotonic() - t0 < 20  # not the 60 s grace
            release.set()
        err = proc.stderr.read()
        assert "second SIGINT: ending the grace period now" in err and "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
