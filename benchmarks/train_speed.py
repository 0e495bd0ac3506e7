"""Training speed: HM-LSTM against a Keras LSTM stack with the same parameter count.

Both run the same training step (embedding -> recurrent stack -> logits,
softmax cross-entropy, global-norm clip, the project's Adam) under
tf.function, on the same batches of the built-in corpus, in one process.
Writes the "train_speed" section of docs/benchmarks.md.

    python benchmarks/train_speed.py [--units 128] [--layers 3] [--steps 30]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from hmlstm.cli import quiet_tensorflow  # noqa: E402

tf = quiet_tensorflow()

from benchmarks.report import NOT_WRITTEN, add_write_docs, write_section  # noqa: E402
from hmlstm.model.config import ModelConfig  # noqa: E402
from hmlstm.model.data import StreamBatcher, Vocabulary, builtin_text  # noqa: E402
from hmlstm.model.network import HMLSTMNetwork  # noqa: E402
from hmlstm.model.optim import Adam  # noqa: E402


def n_params(variables) -> int:
    return int(sum(np.prod(v.shape) for v in variables))


class KerasLSTMLM(tf.Module):
    def __init__(self, vocab: int, embed: int, units: int, layers: int, out_dim: int):
        super().__init__()
        self.embedding = tf.Variable(tf.random.normal([vocab, embed], stddev=0.1))
        self.lstms = [tf.keras.layers.LSTM(units, return_sequences=True, return_state=True)
                      for _ in range(layers)]
        self.hidden = tf.keras.layers.Dense(out_dim, activation="relu")
        self.logits = tf.keras.layers.Dense(vocab)
        x = tf.zeros([1, 2, embed])
        for lstm in self.lstms:
            x, *_ = lstm(x)
        self.logits(self.hidden(x))

    @property
    def train_vars(self):
        v = [self.embedding]
        for layer in [*self.lstms, self.hidden, self.logits]:
            v += [w.value for w in layer.trainable_weights]
        return v

    def __call__(self, tokens, states):
        x = tf.gather(self.embedding, tokens)
        new = []
        for lstm, (h, c) in zip(self.lstms, states):
            x, h, c = lstm(x, initial_state=[h, c])
            new.append((h, c))
        return self.logits(self.hidden(x)), new


def measure(name, forward, variables, init_state, batches, steps, clip=1.0):
    opt = Adam(variables, 2e-3)

    @tf.function
    def step(x, y, state):
        with tf.GradientTape() as tape:
            logits, new = forward(x, state)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
        grads = [tf.convert_to_tensor(g) for g in tape.gradient(loss, variables)]
        grads, _ = tf.clip_by_global_norm(grads, clip)
        opt.apply(grads, variables)
        return loss, tf.nest.map_structure(tf.stop_gradient, new)

    state = init_state
    for k in range(3):  # compile and warm up
        x, y = batches.batch(k)
        _, state = step(x, y, state)
    times = []
    for k in range(steps):
        x, y = batches.batch(3 + k)
        t0 = time.perf_counter()
        loss, state = step(x, y, state)
        float(loss)
        times.append(time.perf_counter() - t0)
    b, t = batches.data.shape[0], batches.seq_len
    med = float(np.median(times))
    return {"name": name, "params": n_params(variables), "step_ms": med * 1e3,
            "chars_s": b * t / med}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--units", type=int, default=128)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=100)
    ap.add_argument("--steps", type=int, default=30)
    add_write_docs(ap)
    args = ap.parse_args()
    tf.keras.utils.set_random_seed(0)

    text = builtin_text()
    vocab = Vocabulary.from_text(text)
    batches = StreamBatcher(vocab.encode(text), args.batch_size, args.seq_len)
    cfg = ModelConfig(vocab_size=len(vocab), num_units=(args.units,) * args.layers)
    net = HMLSTMNetwork(cfg)
    hm_vars = list(net.trainable_variables)
    target = n_params(hm_vars)

    def keras_params(u):
        m = KerasLSTMLM(len(vocab), cfg.embed_dim, u, args.layers, cfg.output_dim)
        return n_params(m.train_vars), m

    best = min(range(args.units, 3 * args.units, 2), key=lambda u: abs(
        4 * u * (cfg.embed_dim + u + 1) + (args.layers - 1) * 4 * u * (2 * u + 1)
        + u * cfg.output_dim - target))
    _, keras = keras_params(best)
    rows = [
        measure(f"HM-LSTM {args.layers}x{args.units}",
                lambda x, s: (lambda o: (o.logits, o.final_state))(net(x, s)),
                hm_vars, net.initial_state(args.batch_size), batches, args.steps),
        measure(f"Keras LSTM {args.layers}x{best}", keras, keras.train_vars,
                [(tf.zeros([args.batch_size, best]),) * 2] * args.layers, batches, args.steps),
    ]
    ratio = rows[0]["chars_s"] / rows[1]["chars_s"]
    lines = [
        "## Training speed (`benchmarks/train_speed.py`)", "",
        f"Batch {args.batch_size} x {args.seq_len} characters of the built-in corpus, median of "
        f"{args.steps} steps after warm-up, same training step (tf.function, clip, Adam), one process.", "",
        "| model | parameters | ms / step | chars / s |", "|---|---:|---:|---:|",
    ]
    lines += [f"| {r['name']} | {r['params']:,} | {r['step_ms']:.1f} | {r['chars_s']:,.0f} |" for r in rows]
    lines += ["", f"HM-LSTM trains at **{ratio:.2f}x** the speed of the parameter-matched Keras LSTM. "
              "The HM-LSTM step does one matmul per layer like an LSTM, plus the boundary "
              "detector, the top-down input and the COPY/UPDATE/FLUSH blend; Keras' LSTM runs "
              "its own fused loop."]
    print("\n".join(lines))
    print(f"\nwrote {write_section('train_speed', chr(10).join(lines))}" if args.write_docs else NOT_WRITTEN)


if __name__ == "__main__":
    main()
