"""Adam with global-norm clipping, on plain tf.Variables.

Written out (a dozen lines) rather than taken from Keras so that its slots
live in the same tf.train.Checkpoint as the network and the carried state,
which is what makes an interrupted run resume to bit-identical weights.
"""

from __future__ import annotations

import tensorflow as tf


class Adam(tf.Module):
    def __init__(self, variables, learning_rate: float, beta1: float = 0.9,
                 beta2: float = 0.999, epsilon: float = 1e-8, name: str = "adam"):
        super().__init__(name=name)
        self.learning_rate = tf.Variable(learning_rate, trainable=False, dtype=tf.float32)
        self.iterations = tf.Variable(0, trainable=False, dtype=tf.int64)
        self.beta1, self.beta2, self.epsilon = beta1, beta2, epsilon
        self.m = [tf.Variable(tf.zeros_like(v), trainable=False) for v in variables]
        self.v = [tf.Variable(tf.zeros_like(v), trainable=False) for v in variables]

    def apply(self, grads, variables, ok=None) -> None:
        """One update. ``ok`` (a bool tensor): where False, every variable keeps its value.

        The guard is arithmetic, not a branch, so the update also runs in a
        tf.distribute replica context (no control flow around its assigns).
        """
        if ok is None:
            t = tf.cast(self.iterations.assign_add(1), tf.float32)
        else:
            t = tf.cast(self.iterations.assign_add(tf.cast(ok, tf.int64)), tf.float32)
            t = tf.maximum(t, 1.0)
        lr = self.learning_rate * tf.sqrt(1.0 - self.beta2**t) / (1.0 - self.beta1**t)

        def put(var, new):
            var.assign(new if ok is None else tf.where(ok, new, var))

        for g, var, m, v in zip(grads, variables, self.m, self.v):
            m_new = self.beta1 * m + (1.0 - self.beta1) * g
            v_new = self.beta2 * v + (1.0 - self.beta2) * tf.square(g)
            put(var, var - lr * m_new / (tf.sqrt(v_new) + self.epsilon))
            put(m, m_new)
            put(v, v_new)
