import numpy as np
import pytest
import tensorflow as tf

from hmlstm.model.cell import HMLSTMCell, HMLSTMOutput, HMLSTMState, MultiHMLSTMCell, hmlstm_step
from tests.model import reference

B, D, H, A = 3, 5, 4, 6  # batch, below size, units, above size
CASES = {"update": (0, 1), "copy": (0, 0), "flush_below_fired": (1, 1), "flush_below_silent": (1, 0)}


def _inputs(seed, z_prev, z_below):
    rng = np.random.default_rng(seed)
    h_below = rng.normal(size=(B, D)).astype(np.float32)
    h_above = rng.normal(size=(B, A)).astype(np.float32)
    c = rng.normal(size=(B, H)).astype(np.float32)
    h = rng.normal(size=(B, H)).astype(np.float32)
    z = np.full((B, 1), z_prev, np.float32)
    zb = np.full((B, 1), z_below, np.float32)
    return h_below, zb, h_above, c, h, z


@pytest.mark.parametrize("mode", ["eager", "function"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("layer_norm", [False, True])
def test_cell_step_matches_numpy_reference(case, mode, layer_norm):
    cell = HMLSTMCell(H, D, A, has_boundary=True, layer_norm=layer_norm, seed=3)
    if layer_norm:  # non-trivial gain and shift, so the reference's LN is really exercised
        cell.ln[0].assign(np.linspace(0.5, 1.5, 4 * H).astype(np.float32))
        cell.ln[1].assign(np.linspace(-0.2, 0.2, 4 * H).astype(np.float32))
    h_below, zb, h_above, c, h, z = _inputs(1, *CASES[case])
    call = cell.call if mode == "eager" else tf.function(cell.call)
    out, new = call((h_below, zb, h_above), HMLSTMState(c, h, z), 2.5)
    ln = (cell.ln[0].numpy(), cell.ln[1].numpy()) if layer_norm else None
    c_ref, h_ref, z_ref, _ = reference.step(cell.kernel.numpy(), cell.bias.numpy(), h_below, zb,
                                            h_above, c, h, z, 2.5, True, ln)
    np.testing.assert_allclose(new.c.numpy(), c_ref, atol=1e-6)
    np.testing.assert_allclose(new.h.numpy(), h_ref, atol=1e-6)
    np.testing.assert_array_equal(new.z.numpy(), z_ref)
    np.testing.assert_array_equal(out.h.numpy(), new.h.numpy())
    np.testing.assert_array_equal(new.z.numpy(), (out.z_pre.numpy() > 0).astype(np.float32))


def test_copy_keeps_c_and_h_bit_exact():
    cell = HMLSTMCell(H, D, A, seed=0)
    h_below, zb, h_above, c, h, z = _inputs(2, *CASES["copy"])
    _, new = cell((h_below, zb, h_above), HMLSTMState(c, h, z))
    np.testing.assert_array_equal(new.c.numpy(), c)
    np.testing.assert_array_equal(new.h.numpy(), h)


def test_flush_resets_cell_when_boundary_fired():
    cell = HMLSTMCell(H, D, A, seed=0)
    h_below, zb, h_above, c, h, z = _inputs(3, *CASES["flush_below_fired"])
    _, a = cell((h_below, zb, h_above), HMLSTMState(c, h, z))
    _, b = cell((h_below, zb, h_above), HMLSTMState(c + 10.0, h, z))
    np.testing.assert_allclose(a.c.numpy(), b.c.numpy(), atol=1e-6)  # old c forgotten


@pytest.mark.parametrize("z_prev", [0, 1])
def test_first_layer_path_equals_reference_with_z_below_one(z_prev):
    """Layer 1 passes z_below=None (always 1): the shorter blend must equal the general equations."""
    cell = HMLSTMCell(H, D, A, seed=2)
    h_below, zb, h_above, c, h, z = _inputs(7, z_prev, 1)
    _, new = cell((h_below, None, h_above), HMLSTMState(c, h, z), 1.5)
    c_ref, h_ref, z_ref, _ = reference.step(cell.kernel.numpy(), cell.bias.numpy(), h_below, zb, h_above,
                                            c, h, z, 1.5, True)
    np.testing.assert_allclose(new.c.numpy(), c_ref, atol=1e-6)
    np.testing.assert_allclose(new.h.numpy(), h_ref, atol=1e-6)
    np.testing.assert_array_equal(new.z.numpy(), z_ref)


@pytest.mark.parametrize("case", ["update", "copy"])
def test_top_layer_without_detector_never_fires_or_flushes(case):
    cell = HMLSTMCell(H, D, None, has_boundary=False, seed=0)
    h_below, zb, _, c, h, z = _inputs(4, *CASES[case])
    _, new = cell((h_below, zb, None), HMLSTMState(c, h, z))
    assert cell.kernel.shape == (D + H, 4 * H)
    np.testing.assert_array_equal(new.z.numpy(), 0.0)
    c_ref, h_ref, _, _ = reference.step(cell.kernel.numpy(), cell.bias.numpy(), h_below, zb, None,
                                        c, h, z, 1.0, False)
    np.testing.assert_allclose(new.c.numpy(), c_ref, atol=1e-6)
    np.testing.assert_allclose(new.h.numpy(), h_ref, atol=1e-6)


def test_straight_through_gradient_flows_through_z():
    cell = HMLSTMCell(H, D, A, seed=0)
    h_below, zb, h_above, c, h, z = _inputs(5, *CASES["update"])
    with tf.GradientTape() as tape:
        _, new = cell((h_below, zb, h_above), HMLSTMState(c, h, z), 0.1)  # small slope: linear zone
        loss = tf.reduce_sum(new.z)
    grad = tape.gradient(loss, cell.kernel).numpy()
    assert np.abs(grad[:, -1]).sum() > 0  # the boundary column gets gradient through round()
    np.testing.assert_array_equal(grad[:, :-1], 0.0)  # and nothing else feeds z


def test_gradient_reaches_boundary_weights_through_next_step_flush():
    """z_t decides FLUSH vs UPDATE at t+1; the loss there must train z's weights."""
    cell = HMLSTMCell(H, D, A, seed=0)
    h_below, zb, h_above, c, h, z = _inputs(6, *CASES["update"])
    with tf.GradientTape() as tape:
        _, s1 = cell((h_below, zb, h_above), HMLSTMState(c, h, z), 0.1)
        _, s2 = cell((h_below, zb, h_above), s1, 0.1)
        loss = tf.reduce_sum(s2.c)
    assert np.abs(tape.gradient(loss, cell.kernel).numpy()[:, -1]).sum() > 0


def _multi_state(cell, seed, z_values):
    rng = np.random.default_rng(seed)
    return tuple(
        HMLSTMState(rng.normal(size=(B, c.units)).astype(np.float32),
                    rng.normal(size=(B, c.units)).astype(np.float32),
                    np.full((B, 1), zv, np.float32))
        for c, zv in zip(cell.cells, z_values)
    )


def test_multi_cell_routes_bottom_up_now_and_top_down_from_previous_step():
    multi = MultiHMLSTMCell(D, (4, 5, 6), seed=7)
    x = np.random.default_rng(0).normal(size=(B, D)).astype(np.float32)
    state = _multi_state(multi, 1, (1, 1, 0))
    out, new = multi(x, state, 1.0)
    assert len(out) == len(new) == 3 and all(o.h is n.h for o, n in zip(out, new))
    below_h, below_z = x, np.ones((B, 1), np.float32)
    for l, cell in enumerate(multi.cells):
        above = state[l + 1].h if l < 2 else None
        c, h, z = state[l]
        c_ref, h_ref, z_ref, _ = reference.step(cell.kernel.numpy(), cell.bias.numpy(), below_h,
                                                below_z, above, c, h, z, 1.0, cell.has_boundary)
        np.testing.assert_allclose(new[l].c.numpy(), c_ref, atol=1e-6)
        np.testing.assert_allclose(new[l].h.numpy(), h_ref, atol=1e-6)
        np.testing.assert_array_equal(new[l].z.numpy(), z_ref)
        below_h, below_z = new[l].h.numpy(), new[l].z.numpy()  # the layer below *at this step*
    assert not multi.cells[2].has_boundary and multi.cells[2].kernel.shape[0] == 5 + 6


def test_top_down_input_only_counts_after_a_boundary():
    multi = MultiHMLSTMCell(D, (4, 5), seed=7)
    x = np.random.default_rng(0).normal(size=(B, D)).astype(np.float32)
    for z1, should_change in ((0.0, False), (1.0, True)):
        state = _multi_state(multi, 2, (z1, 0))
        _, a = multi(x, state)
        bumped = (state[0], state[1]._replace(h=state[1].h + 1.0))
        _, b = multi(x, bumped)
        changed = not np.allclose(a[0].h.numpy(), b[0].h.numpy())
        assert changed == should_change


def test_multi_cell_contract_sizes():
    multi = MultiHMLSTMCell(D, (4, 5), top_boundary=True)
    assert multi.state_size == (HMLSTMState(4, 4, 1), HMLSTMState(5, 5, 1))
    assert multi.output_size == (HMLSTMOutput(4, 1), HMLSTMOutput(5, 1))
    init = multi.initial_state(2)
    assert [tuple(s.h.shape) for s in init] == [(2, 4), (2, 5)]
    assert multi.cells[1].has_boundary


def test_step_function_is_one_graph_without_control_flow():
    """The cases are blended arithmetically: no If/Switch ops in the traced step."""
    cell = HMLSTMCell(H, D, A)
    spec = (tf.TensorSpec([None, D]), tf.TensorSpec([None, 1]), tf.TensorSpec([None, A]))
    sspec = HMLSTMState(tf.TensorSpec([None, H]), tf.TensorSpec([None, H]), tf.TensorSpec([None, 1]))
    g = tf.function(lambda i, s: hmlstm_step(cell.kernel, cell.bias, *i, s, 1.0, True)[0]) \
        .get_concrete_function(spec, sspec).graph
    ops = {op.type for op in g.get_operations()}
    assert not ops & {"If", "StatelessIf", "Switch", "Merge"}
