"""The graph that is exported: the network's forward pass, rewritten for inference.

``stream_function`` in ``convert.py`` runs the training network as it is; it
stays the reference that validation compares against. This module builds the
same function with less work inside the time loop, because ONNX Runtime pays
per node per step (about 4-6 us a node at batch 64 on the CPU, measured), not
only per FLOP. Two engines share it:

**dense** computes every row of every layer at every step:

- Layer 1's input projection does not depend on the recurrence: it runs for
  all steps as one matrix product before the loop (bias included), so each
  step adds one precomputed row.
- The training graph blends COPY / UPDATE / FLUSH with 0/1 multipliers so that
  gradients reach the straight-through boundaries. Inference needs no
  gradient: the same cases are selected with ``Where``, which picks exactly
  the value the blend computes (a product with 1 and sums with 0 are exact).
- ``z = round(clip((a s + 1) / 2, 0, 1))`` is 1 iff ``fl(a s) + 1 > 1``, which
  for a fixed slope a > 0 is ``s > t_a`` for one float32 threshold found at
  export (``fire_threshold``): one comparison instead of four nodes, bit for bit.
- The gates are one Split of the product into [f i o | g | s_z] and one
  Sigmoid over f, i, o together.
- Whether a row still runs is computed for all steps before the loop and
  scanned like the input; rows past their length keep their state with one
  ``Where`` per state tensor.
- Per step the loop stacks one packed tensor ([B, sum(H) + 2L]: every h, z and
  s_z), unpacked after the loop.

**sparse** (the default) uses what the hierarchy says need not be computed. A
layer l >= 2 is in COPY at step t when z^l_{t-1} = 0 and z^{l-1}_t = 0: c and h
stay, and the pre-activation is W [0 ; h ; 0] + b. So only the rows that UPDATE
or FLUSH are gathered, multiplied and stepped, then scattered back
(``_sparse_upper``). The boundary column s_z = [z h_below ; h ; z h_above] . w_z
+ b_z is one narrow product for every row, which for a COPY row is exactly its
pre-activation. After the loop, the output module projects h^l (l >= 2) only at
the steps where it changed and carries the projection forward
(``_sparse_output``). The training graph stays dense: the straight-through
gradient needs every row.

Everything except sums of products (summed in another order where a product is
split or narrowed) is bit for bit the training graph. Those move values by
float32 rounding only, which validation (same grid, same tolerance) checks like
any export, and where |s_z| is within rounding of 0 a boundary may flip, which
validation explains.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from hmlstm import spec
from hmlstm.export.functions import tf_signature
from hmlstm.model.cell import _layer_norm

ENGINES = ("sparse", "dense")


def fire_threshold(slope: float) -> np.float32:
    """The largest float32 t with ``s > t  <=>  fl(fl(slope * s) + 1) > 1`` for every float32 s.

    The training graph's boundary is round(clip((a s + 1) * 0.5, 0, 1)) = 1 iff (a s + 1) * 0.5 > 0.5
    (round half to even sends 0.5 to 0; halving is exact), i.e. fl(a s) + 1 > 1, i.e. fl(a s) > 2^-24
    (1 + 2^-24 rounds to 1, anything above to 1 + 2^-23). fl(a s) is monotone in s, so the set of s
    that fire is {s >= s_min}: found by bisection over the float32 bit patterns.
    """
    a = np.float32(slope)
    if not a > 0:
        raise ValueError(f"the boundary slope must be positive, not {slope}")
    limit = np.float32(2.0**-24)
    lo, hi = 0, int(np.float32(np.inf).view(np.int32))
    while lo < hi:  # smallest positive pattern s with fl(a s) > limit
        mid = (lo + hi) // 2
        if np.float32(a * np.int32(mid).view(np.float32)) > limit:
            hi = mid
        else:
            lo = mid + 1
    return np.int32(lo - 1).view(np.float32)


def _step_parts(s: tf.Tensor, units: int, ln, with_z: bool):
    """(f, i, o, g, s_z or None) from the pre-activation [B, 4H (+1)]."""
    if ln is not None:
        gates = _layer_norm(s[:, : 4 * units], ln[0], ln[1])
        f, i, o, g = tf.split(gates, 4, axis=-1)
        return tf.sigmoid(f), tf.sigmoid(i), tf.sigmoid(o), tf.tanh(g), s[:, 4 * units :] if with_z else None
    parts = tf.split(s, [3 * units, units] + ([1] if with_z else []), axis=-1)
    f, i, o = tf.split(tf.sigmoid(parts[0]), 3, axis=-1)
    return f, i, o, tf.tanh(parts[1]), parts[2] if with_z else None


def _dense_upper(cell, units, kernel, x_parts, c, h, z, zb, live):
    """Layer l >= 2 on every row: the product and the element-wise step for all, the case by Where."""
    s = tf.matmul(tf.concat(x_parts, -1), kernel) + cell.bias
    f, i, o, g, s_z = _step_parts(s, units, cell.ln, cell.has_boundary)
    ig = i * g
    if not cell.has_boundary:  # UPDATE where the layer below fired, else COPY
        c_new = tf.where(zb, c + (f * c + ig - c), c)
        h_new = tf.where(zb, h + (o * tf.tanh(c_new) - h), h)
        return tf.where(live, c_new, c), tf.where(live, h_new, h), h_new, None
    z_b = z > 0.5
    c_new = tf.where(z_b, ig, tf.where(zb, f * c + ig, c))
    h_new = tf.where(tf.logical_or(z_b, zb), o * tf.tanh(c_new), h)
    return tf.where(live, c_new, c), tf.where(live, h_new, h), h_new, s_z


def _sparse_upper(cell, units, weights, x_parts, c, h, z, zb, live):
    """Layer l >= 2 on the rows that UPDATE or FLUSH only; COPY rows keep c and h.

    A row is active where the layer fired at t-1 (FLUSH) or the layer below fired at t (UPDATE),
    and only while the row runs. Those rows are gathered (one index tensor for every gather and
    scatter), run through the gate product and the element-wise step, and scattered back. FLUSH
    computes f * 0 + i g, which is i g exactly, so an active row's values are the dense graph's.
    weights: (gate kernel [D, 4H], gate bias [4H], boundary column [D, 1] and its bias [1] or None),
    split once before the loop.
    """
    kernel, bias, w_z, b_z = weights
    x = tf.concat(x_parts, -1)  # [B, D]: [z^{l-1} h^{l-1} ; h ; z h^{l+1}]
    fired_before = z > 0.5
    active = tf.logical_and(tf.logical_or(fired_before, zb) if cell.has_boundary else zb, live)
    rows = tf.where(tf.squeeze(active, -1))  # [K, 1] int64
    c_base = tf.where(fired_before, 0.0, c) if cell.has_boundary else c  # FLUSH forgets
    s = tf.matmul(tf.gather_nd(x, rows), kernel) + bias  # [K, 4H]
    f, i, o, g, _ = _step_parts(s, units, cell.ln, False)
    c_k = f * tf.gather_nd(c_base, rows) + i * g
    c_new = tf.tensor_scatter_nd_update(c, rows, c_k)
    h_new = tf.tensor_scatter_nd_update(h, rows, o * tf.tanh(c_k))
    s_z = tf.matmul(x, w_z) + b_z if cell.has_boundary else None  # every row: a COPY row's x is [0 ; h ; 0]
    return c_new, h_new, h_new, s_z


def inference_function(network, engine: str = "sparse") -> tf.types.experimental.GenericFunction:
    """(tokens, lengths, *state) -> dict of outputs, like ``convert.stream_function``.

    engine "sparse" computes layers >= 2 only on their active rows (``_sparse_upper``) and their
    output projections only where h changed (``_sparse_output``); "dense" computes every row.
    Same inputs, outputs and meanings.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, not {engine!r}")
    cfg = network.config
    cells = network.cell.cells
    n = len(cells)
    units = [c.units for c in cells]
    embed = cfg.embed_dim
    t_fire = float(fire_threshold(float(network.slope.numpy())))  # a constant in the graph, not an input

    @tf.function(input_signature=tf_signature(cfg.num_units, cfg.vocab_size))
    def stream_step(tokens, lengths, *flat_state):
        threshold = tf.constant(t_fire, tf.float32)
        k1 = cells[0].kernel
        x = tf.gather(network.embedding, tf.transpose(tokens))  # [T, B, E]
        x1 = tf.einsum("tbe,eg->tbg", x, k1[:embed]) + cells[0].bias  # [T, B, 4H+1], all steps at once
        steps = tf.shape(x1)[0]
        running = tf.sequence_mask(lengths, steps)  # [B, T]: row b still runs at step t
        carried = tuple(flat_state)
        kernels = [k1[embed:]] + [c.kernel for c in cells[1:]]
        # The sparse engine's gate and boundary parts, split here so that the loop does not split them.
        split = [None] + [
            (kernels[l][:, : 4 * units[l]], cells[l].bias[: 4 * units[l]],
             kernels[l][:, 4 * units[l] :] if cells[l].has_boundary else None,
             cells[l].bias[4 * units[l] :] if cells[l].has_boundary else None)
            for l in range(1, n)]

        def step(prev, elem):
            x_t, live = elem  # live [B, 1]: the row has not reached its length
            state, _ = prev
            new, packed_h, packed_z, packed_s = [], [], [], []
            h_below, zb = None, None  # zb: the layer below fired (bool); None for layer 1
            for l, cell in enumerate(cells):
                c, h, z = state[3 * l : 3 * l + 3]
                if l == 0:  # never COPY: FLUSH where z, else UPDATE
                    parts = [h] + ([z * state[4]] if n > 1 else [])
                    s = x_t + tf.matmul(tf.concat(parts, -1) if len(parts) > 1 else h, kernels[0])
                    f, i, o, g, s_z = _step_parts(s, units[0], cell.ln, cell.has_boundary)
                    ig = i * g
                    c_new = tf.where(z > 0.5, ig, f * c + ig)
                    h_new = o * tf.tanh(c_new)
                    c_keep, h_keep = tf.where(live, c_new, c), tf.where(live, h_new, h)
                else:
                    parts = [packed_z[-1] * h_below, h]
                    if l + 1 < n:
                        parts.append(z * state[3 * (l + 1) + 1])  # top-down, right after a boundary
                    if engine == "sparse":
                        c_keep, h_keep, h_new, s_z = _sparse_upper(cell, units[l], split[l], parts, c, h, z,
                                                                   zb, live)
                    else:
                        c_keep, h_keep, h_new, s_z = _dense_upper(cell, units[l], kernels[l], parts, c, h, z,
                                                                  zb, live)
                if s_z is not None:
                    fired = s_z > threshold
                    z_new = tf.cast(fired, tf.float32)
                else:
                    s_z = z_new = tf.zeros_like(z)
                    fired = tf.zeros_like(z, tf.bool)
                new += [c_keep, h_keep, tf.where(live, z_new, z)]
                packed_h.append(h_new)
                packed_z.append(z_new)
                packed_s.append(s_z)
                h_below, zb = h_new, fired
            return tuple(new), tf.concat(packed_h + packed_z + packed_s, -1)

        width = sum(units) + 2 * n
        zero_packed = tf.zeros([tf.shape(tokens)[0], width])
        live_steps = tf.expand_dims(tf.transpose(running), -1)  # [T, B, 1]
        states, packed = tf.scan(step, (x1, live_steps), initializer=(carried, zero_packed))
        final = [s[-1] for s in states]  # read from the Loop's carried outputs (passes.final_state_from_carried)
        packed = tf.transpose(packed * tf.cast(live_steps, tf.float32), [1, 0, 2])  # [B, T, width]
        hs = tf.split(packed[..., : sum(units)], units, axis=-1)
        boundaries = packed[..., sum(units) : sum(units) + n]
        boundary_logits = packed[..., sum(units) + n :]
        if engine == "sparse":
            logits = _sparse_output(network, hs, boundaries, [flat_state[3 * l + 2] for l in range(n)], running)
        else:
            logits = network.output_logits(tuple(hs))
        logits = logits * tf.cast(tf.expand_dims(running, -1), logits.dtype)
        result = {spec.LOGITS: logits, spec.BOUNDARIES: boundaries, spec.BOUNDARY_LOGITS: boundary_logits}
        for l in range(n):
            for p, part in enumerate(spec.STATE_PARTS):
                result[spec.state_output(part, l + 1)] = tf.identity(final[3 * l + p])
        return result

    return stream_step


def _sparse_output(network, hs, boundaries, z_before, running) -> tf.Tensor:
    """The output module (``HMLSTMNetwork.output_logits``) with each upper layer's projection W_l h_l
    computed only where h_l changed.

    h_l changes at step t only where the layer was active (it fired at t-1 or the layer below fired
    at t, and the row runs); elsewhere it COPYs, and so does W_l h_l. The projection is computed at
    the steps where h_l changed and at each row's first step, then carried forward along the row
    (a running count of those steps indexes the computed rows). Steps past a row's length carry a
    stale value, and their logits are zeroed by the caller, as the dense graph's are.
    """
    cells = network.cell.cells
    batch, steps = tf.shape(running)[0], tf.shape(running)[1]
    first = tf.logical_and(tf.equal(tf.range(steps), 0)[None, :], tf.ones_like(running))  # [B, T]
    gates = tf.sigmoid(tf.einsum("btd,dl->btl", tf.concat(hs, -1), network.gate_kernel))
    terms = [gates[..., :1] * tf.einsum("btd,de->bte", hs[0], network.out_kernels[0])]
    for l in range(1, len(cells)):
        fired_below = boundaries[:, :, l - 1] > 0.5
        if cells[l].has_boundary:  # z^l at t-1: the state's z at the first step, then the outputs
            fired_before = tf.concat([z_before[l] > 0.5, boundaries[:, :-1, l] > 0.5], axis=1)
            changed = tf.logical_or(fired_before, fired_below)
        else:
            changed = fired_below
        computed = tf.reshape(tf.logical_or(tf.logical_and(changed, running), first), [-1])  # [B*T]
        where = tf.where(computed)  # [K, 1]
        projected = tf.matmul(tf.gather_nd(tf.reshape(hs[l], [-1, cells[l].units]), where), network.out_kernels[l])
        carry = tf.cumsum(tf.cast(computed, tf.int32)) - 1  # [B*T]: the latest computed step of the row
        filled = tf.reshape(tf.gather(projected, carry), [batch, steps, -1])
        terms.append(gates[..., l : l + 1] * filled)
    h_e = tf.nn.relu(tf.add_n(terms))
    return tf.einsum("bte,ev->btv", h_e, network.logit_kernel) + network.logit_bias
