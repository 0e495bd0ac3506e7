"""`hmlstm serve --engine`: which graph the server runs, from the file or the companion the export wrote beside it."""

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from hmlstm import spec
from hmlstm.export.convert import ExportConfig, export
from hmlstm.serving.background import BackgroundServer
from hmlstm.serving.client import SegmenterClient
from hmlstm.serving.config import ServeConfig
from hmlstm.serving.model import DEFAULT_MODEL, ModelLoadError, load_model
from tests.serving.durable import free_port, wait_serving

TEXT = "The for statement iterates over the items of any sequence, in the order they appear.\n" * 4


def test_auto_runs_the_sparse_graph_on_the_cpu_and_dense_is_one_flag_away():
    auto = load_model(DEFAULT_MODEL, "cpu")
    assert auto.engine == "sparse" and auto.path == DEFAULT_MODEL and "sparse engine" in auto.runtime.note
    dense = load_model(DEFAULT_MODEL, "cpu", engine="dense")
    assert dense.engine == "dense" and dense.path.name == "default.dense.onnx"
    assert "dense engine" in dense.runtime.note
    # named by its dense file, auto still finds the sparse graph beside it on the CPU
    assert load_model(spec.engine_path(DEFAULT_MODEL, "dense"), "cpu").path == DEFAULT_MODEL


def test_a_dense_only_export_is_served_dense_and_refuses_sparse_in_one_line(tiny_run, tmp_path):
    out = export(tiny_run, tmp_path / "m.onnx", ExportConfig(engines=("dense",), times=(1, 7), batches=(1, 3)),
                 log=lambda m: None)
    assert out.card["engine"] == "dense" and not spec.engine_path(out.path, "dense").exists()
    assert load_model(out.path, "cpu").engine == "dense"  # auto: what the file has
    with pytest.raises(ModelLoadError, match=r"--engine sparse: .*m.onnx holds the dense graph") as e:
        load_model(out.path, "cpu", engine="sparse")
    assert "\n" not in str(e.value)


def test_a_companion_from_another_export_is_refused(tiny_onnx, tmp_path):
    main = tmp_path / "m.onnx"
    shutil.copy(tiny_onnx.path, main)
    shutil.copy(spec.engine_path(DEFAULT_MODEL, "dense"), spec.engine_path(main, "dense"))  # another model's
    with pytest.raises(ModelLoadError, match="is not the dense graph of m.onnx"):
        load_model(main, "cpu", engine="dense")


def test_both_engines_serve_the_same_boundaries_to_a_streaming_client():
    results = {}
    for engine in ("sparse", "dense"):
        model = load_model(DEFAULT_MODEL, "cpu", engine=engine)
        with BackgroundServer(model, ServeConfig(port=0, metrics_port=None)) as srv, SegmenterClient(srv.target) as c:
            chunks = [TEXT[i : i + 9] for i in range(0, len(TEXT), 9)]
            got = {}
            for r in c.stream(chunks):
                for lb in r.boundaries:
                    got.setdefault(lb.layer, []).extend(lb.offsets)
            results[engine] = got
    assert results["sparse"] == results["dense"] and any(results["sparse"].values())


@pytest.mark.parametrize("engine", ["dense", "bogus"])
def test_serve_engine_flag_from_the_command_line(engine):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "hmlstm.cli", "serve", "--port", str(port), "--metrics-port", "-1",
                             "--engine", engine], stderr=subprocess.PIPE, text=True)
    try:
        if engine == "bogus":
            assert proc.wait(timeout=60) == 2
            assert "invalid choice: 'bogus'" in proc.stderr.read()
            return
        wait_serving(f"127.0.0.1:{port}")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        assert any("ONNX Runtime on CPU" in line and "dense engine" in line for line in proc.stderr.read().splitlines())
    finally:
        if proc.poll() is None:
            proc.kill()


def test_the_engine_is_chosen_before_any_session_is_opened(tiny_onnx, monkeypatch):
    """Issue 28, item 4: the graph to run is decided from the files' metadata, read without a session, so
    that load_model opens one session (on CUDA a session costs seconds, on TensorRT an engine build)."""
    import onnxruntime as ort

    from hmlstm import spec
    from hmlstm.serving import model as model_module
    from hmlstm.serving.metadata import read_metadata

    for f in (tiny_onnx.path, spec.engine_path(tiny_onnx.path, "dense"), model_module.DEFAULT_MODEL):
        assert read_metadata(f) == ort.InferenceSession(str(f)).get_modelmeta().custom_metadata_map
    opened = []
    real = model_module.make_session

    def counting(path, *args, **kw):
        opened.append(Path(path).name)
        return real(path, *args, **kw)

    monkeypatch.setattr(model_module, "make_session", counting)
    dense = load_model(tiny_onnx.path, "cpu", engine="dense")
    assert dense.engine == "dense" and opened == [spec.engine_path(tiny_onnx.path, "dense").name]
    opened.clear()
    sparse = load_model(spec.engine_path(tiny_onnx.path, "dense"), "auto")  # the CPU here: auto is sparse
    assert sparse.engine == "sparse" and opened == [tiny_onnx.path.name]
