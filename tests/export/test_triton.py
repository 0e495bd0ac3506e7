"""The Triton model repository, parsed with Triton's own ModelConfig protobuf."""

import json
from pathlib import Path

import onnxruntime as ort
import pytest
from google.protobuf import text_format

from hmlstm import spec
from hmlstm.cli import main
from hmlstm.export.triton import write_repository
from hmlstm.serving.model import DEFAULT_MODEL

PYTRITON = "0.7.0"  # its wheel carries tritonserver 2.51 with the python backend


def parse(path):
    from tritonclient.grpc import model_config_pb2 as mc

    return text_format.Parse(path.read_text(), mc.ModelConfig())


def test_repository_pairs_every_state_and_matches_the_model(tmp_path):
    config = parse(write_repository(DEFAULT_MODEL, tmp_path / "repo"))
    from tritonclient.grpc import model_config_pb2 as mc

    # a GPU instance gets the graph `hmlstm serve --engine auto` runs on a GPU: the dense one
    assert (tmp_path / "repo" / "hmlstm" / "1" / "model.onnx").read_bytes() == \
        spec.engine_path(DEFAULT_MODEL, "dense").read_bytes()
    sess = ort.InferenceSession(str(DEFAULT_MODEL), providers=["CPUExecutionProvider"])
    meta = sess.get_modelmeta().custom_metadata_map
    state_map = json.loads(meta[spec.META_STATE_MAP])
    shapes = {i.name: i.shape for i in sess.get_inputs()} | {o.name: o.shape for o in sess.get_outputs()}
    assert config.backend == "onnxruntime" and config.max_batch_size > 0
    # Explicit tensors: tokens and lengths in; logits, boundaries, boundary_logits out. States are implicit.
    assert {i.name for i in config.input} == {spec.TOKENS, spec.LENGTHS}
    assert {o.name for o in config.output} == {spec.LOGITS, spec.BOUNDARIES, spec.BOUNDARY_LOGITS}
    tokens = next(i for i in config.input if i.name == spec.TOKENS)
    assert tokens.data_type == mc.TYPE_INT32 and list(tokens.dims) == [-1]  # time is dynamic, batch implicit
    lengths = next(i for i in config.input if i.name == spec.LENGTHS)
    assert list(lengths.dims) == [1] and list(lengths.reshape.shape) == []
    for o in config.output:
        assert list(o.dims) == [-1, shapes[o.name][2]] and o.data_type == mc.TYPE_FP32
    states = {s.input_name: s for s in config.sequence_batching.state}
    assert {s.output_name: s.input_name for s in states.values()} == state_map
    for name, s in states.items():
        (init,) = s.initial_state
        assert list(s.dims) == [shapes[name][1]] and init.zero_data
        assert list(init.dims) == list(s.dims) and s.data_type == mc.TYPE_FP32
    assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    # the oldest strategy: no control inputs, no padding to the highest slot, a bounded queue delay
    assert config.sequence_batching.WhichOneof("strategy_choice") == "oldest"
    oldest = config.sequence_batching.oldest
    assert oldest.max_candidate_sequences == 256 and 0 < oldest.max_queue_delay_microseconds <= 1000
    assert list(oldest.preferred_batch_size) == [64, 128, 256] and not config.sequence_batching.control_input
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert json.loads(params["vocabulary"]) == json.loads(meta[spec.META_VOCAB])
    assert json.loads(params["boundary_alignment"]) == json.loads(meta[spec.META_ALIGNMENT])


def test_export_writes_the_repository_beside_the_model(tiny_run, tmp_path, capsys):
    assert main(["export", str(tiny_run), "--out", str(tmp_path / "m.onnx"), "--quick",
                 "--triton", str(tmp_path / "repo"), "--triton-instance", "cpu"]) == 0
    assert f"(Triton model repository {tmp_path / 'repo'}, cpu instance, the sparse graph)\n" in capsys.readouterr().out
    config = parse(tmp_path / "repo" / "hmlstm" / "config.pbtxt")
    from tritonclient.grpc import model_config_pb2 as mc

    assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    assert len(config.sequence_batching.state) == 3 * 2  # the tiny model: 2 layers x (c, h, z)


def test_a_cpu_instance_gets_the_sparse_graph_and_its_own_sequence_limit(tmp_path):
    from tritonclient.grpc import model_config_pb2 as mc

    config = parse(write_repository(DEFAULT_MODEL, tmp_path / "repo", instance="cpu", max_sequences=40))
    assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU and not config.instance_group[0].gpus
    assert config.sequence_batching.oldest.max_candidate_sequences == 40
    assert (tmp_path / "repo" / "hmlstm" / "1" / "model.onnx").read_bytes() == DEFAULT_MODEL.read_bytes()


def test_an_instance_whose_usual_graph_was_not_exported_gets_the_other_and_the_export_says_so(tmp_path):
    import shutil

    from hmlstm.cli.export import triton_written

    alone = tmp_path / "m.onnx"  # the sparse graph without its dense companion: export --engines sparse
    shutil.copyfile(DEFAULT_MODEL, alone)
    config = write_repository(alone, tmp_path / "repo", instance="gpu")
    assert (tmp_path / "repo" / "hmlstm" / "1" / "model.onnx").read_bytes() == DEFAULT_MODEL.read_bytes()
    assert triton_written(config, tmp_path / "repo", "gpu").endswith(
        "gpu instance, the sparse graph; --engines left out the dense graph it usually gets)")
    config = write_repository(DEFAULT_MODEL, tmp_path / "both", instance="gpu")
    assert triton_written(config, tmp_path / "both", "gpu").endswith("gpu instance, the dense graph)")


def test_triton_flags_are_checked_before_the_export(tmp_path, capsys):
    assert main(["export", "no-such-run", "--triton", str(tmp_path / "r"), "--triton-max-sequences", "0"]) == 2
    assert "--triton-max-sequences must be at least 1" in capsys.readouterr().err
    # The repository's own flags without --triton would be ignored after minutes of export: refused at once.
    for flags in (["--triton-instance", "gpu"], ["--triton-max-sequences", "64"]):
        assert main(["export", str(DEFAULT_MODEL), "--out", str(tmp_path / "m.onnx"), *flags]) == 2
        err = capsys.readouterr().err
        assert f"{flags[0]} shapes the Triton repository that --triton REPO writes" in err, err
    assert not list(tmp_path.glob("m*"))


STAND_IN = '''
import sys
sys.path.insert(0, {numpy_site!r})  # the stub's embedded interpreter does not read PYTHONPATH
import json
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """Stands in for the ONNX Runtime backend: records what each request carried, answers zeros."""

    def initialize(self, args):
        self.config = json.loads(args["model_config"])

    def execute(self, requests):
        out = []
        for r in requests:
            seen = {{t.name(): list(t.as_numpy().shape) for t in r.inputs()}}
            with open({seen!r}, "a") as f:
                f.write(json.dumps(seen) + "\\n")
            b, t = pb_utils.get_input_tensor_by_name(r, "tokens").as_numpy().shape
            tensors = [pb_utils.Tensor(o["name"], np.zeros([b, t] + [d for d in o["dims"][1:]], np.float32))
                       for o in self.config["output"]]
            for s in self.config["sequence_batching"]["state"]:
                tensors.append(pb_utils.Tensor(s["output_name"],
                                               pb_utils.get_input_tensor_by_name(r, s["input_name"]).as_numpy()))
            out.append(pb_utils.InferenceResponse(tensors))
        return out
'''


@pytest.mark.slow
def test_the_repository_is_ready_in_a_real_triton_core_and_every_state_input_reaches_the_model(tmp_path):
    """nvidia-pytriton's wheel carries a real tritonserver (2.51) with the python backend. Only that binary is
    used (the wheel is unpacked, not installed: its own dependencies pin numpy < 2). The exported repository
    is loaded with the backend switched to python and a stand-in model, on a CPU instance; this proves the
    config (inputs, outputs, implicit state, the oldest strategy, the instance kind) is one a real Triton core
    accepts and that the sequence batcher injects every state input. What only a container with the
    onnxruntime backend can prove, the ONNX model running inside Triton, is not tested here (docs/triton.md)."""
    import glob
    import subprocess
    import sys
    import time
    import zipfile

    import numpy as np
    import tritonclient.grpc as tg

    from tests.serving.durable import free_port

    wheels = tmp_path / "wheels"
    got = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                          "-d", str(wheels), f"nvidia-pytriton=={PYTRITON}"], capture_output=True, text=True,
                         timeout=600)
    assert got.returncode == 0, got.stderr[-2000:]
    pyt = tmp_path / "pytriton"
    with zipfile.ZipFile(next(wheels.glob("nvidia_pytriton-*.whl"))) as z:
        z.extractall(pyt)
    server = pyt / "pytriton" / "tritonserver"
    libs = str(pyt / "nvidia_pytriton.libs")
    backend = tmp_path / "backends" / "python"
    backend.mkdir(parents=True)
    for f in ("libtriton_python.so", "triton_python_backend_utils.py"):
        (backend / f).write_bytes((server / "backends" / "python" / f).read_bytes())
    stub = backend / "triton_python_backend_stub"
    stub.write_bytes((server / "python_backend_stubs" / f"{sys.version_info[0]}.{sys.version_info[1]}" /
                      "triton_python_backend_stub").read_bytes())
    for exe in glob.glob(str(server / "bin" / "*")) + [str(stub)]:
        Path(exe).chmod(0o755)

    repo = tmp_path / "repo"
    config = write_repository(DEFAULT_MODEL, repo, instance="cpu")
    config.write_text(config.read_text().replace('backend: "onnxruntime"', 'backend: "python"'))
    (repo / "hmlstm" / "1" / "model.onnx").unlink()
    seen = tmp_path / "seen.jsonl"
    (repo / "hmlstm" / "1" / "model.py").write_text(
        STAND_IN.format(numpy_site=str(Path(np.__file__).parents[1]), seen=str(seen)))
    grpc_port = free_port()
    proc = subprocess.Popen([str(server / "bin" / "tritonserver"), f"--model-repository={repo}",
                             f"--backend-directory={backend.parent}", f"--grpc-port={grpc_port}",
                             f"--http-port={free_port()}", f"--metrics-port={free_port()}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={"PATH": "/usr/bin:/bin", "LD_LIBRARY_PATH": libs})
    try:
        client = tg.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            try:
                if client.is_model_ready("hmlstm"):
                    break
            except Exception:  # not listening yet
                pass
            assert time.monotonic() < deadline, "the model did not become READY"
            time.sleep(0.5)
        for start, end in ((True, False), (False, True)):
            tokens = tg.InferInput("tokens", [1, 5], "INT32")
            tokens.set_data_from_numpy(np.arange(1, 6, dtype=np.int32)[None])
            lengths = tg.InferInput("lengths", [1, 1], "INT32")
            lengths.set_data_from_numpy(np.array([[5]], np.int32))
            client.infer("hmlstm", [tokens, lengths], sequence_id=11, sequence_start=start, sequence_end=end)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    requests = [json.loads(line) for line in seen.read_text().splitlines()]
    assert len(requests) == 2
    meta = ort.InferenceSession(str(DEFAULT_MODEL), providers=["CPUExecutionProvider"]).get_modelmeta()
    states = json.loads(meta.custom_metadata_map[spec.META_STATE_MAP]).values()
    for r in requests:
        assert r[spec.TOKENS] == [1, 5] and r[spec.LENGTHS] == [1]
        assert {name: r[name] for name in states} == {name: [1, 1 if "_z" in name else 128] for name in states}
