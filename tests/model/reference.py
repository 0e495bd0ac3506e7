"""An independent NumPy reading of the HM-LSTM equations, for tests only.

Written from the paper with explicit branches, not the blended multipliers
the TensorFlow step uses, so the two can disagree if either is wrong.
"""

import numpy as np


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def layer_norm(x, gamma, beta):
    mu = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5) * gamma + beta


def step(kernel, bias, h_below, z_below, h_above, c, h, z, slope, has_boundary, ln=None):
    """Returns (c_new, h_new, z_new, s) for one layer, each row its own case."""
    units = c.shape[1]
    x = [z_below * h_below, h]
    if h_above is not None:
        x.append(z * h_above)
    s = np.concatenate(x, axis=1) @ kernel + bias
    pre = s[:, : 4 * units]
    if ln is not None:
        pre = layer_norm(pre, *ln)
    f = sigmoid(pre[:, :units])
    i = sigmoid(pre[:, units : 2 * units])
    o = sigmoid(pre[:, 2 * units : 3 * units])
    g = np.tanh(pre[:, 3 * units :])
    c_new = np.empty_like(c)
    h_new = np.empty_like(h)
    for b in range(c.shape[0]):
        if z[b, 0] == 1:  # FLUSH
            c_new[b] = i[b] * g[b]
            h_new[b] = o[b] * np.tanh(c_new[b])
        elif z_below[b, 0] == 1:  # UPDATE
            c_new[b] = f[b] * c[b] + i[b] * g[b]
            h_new[b] = o[b] * np.tanh(c_new[b])
        else:  # COPY
            c_new[b] = c[b]
            h_new[b] = h[b]
    if has_boundary:
        z_tilde = np.clip((slope * s[:, 4 * units :] + 1.0) / 2.0, 0.0, 1.0)
        z_new = np.round(z_tilde)  # half to even, like tf.round
    else:
        z_new = np.zeros_like(z)
    return c_new, h_new, z_new, s
