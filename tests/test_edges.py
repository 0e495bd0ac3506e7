"""Careless user, round 4: each command as typed at the edges of its flags, one clean line or a conventional
exit, and nothing left behind. Most are refused before any work, so most run in a fresh process in well
under a second (no TensorFlow is imported to refuse them)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hmlstm.cli import main
from tests.test_cli import TINY, _one_error_line, run_cli

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = "hmlstm/assets/default.onnx"


@pytest.fixture(scope="module")
def tiny_model(tiny_onnx):
    from hmlstm.serving.model import load_model

    return load_model(tiny_onnx.path, "cpu")


@pytest.fixture(scope="module")
def server(tiny_model):
    from hmlstm.serving.background import BackgroundServer
    from hmlstm.serving.config import ServeConfig

    with BackgroundServer(tiny_model, ServeConfig(port=0, metrics_port=None, max_chunk_chars=500)) as srv:
        yield srv


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    p = tmp_path_factory.mktemp("edges") / "my.txt"
    p.write_text("the cat sat on the mat. the dog sat on the log.\n" * 20)
    return p


@pytest.mark.parametrize("args, needle", [
    # 1. absurd sizes
    (["segment", "{text}", "--local", "--chunk-chars", "99999999999"], "--chunk-chars must be 1-1,048,576"),
    # 2. an empty separator
    (["evaluate", SHIPPED, "{text}", "--sep", ""], "--sep needs at least one character"),
    # 3. outputs where nothing can be written, before anything is loaded
    (["train", "{text}", "--out", "/proc/run"], "--out /proc/run: nothing can be written in /proc"),
    (["plot", SHIPPED, "--out", "/proc/x.png"], "--out /proc/x.png: nothing can be written in /proc"),
    (["export", SHIPPED, "--out", "/proc/x.onnx"], "--out /proc/x.onnx: nothing can be written in /proc"),
    (["export", SHIPPED, "--out", "{tmp}/no/such/x.onnx"], "its folder {tmp}/no/such does not exist"),
    # 4. a file where the Triton repository folder goes
    (["export", SHIPPED, "--out", "{tmp}/tri.onnx", "--triton", "{text}"], "--triton {text} is a file; give a folder"),
    (["export", SHIPPED, "--out", "{tmp}/m.onnx", "--triton", "/proc/tri"], "--triton /proc/tri: nothing can be"),
    # 6. every numeric flag of serve has a range
    (["serve", "--max-batch", "99999999999"], "--max-batch must be 0 (every pending piece, up to --max-streams) to"),
    (["serve", "--max-connection-age", "1e300"], "--max-connection-age must be a number of seconds more than 0, at"),
    (["serve", "--max-chunk-chars", "99999999999"], "--max-chunk-chars must be 1-1,048,576"),
    (["serve", "--max-streams", "99999999999"], "--max-streams must be 1-100,000"),
    (["serve", "--max-wait-us", "99999999999"], "--max-wait-us must be 0-1,000,000"),
    (["serve", "--call-threads", "100000", "--no-batching"], "--call-threads must be 1-256"),
    (["serve", "--grace", "1e300"], "--grace must be a number of seconds 0 or more, at most 2,000,000"),
    # 7. a runaway --workers
    (["serve", "--workers", "100000"], "--workers must be 1-"),
    # 11. PTB on plain prose
    (["train", "{text}", "--format", "ptb"], "--format ptb: {text} is not in the Penn Treebank character format"),
    (["evaluate", SHIPPED, "{text}", "--format", "ptb"], "is not in the Penn Treebank character format"),
    # 12. loss weights and the slope
    (["train", "--entropy-target", "-1"], "--entropy-target is the weight of a loss term, 0 (off) or more, got -1"),
    (["train", "--rate-penalty", "-1"], "--rate-penalty is the weight of a loss term, 0 (off) or more, got -1"),
    (["train", "--slope-max", "0"], "--slope-max must be at least the starting slope 1"),
    (["train", "--rate-penalty", "nan"], "--rate-penalty is the weight of a loss term"),
    # boundary targets: only where the delimiters were removed, one known unit per detector, a positive weight
    (["train", "{text}", "--boundary-targets", "words"], "but this text keeps them: the model would only learn to"),
    (["train", "{text}", "--strip-whitespace", "--boundary-targets", "lines"], "--boundary-targets takes, per layer"),
    (["train", "{text}", "--strip-whitespace", "--boundary-targets", "words,phrases,words"],
     "gives layer 3 a target, but the model has 2 layer(s) with a boundary detector"),
    (["train", "{text}", "--boundary-weight", "2"], "--boundary-weight weighs the --boundary-targets loss"),
    (["train", "{text}", "--strip-whitespace", "--boundary-targets", "words", "--boundary-weight", "0"],
     "--boundary-weight is the weight of a loss term, more than 0, got 0"),
    (["train", "synthetic", "--strip-whitespace", "--boundary-targets", "none,sentences"],
     "does not mark where its sentences are (it knows: words, phrases)"),
    # look-ahead: a number of characters within bounds, and only for boundaries taught from the delimiters
    (["train", "--lookahead", "-1"], "--lookahead is a number of characters from 0 to 16 (at most 16, and below"),
    (["train", "--lookahead", "99999999999"], "--lookahead is a number of characters from 0 to 16"),
    (["train", "--seq-len", "4", "--lookahead", "4"], "--lookahead is a number of characters from 0 to 3"),
    (["train", "{text}", "--strip-whitespace", "--lookahead", "2"],
     "--lookahead delays the boundaries taught from the delimiters, so every layer with a detector needs a unit"),
    (["train", "{text}", "--strip-whitespace", "--boundary-targets", "words", "--lookahead", "1"],
     "(here 2, e.g. words,phrases); a layer that learns its own boundaries decides them at once"),
    (["train", "{text}", "--preset", "shipped", "--boundary-targets", "words", "--no-top-boundary",
      "--layers", "3"], "(here 2, e.g. words,phrases)"),
    # 13. an SQLite store with no file
    (["serve", "--state-store", "sqlite:"], "--state-store sqlite:: name the database file"),
    (["serve", "--state-store", "sqlite::memory:"], "an in-memory SQLite database would make nothing durable"),
    # 14. health's timeout
    (["health", "--timeout", "0"], "--timeout must be a number of seconds more than 0"),
    (["health", "--timeout", "-1"], "--timeout must be a number of seconds more than 0"),
    (["health", "--timeout", "nan"], "--timeout must be a number of seconds more than 0"),
    # 15. flags that would be ignored
    (["evaluate", SHIPPED, "{text}", "--all"], "--all applies to the builtin and synthetic texts only"),
    (["evaluate", SHIPPED, "{text}", "--seed", "3"], "--seed applies to the builtin and synthetic texts only"),
    (["export", SHIPPED, "--no-validate", "--strict"], "--strict sets how validation runs, and --no-validate skips"),
    (["serve", "--trt-fp16", "--device", "cpu"], "--trt-fp16 is a TensorRT setting, and --device cpu"),
    (["serve", "--no-batching", "--max-batch", "8"], "--max-batch shapes batched calls, and --no-batching"),
    (["serve", "--device", "cpu", "--io-binding", "on"], "--io-binding on keeps the recurrent state on a GPU"),
    (["segment", "{text}", "--local", "--lb", "round_robin"], "--lb and --local"),
    (["segment", "{text}", "--server", ""], "--server is empty"),
    (["health", "--target", ""], "--server is empty"),  # gRPC's own words, under a hint about TLS, before
    (["health", "--server", "127.0.0.1:99999"], "--server 127.0.0.1:99999: give host:port with a port 1-65535"),
    (["health", "--server-name", "x.example"], "--server-name is the name the server's TLS certificate must carry"),
    # 18. one port twice
    (["serve", "--port", "50999", "--metrics-port", "50999"], "--port and --metrics-port are both 50999"),
    # 22. whitespace is not emptiness
    (["serve", "--auth-token-file", "{blank}"], "contains only whitespace"),
    (["train", "{blank}"], "contains only whitespace"),
    # 24. a missing file is said to be missing
    (["info", "{tmp}/nope.onnx"], "model file {tmp}/nope.onnx does not exist"),
    # 29. a picture needs its format
    (["plot", SHIPPED, "--out", "{tmp}/name"], "plot writes .png, .pdf or .svg, chosen by the extension, and this"),
])
def test_refused_in_one_line_before_any_work(args, needle, text, tmp_path):
    blank = tmp_path / "blank.txt"
    blank.write_text("  \n\t\n")
    fill = dict(text=text, tmp=tmp_path, blank=blank)
    r = run_cli(*[a.format(**fill) for a in args], cwd=ROOT)
    assert r.returncode == 2, r.stderr
    _one_error_line(r.stderr, needle.format(**fill))
    assert not list(tmp_path.glob("*.onnx")) and not (tmp_path / "name").exists()


def test_export_with_cuda_asked_for_and_none_here_is_one_line_before_the_work(tmp_path):
    from hmlstm.runtime import device_unavailable

    if not device_unavailable("cuda"):
        pytest.skip("CUDA can be used here: the export would validate on it")
    r = run_cli("export", SHIPPED, "--out", tmp_path / "x.onnx", "--device", "cuda", cwd=ROOT)
    assert r.returncode == 2
    _one_error_line(r.stderr, "--device cuda: CUDA cannot be used here (", "--device cpu")


def test_a_preset_gives_way_to_the_flags_given_beside_it_and_what_depends_on_them():
    """27. A flag given explicitly replaces the preset's value of that setting, and of the settings that mean
    nothing without it; 28. a preset's run gets its own default folder."""
    from hmlstm.cli import parse
    from hmlstm.cli.train import PRESETS, default_run_dir

    shipped = PRESETS["shipped"]
    args = parse(["train", "--preset", "shipped", "--strip-delimiters", " "])
    assert args.strip_delimiters == " " and not args.strip_whitespace
    assert args.boundary_targets == shipped["boundary_targets"]
    args = parse(["train", "--preset", "shipped", "--boundary-targets", "none", "--boundary-weight", "3"])
    assert args.boundary_targets == "none" and args.boundary_weight == 3  # off: the preset's targets go
    assert args.lookahead == 0  # ... and the look-ahead that delays them
    args = parse(["train", "--preset", "shipped", "--entropy-target", "1", "--boundary-targets", "words"])
    assert args.entropy_target == 1 and args.boundary_targets == "words" and args.strip_whitespace
    args = parse(["train", "--preset", "shipped", "--no-top-boundary"])
    assert args.top_boundary is False and args.steps == PRESETS["shipped"]["steps"]
    assert parse(["train", "--preset", "shipped"]).top_boundary is True
    assert default_run_dir("builtin", "shipped") == Path("runs/builtin-shipped")
    assert default_run_dir("my.txt", None) == Path("runs/my")


def test_the_shipped_preset_with_other_delimiters_trains(tmp_path, capsys):
    """The preset's --strip-whitespace no longer counts as given: --strip-delimiters beside it is taken."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat sat on the mat. the dog sat on the log. " * 40)
    out = tmp_path / "run"
    assert main(["train", str(corpus), "--preset", "shipped", "--strip-delimiters", " ", "--steps", "2",
                 "--boundary-targets", "words,phrases",  # TINY has two layers
                 "--out", str(out), *TINY]) == 0
    assert "stripped of ' '" in (out / "config.json").read_text()


def test_a_model_without_a_boundary_detector_is_said_once(text, tmp_path, capsys):
    """16. `train --layers 1` learns no boundaries: said before training, not discovered in `segment`."""
    one_layer = [*TINY[TINY.index("--units"):], "--layers", "1"]
    assert main(["train", str(text), "--out", str(tmp_path / "run"), "--steps", "2", *one_layer]) == 0
    err = capsys.readouterr().err
    assert err.count("has no boundary detector") == 1


def test_segment_reads_crlf_as_evaluate_does(tmp_path, capsys):
    """17. A CRLF file segments exactly as its LF twin: no '\\r' reaches the model."""
    body = "The for statement is used to iterate.\nIt should yield an iterable object.\n" * 3
    lf, crlf = tmp_path / "lf.txt", tmp_path / "crlf.txt"
    lf.write_bytes(body.encode())
    crlf.write_bytes(body.replace("\n", "\r\n").encode())
    outs = []
    for f in (lf, crlf):
        assert main(["segment", str(f), "--local", "--chunk-chars", "7", "--jsonl"]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and "\\r" not in outs[1]


def test_segment_output_to_a_file_is_the_text_and_its_marks_only(tmp_path):
    """No trailing newline the input did not have (a terminal still gets one, for the prompt)."""
    f = tmp_path / "x.txt"
    f.write_text("Thefirstsentence")
    r = run_cli("segment", f, "--local", cwd=ROOT)
    assert r.returncode == 0 and not r.stdout.endswith("\n")
    assert r.stdout.replace("|", "").replace("‖", "").replace("⦀", "") == "Thefirstsentence"


def test_a_foreign_onnx_file_names_the_real_cause(tmp_path):
    """20. ONNX Runtime's refusal, without its wrapping and source locations: the cause is not cut off."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 99
    path = tmp_path / "foreign.onnx"
    onnx.save(model, str(path))
    r = run_cli("info", path, cwd=ROOT)
    assert r.returncode == 2
    _one_error_line(r.stderr, "is not a loadable ONNX model: Unsupported model IR version: 99")
    assert ".cc:" not in r.stderr and "ONNXRuntimeError" not in r.stderr


def test_a_dense_only_export_in_a_folder_is_suggested_with_its_folder(tiny_onnx, tmp_path):
    """21. `serve old/x.onnx --engine sparse` suggests exporting old/x.onnx, not x.onnx."""
    import shutil

    from hmlstm import spec

    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(spec.engine_path(tiny_onnx.path, "dense"), old / "x.onnx")
    r = run_cli("serve", old / "x.onnx", "--engine", "sparse", "--port", "0", "--metrics-port", "-1", cwd=ROOT)
    assert r.returncode == 2
    _one_error_line(r.stderr, f"`hmlstm export {old / 'x.onnx'} --out NEW.onnx`")


def test_segment_with_a_layer_the_server_lacks_prints_no_legend(server, text, capsys):
    """23. Refused by name before anything is printed, not a garbled legend and then INVALID_ARGUMENT."""
    assert main(["segment", str(text), "--server", server.target, "--layers", "7"]) == 2
    err = capsys.readouterr().err
    _one_error_line(err, "--layers 7: this model reports boundaries on layer(s) 1")


def test_segment_refuses_a_chunk_over_the_servers_limit(server, text, capsys):
    """1. Against a server: its own advertised limit, in one line, not UNKNOWN "Exception iterating requests"."""
    assert main(["segment", str(text), "--server", server.target, "--chunk-chars", "501"]) == 2
    _one_error_line(capsys.readouterr().err, "--chunk-chars 501 is over the server's limit of 500")


def test_segment_takes_its_token_from_a_file(tiny_model, text, tmp_path, capsys):
    from hmlstm.serving.background import BackgroundServer
    from hmlstm.serving.config import ServeConfig

    token = tmp_path / "token"
    token.write_text("s3cret\n")
    with BackgroundServer(tiny_model, ServeConfig(port=0, metrics_port=None, auth_token="s3cret")) as srv:
        assert main(["segment", str(text), "--server", srv.target, "--token-file", str(token), "--jsonl"]) == 0
        assert capsys.readouterr().out.count('"layer"') > 0
        assert main(["segment", str(text), "--server", srv.target]) == 2
        assert "UNAUTHENTICATED" in capsys.readouterr().err


def test_evaluate_with_lines_says_it_scores_words_only(tmp_path, capsys):
    """26. A segmented file carries words only, and the progress line says so."""
    f = tmp_path / "units.txt"
    f.write_text("\n".join(["the", "for", "statement", "is", "used", "to", "iterate"] * 30))
    assert main(["evaluate", SHIPPED, str(f), "--format", "lines"]) == 0
    err = capsys.readouterr().err
    assert "scoring every layer against words, and the entropy baselines" in err


def test_info_declares_one_alignment_and_scores_that_one(tiny_onnx, capsys):
    """25. `info` scores each layer where it says it fires: no "fires on a unit's last character" followed by
    a word-start F1."""
    import json

    from hmlstm import spec

    card = json.loads(spec.card_path(tiny_onnx.path).read_text())
    assert main(["info", str(tiny_onnx.path)]) == 0
    out = capsys.readouterr().out
    for layer, align in card["boundary_alignment"].items():
        other = "start" if align == "end" else "end"
        assert not any(line.startswith(f"layer {layer},") and f"-{other} F1" in line for line in out.splitlines())


def _wait_for_line(proc, needle: str, deadline_s: float = 300) -> list[str]:
    seen = []
    deadline = time.monotonic() + deadline_s
    for line in proc.stderr:
        seen.append(line)
        if needle in line:
            return seen
        assert time.monotonic() < deadline, "".join(seen)
    raise AssertionError(f"{needle!r} never came: {''.join(seen)}")


def _popen_taking_ctrl_c(cmd, **kw) -> subprocess.Popen:
    """A child that takes Ctrl-C (SIGINT) as one started from a terminal does, even where the tests run with SIGINT
    ignored: a non-interactive shell's background job (`make test &` in a script) starts so, an ignored signal
    stays ignored across exec, and Python then never raises KeyboardInterrupt. A handler set here, unlike
    SIG_IGN, is reset to the default in the exec'd child."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(cmd, **kw)
    finally:
        signal.signal(signal.SIGINT, old)


@pytest.mark.parametrize("sig, status, stage", [(signal.SIGINT, 130, "evaluating for the model card"),
                                               (signal.SIGTERM, 143, "converting the sparse and dense graphs")])
def test_an_interrupted_export_leaves_nothing_behind(tiny_onnx, tmp_path, sig, status, stage):
    """8, 9. Ctrl-C while the card is evaluated (the graphs staged beside OUT), SIGTERM while tf2onnx converts
    (the recovered weights in use): no OUT, no companion, no card, no hidden stage folder beside it, and no
    recovered-weights folder in the temp folder."""
    long_text = tmp_path / "long.txt"  # evaluated for the card: the interrupt lands while it runs
    long_text.write_text("the cat sat on the mat and the dog sat on the log " * 4000)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp)}
    proc = _popen_taking_ctrl_c([sys.executable, "-m", "hmlstm.cli", "export", str(tiny_onnx.path), "--out",
                                 str(out_dir / "m.onnx"), "--no-validate", "--eval-text", str(long_text)],
                                stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    try:
        _wait_for_line(proc, stage)
        held = list(tmp.glob("hmlstm-*"))
        proc.send_signal(sig)
        err = proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == status, err
    assert "Traceback" not in err
    assert list(out_dir.iterdir()) == []
    assert not list(tmp.glob("hmlstm-*"))  # the recovered weights (other libraries keep their own files there)
    assert held or sig != signal.SIGTERM  # while tf2onnx converts, they were there to be removed


def test_a_port_left_by_a_stopped_server_with_a_client_attached_takes_workers_at_once(tiny_onnx):
    """30. Stop a server while a client is attached, then start `--workers 2` on its port at once."""
    import threading

    from hmlstm.serving.client import SegmenterClient
    from tests.serving.durable import free_port, wait_serving

    port = free_port()
    cmd = [sys.executable, "-m", "hmlstm.cli", "serve", str(tiny_onnx.path), "--port", str(port),
           "--metrics-port", "-1", "--grace", "0"]
    first = subprocess.Popen(cmd, stderr=subprocess.DEVNULL, cwd=ROOT)
    release = threading.Event()
    try:
        wait_serving(f"127.0.0.1:{port}")

        def chunks():
            yield "abc"
            release.wait(30)

        with SegmenterClient(f"127.0.0.1:{port}") as c:
            call = iter(c.stream(chunks()))
            assert next(call).processed_chars == 3
            first.terminate()
            first.wait(timeout=30)
            second = subprocess.Popen([*cmd, "--workers", "2", "--state-store", "memory"], stderr=subprocess.PIPE,
                                      text=True, cwd=ROOT)
            try:
                wait_serving(f"127.0.0.1:{port}")
            finally:
                second.terminate()
                err = second.communicate(timeout=60)[1]
            assert "already in use" not in err, err
    finally:
        release.set()
        if first.poll() is None:
            first.kill()


def _segment_stdin(target: str):
    """`hmlstm segment - --server TARGET --jsonl` with its standard input held open: we write to it."""
    return subprocess.Popen([sys.executable, "-m", "hmlstm.cli", "segment", "-", "--server", target, "--jsonl",
                             "--chunk-chars", "16"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)


def _feed_until_acknowledged(proc, text: str) -> str:
    """Write the first part and wait until the server holds it (a segment line came back); returns that line."""
    proc.stdin.write(text)
    proc.stdin.flush()
    line = proc.stdout.readline()
    assert line.startswith("{"), proc.stderr.read()
    return line


@pytest.mark.parametrize("store", ["sqlite", "memory"])
def test_segment_from_stdin_across_a_server_killed_mid_stream(tmp_path, store):
    """32. kill -9 under `segment -`: with a durable store it resumes on the server that replaces it and the
    output equals an uninterrupted run; without one it ends in one line, exit 1. Never SIGABRT."""
    from tests.serving.durable import ServerProcess

    body = "Thefirstsentencegoeshere.Thesecondonefollowsit.Andathirdendsthetext." * 4
    flags = ("--state-store", f"sqlite:{tmp_path / 's.db'}") if store == "sqlite" else ()
    server = ServerProcess(*flags)
    try:
        whole = run_cli("segment", "-", "--server", server.target, "--jsonl", "--chunk-chars", "16", cwd=ROOT,
                        input=body)
        assert whole.returncode == 0, whole.stderr
        proc = _segment_stdin(server.target)
        try:
            out = _feed_until_acknowledged(proc, body[:160])
            server.kill9()
            server = ServerProcess(*flags, port=server.port)
            try:
                proc.stdin.write(body[160:])
                proc.stdin.close()
            except BrokenPipeError:  # it gave up already (nothing to resume from)
                pass
            out += proc.stdout.read()  # the same reader as the first line's: nothing it buffered is skipped
            err = proc.stderr.read()
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    finally:
        server.stop()
    assert proc.returncode in (0, 1), err  # not -6 (SIGABRT)
    assert "Fatal Python error" not in err and "Traceback" not in err
    if store == "sqlite":
        assert proc.returncode == 0, err
        assert "resuming stream segment-" in err
        assert out == whole.stdout
    else:
        assert proc.returncode == 1
        lines = [ln for ln in err.splitlines() if ln.startswith("hmlstm: error:")]
        assert len(lines) == 1 and "UNAVAILABLE" in lines[0], err


def test_segment_marks_can_be_told_from_the_text(tmp_path):
    """Friction: a text that holds a mark is warned about once, and --marks chooses others."""
    f = tmp_path / "pipes.txt"
    f.write_text("a|b the cat | sat on the mat")
    r = run_cli("segment", f, "--local", cwd=ROOT)
    assert r.returncode == 0 and r.stderr.count("which is also layer 1's mark") == 1
    r = run_cli("segment", f, "--local", "--marks", "/#@", cwd=ROOT)
    assert r.returncode == 0 and "also layer" not in r.stderr and "[/ layer 1  # layer 2  @ layer 3]" in r.stderr
    assert r.stdout.count("|") == 2  # only the text's own
    assert r.stdout.replace("/", "").replace("#", "").replace("@", "") == f.read_text()
    r = run_cli("segment", f, "--local", "--marks", "//", cwd=ROOT)
    assert r.returncode == 2 and "--marks takes one distinct, visible character per layer" in r.stderr


def test_python_dash_m_hmlstm_is_the_command():
    r = subprocess.run([sys.executable, "-m", "hmlstm", "--version"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.startswith("hmlstm ")


def test_segment_of_whitespace_only_says_so(tmp_path):
    """22. Whitespace is not emptiness: the note says what the input held."""
    f = tmp_path / "blank.txt"
    f.write_text("  \n\t \n")
    r = run_cli("segment", f, "--local", cwd=ROOT)
    assert r.returncode == 0 and "0 characters sent: " + str(f) + " contains only whitespace" in r.stderr
    f.write_text("")
    assert "is empty" in run_cli("segment", f, "--local", cwd=ROOT).stderr


def test_info_on_a_training_run_says_what_it_is_without_tensorflow(tmp_path):
    """Friction: `hmlstm info RUN_DIR` describes the run from its files, and says how to export it."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat sat on the mat. the dog sat on the log. " * 40)
    assert main(["train", str(corpus), "--out", str(tmp_path / "run"), "--steps", "3", *TINY]) == 0
    code = ("import sys; from hmlstm.cli import main; rc = main(sys.argv[1:]); "
            "assert 'tensorflow' not in sys.modules; sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, "info", str(tmp_path / "run")], capture_output=True, text=True,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "training run, 2 layers x 8/8 units" in r.stdout and "trained: 3 steps" in r.stdout
    assert "layer2: no boundary detector" in r.stdout and f"hmlstm export {tmp_path / 'run'}" in r.stdout
    import shutil

    shutil.rmtree(tmp_path / "run" / "ckpt")  # a run with nothing saved yet is not one to export
    r = subprocess.run([sys.executable, "-c", code, "info", str(tmp_path / "run")], capture_output=True, text=True,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "hmlstm export" not in r.stdout and r.stdout.rstrip().endswith(
        "nothing to export yet (no checkpoint): train it, with the recipe above to resume it, then export it")


def test_plot_says_once_that_characters_its_font_lacks_are_boxes(tmp_path):
    """Friction: matplotlib's warning per missing glyph becomes one note."""
    r = run_cli("plot", SHIPPED, "--text", "漢字かな the cat sat", "--allow-unknown", "--out", tmp_path / "x.png",
                cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("drawn as boxes") == 1 and "Glyph" not in r.stderr, r.stderr
    assert (tmp_path / "x.png").stat().st_size > 0
