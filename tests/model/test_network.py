import numpy as np
import pytest
import tensorflow as tf

from hmlstm.model.cell import MultiHMLSTMCell
from hmlstm.model.config import ModelConfig
from hmlstm.model.network import HMLSTMNetwork, unroll

CFG = ModelConfig(vocab_size=9, embed_dim=4, num_units=(5, 6, 7), output_dim=8)


class AddCell:
    """Toy cell with a closed-form unroll: state_t = state_0 + sum of inputs up to t."""

    output_size = 3

    def __call__(self, x, state, slope):
        new = state + x
        return 2.0 * new, new


def test_unroll_toy_cell_gives_cumulative_sums_and_holds_state_past_length():
    x = np.arange(2 * 5 * 3, dtype=np.float32).reshape(2, 5, 3)
    init = np.ones((2, 3), np.float32)
    outputs, stacked, final = unroll(AddCell(), x, init, lengths=tf.constant([5, 2]))
    expected = init[:, None, :] + np.cumsum(x, axis=1)
    np.testing.assert_allclose(outputs, 2.0 * stacked)
    np.testing.assert_allclose(stacked[0], expected[0])
    np.testing.assert_allclose(stacked[1, :2], expected[1, :2])
    np.testing.assert_array_equal(stacked[1, 2:], 0.0)  # outputs past the length are zero
    np.testing.assert_allclose(final[1], expected[1, 1])  # state held at step lengths[1]


def test_unroll_stays_a_symbolic_loop_under_tf_function():
    net = HMLSTMNetwork(CFG)
    f = tf.function(lambda t: net(t, net.initial_state(tf.shape(t)[0])).logits)
    graph = f.get_concrete_function(tf.TensorSpec([None, None], tf.int32)).graph
    types = {op.type for op in graph.get_operations()}
    assert "While" in types or "StatelessWhile" in types


@pytest.mark.parametrize("mode", ["eager", "function"])
def test_scan_returns_every_layer_at_every_step_and_equals_python_loop(mode):
    net = HMLSTMNetwork(CFG, seed=1)
    tokens = np.random.default_rng(0).integers(0, 9, (3, 7)).astype(np.int32)
    call = net.__call__ if mode == "eager" else tf.function(net.__call__)
    out = call(tokens, net.initial_state(3))
    assert out.logits.shape == (3, 7, 9) and out.boundaries.shape == (3, 7, 3)
    for l, n in enumerate(CFG.num_units):
        assert out.unrolled.h[l].shape == (3, 7, n) and out.unrolled.c[l].shape == (3, 7, n)
        assert out.unrolled.z[l].shape == (3, 7, 1)
    state = net.initial_state(3)
    emb = tf.gather(net.embedding, tokens)
    for t in range(7):
        step_out, state = net.cell(emb[:, t], state, net.slope)
        pre = np.concatenate([o.z_pre.numpy() for o in step_out], -1)
        np.testing.assert_allclose(out.boundary_logits[:, t], pre, atol=1e-6)
        np.testing.assert_array_equal(out.boundaries[:, t], (pre > 0).astype(np.float32))
        for l in range(3):
            np.testing.assert_allclose(out.unrolled.h[l][:, t], state[l].h, atol=1e-6)
            np.testing.assert_allclose(out.unrolled.c[l][:, t], state[l].c, atol=1e-6)
            np.testing.assert_array_equal(out.unrolled.z[l][:, t], state[l].z)
    for l in range(3):
        np.testing.assert_allclose(out.final_state[l].h, state[l].h, atol=1e-6)
    assert set(np.unique(out.boundaries.numpy())) <= {0.0, 1.0}
    np.testing.assert_array_equal(out.boundaries.numpy()[..., 2], 0.0)  # top layer: no detector


def test_ragged_row_equals_the_same_row_run_alone():
    net = HMLSTMNetwork(CFG, seed=2)
    tokens = np.random.default_rng(1).integers(0, 9, (3, 6)).astype(np.int32)
    lengths = np.array([6, 3, 0], np.int32)
    out = net(tokens, net.initial_state(3), tf.constant(lengths))
    alone = net(tokens[1:2, :3], net.initial_state(1))
    np.testing.assert_allclose(out.logits[1, :3], alone.logits[0], atol=1e-6)
    np.testing.assert_array_equal(out.logits[1, 3:], 0.0)
    for l in range(3):
        np.testing.assert_allclose(out.final_state[l].c[1], alone.final_state[l].c[0], atol=1e-6)
        np.testing.assert_array_equal(out.final_state[l].h[2], 0.0)  # length 0: untouched


def test_slope_is_a_variable_read_at_run_time():
    net = HMLSTMNetwork(CFG)
    f = tf.function(lambda t: net(t, net.initial_state(1)).boundaries)
    tokens = tf.constant([[1, 2, 3]], tf.int32)
    f(tokens)
    net.slope.assign(4.0)
    f(tokens)
    assert f.experimental_get_tracing_count() == 1
    assert isinstance(net.slope, tf.Variable) and not net.slope.trainable


def test_multi_cell_output_module_uses_every_layer():
    net = HMLSTMNetwork(CFG, seed=3)
    hs = tuple(tf.random.normal([2, 3, n]) for n in CFG.num_units)
    base = net.output_logits(hs).numpy()
    for l in range(3):
        bumped = list(hs)
        bumped[l] = bumped[l] + 1.0
        assert not np.allclose(net.output_logits(tuple(bumped)).numpy(), base)
    assert isinstance(net.cell, MultiHMLSTMCell) and len(net.cell.cells) == len(CFG.num_units)
