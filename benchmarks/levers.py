"""Speed levers for the LSTM on a CPU, each measured against the default in the same process.

Run: python benchmarks/levers.py [--tasks digit-letter merged] [--rounds 3]

Each lever is a variant of the study preset's model on synthetic EMNIST-shaped data. The
default and the variant alternate `rounds` times and the best rate of each is printed,
with the ratio. These are the experiments behind docs/performance.md's "other levers" table;
the ones that helped are already the defaults (XLA for training and serving).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def _hoisted_lstm_class():
    """keras.layers.LSTM whose non-cuDNN path computes the input projection of all steps at once."""
    import keras
    from keras import ops
    from keras.src import backend
    from keras.src.layers.rnn.rnn import RNN

    class _HoistedLoop(RNN):
        def inner_loop(self, sequences, initial_state, mask, training=False):
            cell = self.cell
            if mask is not None or (training and (cell.dropout or cell.recurrent_dropout)):
                return super().inner_loop(sequences, initial_state, mask, training)
            projected = ops.matmul(sequences, cell.kernel) + cell.bias

            def step(z_t, states):
                h, c = states
                z = z_t + ops.matmul(h, cell.recurrent_kernel)
                c, o = cell._compute_carry_and_output_fused(ops.split(z, 4, axis=1), c)
                h = o * cell.activation(c)
                return h, [h, c]

            return backend.rnn(step, projected, list(initial_state), go_backwards=self.go_backwards, mask=None,
                               unroll=self.unroll, input_length=sequences.shape[1],
                               zero_output_for_mask=self.zero_output_for_mask,
                               return_all_outputs=self.return_sequences)

    # MRO: LSTM's fallback `super().inner_loop` lands in _HoistedLoop, before RNN's.
    class HoistedLSTM(keras.layers.LSTM, _HoistedLoop):
        pass

    return HoistedLSTM


def _model(config, num_classes, lstm=None, **lstm_options):
    import keras

    lstm = lstm or keras.layers.LSTM
    layers = [keras.Input((28, 28))]
    for i in range(config.num_layers):
        layers.append(lstm(config.hidden_dim, return_sequences=i < config.num_layers - 1, **lstm_options))
    layers += [keras.layers.Dropout(config.dropout), keras.layers.Dense(num_classes)]
    return keras.Sequential(layers)


def _rate(fn, samples: int, repeats: int = 6) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return repeats * samples / (time.perf_counter() - start)


def _compare(name: str, base, variant, samples: int, rounds: int) -> None:
    base(), variant()  # compile both first
    rates = {"default": [], "variant": []}
    for _ in range(rounds):
        rates["default"].append(_rate(base, samples))
        rates["variant"].append(_rate(variant, samples))
    b, v = max(rates["default"]), max(rates["variant"])
    print(f"  {name:42} default {b:8,.0f}/s  variant {v:8,.0f}/s  ratio {v / b:.2f}", flush=True)


def training_levers(task_name: str, rounds: int) -> None:
    import keras

    from tf_emnist.bench import synthetic
    from tf_emnist.data import make_dataset
    from tf_emnist.model import build_model, compile_model
    from tf_emnist.tasks import get_task

    task = get_task(task_name)
    config = task.preset
    x, y = synthetic(256, task.num_classes)
    x = x.astype(np.float32) / 255

    def trainer(model, **compile_options):
        model.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      jit_compile=True, **compile_options)
        return lambda: model.train_on_batch(x, y)

    base = _model(config, task.num_classes)
    print(f"{task.name}: training, batch 256 (train steps per second x 256)")
    _compare("input projection of all steps in one matmul", trainer(base),
             trainer(_model(config, task.num_classes, _hoisted_lstm_class())), 256, rounds)
    _compare("unrolled LSTM (unroll=True)", trainer(_model(config, task.num_classes)),
             trainer(_model(config, task.num_classes, unroll=True)), 256, rounds)
    bf16 = config.replace(mixed_precision=True)
    _compare("bfloat16 mixed precision", trainer(build_model(config, task.num_classes)),
             trainer(build_model(bf16, task.num_classes)), 256, rounds)

    images, labels = synthetic(256 * 40, task.num_classes)
    data = make_dataset(images, labels, 256, training=True).repeat()

    def fitter(steps_per_execution):
        model = compile_model(build_model(config, task.num_classes), config)
        model.compile(optimizer=model.optimizer, loss=model.loss, jit_compile=True,
                      steps_per_execution=steps_per_execution)
        return lambda: model.fit(data, steps_per_epoch=20, epochs=1, verbose=0)

    _compare("fit with steps_per_execution=10", fitter(1), fitter(10), 20 * 256, rounds)


def serving_levers(task_name: str, rounds: int) -> None:
    import tensorflow as tf

    from tf_emnist.tasks import get_task

    task = get_task(task_name)
    model = _model(task.preset, task.num_classes)
    x = tf.constant(np.random.default_rng(0).random((1024, 28, 28), dtype=np.float32))
    xla = tf.function(lambda v: model(v, training=False), jit_compile=True)

    lstms, dense = model.layers[:-2], model.layers[-1]
    weights = [(tf.concat([l.cell.kernel, l.cell.recurrent_kernel], 0), l.cell.bias, l.units) for l in lstms]

    @tf.function
    def fused(v):
        """TensorFlow's fused BlockLSTMV2 op (gate order i, f, c, o: Keras's)."""
        seq, n = tf.transpose(v, [1, 0, 2]), tf.shape(v)[0]
        for w, b, units in weights:
            zeros, no_peephole = tf.zeros([n, units]), tf.zeros([units])
            seq = tf.raw_ops.BlockLSTMV2(seq_len_max=tf.constant(28, tf.int64), x=seq, cs_prev=zeros, h_prev=zeros,
                                         w=w, wci=no_peephole, wcf=no_peephole, wco=no_peephole, b=b)[6]
        return tf.matmul(seq[-1], dense.kernel) + dense.bias

    @tf.function
    def halves(v):
        """The batch in two halves, two XLA launches that the executor may run side by side."""
        a, b = tf.split(v, 2)
        return tf.concat([xla(a), xla(b)], 0)

    np.testing.assert_allclose(fused(x).numpy(), xla(x).numpy(), atol=1e-4)
    print(f"{task.name}: serving, batch 1024")
    _compare("fused BlockLSTMV2 op instead of XLA", lambda: xla(x).numpy(), lambda: fused(x).numpy(), 1024, rounds)
    _compare("two concurrent halves of the batch", lambda: xla(x).numpy(), lambda: halves(x).numpy(), 1024, rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["digit-letter", "merged"])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from tf_emnist.bench import cpu_name

    print(f"CPU: {cpu_name()}")
    for task in args.tasks:
        training_levers(task, args.rounds)
        serving_levers(task, args.rounds)


if __name__ == "__main__":
    main()
