import pytest

from hmlstm.runtime import make_session, nvidia_driver_present


def test_auto_device_falls_back_to_cpu_with_one_clean_line(tiny_onnx, capfd):
    rt = make_session(str(tiny_onnx.path), "auto")
    err = capfd.readouterr().err
    if nvidia_driver_present() and rt.on_cuda:
        pytest.skip("a working CUDA provider is present")
    assert rt.providers == ("CPUExecutionProvider",)
    assert rt.note.startswith("ONNX Runtime on CPU") and "\n" not in rt.note
    assert "onnxruntime" not in err and "Failed" not in err  # no stack of ORT errors


def test_cuda_demanded_without_cuda_is_an_error(tiny_onnx):
    if nvidia_driver_present():
        pytest.skip("an NVIDIA driver is present")
    with pytest.raises(RuntimeError, match="--device cuda"):
        make_session(str(tiny_onnx.path), "cuda")


@pytest.mark.gpu
def test_cuda_provider_runs_the_model_and_matches_the_cpu(tiny_onnx):
    if not nvidia_driver_present():
        pytest.skip("no NVIDIA GPU here")
    import numpy as np

    from hmlstm import spec
    from hmlstm.export.validate import make_feeds, run_session
    rt = make_session(str(tiny_onnx.path), "cuda")
    assert rt.on_cuda
    cpu = make_session(str(tiny_onnx.path), "cpu")
    meta = tiny_onnx.card["model_config"]
    feeds = make_feeds(np.random.default_rng(0), meta["num_units"], meta["vocab_size"], 17, 333, None, True, True)
    a, b = run_session(rt.session, feeds), run_session(cpu.session, feeds)
    np.testing.assert_allclose(a[spec.LOGITS], b[spec.LOGITS], atol=1e-3)
    assert tiny_onnx.card["validation"]["providers"] == ["CPUExecutionProvider", "CUDAExecutionProvider"]


def test_session_options_set_threads_and_spinning_only_when_asked():
    from hmlstm.runtime import session_options

    so = session_options(threads=1, spinning=False)
    assert so.intra_op_num_threads == 1
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert session_options(spinning=True).get_session_config_entry("session.intra_op.allow_spinning") == "1"
    default = session_options()
    assert default.intra_op_num_threads == 0  # ORT's default: one thread per core
    with pytest.raises(RuntimeError):  # ORT raises when the entry was never set: its own default applies
        default.get_session_config_entry("session.intra_op.allow_spinning")


def test_the_server_imports_neither_the_trainer_nor_the_exporter():
    """model -> export -> serving holds in the imports: what both sides read is in hmlstm.spec and
    hmlstm.vocabulary, so a server-only install needs neither TensorFlow nor the exporter."""
    import subprocess
    import sys

    code = ("import sys, hmlstm.serving.server, hmlstm.serving.client, hmlstm.serving.workers, hmlstm.serving.model;"
            "bad = sorted(m for m in sys.modules if m.startswith(('hmlstm.model', 'hmlstm.export', 'tensorflow',"
            " 'tf2onnx', 'onnx.')) or m == 'onnx'); print(bad); sys.exit(1 if bad else 0)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
