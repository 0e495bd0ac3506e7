"""The TensorFlow functions export works with, apart from the inference graph (inference.py).

``tf_signature``: the exported function's input signature, from the interface in ``hmlstm.spec``.
``stream_function``: the training network's own forward pass with that signature, the reference that
validation compares every exported graph against. ``tf_reference`` runs it on NumPy feeds, and
``tf_float_spread`` measures how far it moves from itself under float32 rounding (validate.py).
Read by convert.py, inference.py and recover.py, none of which imports another for these.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from hmlstm import spec
from hmlstm.model.cell import HMLSTMState


def tf_signature(num_units: tuple[int, ...], vocab_size: int) -> list[tf.TensorSpec]:
    ins, _ = spec.io_spec(num_units, vocab_size)
    return [tf.TensorSpec([None if isinstance(d, str) else d for d in s.shape], s.dtype, name=s.name)
            for s in ins]


def stream_function(network) -> tf.types.experimental.GenericFunction:
    """The function that is exported: (tokens, lengths, *state) -> dict of outputs."""
    cfg = network.config
    num_layers = cfg.num_layers

    @tf.function(input_signature=tf_signature(cfg.num_units, cfg.vocab_size))
    def stream_step(tokens, lengths, *flat_state):
        state = tuple(HMLSTMState(*flat_state[3 * l : 3 * l + 3]) for l in range(num_layers))
        out = network(tokens, state, lengths)
        result = {spec.LOGITS: out.logits, spec.BOUNDARIES: out.boundaries,
                  spec.BOUNDARY_LOGITS: out.boundary_logits}
        for l, s in enumerate(out.final_state, start=1):
            for part in spec.STATE_PARTS:
                result[spec.state_output(part, l)] = tf.identity(getattr(s, part))
        return result

    return stream_step


def tf_reference(fn, num_units: tuple[int, ...]):
    """feeds dict -> TensorFlow outputs as NumPy, for validation."""
    ins, _ = spec.io_spec(num_units, 2)
    order = [s.name for s in ins]

    def run(feeds):
        return {k: v.numpy() for k, v in fn(*[tf.constant(feeds[n]) for n in order]).items()}

    return run


def tf_float_spread(network, fn, num_units: tuple[int, ...], runs: int = 3, seed: int = 0):
    """(feeds, expected) -> per output, how far TensorFlow moves from itself under float32 rounding.

    Runs the reference ``runs`` times with every trainable weight moved one
    float32 ulp in a random direction and keeps, per value, the largest
    |moved - expected|. In a row where a moved run flips a boundary, that run's
    spread is dropped from the flip on (a diverged trajectory explains nothing).
    The weights are restored exactly afterwards.
    """
    reference = tf_reference(fn, num_units)
    variables = list(network.trainable_variables)
    up, down = np.float32(np.inf), np.float32(-np.inf)

    def run(feeds, expected):
        originals = [v.numpy() for v in variables]
        rng = np.random.default_rng(seed)
        spread = {k: np.zeros(v.shape, np.float32) for k, v in expected.items()}
        try:
            for _ in range(runs):
                for v, w in zip(variables, originals):
                    v.assign(np.nextafter(w, np.where(rng.random(w.shape) < 0.5, up, down)))
                moved = reference(feeds)
                flipped = np.any(moved[spec.BOUNDARIES] != expected[spec.BOUNDARIES], axis=-1)  # [B, T]
                first = np.where(flipped.any(1), flipped.argmax(1), flipped.shape[1])
                for k, e in expected.items():
                    d = np.abs(moved[k] - e)
                    if d.ndim >= 3:  # [B, T, ...]
                        d[np.arange(d.shape[1])[None, :] >= first[:, None]] = 0.0
                    else:  # final state: the whole row
                        d[first < flipped.shape[1]] = 0.0
                    np.maximum(spread[k], d, out=spread[k])
        finally:
            for v, w in zip(variables, originals):
                v.assign(w)
        return spread

    return run
