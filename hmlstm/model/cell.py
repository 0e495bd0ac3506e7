"""HM-LSTM cells (Chung, Ahn & Bengio, ICLR 2017).

The cell contract, shared by the single-layer cell and the stack, so the
network cannot tell one from the other:

  state_size                 nested structure of per-example sizes
  output_size                nested structure of per-example sizes
  call(inputs, state)        -> (output, new_state)
  initial_state(batch_size)  -> zero state

Why these are tf.Modules and not keras.layers.RNN cells: Keras 3's RNN layer
wants a keras Layer whose state is a flat list of tensors and runs its own
loop (keras.ops.rnn). ``MultiHMLSTMCell`` needs a tuple of NamedTuple states
and must read the layer *above* at t-1, and the product's export relies on the
time loop being our own ``tf.scan`` (see ``network.unroll``). Wrapping them
for Keras would add an adapter that nothing here uses, so we do not.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import tensorflow as tf


class HMLSTMState(NamedTuple):
    """State of one layer: c, h [batch, units]; z [batch, 1] (0. or 1.)."""

    c: tf.Tensor  # memory cell
    h: tf.Tensor  # hidden state
    z: tf.Tensor  # boundary detector, fired at the previous step


class HMLSTMOutput(NamedTuple):
    """What one layer emits at a step, besides its state."""

    h: tf.Tensor  # [batch, units] the new hidden state
    z_pre: tf.Tensor  # [batch, 1] boundary pre-activation s_z: z = 1 iff s_z > 0 (0. without a detector)


@tf.custom_gradient
def straight_through_round(x: tf.Tensor) -> tf.Tensor:
    """round(x) forward; the identity backward (straight-through estimator)."""

    def grad(dy: tf.Tensor) -> tf.Tensor:
        return dy

    return tf.round(x), grad


def hard_sigmoid(x: tf.Tensor) -> tf.Tensor:
    """clip((x + 1) / 2, 0, 1)."""
    return tf.clip_by_value((x + 1.0) * 0.5, 0.0, 1.0)


def _layer_norm(x: tf.Tensor, gamma: tf.Tensor, beta: tf.Tensor) -> tf.Tensor:
    mean, var = tf.nn.moments(x, axes=[-1], keepdims=True)
    return (x - mean) * tf.math.rsqrt(var + 1e-5) * gamma + beta


def hmlstm_step(
    kernel: tf.Tensor,
    bias: tf.Tensor,
    h_below: tf.Tensor,
    z_below: tf.Tensor,
    h_above: tf.Tensor | None,
    state: HMLSTMState,
    slope: tf.Tensor,
    has_boundary: bool,
    ln: tuple[tf.Tensor, tf.Tensor] | None = None,
) -> tuple[HMLSTMState, tf.Tensor]:
    """One HM-LSTM step of layer l; returns (new state, s_z [B, 1]).

    Shapes: h_below [B, D_below] (h^{l-1}_t; the embedding for l = 1),
    z_below [B, 1] (z^{l-1}_t; None for l = 1, where it is always 1), h_above [B, D_above] or None for
    the top layer (h^{l+1}_{t-1}), state (c, h, z) at t-1, kernel
    [D_below + H (+ D_above), 4H (+1)], bias [4H (+1)].

      s = W [z^{l-1}_t h^{l-1}_t ; h^l_{t-1} ; z^l_{t-1} h^{l+1}_{t-1}] + b
      f, i, o = sigmoid(s_f, s_i, s_o);  g = tanh(s_g)
      z~ = hard_sigmoid(a * s_z);        z = round(z~) (straight-through)
      c_t = i*g            FLUSH   z^l_{t-1} = 1
            f*c + i*g      UPDATE  z^l_{t-1} = 0, z^{l-1}_t = 1
            c              COPY    z^l_{t-1} = 0, z^{l-1}_t = 0
      h_t = h_{t-1} in COPY, else o * tanh(c_t)

    A layer without a boundary detector (the top layer by default) keeps z = 0.
    The cases are blended with 0/1 multipliers rather than branches, so the
    step stays one straight-line graph (cheap in a loop, clean to export);
    where z_below or z is known (layer 1, a layer without a detector) the blend
    drops the terms that cannot occur, saving ops in every step of the loop.
    """
    c, h, z = state
    units = c.shape[-1]
    # z_below None means "always 1" (layer 1 reads the input at every step).
    parts = [h_below if z_below is None else z_below * h_below, h]
    if h_above is not None:
        parts.append(z * h_above)  # top-down only right after a boundary
    s = tf.matmul(tf.concat(parts, axis=-1), kernel) + bias
    gates = s[:, : 4 * units]
    if ln is not None:
        gates = _layer_norm(gates, ln[0], ln[1])
    f, i, o, g = tf.split(gates, 4, axis=-1)
    f, i, o, g = tf.sigmoid(f), tf.sigmoid(i), tf.sigmoid(o), tf.tanh(g)

    ig = i * g
    if z_below is None:  # never COPY: FLUSH where z = 1, else UPDATE
        c_new = ig + (1.0 - z) * (f * c)
        h_new = o * tf.tanh(c_new)
    elif not has_boundary:  # z is always 0 here: UPDATE where z_below = 1, else COPY
        c_new = c + z_below * (f * c + ig - c)
        h_new = h + z_below * (o * tf.tanh(c_new) - h)
    else:
        flush = z  # z^l_{t-1}
        update = (1.0 - z) * z_below
        copy = (1.0 - z) * (1.0 - z_below)
        c_new = flush * ig + update * (f * c + ig) + copy * c
        h_new = copy * h + (1.0 - copy) * (o * tf.tanh(c_new))
    if has_boundary:
        s_z = s[:, 4 * units :]
        z_new = straight_through_round(hard_sigmoid(slope * s_z))
    else:
        s_z = z_new = tf.zeros_like(z)
    return HMLSTMState(c=c_new, h=h_new, z=z_new), s_z


def _glorot(rng: np.random.Generator, fan_in: int, fan_out: int) -> np.ndarray:
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=(fan_in, fan_out)).astype(np.float32)


class HMLSTMCell(tf.Module):
    """One HM-LSTM layer.

    ``call((h_below, z_below, h_above), state) -> (HMLSTMOutput, new_state)``;
    h_above is None for the top layer.
    """

    def __init__(
        self,
        units: int,
        below_size: int,
        above_size: int | None,
        has_boundary: bool = True,
        layer_norm: bool = False,
        seed: int = 0,
        name: str | None = None,
    ):
        super().__init__(name=name)
        self.units = units
        self.has_boundary = has_boundary
        self.has_above = above_size is not None
        rng = np.random.default_rng(seed)
        in_size = below_size + units + (above_size or 0)
        out_size = 4 * units + (1 if has_boundary else 0)
        kernel = _glorot(rng, in_size, out_size)
        bias = np.zeros(out_size, np.float32)
        bias[:units] = 1.0  # forget-gate bias
        self.kernel = tf.Variable(kernel, name="kernel")
        self.bias = tf.Variable(bias, name="bias")
        self.ln = None
        if layer_norm:
            self.ln = (
                tf.Variable(tf.ones([4 * units]), name="ln_gamma"),
                tf.Variable(tf.zeros([4 * units]), name="ln_beta"),
            )

    @property
    def state_size(self) -> HMLSTMState:
        return HMLSTMState(c=self.units, h=self.units, z=1)

    @property
    def output_size(self) -> HMLSTMOutput:
        return HMLSTMOutput(h=self.units, z_pre=1)

    def initial_state(self, batch_size: int | tf.Tensor) -> HMLSTMState:
        zeros = tf.zeros([batch_size, self.units])
        return HMLSTMState(c=zeros, h=zeros, z=tf.zeros([batch_size, 1]))

    def call(self, inputs, state: HMLSTMState, slope: tf.Tensor | float = 1.0):
        h_below, z_below, h_above = inputs
        new, s_z = hmlstm_step(
            self.kernel, self.bias, h_below, z_below, h_above if self.has_above else None,
            state, tf.convert_to_tensor(slope, tf.float32), self.has_boundary, self.ln,
        )
        return HMLSTMOutput(new.h, s_z), new

    __call__ = call


class MultiHMLSTMCell(tf.Module):
    """A stack of HM-LSTM layers with the same contract as one cell.

    ``call(x_t, states) -> (outputs_t, states_t)``: the input is the character
    embedding at t, the state a tuple of per-layer ``HMLSTMState`` at t-1. Layer
    l reads h^{l-1}_t and z^{l-1}_t from the layer below at this step (x_t and 1
    for layer 1) and h^{l+1}_{t-1} from the layer above at the previous step,
    which is why Keras' stacked cell, which only passes outputs upwards, does
    not fit. The output is a tuple of per-layer ``HMLSTMOutput``.
    """

    def __init__(
        self,
        input_size: int,
        num_units: tuple[int, ...],
        top_boundary: bool = False,
        layer_norm: bool = False,
        seed: int = 0,
        name: str | None = None,
    ):
        super().__init__(name=name)
        n = len(num_units)
        self.cells = []
        for l, units in enumerate(num_units):
            below = input_size if l == 0 else num_units[l - 1]
            above = num_units[l + 1] if l + 1 < n else None
            has_boundary = l + 1 < n or top_boundary
            self.cells.append(
                HMLSTMCell(units, below, above, has_boundary, layer_norm,
                           seed=seed + 1000 * (l + 1), name=f"layer{l + 1}")
            )

    @property
    def state_size(self) -> tuple[HMLSTMState, ...]:
        return tuple(cell.state_size for cell in self.cells)

    @property
    def output_size(self) -> tuple[HMLSTMOutput, ...]:
        return tuple(cell.output_size for cell in self.cells)

    def initial_state(self, batch_size: int | tf.Tensor) -> tuple[HMLSTMState, ...]:
        return tuple(cell.initial_state(batch_size) for cell in self.cells)

    def call(self, inputs: tf.Tensor, state: tuple[HMLSTMState, ...], slope=1.0):
        h_below = inputs
        z_below = None  # layer 1 reads the input at every step (z^0 = 1)
        outputs, new_states = [], []
        for l, cell in enumerate(self.cells):
            h_above = state[l + 1].h if l + 1 < len(self.cells) else None
            out, new = cell((h_below, z_below, h_above), state[l], slope)
            outputs.append(out)
            new_states.append(new)
            h_below, z_below = new.h, new.z
        return tuple(outputs), tuple(new_states)

    __call__ = call
