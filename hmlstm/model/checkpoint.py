"""A training run on disk, and loading a trained network back from it.

Layout of a run directory:

  config.json   model config, train config, corpus name, provenance
  vocab.json    the character list (id = index; id 0 = unknown)
  ckpt/         TensorFlow checkpoints (weights, optimizer, carried state, step)
  tb/           TensorBoard scalars
  metrics.json  validation BPC history and boundary scores, rewritten as it goes
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hmlstm.errors import UserError, first_line
from hmlstm.model.config import ModelConfig, TrainConfig, dumps
from hmlstm.model.data import Vocabulary


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside ``path`` and rename: never half-written."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    """``atomic_write_bytes`` of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


@dataclass(frozen=True)
class RunInfo:
    path: Path
    model: ModelConfig
    train: TrainConfig
    vocab: Vocabulary
    meta: dict[str, Any]


def write_run_info(run_dir: Path, model: ModelConfig, train: TrainConfig, vocab: Vocabulary,
                   meta: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "vocab.json", vocab.to_json())
    atomic_write_text(
        run_dir / "config.json",
        dumps({"model": model.to_dict(), "train": train.to_dict(), **meta}),
    )


def read_run_info(run_dir: str | Path) -> RunInfo:
    """Read config and vocabulary of a run; UserError if it is not a valid run."""
    p = Path(run_dir)
    if not p.exists():
        raise UserError(f"checkpoint {p} does not exist; train one with `hmlstm train --out {p}`")
    if not (p / "config.json").is_file() or not (p / "vocab.json").is_file():
        raise UserError(
            f"{p} is not an hmlstm training run (config.json or vocab.json missing); "
            "point at the directory given to `hmlstm train --out`"
        )
    try:
        cfg = json.loads((p / "config.json").read_text(encoding="utf-8"))
        vocab = Vocabulary.from_json((p / "vocab.json").read_text(encoding="utf-8"))
        model = ModelConfig.from_dict(cfg.pop("model"))
        train_d = cfg.pop("train")
        train_d["rate_targets"] = tuple(train_d.get("rate_targets", ()))
        train = TrainConfig(**train_d)
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{p}/config.json or vocab.json is corrupt ({e}); retrain or restore it") from None
    if len(vocab) != model.vocab_size:
        raise UserError(
            f"{p}: vocab.json has {len(vocab)} characters but the model expects "
            f"{model.vocab_size}; the run directory is inconsistent"
        )
    return RunInfo(p, model, train, vocab, cfg)


RUN_FILES = ("config.json", "vocab.json", "ckpt", "tb", "metrics.json")  # what a run writes (the layout above)


def remove_run(run_dir: Path, folder_too: bool) -> None:
    """Delete what a run wrote in ``run_dir`` (``folder_too``: the folder itself, made for the run), for a run
    that never saved and would otherwise stand in the way of the next one."""
    import shutil

    if folder_too:
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    for name in RUN_FILES:
        target = Path(run_dir) / name
        shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)


# Train settings that may change on resume: they say when to stop, not how to train.
STOP_FIELDS = frozenset({"epochs", "max_steps", "max_minutes", "checkpoint_every", "eval_every"})


def refuse_another_run(run_dir: Path, model: ModelConfig, cfg: TrainConfig, vocab: Vocabulary,
                       corpus_name: str) -> None:
    """UserError naming each setting that differs, with both values, if ``run_dir`` holds a run of another model,
    training setup, corpus or vocabulary than these; nothing if it holds none. Needs no TensorFlow: the CLI
    answers the mistake before loading it."""
    if not (Path(run_dir) / "config.json").exists():
        return
    info = read_run_info(run_dir)
    old, new = info.train.to_dict(), cfg.to_dict()
    diff = [f"{k} {old.get(k)!r} (now {new[k]!r})" for k in new if k not in STOP_FIELDS and old.get(k) != new[k]]
    if info.model != model:
        was, now = info.model.to_dict(), model.to_dict()
        diff[:0] = [f"{k} {was.get(k)!r} (now {now[k]!r})" for k in now if was.get(k) != now[k] and k != "vocab_size"]
    if info.meta.get("corpus") != corpus_name:
        diff.insert(0, f"corpus {info.meta.get('corpus')!r} (now {corpus_name!r})")
    elif info.vocab.chars != vocab.chars:
        diff.insert(0, f"vocabulary of {len(info.vocab.chars)} characters (now {len(vocab.chars)})")
    if diff:
        raise UserError(f"{run_dir} holds a run with a different {'; '.join(diff)}: resume it with its settings, "
                        "or choose another --out")


def latest_checkpoint(run_dir: Path) -> str | None:
    import tensorflow as tf

    return tf.train.latest_checkpoint(str(Path(run_dir) / "ckpt"))


def load_network(run_dir: str | Path):
    """(network, RunInfo) with the newest weights of a run restored."""
    import tensorflow as tf

    from hmlstm.model.network import HMLSTMNetwork

    info = read_run_info(run_dir)
    path = latest_checkpoint(info.path)
    if path is None:
        raise UserError(f"{info.path} has no saved weights yet (ckpt/ is empty); train first")
    net = HMLSTMNetwork(info.model)
    # The trainer saves the network as trainer/network; mirror that path.
    ckpt = tf.train.Checkpoint(trainer=tf.train.Checkpoint(network=net))
    try:
        status = ckpt.restore(path).expect_partial()
        status.assert_existing_objects_matched()
    except Exception as e:  # TF raises OpError, AssertionError, IndexError... on bad files
        first = first_line(e)
        raise UserError(
            f"checkpoint {path} cannot be restored into this model config ({first[:200]}); "
            "it is corrupt or from another model"
        ) from None
    return net, info
