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
def test_cuda_provider_runs_the_model(tiny_onnx):
    if not nvidia_driver_present():
        pytest.skip("no NVIDIA GPU here")
    rt = make_session(str(tiny_onnx.path), "cuda")
    assert rt.on_cuda
