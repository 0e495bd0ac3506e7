"""The Triton model repository, parsed with Triton's own ModelConfig protobuf."""

import json

import onnxruntime as ort
from google.protobuf import text_format

from hmlstm import spec
from hmlstm.cli import main
from hmlstm.export.triton import write_repository
from hmlstm.serving.model import DEFAULT_MODEL


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


def test_export_writes_the_repository_beside_the_model(tiny_run, tmp_path):
    assert main(["export", str(tiny_run), "--out", str(tmp_path / "m.onnx"), "--quick",
                 "--triton", str(tmp_path / "repo"), "--triton-instance", "cpu"]) == 0
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


def test_triton_flags_are_checked_before_the_export(tmp_path, capsys):
    assert main(["export", "no-such-run", "--triton", str(tmp_path / "r"), "--triton-max-sequences", "0"]) == 2
    assert "--triton-max-sequences must be at least 1" in capsys.readouterr().err
