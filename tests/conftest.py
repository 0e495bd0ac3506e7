import contextlib
import fcntl
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
# hundreds of runs need not each train and export). Unset, the default: built once per pytest run, by the first
# of its workers (pytest-xdist) that needs them, in a folder they share.
CACHE = os.environ.get("HMLSTM_TEST_CACHE")


@contextlib.contextmanager
def shared_folder(tmp_path_factory, name: str):
    """HMLSTM_TEST_CACHE, else a folder every pytest-xdist worker of this run shares; held under a lock
    named ``name`` while a worker builds what goes there, so the others wait for it and then read it."""
    if CACHE:
        folder = Path(CACHE)
    else:
        base = tmp_path_factory.getbasetemp()
        folder = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield folder


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A tiny HM-LSTM trained for a few steps on the synthetic corpus."""
    from hmlstm.model.config import TrainConfig
    from hmlstm.model.data import synthetic_corpus
    from hmlstm.model.train import train

    with shared_folder(tmp_path_factory, "tiny-run") as folder:
        out = folder / "run"
        if not (out / "metrics.json").exists():
            train(synthetic_corpus(seed=0, n_chars=8000), TINY_MODEL,
                  TrainConfig(batch_size=8, seq_len=20, max_steps=30, checkpoint_every=30), out, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_onnx(tiny_run, tmp_path_factory):
    """The tiny run exported and validated on the full grid."""
    from hmlstm import spec
    from hmlstm.export.convert import ExportResult, export

    with shared_folder(tmp_path_factory, "tiny-onnx") as folder:
        out = folder / "tiny.onnx"
        if spec.card_path(out).exists():
            return ExportResult(out, spec.card_path(out), json.loads(spec.card_path(out).read_text()))
        return export(tiny_run, out, log=lambda m: None)


@pytest.fixture(scope="session")
def shipped_reexport(tmp_path_factory):
    """The README's `hmlstm export hmlstm/assets/default.onnx --out x.onnx --quick`, run once per pytest run
    (in this process, for the workers that share it): (x.onnx, what the command printed on stderr)."""
    import io
    from contextlib import redirect_stderr

    from hmlstm.cli import main
    from hmlstm.serving.model import DEFAULT_MODEL

    with shared_folder(tmp_path_factory, "shipped-reexport") as folder:
        out, log = folder / "reexport" / "x.onnx", folder / "reexport.log"
        if not log.exists():
            out.parent.mkdir(exist_ok=True)
            err = io.StringIO()
            with redirect_stderr(err):
                status = main(["export", str(DEFAULT_MODEL), "--out", str(out), "--quick"])
            assert status == 0, err.getvalue()
            log.write_text(err.getvalue())
        return out, log.read_text()
