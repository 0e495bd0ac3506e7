"""The same training under tf.distribute: several GPUs (mirrored) or several hosts (multiworker).

MultiWorkerMirroredStrategy is configured the standard way, through the
TF_CONFIG environment variable (cluster and task). The global batch of
``batch_size`` streams is split evenly over the replicas; every worker builds
the same batches from the same text and takes its replicas' rows, so no data
moves between hosts. Each replica's gradients are all-reduced to the global
mean before clipping, so one step equals a single-device step on the global
batch (up to the order of float sums). Variables are created with
ONLY_FIRST_REPLICA aggregation: all replicas compute the same update, and the
optimizer's plain assigns stay valid in replica context.

The carried TBPTT state lives per replica between steps. A firing-rate
penalty is computed on each replica's rows, so with a penalty a distributed
step is close to, not equal to, the single-device one. Resume restores weights
and optimizer exactly; the carried state restarts from zero.
"""

from __future__ import annotations

import json
import os

import tensorflow as tf

from hmlstm.errors import UserError


def make_strategy(name: str | None):
    if name in (None, "", "none"):
        return None
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multiworker":
        if "TF_CONFIG" not in os.environ:
            raise UserError("--strategy multiworker needs TF_CONFIG (cluster and task) in the environment")
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise UserError(f"unknown strategy {name!r}; use mirrored or multiworker")


def is_chief(strategy) -> bool:
    if strategy is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return True
    task = json.loads(os.environ.get("TF_CONFIG", "{}")).get("task", {})
    return task.get("type") in (None, "chief") or (task.get("type") == "worker" and task.get("index", 0) == 0)


def _first_replica(next_creator, **kwargs):
    kwargs["aggregation"] = tf.VariableAggregation.ONLY_FIRST_REPLICA
    return next_creator(**kwargs)


class DistributedStep:
    """Wraps a Trainer built under ``strategy`` with a step that runs on every replica."""

    def __init__(self, strategy, make_trainer, batch_size: int, seq_len: int):
        self.strategy = strategy
        replicas = strategy.num_replicas_in_sync
        if batch_size % replicas:
            raise UserError(f"--batch-size {batch_size} must be a multiple of the {replicas} replicas")
        self.per_replica = batch_size // replicas
        with strategy.scope(), tf.variable_creator_scope(_first_replica):
            self.trainer = make_trainer()
        self.seq_len = seq_len
        self.state = None
        self.reset_state()
        # The whole strategy.run inside one tf.function (tf.distribute requires it for the all-reduce).
        self._step = tf.function(lambda x, y, b, s: strategy.run(self._replica_step, args=(x, y, b, s)))

    def reset_state(self) -> None:
        net = self.trainer.network
        self.state = self.strategy.experimental_distribute_values_from_function(
            lambda ctx: net.initial_state(self.per_replica))

    def _shard(self, array):
        n = self.per_replica
        return self.strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(array[ctx.replica_id_in_sync_group * n : (ctx.replica_id_in_sync_group + 1) * n]))

    def _replica_step(self, x, y, targets, state):
        tr = self.trainer
        ctx = tf.distribute.get_replica_context()
        with tf.GradientTape() as tape:
            out, loss, total = tr.loss(x, y, targets, state)
        grads = [tf.convert_to_tensor(g) for g in tape.gradient(total, tr.variables_to_train)]
        replicas = tf.cast(ctx.num_replicas_in_sync, tf.float32)
        grads = [g / replicas for g in ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads)]
        loss = ctx.all_reduce(tf.distribute.ReduceOp.SUM, loss) / replicas
        grads, gnorm = tf.clip_by_global_norm(grads, tr.cfg.clip_norm)
        ok = tf.math.is_finite(loss) & tf.math.is_finite(gnorm)
        tr.optimizer.apply(grads, tr.variables_to_train, ok=ok)  # a non-finite step changes nothing
        new_state = tf.nest.map_structure(lambda s: tf.where(ok, s, tf.zeros_like(s)), out.final_state)
        tr.step.assign_add(1)
        rate = tf.reduce_mean(out.boundaries, axis=[0, 1])
        return loss, gnorm, ok, rate, new_state

    def train_step(self, x, y, targets):
        loss, gnorm, ok, rate, self.state = self._step(self._shard(x), self._shard(y), self._shard(targets),
                                                       self.state)
        first = self.strategy.experimental_local_results
        return first(loss)[0], first(gnorm)[0], first(ok)[0], first(rate)[0]
