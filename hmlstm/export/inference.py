"""The graph that is exported: the network's forward pass, rewritten for inference.

``stream_function`` in ``convert.py`` runs the training network as it is; it
stays the reference that validation compares against. This module builds the
same function with less work inside the time loop, because ONNX Runtime pays
per node per step (about 6 us a node at batch 64 on the CPU, measured), not
per FLOP:

- Layer 1's input projection does not depend on the recurrence: it runs for
  all steps as one matrix product before the loop (bias included), so each
  step adds one precomputed row instead of concatenating the embedding to the
  recurrent inputs and multiplying it in a small product per step.
- The training graph blends COPY / UPDATE / FLUSH with 0/1 multipliers so that
  gradients reach the straight-through boundaries. Inference needs no
  gradient: the same cases are selected with ``Where``, which picks exactly
  the value the blend computes (a product with 1 and sums with 0 are exact), in
  about half the nodes.
- ``z = round(clip((a s + 1) / 2, 0, 1))`` is ``(a s + 1) / 2 > 0.5`` exactly
  (round half to even sends 0.5 to 0; the clip changes no side of 0.5), and the
  boolean feeds the next layer's selects directly.
- Rows past their length keep their state with one ``Where`` per state tensor
  instead of a blend of three nodes.
- Per step the loop stacks one packed tensor ([B, sum(H) + 2L]: every h, z and
  s_z) instead of one scan output per layer and kind; it is unpacked after the
  loop.

The output module (gates, output embedding, logits) already runs after the
loop over all steps at once, as in the training network.

Everything except the layer-1 sum order and the held-state select is bit for
bit the training graph; those two move values by float32 rounding only, which
validation (same grid, same tolerance) checks like any export.
"""

from __future__ import annotations

import tensorflow as tf

from hmlstm import spec
from hmlstm.model.cell import _layer_norm


def _gates(s: tf.Tensor, units: int, ln):
    gates = s[:, : 4 * units]
    if ln is not None:
        gates = _layer_norm(gates, ln[0], ln[1])
    f, i, o, g = tf.split(gates, 4, axis=-1)
    return tf.sigmoid(f), tf.sigmoid(i), tf.sigmoid(o), tf.tanh(g)


def _fires(s_z: tf.Tensor, slope: tf.Tensor) -> tf.Tensor:
    """The boundary as a boolean, exactly as round(hard_sigmoid(slope * s_z)) > 0."""
    return (slope * s_z + 1.0) * 0.5 > 0.5


def inference_function(network) -> tf.types.experimental.GenericFunction:
    """(tokens, lengths, *state) -> dict of outputs, like ``convert.stream_function``."""
    from hmlstm.export.convert import tf_signature

    cfg = network.config
    cells = network.cell.cells
    n = len(cells)
    units = [c.units for c in cells]
    embed = cfg.embed_dim

    @tf.function(input_signature=tf_signature(cfg.num_units, cfg.vocab_size))
    def stream_step(tokens, lengths, *flat_state):
        slope = tf.convert_to_tensor(network.slope)
        k1 = cells[0].kernel
        x = tf.gather(network.embedding, tf.transpose(tokens))  # [T, B, E]
        x1 = tf.einsum("tbe,eg->tbg", x, k1[:embed]) + cells[0].bias  # [T, B, 4H+1], all steps at once
        steps = tf.shape(x1)[0]
        carried = tuple(flat_state)
        kernels = [k1[embed:]] + [c.kernel for c in cells[1:]]

        def step(prev, elem):
            x_t, t = elem
            state, _ = prev
            live = tf.expand_dims(t < lengths, -1)  # [B, 1]
            new, packed_h, packed_z, packed_s = [], [], [], []
            h_below, zb = None, None  # zb: the layer below fired (bool); None for layer 1
            for l, cell in enumerate(cells):
                c, h, z = state[3 * l : 3 * l + 3]
                parts = [h] if l == 0 else [packed_z[-1] * h_below, h]
                if l + 1 < n:
                    parts.append(z * state[3 * (l + 1) + 1])  # top-down, right after a boundary
                below_above = tf.matmul(tf.concat(parts, -1) if len(parts) > 1 else h, kernels[l])
                s = x_t + below_above if l == 0 else below_above + cell.bias
                f, i, o, g = _gates(s, units[l], cell.ln)
                ig = i * g
                z_b = z > 0.5
                if l == 0:  # FLUSH where z, else UPDATE
                    c_new = tf.where(z_b, ig, f * c + ig)
                    h_new = o * tf.tanh(c_new)
                elif not cell.has_boundary:  # UPDATE where the layer below fired, else COPY
                    c_new = tf.where(zb, c + (f * c + ig - c), c)
                    h_new = tf.where(zb, h + (o * tf.tanh(c_new) - h), h)
                else:
                    c_new = tf.where(z_b, ig, tf.where(zb, f * c + ig, c))
                    h_new = tf.where(tf.logical_or(z_b, zb), o * tf.tanh(c_new), h)
                if cell.has_boundary:
                    s_z = s[:, 4 * units[l] :]
                    fired = _fires(s_z, slope)
                    z_new = tf.cast(fired, tf.float32)
                else:
                    s_z = z_new = tf.zeros_like(z)
                    fired = tf.zeros_like(z, tf.bool)
                new += [tf.where(live, c_new, c), tf.where(live, h_new, h), tf.where(live, z_new, z)]
                packed_h.append(h_new)
                packed_z.append(z_new)
                packed_s.append(s_z)
                h_below, zb = h_new, fired
            return tuple(new), tf.concat(packed_h + packed_z + packed_s, -1)

        width = sum(units) + 2 * n
        zero_packed = tf.zeros([tf.shape(tokens)[0], width])
        states, packed = tf.scan(step, (x1, tf.range(steps)), initializer=(carried, zero_packed))
        final = [s[-1] for s in states]
        mask = tf.expand_dims(tf.transpose(tf.sequence_mask(lengths, steps, dtype=tf.float32)), -1)  # [T, B, 1]
        packed = tf.transpose(packed * mask, [1, 0, 2])  # [B, T, width]
        hs = tf.split(packed[..., : sum(units)], units, axis=-1)
        boundaries = packed[..., sum(units) : sum(units) + n]
        boundary_logits = packed[..., sum(units) + n :]
        logits = network.output_logits(tuple(hs))
        logits = logits * tf.expand_dims(tf.sequence_mask(lengths, steps, dtype=logits.dtype), -1)
        result = {spec.LOGITS: logits, spec.BOUNDARIES: boundaries, spec.BOUNDARY_LOGITS: boundary_logits}
        for l in range(n):
            for p, part in enumerate(spec.STATE_PARTS):
                result[spec.state_output(part, l + 1)] = tf.identity(final[3 * l + p])
        return result

    return stream_step
