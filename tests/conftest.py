import json
import os
from pathlib import Path

import pytest


def missing(what: str) -> None:
    """A dependency that the README's test command installs is not here. Under CI (CI=true) that is a
    failure, since a skip would hide a missing install step; elsewhere a skip that says what is missing."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what}; under CI the README's test command (make test) installs it, so this is a failure")
    pytest.skip(what)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

TINY_MODEL = dict(embed_dim=8, num_units=(12, 10), output_dim=16)


# A directory where the tiny run and its export are kept between pytest runs (benchmarks/mutation.py sets it:
# hundreds of runs need not each train and export). Unset, the default: built afresh in each session.
CACHE = os.environ.get("HMLSTM_TEST_CACHE")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A tiny HM-LSTM trained for a few steps on the synthetic corpus."""
    from hmlstm.model.config import TrainConfig
    from hmlstm.model.data import synthetic_corpus
    from hmlstm.model.train import train

    out = (Path(CACHE) if CACHE else tmp_path_factory.mktemp("tiny")) / "run"
    if not (CACHE and (out / "metrics.json").exists()):
        train(synthetic_corpus(seed=0, n_chars=8000), TINY_MODEL,
              TrainConfig(batch_size=8, seq_len=20, max_steps=30, checkpoint_every=30), out, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_onnx(tiny_run, tmp_path_factory):
    """The tiny run exported and validated on the full grid."""
    from hmlstm import spec
    from hmlstm.export.convert import ExportResult, export

    out = (Path(CACHE) if CACHE else tmp_path_factory.mktemp("onnx")) / "tiny.onnx"
    if CACHE and spec.card_path(out).exists():
        return ExportResult(out, spec.card_path(out), json.loads(spec.card_path(out).read_text()))
    return export(tiny_run, out, log=lambda m: None)
