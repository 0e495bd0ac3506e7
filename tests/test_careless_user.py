"""What a careless user does to the command line: each gets one clean line, a conventional exit, no traceback."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hmlstm.cli import main
from tests.test_cli import TINY, _one_error_line, run_cli

ROOT = Path(__file__).resolve().parents[1]


def _ends_in_one_error_line(stderr: str, *needles: str) -> None:
    """Progress notes may come first; the failure itself is the last line, one line, no traceback."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("hmlstm: error: ") and "Traceback" not in stderr, stderr
    assert sum(ln.startswith("hmlstm: error: ") for ln in lines) == 1
    for n in needles:
        assert n in lines[-1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    p = tmp_path_factory.mktemp("careless") / "corpus.txt"
    p.write_text("the cat sat on the mat. the dog sat on the log. " * 60)
    return p


def test_sigterm_during_training_saves_a_checkpoint_and_exits_143(corpus, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "hmlstm.cli", "train", str(corpus), "--out", str(out),
                             "--steps", "1000000", "--checkpoint-every", str(EVERY), *TINY],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_steps(proc, out)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    step = int(re.search(r"terminated \(SIGTERM\) at step (\d+); checkpoint ckpt-\d+ saved", err).group(1))
    assert step >= EVERY and (out / "ckpt" / f"ckpt-{step}.index").exists()


EVERY = 7  # checkpoint interval of the interrupted runs: their first checkpoint shows training is under way


def _wait_for_steps(proc, out, deadline_s: float = 300) -> None:
    """Until the run's first scheduled checkpoint is on disk (steps have run), however loaded the machine."""
    deadline = time.monotonic() + deadline_s
    while not (out / "ckpt" / f"ckpt-{EVERY}.index").exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "no checkpoint written"
        time.sleep(0.05)


def _start_training(corpus, out):
    proc = subprocess.Popen([sys.executable, "-m", "hmlstm.cli", "train", str(corpus), "--out", str(out),
                             "--steps", "1000000", "--checkpoint-every", str(EVERY), "--no-progress", *TINY],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "tb").exists():  # the training loop is about to start
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    return proc


def test_two_ctrl_c_during_training_still_save_and_saved_is_said_only_once_it_is_on_disk(corpus, tmp_path):
    """The second Ctrl-C lands while the first one's checkpoint is written or validated: the checkpoint is
    written whole either way, and "saved" names a file that exists."""
    out = tmp_path / "run"
    proc = _start_training(corpus, out)
    _wait_for_steps(proc, out)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)  # not an assertion: the second Ctrl-C lands during the save or just after; both must hold
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode in (130, -signal.SIGINT), err  # -2: the second Ctrl-C came as the process exited
    name = re.search(r"interrupted at step \d+; checkpoint (ckpt-\d+) saved", err).group(1)
    assert (out / "ckpt" / f"{name}.index").exists() and "Traceback" not in err
    assert main(["train", str(corpus), "--out", str(out), "--steps", str(int(name.split("-")[1]) + 2), *TINY]) == 0


def test_resume_falls_back_to_the_newest_intact_checkpoint_and_says_which(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(corpus), "--out", str(out), "--steps", "6", "--checkpoint-every", "2", *TINY]) == 0
    for f in (out / "ckpt").glob("ckpt-6.data-*"):  # only the newest is damaged
        f.write_bytes(f.read_bytes()[:16])
    capsys.readouterr()
    assert main(["train", str(corpus), "--out", str(out), "--steps", "8", *TINY]) == 0
    err = capsys.readouterr().err
    assert "checkpoint ckpt-6 is corrupt or incomplete" in err and "the newest intact one, ckpt-4" in err
    assert "resuming" in err and "from step 4" in err


@pytest.mark.parametrize("command, missing", [
    (["train", "synthetic"], "tensorflow"),
    (["export", "runs/x"], "tensorflow"),
    (["plot", str(ROOT / "hmlstm/assets/default.onnx")], "matplotlib"),
])
def test_a_server_only_install_says_which_extra_a_command_needs(command, missing, tmp_path):
    # A server-only install lacks the [train] extra: its imports fail here as they would there.
    code = (f"import sys; sys.modules[{missing!r}] = None; from hmlstm.cli import main; "
            f"sys.exit(main({command!r}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2, r.stderr
    _ends_in_one_error_line(r.stderr, f"needs {missing}", "pip install 'hmlstm[train]'")


def test_resuming_a_corrupt_checkpoint_is_one_line(corpus, tmp_path):
    out = tmp_path / "run"
    assert main(["train", str(corpus), "--out", str(out), "--steps", "4", *TINY]) == 0
    for f in (out / "ckpt").glob("*.data-*"):
        f.write_bytes(f.read_bytes()[:16])
    r = run_cli("train", corpus, "--out", out, "--steps", "8", *TINY)
    assert r.returncode == 2
    _ends_in_one_error_line(r.stderr, "cannot resume", "corrupt")


@pytest.mark.parametrize("args, needle", [
    (["serve", "--host", "192.0.2.1", "--port", "0", "--metrics-port", "-1"], "cannot bind 192.0.2.1"),
    (["serve", "--port", "-5"], "--port -5 is not a port number"),
    (["serve", "--port", "70000"], "--port 70000 is not a port number"),
    (["serve", "--metrics-port", "-2"], "--metrics-port -2 is not a port number"),
    (["demo", "--chunk-chars", "-1"], "--chunk-chars must be at least 1"),
    (["evaluate", "hmlstm/assets/default.onnx", "builtin", "--max-chars", "-5"], "--max-chars must be at least 2"),
    (["plot", "hmlstm/assets/default.onnx", "--chars", "-5"], "--chars must be at least 1"),
    (["export", "hmlstm/assets/default.onnx", "--tolerance", "-1"], "--tolerance must be a positive number"),
    (["export", "hmlstm/assets/default.onnx", "--tolerance", "inf"], "got inf (a finite one; --no-validate skips"),
    (["serve", "--max-streams", "0"], "--max-streams must be 1-100,000, got 0"),
    (["train", "--units", "100000000"], "--units 100000000 --embed-dim 64 --layers 3: the model would have about"),
    (["train", "--embed-dim", "1000000000"], "GiB with Adam's state, more than this machine's"),
    (["train", "--rate-targets", "0.2,0.1,0.05"], "--rate-targets gives 3 rates, but the model has 2 layer(s)"),
    (["train", "--peak-fractions", "0.7,0.2"], "--peak-fractions says which entropy peaks each layer is taught"),
    (["serve", "--state-store", "redis://127.0.0.1:1/0"], "--state-store is unreachable (Redis redis://127.0.0.1:1/0"),
    (["serve", "--state-store", "redis://127.0.0.1:99999/0"], "--state-store redis://127.0.0.1:99999/0: Port out of "
     "range"),  # (redis-py's OverflowError, naming nothing)
    (["serve", "--state-store", "sqlite:/no/such/folder/s.db"], "--state-store sqlite:/no/such/folder/s.db: its "
     "folder /no/such/folder does not exist"),
    (["serve", "--idle-timeout", "0"], "--idle-timeout must be a number of seconds more than 0, at most "
     "2,000,000 (24 days), got 0.0"),
    (["serve", "--idle-timeout", "-1"], "--idle-timeout must be a number of seconds more than 0, at most "
     "2,000,000 (24 days), got -1.0"),
    (["serve", "--idle-timeout", "nan"], "--idle-timeout must be a number of seconds more than 0, at most "
     "2,000,000 (24 days), got nan"),
    (["serve", "--grace", "-1"], "--grace must be a number of seconds 0 or more, at most "
     "2,000,000 (24 days), got -1.0"),
    (["serve", "--device-tolerance", "-1"], "--device-tolerance must be more than 0, got -1.0"),
    (["serve", "--max-wait-us", "-1"], "--max-wait-us must be 0-1,000,000, got -1"),
    (["serve", "--store-timeout", "0"], "--store-timeout must be a number of seconds more than 0, at most "
     "2,000,000 (24 days), got 0.0"),
    (["serve", "--max-connection-age", "-5"], "--max-connection-age must be a number of seconds more than 0"),
    (["serve", "--max-wait-fraction", "-1"], "--max-wait-fraction must be between 0 and 1, got -1.0"),
    (["serve", "--ort-threads", "-1"], "--ort-threads must be 1-256"),
    (["serve", "--ort-threads", "100000"], "--ort-threads must be 1-256"),
    (["serve", "--engine", "sparse", "hmlstm/assets/default.dense.onnx", "--workers", "0"],
     "--workers must be 1-"),
    (["train", "--seed", "-1"], "--seed must be 0 to 4,294,967,295, got -1"),
    (["train", "--seed", "99999999999999999999", "--lr", "inf"], "--lr must be a positive number, got inf"),
    (["train", "--seed", "99999999999999999999"], "--seed must be 0 to 4,294,967,295"),
    (["evaluate", "hmlstm/assets/default.onnx", "synthetic", "--seed", "-1"], "--seed must be 0 to 4,294,967,295"),
    # sizes the text cannot fill: refused before TensorFlow loads (they came after its import and the first note)
    (["train", "--batch-size", "30000"], "the training part (2,011,589 characters) is too short for batch size "
     "30,000 x sequence length 100"),
    (["train", "--seq-len", "200000", "--batch-size", "1"], "the validation part (210,931 characters) is shorter "
     "than two sequences of 200,000"),
])
def test_values_out_of_range_are_refused_before_any_work(args, needle, tmp_path):
    """Refused before any work: the error is the only thing on stderr (no progress note, no model or corpus
    loaded), and a run directory is never made."""
    out = tmp_path / "never"
    extra = ["--out", str(out)] if args[0] == "train" else []
    r = run_cli(*args, *extra, cwd=ROOT)
    assert r.returncode == 2, r.stderr
    _one_error_line(r.stderr, needle)
    assert len([ln for ln in r.stderr.splitlines() if ln.strip()]) == 1, r.stderr
    assert not out.exists()


def test_binary_on_stdin_is_one_line():
    r = subprocess.run([sys.executable, "-m", "hmlstm.cli", "segment", "-", "--local"], input=b"ab\xff\xfe\x00cd",
                       capture_output=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2
    _ends_in_one_error_line(r.stderr.decode(), "standard input is not UTF-8 text (bad byte at offset 2); "
                            "convert it, e.g. iconv -f latin1")


def test_a_bad_byte_past_the_first_block_is_placed_in_the_file(tmp_path, capsys):
    """A file is checked whole before anything is sent, a block at a time: the offset is the bad byte's in the file,
    also past a character split between two blocks, and at the end of the file (a character cut short)."""
    from hmlstm.cli.segment import _check_utf8
    from hmlstm.errors import UserError

    f = tmp_path / "late.txt"
    f.write_bytes(b"a" * 5 + "\u00e9".encode() + b"bc\xff")  # the e-acute split across blocks of 6 bytes
    for block in (1, 2, 6, 7, 1 << 20):
        with pytest.raises(UserError, match=r"late.txt is not UTF-8 text \(bad byte at offset 9\)"):
            _check_utf8(f, block=block)
    f.write_bytes(b"abcde" + "\u00e9".encode()[:1])  # ends inside a character
    for block in (1, 6, 1 << 20):
        with pytest.raises(UserError, match=r"\(bad byte at offset 5\)"):
            _check_utf8(f, block=block)
    f.write_bytes(b"abc " * 600_000 + b"\xe9x")  # past the real 1 MiB blocks
    assert main(["segment", str(f), "--local"]) == 2
    _ends_in_one_error_line(capsys.readouterr().err, "(bad byte at offset 2,400,000)")


def test_an_output_that_is_a_pipe_or_device_is_refused_not_replaced(tmp_path, capsys):
    """`export --out /dev/null` wrote the model beside it and renamed it over the device (as root: /dev/null a
    regular file from then on), and SQLite left a journal beside a device named as the store. A FIFO here stands
    for the device: what a regression would replace is the test's own."""
    from hmlstm.serving.model import DEFAULT_MODEL

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    assert main(["export", str(DEFAULT_MODEL), "--out", str(fifo), "--quick"]) == 2
    _ends_in_one_error_line(capsys.readouterr().err, f"--out {fifo} is not a regular file (a device, a pipe or a "
                            "socket), and the output would replace it")
    assert main(["serve", "--state-store", f"sqlite:{fifo}", "--port", "0", "--metrics-port", "-1"]) == 2
    _ends_in_one_error_line(capsys.readouterr().err, f"{fifo} is not a regular file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"] and fifo.is_fifo()


@pytest.mark.parametrize("args", [["info", "/dev/null"], ["evaluate", "/dev/null", "builtin"],
                                  ["plot", "/dev/null", "--out", "x.png"], ["serve", "/dev/null", "--port", "0"],
                                  ["segment", "-", "--local", "--model", "/dev/null"]])
def test_a_device_given_as_a_model_is_named_as_what_it_is(args, capsys):
    """Each said 'does not exist' of /dev/null, or (evaluate, plot) that it was no training run."""
    assert main(args) == 2
    _ends_in_one_error_line(capsys.readouterr().err, "/dev/null is not a regular file (a device or a pipe)")


def test_an_empty_file_says_zero_characters(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["segment", str(empty), "--local"]) == 0
    assert "0 characters" in capsys.readouterr().err


def test_plot_into_a_directory_is_one_line_and_leaves_nothing(tmp_path, capsys):
    assert main(["plot", str(ROOT / "hmlstm/assets/default.onnx"), "--out", str(tmp_path)]) == 2
    _one_error_line(capsys.readouterr().err, "is a directory")
    assert list(tmp_path.iterdir()) == []


def test_plot_draws_an_exported_model_on_text_without_its_delimiters(tmp_path, capsys):
    out = tmp_path / "b.png"
    assert main(["plot", str(ROOT / "hmlstm/assets/default.onnx"), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert out.stat().st_size > 1000 and "trained on text without" in captured.err and "truth row" in captured.err
    n = int(re.search(r"\((\d+) chars", captured.out).group(1))
    assert n == len("".join("Theforstatementisusedtoiterateovertheelementsofasequence(suchasastring,tupleorlist)"
                            "orotheriterableobject."))
    assert [p.name for p in tmp_path.iterdir()] == ["b.png"]


def test_a_trial_benchmark_never_overwrites_the_committed_report():
    r = subprocess.run([sys.executable, "benchmarks/serve_bench.py", "--quick", "--write-docs"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "never replaces the committed report" in r.stderr
    for script in ("serve_bench", "soak", "train_speed", "export_loop_vs_unrolled", "segmentation_experiments"):
        text = (ROOT / "benchmarks" / f"{script}.py").read_text()
        assert "add_write_docs(ap)" in text or "--write-docs" in text, script
        assert "import tensorflow" not in text, f"{script} imports TensorFlow without quieting it"


@pytest.mark.parametrize("flags, needle", [
    (["--seconds", "0"], "--seconds is each row's measuring time"),
    (["--front-end", "--seconds", "nan"], "--seconds is each row's measuring time"),
    (["--engine-cost", "--seconds", "1e9"], "--seconds is each row's measuring time"),
    (["--front-end", "--engine-cost"], "sections of their own"),
    (["--against", "."], "give one of them"),
    (["--engine-cost", "--against", "/no/such/checkout"], "not a checkout of this project"),
])
def test_serve_bench_refuses_absurd_and_clashing_flags_before_it_starts_anything(flags, needle):
    r = subprocess.run([sys.executable, "benchmarks/serve_bench.py", *flags], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and needle in r.stderr.splitlines()[-1], r.stderr
    assert "Traceback" not in r.stderr and not r.stdout


def test_a_taken_metrics_port_is_named_in_one_line():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = run_cli("serve", "--port", "0", "--metrics-port", port)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and " hmlstm." not in ln]  # log lines aside
    assert lines == [lines[-1]] and f"metrics port {port} on 127.0.0.1 is not available" in lines[-1], r.stderr
    assert "Event loop is closed" not in r.stderr and "Traceback" not in r.stderr


def test_a_corpus_after_strip_delimiters_is_not_taken_for_the_delimiters(corpus, tmp_path):
    r = run_cli("train", "--strip-delimiters", corpus, "--out", tmp_path / "run", *TINY)
    assert r.returncode == 2
    _ends_in_one_error_line(r.stderr, "looks like a file name", "--strip-delimiters=CHARS")
    assert not (tmp_path / "run").exists()


def test_segment_layers_are_a_comma_list_that_leaves_the_file_alone(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("Thecatsatonthemat.")
    assert main(["segment", "--layers", "1", str(text), "--local", "--jsonl"]) == 0
    out = capsys.readouterr().out
    assert out and all('"layer": 1' in line for line in out.splitlines())
    with pytest.raises(SystemExit) as e:
        main(["segment", "--layers", "x", str(text), "--local"])
    assert e.value.code == 2


@pytest.mark.parametrize("flags, needle", [
    (["--steps", "0"], "--steps must be at least 1"), (["--steps", "-5"], "--steps must be at least 1"),
    (["--epochs", "0"], "--epochs must be at least 1"), (["--epochs", "-1"], "--epochs must be at least 1"),
    (["--embed-dim", "0"], "--embed-dim must be at least 1"), (["--embed-dim", "-3"], "--embed-dim must be at least 1"),
    (["--output-dim", "0"], "--output-dim must be at least 1"), (["--lr", "-1"], "--lr must be a positive number"),
    (["--checkpoint-every", "0"], "--checkpoint-every must be at least 1"),
])
def test_training_settings_that_cannot_train_are_refused_and_leave_no_run(flags, needle, corpus, tmp_path, capsys):
    out = tmp_path / "run"
    tiny = list(TINY)
    if flags[0] in tiny:  # the value under test replaces the tiny model's own
        i = tiny.index(flags[0])
        del tiny[i : i + 2]
    assert main(["train", str(corpus), "--out", str(out), *tiny, *flags]) == 2
    _ends_in_one_error_line(capsys.readouterr().err, needle)
    assert not out.exists()


def test_train_into_an_existing_file_is_one_line(corpus, tmp_path, capsys):
    f = tmp_path / "file.txt"
    f.write_text("x")
    assert main(["train", str(corpus), "--out", str(f), *TINY]) == 2
    _ends_in_one_error_line(capsys.readouterr().err, "is a file")


def test_output_piped_into_head_ends_quietly(tmp_path):
    """`hmlstm segment BIG --jsonl | head -c 10`: the reader leaves while output is still coming (far more than a
    pipe buffer), so the command meets a broken pipe: it exits 141 like a process killed by SIGPIPE, the reader
    got its 10 bytes, and stderr has the usual note and nothing else."""
    from hmlstm.model.data import builtin_text

    big = tmp_path / "big.txt"
    big.write_text(builtin_text()[:150_000])
    pipeline = f"{sys.executable} -m hmlstm.cli segment {big} --local --jsonl | head -c 10; s=${{PIPESTATUS[0]}}"
    r = subprocess.run(["bash", "-c", pipeline + "; echo; echo exit=$s"], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    head, status = r.stdout.splitlines()[0], r.stdout.splitlines()[-1]
    assert head == '{"layer": ' and status == "exit=141", r.stdout
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("[the model was trained on text without"), r.stderr


def test_evaluate_refuses_text_mostly_outside_the_vocabulary(tmp_path, capsys):
    cyrillic = tmp_path / "ru.txt"
    cyrillic.write_text("Съешь же ещё этих мягких французских булок, да выпей чаю. " * 40)
    model = str(ROOT / "hmlstm/assets/default.onnx")
    assert main(["evaluate", model, str(cyrillic)]) == 2
    _ends_in_one_error_line(capsys.readouterr().err, "outside the model's vocabulary", "--allow-unknown")
    assert main(["evaluate", model, str(cyrillic), "--allow-unknown"]) == 0


def test_help_shows_defaults_and_the_version_is_one_flag_away(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 256)" in text and "(default: 50051)" in text  # --max-batch, --port
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("hmlstm ")


def test_health_takes_server_like_segment(capsys):
    assert main(["health", "--server", "127.0.0.1:1", "--timeout", "0.5"]) == 1
    assert "127.0.0.1:1" in capsys.readouterr().err


def test_segment_through_a_server_reports_its_own_mistakes_before_connecting(tmp_path, capsys):
    binary = tmp_path / "b.txt"
    binary.write_bytes(b"abc\xff\xfe")
    dead = "127.0.0.1:1"  # nothing listens: a mistake found first never reaches the network
    for args, needle in ((["segment", str(tmp_path / "missing.txt")], "does not exist"),
                         (["segment", str(binary)], "is not UTF-8 text (bad byte at offset 3); convert it"),
                         (["segment", str(binary), "--chunk-chars", "0"], "--chunk-chars must be 1-1,048,576, got 0")):
        assert main([*args, "--server", dead]) == 2
        err = capsys.readouterr().err
        _ends_in_one_error_line(err, needle)
        assert "UNKNOWN" not in err and "UNAVAILABLE" not in err and "layer 1" not in err  # no legend either


def test_an_unreachable_store_is_a_warning_with_store_optional_and_the_server_starts_saying_it_is_down():
    """The start-up check's finding is the server's starting state: the store's health name NOT_SERVING and
    hmlstm_state_store_up 0 from the first moment, not SERVING / 1 until a stream tries to save."""
    import urllib.request

    from tests.serving.durable import free_port, health, store_health, wait_serving

    port, metrics = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "hmlstm.cli", "serve", "--port", str(port), "--metrics-port",
                             str(metrics), "--state-store", "redis://127.0.0.1:1/0", "--store-optional"],
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        wait_serving(f"127.0.0.1:{port}")
        assert (health(f"127.0.0.1:{port}"), store_health(f"127.0.0.1:{port}")) == ("SERVING", "NOT_SERVING")
        page = urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10).read().decode()
        assert "hmlstm_state_store_up 0.0" in page
        proc.terminate()
        proc.wait(timeout=30)
        lines = proc.stderr.read().splitlines()
        warning = [line for line in lines if line.startswith("hmlstm: warning:")]
        assert len(warning) == 1 and warning[0].startswith("hmlstm: warning: --state-store is unreachable")
        assert any("state store unreachable, streams go on without durability" in line for line in lines)
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("args, suggestion", [
    (["train", "--stpes", "5"], "(did you mean --steps?)"),
    (["serve", "--max-strems", "3"], "(did you mean --max-streams?)"),
    (["export", "runs/x", "--engins", "dense"], "(did you mean --engines?)"),
])
def test_a_misspelt_flag_gets_did_you_mean(args, suggestion):
    r = run_cli(*args, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].endswith(suggestion), r.stderr


def test_an_unknown_flag_with_nothing_close_gets_no_guess():
    r = run_cli("serve", "--xyzzy", cwd=ROOT)
    assert r.returncode == 2 and "did you mean" not in r.stderr and "--xyzzy" in r.stderr


@pytest.mark.parametrize("args, needle", [
    (["serve", "--max-streams", "1e9"], "argument --max-streams: invalid int value: '1e9' (hmlstm serve --help"),
    (["serve", "--max-wait-us", "1e20"], "argument --max-wait-us: invalid int value"),
    (["serve", "--engine", "bogus"], "invalid choice: 'bogus'"),
    (["train", "--steps", "ten"], "argument --steps: invalid int value: 'ten' (hmlstm train --help"),
    (["segment"], "required: file (hmlstm segment --help lists the options)"),
    ([], "required: command (hmlstm --help lists the options)"),
    (["info", "--nope"], "unrecognized arguments: --nope (hmlstm info --help lists the options)"),
])
def test_what_argparse_itself_refuses_is_one_line_too(args, needle, capsys):
    """Not argparse's whole usage (20 lines for serve) above its message: the one line every other mistake gets,
    and where the options are listed."""
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    _one_error_line(capsys.readouterr().err, needle)


@pytest.mark.parametrize("extra, needle", [
    (["--local", "--server", "127.0.0.1:50051"], "--server and --local"),
    (["--local", "--token-env", "HOME"], "--token-env and --local"),
    (["--model", "hmlstm/assets/default.onnx"], "--model works only with --local"),
    (["--token-env", "NO_SUCH_VAR_HMLSTM"], "--token-env NO_SUCH_VAR_HMLSTM: that environment variable is empty"),
    (["--server", "127.0.0.1:99999"], "--server 127.0.0.1:99999: give host:port with a port 1-65535"),
    (["--server", "localhost"], "--server localhost: give host:port"),
])
def test_segment_refuses_flags_that_conflict_or_would_be_ignored(tmp_path, extra, needle):
    f = tmp_path / "t.txt"
    f.write_text("some text\n")
    r = run_cli("segment", str(f), *extra, cwd=ROOT)
    assert r.returncode == 2, r.stderr
    _one_error_line(r.stderr, needle)


@pytest.mark.parametrize("command", ["segment", "health"])
def test_a_root_certificate_that_is_not_one_is_named_before_connecting(command, tmp_path, capsys):
    """--tls-ca missing, a folder, or a key in place of a certificate: one line naming the flag and the file (segment
    printed a traceback for a missing one; gRPC's handshake failure names neither)."""
    text = tmp_path / "t.txt"
    text.write_text("some text\n")
    key = tmp_path / "key.pem"
    key.write_text("-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n")
    head = ["segment", str(text)] if command == "segment" else ["health"]
    for ca, says in ((tmp_path / "absent.pem", "no such file"), (tmp_path, "cannot read it"),
                     (key, "not a PEM certificate")):
        assert main([*head, "--server", "127.0.0.1:1", "--tls-ca", str(ca)]) == 2
        _one_error_line(capsys.readouterr().err, f"--tls-ca {ca}: {says}")


def test_training_on_a_binary_file_is_refused(tmp_path):
    f = tmp_path / "zeros.txt"
    f.write_bytes(b"\0" * 300_000)
    r = run_cli("train", str(f), "--out", str(tmp_path / "run"), "--steps", "2", cwd=ROOT)
    assert r.returncode == 2, r.stderr
    _one_error_line(r.stderr, "is 100% control characters (NUL bytes?): it looks like a binary file")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name, magic", [("b.pdf", b"%PDF"), ("b.svg", b"<?xml"), ("b.png", b"\x89PNG")])
def test_plot_writes_the_format_its_file_name_says(tmp_path, capsys, name, magic):
    out = tmp_path / name
    assert main(["plot", str(ROOT / "hmlstm/assets/default.onnx"), "--out", str(out), "--chars", "40"]) == 0
    assert out.read_bytes().startswith(magic)
    assert [p.name for p in tmp_path.iterdir()] == [name]


@pytest.mark.parametrize("args, needle", [
    (["plot", "hmlstm/assets/default.onnx", "--out", "b.jpg"], "plot writes .png, .pdf or .svg"),
    (["evaluate", "hmlstm/assets/default.onnx", "x.txt", "--format", "lines", "--sep", "|"],
     "--sep reads a file segmented by that symbol, so --format lines would be ignored"),
    (["serve", "hmlstm/assets"], "hmlstm/assets is a folder; give the .onnx file (it holds default.dense.onnx"),
])
def test_more_mistakes_get_one_line(args, needle):
    r = run_cli(*args, cwd=ROOT)
    assert r.returncode == 2, r.stderr
    _one_error_line(r.stderr, needle)


def test_a_foreign_onnx_file_is_named_without_cutting_a_word(tmp_path):
    from hmlstm.serving.model import ModelLoadError, load_model

    bad = tmp_path / "x.onnx"
    bad.write_bytes(b"\x08\x07" + b"garbage " * 100)
    with pytest.raises(ModelLoadError) as e:
        load_model(bad, "cpu")
    message = str(e.value)
    assert "is not a loadable ONNX model" in message and "\n" not in message
    assert message.endswith(" ...") or len(message) < 400


def test_training_without_a_terminal_logs_lines_not_a_bar(corpus, tmp_path):
    r = subprocess.run([sys.executable, "-m", "hmlstm.cli", "train", str(corpus), "--out", str(tmp_path / "run"),
                        "--steps", "6", *TINY], capture_output=True, text=True, timeout=300)  # stderr: a pipe
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr
    assert re.search(r"step 6/6: train BPC [\d.]+, validation BPC [\d.]+ \(just measured\), [\d,]+ chars/s", r.stderr)


@pytest.mark.parametrize("at_call, saved", [(1, False), (4, True)], ids=["first step", "after a checkpoint"])
def test_running_out_of_memory_is_one_line_and_a_run_never_saved_is_not_left_behind(corpus, tmp_path, capsys,
                                                                                    monkeypatch, at_call, saved):
    """A batch too large for memory raised TensorFlow's ResourceExhaustedError as a 58-line traceback (found with
    `prlimit --as` and --batch-size 8000), and left the run's settings behind, so that a retry with a smaller
    batch was refused as another run's folder, and a first step that ran out of memory was saved as step 1 (its
    counter had moved). Here the real trainer's step runs and then raises TensorFlow's own error."""
    import tensorflow as tf

    from tests.model.test_train import wrap_train_step

    calls = []

    def running_out(trainer, step):
        def step_or_oom(*a):
            calls.append(1)
            out = step(*a)  # run, so that the step's counter moves, as a real one's did before it ran out
            if len(calls) == at_call:
                raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor with shape[8000,512]")
            return out
        return step_or_oom

    wrap_train_step(monkeypatch, running_out)
    out = tmp_path / "run"
    assert main(["train", str(corpus), "--out", str(out), "--steps", "6", "--checkpoint-every", "2", *TINY]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "ResourceExhausted" not in err
    if saved:  # the 3 steps done before the 4th ran out are kept
        _ends_in_one_error_line(err, "out of memory training 2 layers x 8 units at batch 4 x 10 characters per step, "
                                f"after checkpoint ckpt-3 was saved in {out}; lower --batch-size or --seq-len")
        assert (out / "config.json").is_file()
    else:
        _ends_in_one_error_line(err, "out of memory training 2 layers x 8 units at batch 4 x 10 characters per step, "
                                f"before anything was saved (nothing is left in {out}); lower --batch-size")
        assert not out.exists()
        monkeypatch.undo()  # the real trainer again: the retry is not refused
        b = TINY.index("--batch-size") + 1
        assert main(["train", str(corpus), "--out", str(out), "--steps", "2", *TINY[:b], "2", *TINY[b + 1:]]) == 0


def test_a_slow_first_step_says_it_is_compiling_once(corpus, tmp_path, capsys, monkeypatch):
    """Dozens of layers take minutes to trace before step 1 (4 min for 100 here): the command says why it is silent.
    The note's delay set to nothing, so that a tiny model's first step is 'slow'."""
    import hmlstm.model.train as train_module

    monkeypatch.setattr(train_module, "COMPILE_NOTE_S", 0.0)
    assert main(["train", str(corpus), "--out", str(tmp_path / "run"), "--steps", "3", *TINY]) == 0
    err = capsys.readouterr().err
    assert err.count("still compiling the training step after 0 s (2 layer(s): TensorFlow traces each one") == 1, err


def test_a_refused_resume_names_what_differs_with_both_values(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(corpus), "--out", str(out), "--steps", "2", *TINY]) == 0
    other = [a if a != "8" else "9" for a in TINY]  # --units 8 -> 9 (and --output-dim 8 -> 9)
    capsys.readouterr()
    assert main(["train", str(corpus), "--out", str(out), "--steps", "2", *other]) == 2
    _ends_in_one_error_line(capsys.readouterr().err, "num_units [8, 8] (now [9, 9])", "output_dim 8 (now 9)")


def test_a_certificate_that_is_not_one_is_named_not_reported_as_a_listen_failure(tmp_path):
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    r = run_cli("serve", "--tls-cert", str(bad), "--tls-key", str(bad), "--port", "0", cwd=ROOT)
    assert r.returncode == 2
    _one_error_line(r.stderr, "are not a PEM certificate and its matching private key")
    assert "cannot listen" not in r.stderr


def test_a_tls_file_that_is_missing_or_a_folder_is_named_with_where_it_came_from(tmp_path, capsys, monkeypatch):
    key = tmp_path / "key.pem"
    key.write_text("not a key\n")
    assert main(["serve", "--tls-cert", str(tmp_path / "missing.pem"), "--tls-key", str(key), "--port", "0"]) == 2
    _ends_in_one_error_line(capsys.readouterr().err, f"--tls-cert {tmp_path / 'missing.pem'}: no such file")
    monkeypatch.setenv("HMLSTM_TLS_CERT", str(tmp_path))  # the flag's default: the container's own certificate
    monkeypatch.setenv("HMLSTM_TLS_KEY", str(key))
    assert main(["serve", "--port", "0"]) == 2
    _ends_in_one_error_line(capsys.readouterr().err, f"$HMLSTM_TLS_CERT {tmp_path} is a folder; name the PEM file")


def test_a_taken_worker_metrics_port_is_one_line_before_any_worker_starts():
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        r = run_cli("serve", "--workers", "2", "--metrics-port", str(taken - 1), "--port", "0", cwd=ROOT)
    assert r.returncode == 2, r.stderr
    _one_error_line(r.stderr, "is taken; choose another --metrics-port")  # worker 1's, unless taken - 1 is too


def test_segment_warns_when_the_text_is_mostly_outside_the_vocabulary(tmp_path):
    f = tmp_path / "ru.txt"
    f.write_text("Это текст на русском языке, которого модель не знает.\n", encoding="utf-8")
    r = run_cli("segment", str(f), "--local", cwd=ROOT)
    assert r.returncode == 0, r.stderr
    warning = [ln for ln in r.stderr.splitlines() if ln.startswith("hmlstm: warning:")]
    assert len(warning) == 1 and "outside the model's vocabulary and were read as unknown" in warning[0]
    ok = tmp_path / "en.txt"
    ok.write_text("The for statement is used to iterate over the elements of a sequence.\n")
    assert "warning" not in run_cli("segment", str(ok), "--local", cwd=ROOT).stderr


def test_ctrl_c_exits_130_with_a_checkpoint_that_the_same_command_resumes(corpus, tmp_path, capsys):
    """README: Ctrl-C stops training with exit status 130 and a checkpoint; running the same command again
    resumes from it (and runs on to its end)."""
    out = tmp_path / "run"
    proc = _start_training(corpus, out)
    _wait_for_steps(proc, out)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    step = int(re.search(r"interrupted at step (\d+); checkpoint ckpt-(\d+) saved", err).group(2))
    capsys.readouterr()
    assert main(["train", str(corpus), "--out", str(out), "--steps", str(step + 3), "--checkpoint-every", str(EVERY),
                 "--no-progress", *TINY]) == 0  # the same command, in this process (TensorFlow is loaded already)
    assert f"resuming {out} from step {step}" in capsys.readouterr().err
    assert (out / "ckpt" / f"ckpt-{step + 3}.index").exists()


def test_a_different_corpus_in_the_same_out_is_refused(corpus, tmp_path):
    out = tmp_path / "run"
    assert main(["train", str(corpus), "--out", str(out), "--steps", "2", *TINY]) == 0  # in-process: no TF import
    other = tmp_path / "other.txt"
    other.write_text("a different text altogether. " * 80)
    # answered before TensorFlow loads (a fraction of a second, not the seconds of its import)
    code = ("import sys; from hmlstm.cli import main; rc = main(sys.argv[1:]); "
            "assert 'tensorflow' not in sys.modules; sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, "train", str(other), "--out", str(out), "--steps", "2", *TINY],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    _ends_in_one_error_line(r.stderr, f"{out} holds a run with a different corpus")
    assert "choose another --out" in r.stderr


def test_serve_on_a_taken_grpc_port_is_one_line():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = run_cli("serve", "--port", port, "--metrics-port", "-1")
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and " hmlstm." not in ln]  # log lines aside
    assert len(lines) == 1 and str(port) in lines[0] and lines[0].startswith("hmlstm: error: "), r.stderr
