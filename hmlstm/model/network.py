"""The HM-LSTM character language model: embedding, tf.scan unroll, output module."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import tensorflow as tf

from hmlstm.model.cell import HMLSTMState, MultiHMLSTMCell, _glorot
from hmlstm.model.config import ModelConfig

State = tuple[HMLSTMState, ...]


class Unrolled(NamedTuple):
    """Every layer's state at every step, batch-major.

    Each field is a tuple over layers: c[l], h[l] [B, T, H_l]; z[l] [B, T, 1].
    """

    c: tuple[tf.Tensor, ...]
    h: tuple[tf.Tensor, ...]
    z: tuple[tf.Tensor, ...]


class NetworkOutput(NamedTuple):
    logits: tf.Tensor  # [B, T, V]: scores of the next character
    boundaries: tf.Tensor  # [B, T, L]: z of every layer, 0. or 1.
    boundary_logits: tf.Tensor  # [B, T, L]: s_z of every layer; z = 1 iff s_z > 0
    unrolled: Unrolled
    final_state: State


def unroll(cell, inputs: tf.Tensor, state, lengths: tf.Tensor | None = None, slope=1.0):
    """Run ``cell`` over time with ``tf.scan``.

    inputs [B, T, D]; state: the cell's state at t = 0; lengths [B] int32 or
    None. Returns (outputs, states, final_state): the cell's outputs and its
    states at every step, batch-major [B, T, ...], and the state after the
    last step. Row b advances only lengths[b] steps: past that its state is
    held (so its final state is exactly the state after lengths[b] steps) and
    its stacked outputs and states are zero.

    This must stay a symbolic loop under tf.function: tf2onnx turns the scan
    into one ONNX Loop, which is what makes the exported model work for any
    sequence length. Do not replace it by a Python loop over a static T. The
    scan needs ``initializer=`` and must not run in reverse.
    """
    time_major = tf.transpose(inputs, [1, 0, 2])
    num_steps = tf.shape(time_major)[0]
    batch = tf.shape(time_major)[1]
    zero_out = tf.nest.map_structure(lambda n: tf.zeros([batch, n]), cell.output_size)

    def step(prev, elem):
        x_t, t = elem
        prev_state, _ = prev
        out, new = cell(x_t, prev_state, slope)
        if lengths is not None:
            live = tf.cast(tf.expand_dims(t < lengths, -1), tf.float32)  # [B, 1]: 1 while the row runs
            new = tf.nest.map_structure(lambda n, p: p + live * (n - p), new, prev_state)
        return new, out

    states, outputs = tf.scan(step, (time_major, tf.range(num_steps)),
                              initializer=(state, zero_out))
    final = tf.nest.map_structure(lambda s: s[-1], states)
    if lengths is not None:
        mask = tf.sequence_mask(lengths, num_steps, dtype=tf.float32)
        mask = tf.expand_dims(tf.transpose(mask), -1)  # [T, B, 1]
        states, outputs = tf.nest.map_structure(lambda s: s * mask, (states, outputs))
    to_batch_major = lambda s: tf.transpose(s, [1, 0, 2])  # noqa: E731
    return (tf.nest.map_structure(to_batch_major, outputs),
            tf.nest.map_structure(to_batch_major, states), final)


class HMLSTMNetwork(tf.Module):
    """Character LM: embedding -> MultiHMLSTMCell over time -> output module.

    Output module (paper, eq. 11-12): per-layer scalar gates
    g^l = sigmoid(w^l . [h^1; ...; h^L]), h_e = ReLU(sum_l g^l W^l h^l),
    logits = W_out h_e + b_out.

    The slope a of the boundary detector is a non-trainable variable, so a
    traced function reads its current value and annealing needs no retrace.
    """

    def __init__(self, config: ModelConfig, seed: int = 0, name: str | None = "hmlstm"):
        super().__init__(name=name)
        self.config = config
        rng = np.random.default_rng(seed)
        units = config.num_units
        self.embedding = tf.Variable(
            rng.normal(0.0, 0.1, (config.vocab_size, config.embed_dim)).astype(np.float32),
            name="embedding",
        )
        self.cell = MultiHMLSTMCell(
            config.embed_dim, units, config.top_boundary, config.layer_norm, seed=seed
        )
        self.gate_kernel = tf.Variable(_glorot(rng, sum(units), len(units)), name="gate_kernel")
        self.out_kernels = [
            tf.Variable(_glorot(rng, n, config.output_dim), name=f"out_kernel{l + 1}")
            for l, n in enumerate(units)
        ]
        self.logit_kernel = tf.Variable(
            _glorot(rng, config.output_dim, config.vocab_size), name="logit_kernel"
        )
        self.logit_bias = tf.Variable(tf.zeros([config.vocab_size]), name="logit_bias")
        self.slope = tf.Variable(1.0, trainable=False, name="slope")

    def initial_state(self, batch_size) -> State:
        return self.cell.initial_state(batch_size)

    def output_logits(self, hs: tuple[tf.Tensor, ...]) -> tf.Tensor:
        """hs: per-layer h [B, T, H_l] -> logits [B, T, V]."""
        gates = tf.sigmoid(tf.einsum("btd,dl->btl", tf.concat(hs, -1), self.gate_kernel))
        h_e = tf.add_n([
            gates[..., l : l + 1] * tf.einsum("btd,de->bte", h, w)
            for l, (h, w) in enumerate(zip(hs, self.out_kernels))
        ])
        h_e = tf.nn.relu(h_e)
        return tf.einsum("bte,ev->btv", h_e, self.logit_kernel) + self.logit_bias

    def __call__(self, tokens: tf.Tensor, state: State, lengths: tf.Tensor | None = None):
        """tokens [B, T] int32 -> NetworkOutput."""
        x = tf.gather(self.embedding, tokens)
        outputs, stacked, final = unroll(self.cell, x, state, lengths, self.slope)
        unrolled = Unrolled(
            c=tuple(s.c for s in stacked), h=tuple(s.h for s in stacked),
            z=tuple(s.z for s in stacked),
        )
        logits = self.output_logits(unrolled.h)
        if lengths is not None:
            mask = tf.sequence_mask(lengths, tf.shape(tokens)[1], dtype=logits.dtype)
            logits = logits * tf.expand_dims(mask, -1)
        boundaries = tf.concat(unrolled.z, axis=-1)
        boundary_logits = tf.concat([o.z_pre for o in outputs], axis=-1)
        return NetworkOutput(logits, boundaries, boundary_logits, unrolled, final)
