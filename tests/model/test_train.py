import numpy as np
import pytest
import tensorflow as tf

from hmlstm.errors import UserError
from hmlstm.model.checkpoint import load_network
from hmlstm.model.config import ModelConfig, TrainConfig
from hmlstm.model.data import synthetic_corpus
from hmlstm.model.train import Trainer, train

SMALL = dict(embed_dim=8, num_units=(16, 16), output_dim=16)


@pytest.fixture(scope="module")
def corpus():
    return synthetic_corpus(seed=0, n_chars=12_000)


def test_training_lowers_validation_bpc(corpus, tmp_path):
    cfg = TrainConfig(batch_size=8, seq_len=20, epochs=4, checkpoint_every=1000)
    result = train(corpus, SMALL, cfg, tmp_path / "run", progress=False)
    bpcs = [b for _, b in result.val_bpc]
    assert len(bpcs) == 4
    assert bpcs[-1] < bpcs[0] - 0.5, bpcs
    assert set(result.boundary) == {"layer1", "layer2"}
    assert {"word_ends", "word_starts", "phrase_ends"} <= set(result.boundary["layer1"])
    assert (tmp_path / "run" / "config.json").exists() and (tmp_path / "run" / "vocab.json").exists()
    assert list((tmp_path / "run" / "tb").iterdir())  # TensorBoard events written
    import json
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["step"] == result.step and 0 < metrics["train_seconds"] < 600


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(corpus, tmp_path):
    cfg = TrainConfig(batch_size=8, seq_len=20, max_steps=40, checkpoint_every=10)
    train(corpus, SMALL, cfg, tmp_path / "full", progress=False)
    # Stop at 25 (mid-epoch, between checkpoints), then resume to 40.
    from dataclasses import replace
    train(corpus, SMALL, replace(cfg, max_steps=25), tmp_path / "split", progress=False)
    import json
    first = json.loads((tmp_path / "split" / "metrics.json").read_text())["train_seconds"]
    resumed = train(corpus, SMALL, cfg, tmp_path / "split", progress=False)
    assert resumed.step == 40
    assert json.loads((tmp_path / "split" / "metrics.json").read_text())["train_seconds"] > first  # accumulates
    a, _ = load_network(tmp_path / "full")
    b, _ = load_network(tmp_path / "split")
    for x, y in zip(a.trainable_variables, b.trainable_variables):
        np.testing.assert_array_equal(x.numpy(), y.numpy())


def test_resume_with_other_settings_is_refused(corpus, tmp_path):
    cfg = TrainConfig(batch_size=8, seq_len=20, max_steps=2)
    train(corpus, SMALL, cfg, tmp_path / "run", progress=False)
    with pytest.raises(UserError, match=r"different num_units \[16, 16\] \(now \[8, 8\]\)"):
        train(corpus, dict(SMALL, num_units=(8, 8)), cfg, tmp_path / "run", progress=False)


def test_non_finite_step_is_skipped_and_changes_no_weight():
    model = ModelConfig(vocab_size=5, **SMALL)
    trainer = Trainer(model, TrainConfig(batch_size=2, seq_len=4))
    x = np.ones((2, 4), np.int32)
    none = np.zeros((2, 4, 0), np.float32)  # no supervised boundary targets
    _, _, applied, _ = trainer.train_step(x, x, none)  # a good step first: the carried state is no longer zero
    assert bool(applied)
    assert any(np.abs(v.numpy()).max() > 0 for v in tf.nest.flatten(trainer.carried))
    trainer.network.logit_bias.assign([np.inf, 0, 0, 0, 0])
    before = [v.numpy().copy() for v in trainer.variables_to_train]
    _, _, applied, _ = trainer.train_step(x, x, none)
    assert not bool(applied)
    for b, v in zip(before, trainer.variables_to_train):
        np.testing.assert_array_equal(b, v.numpy())
    for v in tf.nest.flatten(trainer.carried):  # the carried state restarts from zero
        np.testing.assert_array_equal(v.numpy(), 0.0)


def test_slope_anneals_per_epoch():
    cfg = TrainConfig()
    assert [cfg.slope_at(e) for e in (0, 10, 100, 1000)] == [1.0, 1.4, 5.0, 5.0]


def test_training_applies_the_slope_schedule(tmp_path):
    """The slope at every logged step (TensorBoard, every 10 steps and the last) is the schedule's value for the
    epoch the step is in, and the trained network ends with the last epoch's (a short text: the claim is about
    epochs, not their length). One run of 6 epochs: 1 + 0.5 * epoch, capped at slope_max 2.6."""
    from hmlstm.model.data import StreamBatcher, Vocabulary, split

    corpus = synthetic_corpus(seed=0, n_chars=4_000)

    cfg = TrainConfig(batch_size=8, seq_len=20, slope_rate=0.5, slope_max=2.6, checkpoint_every=1000)
    ids = Vocabulary.from_text(corpus.text).encode(corpus.text)
    per_epoch = len(StreamBatcher(split(ids, corpus.held_out_start(cfg.val_fraction))[0], 8, 20))
    run = tmp_path / "run"
    train(corpus, SMALL, TrainConfig(**{**cfg.to_dict(), "max_steps": 6 * per_epoch, "rate_targets": ()}),
          run, progress=False)
    logged = {}
    for events in sorted((run / "tb").rglob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(events)):
            for value in event.summary.value:
                if value.tag == "train/slope":
                    logged[event.step] = float(tf.make_ndarray(value.tensor))
    assert len(logged) >= 6 * per_epoch // 10 and 6 * per_epoch in logged, sorted(logged)
    for step, slope in logged.items():
        epoch = (step - 1) // per_epoch
        assert slope == pytest.approx(min(1.0 + 0.5 * epoch, 2.6)), (step, epoch)
    assert {round(v, 4) for v in logged.values()} >= {1.0, 1.5, 2.0, 2.5, 2.6}  # every epoch was logged
    net, _ = load_network(run)
    assert float(net.slope.numpy()) == pytest.approx(2.6)


def test_rate_penalty_has_gradient_even_when_every_detector_is_saturated_off():
    from hmlstm.model.train import rate_penalty
    cfg = TrainConfig(rate_targets=(0.2, 0.1))
    s_z = tf.Variable(tf.fill([2, 5, 3], -5.0))  # a * s_z far below -1: the hard sigmoid is flat here
    z = tf.zeros([2, 5, 3])  # no detector fires
    with tf.GradientTape() as tape:
        p = rate_penalty(z, s_z, tf.constant(1.0), cfg)
    g = tape.gradient(p, s_z).numpy()
    assert float(p) == pytest.approx(0.2**2 + 0.1**2)  # the value is the true (hard) rate's
    assert np.all(g[..., :2] < 0)  # pushes the detectors back towards firing
    np.testing.assert_array_equal(g[..., 2], 0.0)  # a layer without a target is left alone


def test_rate_penalty_moves_the_firing_rate_towards_its_target():
    corpus = synthetic_corpus(seed=1, n_chars=12_000)
    base = TrainConfig(batch_size=8, seq_len=20, max_steps=60, checkpoint_every=1000)
    import tempfile
    from dataclasses import replace
    with tempfile.TemporaryDirectory() as d:
        free = train(corpus, SMALL, base, f"{d}/free", progress=False).boundary["layer1"]["rate"]
        pushed = train(corpus, SMALL, replace(base, rate_targets=(0.9,), rate_penalty=10.0), f"{d}/pushed",
                       progress=False).boundary["layer1"]["rate"]
    assert pushed > free and pushed > 0.5, (free, pushed)


def test_entropy_target_pushes_layer1_to_fire_one_step_after_each_entropy_peak():
    from hmlstm.model.train import entropy_peak_loss
    sharp, flat = [8.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]  # low and high next-character entropy
    logits = tf.constant([[sharp, flat, sharp, sharp, flat, sharp, sharp]])  # peaks at t = 1 and t = 4
    s_z = tf.Variable(tf.zeros([1, 7, 2]))
    with tf.GradientTape() as tape:
        loss = entropy_peak_loss(logits, s_z, tf.constant(1.0))
    g = tape.gradient(loss, s_z).numpy()[0, :, 0]
    assert g[2] < 0 and g[5] < 0  # fire at t + 1 after each peak (the start alignment)
    assert np.all(g[[3, 4, 6]] > 0) and np.all(g[:2] == 0)  # quiet elsewhere; no target before t = 2


def test_upper_layers_are_taught_only_the_highest_entropy_peaks():
    from hmlstm.model.train import entropy_peak_loss, entropy_peak_targets
    sharp, flat = [8.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]
    three, half = [1.0, 1.0, 1.0, -8.0], [4.0, 4.0, 0.0, 0.0]  # 1.6 and 1.1 bits against flat's 2
    # peaks at t = 1 (three), 4 (half), 7 (flat) and 10 (half)
    logits = tf.constant([[sharp, three, sharp, sharp, half, sharp, sharp, flat, sharp, sharp, half, sharp]])
    t = entropy_peak_targets(logits, (1.0, 0.5, 0.25)).numpy()[0]  # [T-2, 3], index i is t = i + 1
    assert np.flatnonzero(t[:, 0]).tolist() == [0, 3, 6, 9]  # every peak
    assert np.flatnonzero(t[:, 1]).tolist() == [0, 6]  # the highest half: flat and three
    assert np.flatnonzero(t[:, 2]).tolist() == [6]  # ceil(0.25 * 4) = 1: flat
    assert entropy_peak_targets(tf.constant([[sharp] * 5]), (1.0, 0.5)).numpy().sum() == 0  # no peak, no target
    s_z = tf.Variable(tf.zeros([1, 12, 3]))
    with tf.GradientTape() as tape:
        loss = entropy_peak_loss(logits, s_z, tf.constant(1.0), (1.0, 0.5))
    g = tape.gradient(loss, s_z).numpy()[0]
    assert g[5, 0] < 0 and g[5, 1] > 0  # after the half peak at t = 4: layer 1 fires, layer 2 does not
    assert g[8, 0] < 0 and g[8, 1] < 0 and g[2, 1] < 0  # after the peaks at t = 7 and 1: both fire
    assert np.all(g[:, 2] == 0)  # no fraction for layer 3: no target


def test_a_peak_window_ranks_layer1_by_height_above_the_neighbourhood():
    from hmlstm.model.train import entropy_peak_targets
    sharp, flat = [8.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]
    mid, a, b = [2.5, 0.0, 0.0, 0.0], [0.6, 0.0, 0.0, 0.0], [0.3, 0.0, 0.0, 0.0]  # 1.0, 1.93, 1.98 bits
    # two peaks: a low one (t = 2, mid) among sharp characters, a high one (t = 7, flat) on a high ramp
    logits = tf.constant([[sharp, sharp, mid, sharp, sharp, a, b, flat, b, a, sharp, sharp]])
    by_height = entropy_peak_targets(logits, (0.5, 0.5)).numpy()[0]
    by_contrast = entropy_peak_targets(logits, (0.5, 0.5), window=5).numpy()[0]
    assert np.flatnonzero(by_height[:, 0]).tolist() == [6]  # t = 7: the highest
    assert np.flatnonzero(by_contrast[:, 0]).tolist() == [1]  # t = 2: stands out most from its neighbours
    np.testing.assert_array_equal(by_height[:, 1], by_contrast[:, 1])  # upper layers rank by height


def test_more_peak_fractions_than_detectors_is_refused(tmp_path):
    corpus = synthetic_corpus(seed=0, n_chars=4000)
    cfg = TrainConfig(batch_size=4, seq_len=20, max_steps=1, entropy_target=1.0, peak_fractions=(1.0, 0.3))
    with pytest.raises(UserError, match="2 peak fractions, but only 1 layers have a boundary detector"):
        train(corpus, SMALL, cfg, tmp_path / "run", progress=False)


def test_the_recorded_command_runs_again_in_a_shell():
    import shlex

    from hmlstm.cli import _unescape
    from hmlstm.model.train import command_line

    argv = ["train", "builtin", "--strip-delimiters", " \n\t", "--out", "runs/a b"]
    line = command_line(argv)
    assert line == "hmlstm train builtin --strip-delimiters ' \\n\\t' --out 'runs/a b'"
    back = shlex.split(line)[1:]
    assert back[:3] == argv[:3] and _unescape(back[3]) == " \n\t" and back[4:] == argv[4:]


def test_an_interrupt_before_the_first_step_says_nothing_was_saved(corpus, tmp_path, monkeypatch):
    """Ctrl-C arriving while the first batch is being made (the loop has taken no step): the run says so and
    leaves no checkpoint, rather than claiming one."""
    from hmlstm.model import train as train_module

    def interrupted(self, k):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module.StreamBatcher, "batch", interrupted)
    logs = []
    result = train(corpus, SMALL, TrainConfig(batch_size=8, seq_len=20, max_steps=5), tmp_path / "run",
                   progress=False, log=logs.append)
    assert result.stopped_by == "interrupted" and result.step == 0
    assert any("before the first step: nothing was saved" in line for line in logs), logs
    assert not any("saved, run" in line for line in logs)
    assert not list((tmp_path / "run").glob("ckpt/ckpt-*"))


def wrap_train_step(monkeypatch, wrap) -> list:
    """Fault injection into the real trainer: every Trainer made from now on runs ``wrap(trainer, its real step)``
    as its step. Returns the trainers made."""
    import hmlstm.model.train as train_module

    trainers = []
    real_init = train_module.Trainer.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        trainers.append(self)
        self.train_step = wrap(self, self.train_step)

    monkeypatch.setattr(train_module.Trainer, "__init__", init)
    return trainers


def poison_from(monkeypatch, first: int, last: int):
    """Fault injection into the real trainer: before calls first..last of its step, the output bias is set
    to inf, so those steps' loss is non-finite. Returns (trainers made, calls so far)."""
    calls = []

    def poisoning(trainer, step):
        def poisoned(x, y, targets):
            calls.append(1)
            if first <= len(calls) <= last:
                trainer.network.logit_bias.assign(tf.fill(trainer.network.logit_bias.shape, np.inf))
            return step(x, y, targets)
        return poisoned

    return wrap_train_step(monkeypatch, poisoning), calls


def test_three_non_finite_steps_in_a_row_roll_back_to_the_checkpoint_with_half_the_learning_rate(
        corpus, tmp_path, monkeypatch):
    """The README's claim, through train(): at step 11 the output bias is poisoned (inf), so steps 11-13 are
    non-finite and skipped; the third rolls back to the checkpoint of step 8 (weights finite again) and halves
    the learning rate, and training then runs to its end. The fault is injected into the real trainer."""
    trainers, calls = poison_from(monkeypatch, 11, 11)
    lines = []
    cfg = TrainConfig(batch_size=8, seq_len=20, max_steps=20, checkpoint_every=4, learning_rate=2e-3)
    result = train(corpus, SMALL, cfg, tmp_path / "run", progress=False, log=lines.append)
    (trainer,) = trainers
    assert result.skipped_steps == 3 and result.step == 20
    assert [ln for ln in lines if "non-finite" in ln] == [
        f"step {s}: non-finite loss or gradient; step skipped, state reset" for s in (11, 12, 13)]
    assert "3 bad steps in a row: back to checkpoint at step 8, learning rate halved to 1.00e-03" in lines
    assert float(trainer.optimizer.learning_rate.numpy()) == pytest.approx(1e-3)
    assert len(calls) == 20 + 3 + 2  # steps 9-10 ran again after the rollback (to step 8), then 11-20
    assert np.isfinite(trainer.network.logit_bias.numpy()).all()
    net, _ = load_network(tmp_path / "run")
    assert all(np.isfinite(v.numpy()).all() for v in net.trainable_variables)


def test_rollbacks_that_keep_failing_stop_training_as_diverged(corpus, tmp_path, monkeypatch):
    """Steps 11 on are all poisoned: a checkpoint that falls due on a skipped step (12) is not written, so
    every rollback goes to step 8's good weights; after 3 rollbacks that did not help, one line says the run
    diverged and where it was left, instead of halving the learning rate forever."""
    poison_from(monkeypatch, 11, 10_000)
    cfg = TrainConfig(batch_size=8, seq_len=20, max_steps=40, checkpoint_every=4)
    with pytest.raises(UserError, match="training diverged: 3 rollbacks to ckpt-8, each with the learning rate "
                                        r"halved \(now 2.50e-04\)"):
        train(corpus, SMALL, cfg, tmp_path / "run", progress=False, log=lambda m: None)
    assert sorted(p.name for p in (tmp_path / "run" / "ckpt").glob("*.index")) == ["ckpt-4.index", "ckpt-8.index"]
