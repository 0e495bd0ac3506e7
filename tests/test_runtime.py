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


def test_tensorrt_where_it_cannot_run_is_refused_in_one_line_and_auto_says_why_it_fell_back():
    from hmlstm.runtime import make_session, nvidia_driver_present
    from hmlstm.serving.model import DEFAULT_MODEL

    if nvidia_driver_present():
        pytest.skip("a GPU is here: the fallback path is not taken")
    with pytest.raises(RuntimeError) as e:
        make_session(str(DEFAULT_MODEL), "tensorrt")
    assert str(e.value).startswith("--device tensorrt asked for, but ") and "\n" not in str(e.value)
    note = make_session(str(DEFAULT_MODEL), "auto").note
    assert note.startswith("ONNX Runtime on CPU (") and "TensorRT" in note and "CUDA" in note and "\n" not in note


def test_serve_on_tensorrt_without_it_is_one_line(capsys):
    from hmlstm.cli import main
    from hmlstm.runtime import nvidia_driver_present

    if nvidia_driver_present():
        pytest.skip("a GPU is here")
    assert main(["serve", "--device", "tensorrt", "--port", "0", "--metrics-port", "-1"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("hmlstm: error: --device tensorrt asked for")


def test_a_provider_whose_outputs_differ_from_the_cpu_is_refused(tmp_path):
    """What start-up does for TensorRT, shown with a session of a slightly changed model standing in."""
    import json

    import numpy as np
    import onnx
    from onnx import numpy_helper

    from hmlstm import spec
    from hmlstm.runtime import check_against_cpu, make_session
    from hmlstm.serving.model import DEFAULT_MODEL

    same = make_session(str(DEFAULT_MODEL), "cpu")
    assert check_against_cpu(same, str(DEFAULT_MODEL)) <= 1e-5
    model = onnx.load(str(DEFAULT_MODEL))
    vocab_size = json.loads(spec.card_path(DEFAULT_MODEL).read_text())["vocabulary_size"]
    bias = next(i for i in model.graph.initializer if numpy_helper.to_array(i).shape == (vocab_size,))  # logit bias
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + np.float32(1e-3), bias.name))
    changed = make_session(model.SerializeToString(), "cpu")
    with pytest.raises(RuntimeError, match=rf"differs from the CPU by up to 0.001.* on {spec.LOGITS}"):
        check_against_cpu(changed, str(DEFAULT_MODEL))


def test_cudas_own_failure_printed_on_stdout_is_the_one_line_reason(monkeypatch, tmp_path):
    """Issue 29, item 4: when the CUDA provider loads but CUDA cannot start, ONNX Runtime prints the cause on
    stdout ("CUDA failure 100 ... cudaSetDevice") and falls back to the CPU. That text is the reason given,
    not "the session did not list it"."""
    import os

    import onnxruntime as ort

    from hmlstm import runtime
    from hmlstm.serving.model import DEFAULT_MODEL

    real = ort.InferenceSession

    def provider_that_fails_on_stdout(model, options=None, providers=None):
        os.write(1, b"2026-12-01 10:00:00.0 [E:onnxruntime:Default, cuda_call.cc:123 CudaCall] CUDA failure 100: "
                    b"no CUDA-capable device is detected ; GPU=0 ; hostname=h ; file=cuda_execution_provider.cc ; "
                    b"line=282 ; expr=cudaSetDevice(info_.device_id);\n")
        return real(model, options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(runtime.ort, "InferenceSession", provider_that_fails_on_stdout)
    monkeypatch.setattr(runtime, "_gpu_unavailable", lambda provider: "")
    with pytest.raises(RuntimeError) as e:
        runtime.make_session(str(DEFAULT_MODEL), "cuda")
    message = str(e.value)
    assert "--device cuda asked for, but CUDA provider failed to load: CUDA failure 100: no CUDA-capable device " \
           "is detected" in message and "\n" not in message
    assert "did not list it" not in message
