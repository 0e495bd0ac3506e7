import pytest

from hmlstm.serving.background import BackgroundServer
from hmlstm.serving.config import ServeConfig
from hmlstm.serving.model import load_model


@pytest.fixture(scope="session")
def tiny_model(tiny_onnx):
    return load_model(tiny_onnx.path, "cpu")


@pytest.fixture(scope="module")
def server(tiny_model):
    config = ServeConfig(port=0, metrics_port=0, max_streams=40, max_chunk_chars=500, idle_timeout_s=30,
                         piece_chars=64)
    with BackgroundServer(tiny_model, config) as srv:
        yield srv
