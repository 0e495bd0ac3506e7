"""Training: truncated BPTT with carried state, Adam, clipping, resume, recovery.

``train(corpus, model_config, train_config, run_dir)`` is the whole job; the
CLI only builds its arguments. A run directory that already holds a run with
the same configuration is resumed from its newest checkpoint; the run then
ends with the same weights as one that was never interrupted.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from hmlstm import boundary_scores
from hmlstm.errors import Terminated, UserError, first_line
from hmlstm.model import checkpoint as run_io
from hmlstm.model.config import ModelConfig, TrainConfig, dumps
from hmlstm.model.data import Corpus, StreamBatcher, Vocabulary, delay, size_problem, split
from hmlstm.model.network import HMLSTMNetwork
from hmlstm.model.optim import Adam

LN2 = math.log(2.0)


def command_line(argv: list[str]) -> str:
    """``hmlstm ARGS`` as one line a shell runs again: quoted, with newlines and tabs written
    as the backslash escapes that --strip-delimiters and --sep read back."""
    import shlex

    return shlex.join(["hmlstm", *(a.replace("\n", "\\n").replace("\t", "\\t") for a in argv)])


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    val_bpc: list[tuple[int, float]] = field(default_factory=list)
    boundary: dict[str, Any] = field(default_factory=dict)
    skipped_steps: int = 0
    stopped_by: str = "done"


MAX_ROLLBACKS = 3  # rollbacks in a row (no applied step between) before training gives up as diverged
LOG_EVERY_S = 30.0  # without a terminal (or with --no-progress), a progress line this often and at each validation
# The first step traces and compiles the training graph: seconds for a few layers, minutes for dozens (4 min for 100
# on 2 cores). A first step slower than this says so once, instead of leaving the command silent.
COMPILE_NOTE_S = 20.0


class Trainer(tf.Module):
    """Network, optimizer, carried state and counters: everything a checkpoint holds."""

    def __init__(self, model: ModelConfig, cfg: TrainConfig):
        super().__init__(name="trainer")
        self.cfg = cfg
        self.network = HMLSTMNetwork(model, seed=cfg.seed)
        self.variables_to_train = list(self.network.trainable_variables)
        self.optimizer = Adam(self.variables_to_train, cfg.learning_rate)
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False)
        zero = self.network.initial_state(cfg.batch_size)
        self.carried = tf.nest.map_structure(lambda t: tf.Variable(t, trainable=False), zero)
        b, t = cfg.batch_size, cfg.seq_len
        spec = tf.TensorSpec([b, t], tf.int32)
        targets = tf.TensorSpec([b, t, len(cfg.supervised_layers)], tf.float32)
        self.train_step = tf.function(self._train_step, input_signature=[spec, spec, targets])

    def reset_state(self) -> None:
        for v in tf.nest.flatten(self.carried):
            v.assign(tf.zeros_like(v))

    def loss(self, x, y, targets, state):
        """(network output, mean cross-entropy, the loss that is optimized).

        The optimized loss adds the configured firing-rate penalty, the
        entropy-peak targets and the supervised boundary targets (``targets``
        [B, T, supervised layers], from the delimiters the corpus had) to the
        cross-entropy. Shared by the single-device step and the tf.distribute
        replica step.
        """
        out = self.network(x, state)
        ce = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=out.logits))
        total = ce
        if self.cfg.rate_targets:
            total += rate_penalty(out.boundaries, out.boundary_logits, self.network.slope, self.cfg)
        supervised = [l for l, _ in self.cfg.supervised_layers]
        if self.cfg.entropy_target:
            total += self.cfg.entropy_target * entropy_peak_loss(out.logits, out.boundary_logits, self.network.slope,
                                                                 self.cfg.target_fractions, self.cfg.peak_window,
                                                                 skip=supervised)
        if supervised:
            total += self.cfg.boundary_weight * supervised_boundary_loss(out.boundary_logits, self.network.slope,
                                                                         targets, supervised)
        return out, ce, total

    def _train_step(self, x, y, targets):
        state = tf.nest.map_structure(tf.identity, self.carried)
        with tf.GradientTape() as tape:
            out, loss, total = self.loss(x, y, targets, state)
        grads = tape.gradient(total, self.variables_to_train)
        grads = [tf.convert_to_tensor(g) for g in grads]
        grads, gnorm = tf.clip_by_global_norm(grads, self.cfg.clip_norm)
        ok = tf.math.is_finite(loss) & tf.math.is_finite(gnorm)

        def apply():
            self.optimizer.apply(grads, self.variables_to_train)
            for v, s in zip(tf.nest.flatten(self.carried), tf.nest.flatten(out.final_state)):
                v.assign(s)
            return tf.constant(True)

        def skip():
            # A non-finite step changes nothing but the carried state, which restarts.
            for v in tf.nest.flatten(self.carried):
                v.assign(tf.zeros_like(v))
            return tf.constant(False)

        applied = tf.cond(ok, apply, skip)
        self.step.assign_add(1)
        rate = tf.reduce_mean(out.boundaries, axis=[0, 1])
        return loss, gnorm, applied, rate


def rate_penalty(boundaries: tf.Tensor, boundary_logits: tf.Tensor, slope: tf.Tensor,
                 cfg: TrainConfig) -> tf.Tensor:
    """penalty * sum_l (firing rate of layer l - target_l)^2.

    The rate's value is the true share of characters where z fired; its
    gradient is the hard sigmoid's slope a/2 without the clip, so it never
    vanishes. Two surrogates were measured and failed: through the
    straight-through z, the gradient dies once a*s_z < -1 and both detectors
    stopped firing for good; a soft rate mean(sigmoid(2 a s_z)) can meet its
    target while z almost never fires (2% against a 20% target).
    """
    n = len(cfg.rate_targets)
    z = tf.stop_gradient(boundaries[..., :n])
    lin = 0.5 * slope * boundary_logits[..., :n]
    rates = tf.reduce_mean(z + lin - tf.stop_gradient(lin), axis=[0, 1])
    return cfg.rate_penalty * tf.reduce_sum(tf.square(rates - tf.constant(cfg.rate_targets)))


def entropy_peak_targets(logits: tf.Tensor, fractions: tuple[float, ...], window: int = 0) -> tf.Tensor:
    """Self-supervised boundary targets from the network's own next-character entropy: [B, T-2, n].

    H (no gradient through it) peaks at t where H_t > H_{t-1} and H_t >= H_{t+1}.
    Target l at t (for z at t+1, see entropy_peak_loss) is 1 where a peak is
    among the highest ``fractions[l]`` of the batch's peaks: the higher the
    peak, the longer the unit it tends to close (after a phrase or a sentence,
    what comes next is harder to guess than after a word), so a smaller
    fraction gives a coarser layer. ``window`` > 0 ranks layer 1's peaks by
    their height above the mean entropy of the ``window`` characters around
    them instead: a word boundary stands out from its neighbourhood, and a
    whole stretch of hard text no longer counts as one (measured better for
    words, worse for phrases: docs/segmentation.md).
    """
    logp = tf.nn.log_softmax(tf.stop_gradient(logits))
    h = -tf.reduce_sum(tf.exp(logp) * logp, axis=-1)  # [B, T]
    mid = h[:, 1:-1]
    peak = tf.logical_and(mid > h[:, :-2], mid >= h[:, 2:])  # at t = 1..T-2
    n_peaks = tf.reduce_sum(tf.cast(peak, tf.float32))
    targets = []
    for layer, fraction in enumerate(fractions):
        target = peak
        if fraction < 1.0:
            score = mid
            if window and layer == 0:  # SAME pooling averages only over the characters that exist
                local = tf.nn.avg_pool1d(h[:, :, None], ksize=window, strides=1, padding="SAME")[:, 1:-1, 0]
                score = mid - local
            heights = tf.concat([tf.boolean_mask(score, peak), [-1e9]], axis=0)  # never empty
            k = tf.maximum(1, tf.cast(tf.math.ceil(fraction * n_peaks), tf.int32))
            lowest_kept = tf.math.top_k(heights, k).values[-1]
            target = tf.logical_and(peak, score >= lowest_kept)
        targets.append(tf.cast(target, tf.float32))
    return tf.stack(targets, axis=-1)


def entropy_peak_loss(logits: tf.Tensor, boundary_logits: tf.Tensor, slope: tf.Tensor,
                      fractions: tuple[float, ...] = (1.0,), window: int = 0, skip=()) -> tf.Tensor:
    """Teach each layer's detector where the model itself is most unsure of the next character.

    The targets need no labels (entropy_peak_targets). A causal detector can
    only know of a peak at t after reading character t+1, so each target is
    for z at t+1 (the start alignment: the first character of the next unit).
    Cross-entropy on sigmoid(2 a s_z), summed over the layers, except the
    layers in ``skip`` (taught from the corpus's delimiters instead).
    """
    targets = entropy_peak_targets(logits, fractions, window)
    n = len(fractions)
    per_layer = tf.nn.sigmoid_cross_entropy_with_logits(labels=targets,
                                                        logits=2.0 * slope * boundary_logits[:, 2:, :n])
    keep = tf.constant([0.0 if l in skip else 1.0 for l in range(n)])
    return tf.reduce_sum(keep * tf.reduce_mean(per_layer, axis=[0, 1]))


def supervised_boundary_loss(boundary_logits: tf.Tensor, slope: tf.Tensor, targets: tf.Tensor,
                             layers: list[int]) -> tf.Tensor:
    """Teach the detectors of ``layers`` where the units the corpus marked start: ``targets`` [B, T, n] is
    1 on a unit's first character (the start alignment, as the entropy-peak targets). The input never
    holds the delimiters that marked them (Corpus.unit_starts refuses a text that keeps them). Cross-entropy
    on sigmoid(2 a s_z), through the pre-activation as the entropy-peak loss; z itself stays the
    straight-through hard decision that drives COPY, UPDATE and FLUSH."""
    picked = tf.gather(boundary_logits, layers, axis=-1)
    per_layer = tf.nn.sigmoid_cross_entropy_with_logits(labels=targets, logits=2.0 * slope * picked)
    return tf.reduce_sum(tf.reduce_mean(per_layer, axis=[0, 1]))


def evaluate_stream(network: HMLSTMNetwork, ids: np.ndarray, batch_size: int, seq_len: int):
    """Mean BPC over ``ids`` and the boundaries at each position of the streams.

    Returns (bpc, boundaries [B, steps*T, L], positions [B, steps*T]) where
    positions index into ``ids``, so callers can align any truth array.
    """
    batch_size = max(1, min(batch_size, (len(ids) - 1) // (seq_len + 1)))
    batcher = StreamBatcher(ids, batch_size, seq_len)
    per_stream = batcher.data.shape[1]

    @tf.function(input_signature=[tf.TensorSpec([batch_size, seq_len], tf.int32)] * 2
                 + [tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape, t.dtype),
                                          network.initial_state(batch_size))])
    def run(x, y, state):
        out = network(x, state)
        nll = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=out.logits)
        return tf.reduce_sum(nll), out.boundaries, out.final_state

    state = network.initial_state(batch_size)
    total, zs = 0.0, []
    for k in range(len(batcher)):
        x, y = batcher.batch(k)
        nll, z, state = run(x, y, state)
        total += float(nll)
        zs.append(z.numpy())
    n = len(batcher) * batch_size * seq_len
    positions = (np.arange(batch_size)[:, None] * per_stream
                 + np.arange(len(batcher) * seq_len)[None, :])
    return total / n / LN2, np.concatenate(zs, axis=1), positions


def _check_resumable(run_dir: Path, model: ModelConfig, cfg: TrainConfig, vocab: Vocabulary,
                     corpus: Corpus) -> bool:
    """True if run_dir holds a run to resume; UserError if it holds a different one."""
    if not (run_dir / "config.json").exists():
        return False
    run_io.refuse_another_run(run_dir, model, cfg, vocab, corpus.name)
    return run_io.latest_checkpoint(run_dir) is not None


class _signals_deferred:
    """Within it, Ctrl-C and SIGTERM only set ``pending``: the training loop acts on one between steps
    (``raise_pending``), and a checkpoint being written is never cut short. Only in the main thread, where
    Python delivers signals."""

    def __init__(self, active: bool = True):
        self.active = active
        self.pending: int | None = None

    def _hold(self, signum, frame) -> None:
        self.pending = signum

    def __enter__(self):
        if self.active:
            self.old = {s: signal.signal(s, self._hold) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        if not self.active:
            return
        for s, handler in self.old.items():
            signal.signal(s, handler)

    def raise_pending(self) -> None:
        """Act on a signal that came meanwhile: SIGTERM as Terminated, Ctrl-C as KeyboardInterrupt."""
        if self.pending is not None:
            raise Terminated() if self.pending == signal.SIGTERM else KeyboardInterrupt()


def train(corpus: Corpus, model_cfg_kwargs: dict[str, Any], cfg: TrainConfig, run_dir: str | Path,
          progress: bool = True, log=None, strategy=None, preset: str | None = None) -> TrainResult:
    """Train an HM-LSTM LM on ``corpus``; checkpoints, logs and metrics go to run_dir.

    ``strategy``: a tf.distribute strategy (see distributed.py), or None for one device. ``preset``: the
    named recipe the settings came from (`train --preset`), recorded with the run for its model card.
    """
    from hmlstm.model.distributed import DistributedStep, is_chief

    log = log or (lambda msg: print(msg, file=sys.stderr))
    run_dir = Path(run_dir)
    chief = is_chief(strategy)
    if not chief:  # other workers save to a scratch directory, as tf.distribute requires
        import tempfile
        progress = False
        log = lambda msg: None  # noqa: E731
        run_dir = Path(tempfile.mkdtemp(prefix="hmlstm-worker-"))
    if not corpus.text:
        raise UserError("the corpus is empty; give it some text")
    vocab = Vocabulary.from_text(corpus.text)
    model = ModelConfig(vocab_size=len(vocab), **model_cfg_kwargs)
    if len(cfg.target_fractions) > model.num_detectors:
        raise UserError(f"{len(cfg.target_fractions)} peak fractions, but only {model.num_detectors} layers have a "
                        "boundary detector; "
                        "give fewer, or --top-boundary to give the top layer one")
    supervised = cfg.supervised_layers
    problem = cfg.detector_problem(model.num_detectors)
    if problem:
        raise UserError(problem)
    ids = vocab.encode(corpus.text)
    train_ids, val_ids = split(ids, corpus.held_out_start(cfg.val_fraction))
    labels = delay(corpus.unit_starts(tuple(u for _, u in supervised)), cfg.lookahead)[: len(train_ids)] \
        if supervised else None
    problem = size_problem(len(train_ids), len(val_ids), cfg.batch_size, cfg.seq_len)
    if problem:
        raise UserError(problem)
    batcher = StreamBatcher(train_ids, cfg.batch_size, cfg.seq_len, labels)

    tf.keras.utils.set_random_seed(cfg.seed)
    tf.config.experimental.enable_op_determinism()
    resume = _check_resumable(run_dir, model, cfg, vocab, corpus)
    if strategy is None:
        trainer = Trainer(model, cfg)
        step_fn, reset_state = trainer.train_step, trainer.reset_state
    else:
        dist = DistributedStep(strategy, lambda: Trainer(model, cfg), cfg.batch_size, cfg.seq_len)
        trainer = dist.trainer
        step_fn, reset_state = dist.train_step, dist.reset_state
        log(f"training on {strategy.num_replicas_in_sync} replica(s) with {type(strategy).__name__}")
    ckpt = tf.train.Checkpoint(trainer=trainer)
    manager = tf.train.CheckpointManager(ckpt, str(run_dir / "ckpt"), max_to_keep=3)
    if resume:
        restored, bad = None, []
        for path in reversed(manager.checkpoints):  # the newest first; an older intact one if it is damaged
            try:
                ckpt.restore(path).assert_existing_objects_matched()
                restored = path
                break
            except Exception as e:  # TF raises OpError, AssertionError, IndexError... on bad files
                first = first_line(e, 160)
                bad.append((path, first))
        if restored is None:
            raise UserError(f"cannot resume {run_dir}: every checkpoint in {run_dir / 'ckpt'} is corrupt or "
                            f"incomplete (the newest: {bad[0][1] if bad else 'none found'}); delete "
                            f"{run_dir / 'ckpt'} to start over, or train into another --out") from None
        if bad:
            log(f"checkpoint {Path(bad[0][0]).name} is corrupt or incomplete ({bad[0][1]}); resuming from the newest "
                f"intact one, {Path(restored).name}")
        log(f"resuming {run_dir} from step {int(trainer.step.numpy())}")
    else:
        run_io.write_run_info(run_dir, model, cfg, vocab, {
            "corpus": corpus.name, "corpus_chars": len(corpus.text), "source": corpus.source,
            "strip_delimiters": corpus.strip, "corpus_sha256": corpus.sha256, "held_out_chars": len(val_ids),
            "command": command_line(sys.argv[1:]), "preset": preset,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "tensorflow": tf.__version__,
        })

    steps_per_epoch = len(batcher)
    total = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
    eval_every = cfg.eval_every or steps_per_epoch
    result = TrainResult(run_dir, int(trainer.step.numpy()))
    metrics_path = run_dir / "metrics.json"
    if resume and metrics_path.exists():
        import json
        old = json.loads(metrics_path.read_text())
        result.val_bpc = [tuple(x) for x in old.get("val_bpc", [])]
        result.skipped_steps = old.get("skipped_steps", 0)
        earlier_s = float(old.get("train_seconds", 0.0))
    else:
        earlier_s = 0.0
    writer = tf.summary.create_file_writer(str(run_dir / "tb"))

    val_truth = corpus.word_ends[len(train_ids):] if corpus.word_ends is not None else None
    val_starts = None  # a word's first character: where a start-aligned detector (--entropy-target) fires
    if val_truth is not None:
        val_starts = np.zeros_like(val_truth)
        val_starts[1:] = val_truth[:-1]
    val_units = {k: v[len(train_ids):] for k, v in corpus.truths().items() if k != "words"}
    if cfg.lookahead:  # the output at step t speaks of character t-K: score it against that one
        val_truth, val_starts = delay(val_truth, cfg.lookahead), delay(val_starts, cfg.lookahead)
        val_units = {k: delay(v, cfg.lookahead) for k, v in val_units.items()}

    def validate(step: int) -> float:
        bpc, z, pos = evaluate_stream(trainer.network, val_ids, cfg.batch_size, cfg.seq_len)
        result.val_bpc.append((step, round(bpc, 4)))
        layers = {}
        for l in range(model.num_layers):
            entry = {"rate": round(float(z[..., l].mean()), 4)}
            if val_truth is not None:
                entry["word_ends"] = boundary_scores.score(z[..., l] > 0.5, val_truth[pos]).to_dict()
                entry["word_starts"] = boundary_scores.score(z[..., l] > 0.5, val_starts[pos]).to_dict()
            for unit, ends in val_units.items():  # phrases, sentences: start-aligned, like the targets
                starts = np.zeros_like(ends)
                starts[1:] = ends[:-1]
                entry[f"{unit[:-1]}_ends"] = boundary_scores.score(z[..., l] > 0.5, ends[pos]).to_dict()
                entry[f"{unit[:-1]}_starts"] = boundary_scores.score(z[..., l] > 0.5, starts[pos]).to_dict()
            layers[f"layer{l + 1}"] = entry
        result.boundary = layers
        with writer.as_default(step=step):
            tf.summary.scalar("val/bpc", bpc)
            for name, e in layers.items():
                tf.summary.scalar(f"val/{name}_rate", e["rate"])
                if "word_ends" in e:
                    tf.summary.scalar(f"val/{name}_word_f1", e["word_ends"]["f1"])
                    tf.summary.scalar(f"val/{name}_word_start_f1", e["word_starts"]["f1"])
        run_io.atomic_write_text(metrics_path, dumps({
            "val_bpc": result.val_bpc, "boundary": result.boundary,
            "skipped_steps": result.skipped_steps, "step": step,
            "train_seconds": round(earlier_s + time.monotonic() - start, 1),  # wall clock, resumes included
        }))
        return bpc

    start = time.monotonic()
    step = int(trainer.step.numpy())
    bar = None
    if progress and sys.stderr.isatty():  # a bar redraws with \r: only on a terminal, never into a log file
        from tqdm import tqdm
        bar = tqdm(total=total, initial=step, unit="step", dynamic_ncols=True, file=sys.stderr)
    last_line = time.monotonic()
    chars_since, seconds_since = 0, 0.0
    consecutive_bad = 0
    rollbacks = 0  # since the last step that was applied: rolling back again and again cannot help
    pending_save = False  # a checkpoint fell due on a skipped step: the next applied step saves it
    last_val = result.val_bpc[-1][1] if result.val_bpc else float("nan")
    main_thread = threading.current_thread() is threading.main_thread()
    # Ctrl-C and SIGTERM are held and acted on between steps: raised inside TensorFlow (in its argument binding,
    # say) one came out as a TypeError, and SIGTERM then exited 1 with a traceback instead of saving.
    held = _signals_deferred(main_thread)
    held.__enter__()
    compiling = threading.Timer(COMPILE_NOTE_S, log if bar is None else bar.write, [  # (above the bar, not after it)
        f"still compiling the training step after {COMPILE_NOTE_S:g} s ({model.num_layers} layer(s): TensorFlow "
        "traces each one once; the first step waits for it)"])
    compiling.daemon = True
    compiling.start()
    try:
        while step < total:
            held.raise_pending()
            epoch, k = divmod(step, steps_per_epoch)
            if k == 0:
                reset_state()
            if k == 0 or cfg.slope_per_step:
                trainer.network.slope.assign(cfg.slope_at(step / steps_per_epoch if cfg.slope_per_step else epoch))
            x, y = batcher.batch(k)
            t0 = time.perf_counter()
            loss, gnorm, applied, rate = step_fn(x, y, batcher.targets(k))
            dt = time.perf_counter() - t0
            compiling.cancel()
            step += 1
            if not bool(applied):
                result.skipped_steps += 1
                consecutive_bad += 1
                log(f"step {step}: non-finite loss or gradient; step skipped, state reset")
                if consecutive_bad >= 3 and manager.latest_checkpoint:
                    rollbacks += 1
                    if rollbacks > MAX_ROLLBACKS:
                        raise UserError(
                            f"training diverged: {MAX_ROLLBACKS} rollbacks to {Path(manager.latest_checkpoint).name}, "
                            f"each with the learning rate halved (now "
                            f"{float(trainer.optimizer.learning_rate.numpy()):.2e}), were followed by 3 non-finite "
                            "steps again; the run is left at that checkpoint. Lower --lr or --clip-norm, or check "
                            "the text")
                    lr = float(trainer.optimizer.learning_rate.numpy()) / 2
                    ckpt.restore(manager.latest_checkpoint)
                    trainer.optimizer.learning_rate.assign(lr)
                    step = int(trainer.step.numpy())
                    consecutive_bad = 0
                    log(f"3 bad steps in a row: back to checkpoint at step {step}, "
                        f"learning rate halved to {lr:.2e}")
                    if bar is not None:
                        bar.n = step
                    continue
            else:
                consecutive_bad = rollbacks = 0
            bpc = float(loss) / LN2
            if step % 10 == 0 or step == total:
                with writer.as_default(step=step):
                    tf.summary.scalar("train/bpc", bpc)
                    tf.summary.scalar("train/grad_norm", gnorm)
                    tf.summary.scalar("train/slope", trainer.network.slope)
                    for l, r in enumerate(rate.numpy()):
                        tf.summary.scalar(f"train/layer{l + 1}_rate", r)
            chars_since += cfg.batch_size * cfg.seq_len
            seconds_since += dt
            validating = step % eval_every == 0 or step == total
            if validating:
                if bar is not None:
                    bar.set_description("validating", refresh=True)  # a pass over the held-out text
                last_val = validate(step)
                if bar is not None:
                    bar.set_description("", refresh=False)
            if bar is None and (validating or time.monotonic() - last_line >= LOG_EVERY_S):
                val = "-" if math.isnan(last_val) else f"{last_val:.3f}" + (" (just measured)" if validating else "")
                log(f"step {step:,}/{total:,}: train BPC {bpc:.3f}, validation BPC {val}, "
                    f"{chars_since / max(seconds_since, 1e-9):,.0f} chars/s")
                last_line, chars_since, seconds_since = time.monotonic(), 0, 0.0
            # Not after a skipped step: the weights in hand just gave a non-finite loss, and a rollback must find
            # weights that did not (the next applied step saves instead).
            if step % cfg.checkpoint_every == 0 or step == total or pending_save:
                pending_save = consecutive_bad > 0
                if not pending_save:  # an interrupt meanwhile is held (above) and stops the run after the save
                    manager.save(checkpoint_number=step)
            if bar is not None:
                bar.set_postfix(loss=f"{float(loss):.3f}", bpc=f"{bpc:.3f}",
                                val_bpc="-" if math.isnan(last_val) else f"{last_val:.3f}",
                                chars_s=f"{cfg.batch_size * cfg.seq_len / dt:,.0f}", refresh=False)
                bar.update(1)
            if cfg.max_minutes is not None and time.monotonic() - start > 60 * cfg.max_minutes:
                result.stopped_by = f"time limit ({cfg.max_minutes} min)"
                break
        held.raise_pending()  # one that came during the last step
    except KeyboardInterrupt as e:
        result.stopped_by = "terminated" if isinstance(e, Terminated) else "interrupted"
    except Exception:
        # A step that raised (out of memory, say) is not one done, though its counter may have moved (a first
        # step that ran out of memory in its forward pass left it at 1): what is saved below is the steps done.
        trainer.step.assign(step)
        raise
    finally:
        compiling.cancel()
        held.__exit__(None, None, None)
        if bar is not None:
            bar.close()
        stopped = result.stopped_by in ("interrupted", "terminated")
        how = "terminated (SIGTERM)" if result.stopped_by == "terminated" else "interrupted"
        # An interrupt can land after a step ran (its counter is in the trainer) and before the loop counted it.
        step = int(trainer.step.numpy())
        # Weights that just gave a non-finite loss are never saved: the last checkpoint stays the run's state.
        bad_weights = consecutive_bad > 0
        unsaved = not bad_weights and step > 0 and (
            manager.latest_checkpoint is None or not manager.latest_checkpoint.endswith(f"-{step}"))
        if unsaved:  # saved first, with further Ctrl-C and SIGTERM held off until it is on disk
            if stopped:
                log(f"\n{how} at step {step}; saving a checkpoint (another Ctrl-C waits until it is written)")
            with _signals_deferred(main_thread):
                manager.save(checkpoint_number=step)
        if stopped:
            if step == 0:
                log(f"\n{how} before the first step: nothing was saved")
            elif manager.latest_checkpoint is None:
                log(f"\n{how} at step {step}, in a run of non-finite steps: nothing was saved")
            else:
                name = Path(manager.latest_checkpoint).name
                kept = " (kept: the steps after it were non-finite)" if bad_weights else " saved"
                log(f"{'' if unsaved else chr(10)}{how} at step {step}; checkpoint {name}{kept}, run the same "
                    "command to resume")
        if unsaved and result.stopped_by != "done" and step % eval_every != 0:
            validate(step)  # after the save: an interrupt here loses nothing
        writer.flush()
        if not chief:
            import shutil
            shutil.rmtree(run_dir, ignore_errors=True)
    result.step = step
    return result
