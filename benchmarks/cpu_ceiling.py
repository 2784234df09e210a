"""How close the LSTM runs to this CPU's matmul limit, and one more training lever.

Run: python benchmarks/cpu_ceiling.py [--rounds 4]   (output kept in results/cpu_ceiling.txt)

1. A plain float32 matmul at the LSTM's shapes (batch 512: one half of the serving batch)
   and at 4096^3, XLA and not: the most this CPU does with TensorFlow.
2. The exported serving function (XLA, batch 1024 in two halves) in GFLOP/s, counting
   2 * 4h * (inputs + h) multiply-adds per step and layer, 28 steps.
3. A training step of the study's merged model with Keras's autodiff of the LSTM loop
   against a hand-written backward pass (tf.custom_gradient) that takes the weight
   gradients of all 28 steps in one large matmul each, as cuDNN and oneDNN do. Both are
   XLA-compiled; the gradients are compared first.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

STEPS = 28


def lstm_flops_per_sample(config, num_classes: int) -> float:
    """Forward multiply-adds x 2 of the stacked LSTM and its Dense head, per image."""
    flops, inputs = 0.0, 28
    for _ in range(config.num_layers):
        flops += STEPS * 2 * 4 * config.hidden_dim * (inputs + config.hidden_dim)
        inputs = config.hidden_dim
    return flops + 2 * inputs * num_classes


def matmul_gflops(m: int, k: int, n: int, jit: bool) -> float:
    import tensorflow as tf

    a, b = tf.random.normal([m, k]), tf.random.normal([k, n])
    fn = tf.function(lambda a, b: tf.matmul(a, b), jit_compile=jit)
    fn(a, b).numpy()
    repeats = max(3, int(2e10 / (2 * m * k * n)))
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn(a, b)
    out.numpy()
    return 2 * m * k * n * repeats / (time.perf_counter() - start) / 1e9


def lstm_sequence(x, kernel, recurrent_kernel, bias):
    """One LSTM layer, Keras's gate order (i, f, c, o): x [T, B, F] -> h of every step [T, B, H].

    The backward pass runs the recurrence for the gate gradients only; the input, kernel
    and recurrent-kernel gradients of all steps are then one matmul each.
    """
    import tensorflow as tf

    @tf.custom_gradient
    def run(x, w, u, b):
        t_steps, n, hidden = x.shape[0], tf.shape(x)[1], u.shape[0]
        projected = tf.reshape(tf.matmul(tf.reshape(x, [-1, x.shape[2]]), w) + b, [t_steps, n, 4 * hidden])
        zeros = tf.zeros([n, hidden])

        def step(t, h, c, gates, cells, outputs):
            i, f, g, o = tf.split(projected[t] + tf.matmul(h, u), 4, axis=1)
            i, f, g, o = tf.sigmoid(i), tf.sigmoid(f), tf.tanh(g), tf.sigmoid(o)
            c = f * c + i * g
            h = o * tf.tanh(c)
            return t + 1, h, c, gates.write(t, tf.concat([i, f, g, o], 1)), cells.write(t, c), outputs.write(t, h)

        arrays = [tf.TensorArray(tf.float32, size=t_steps) for _ in range(3)]
        *_, gates, cells, outputs = tf.while_loop(lambda t, *_: t < t_steps, step, (0, zeros, zeros, *arrays))
        gates, cells, outputs = gates.stack(), cells.stack(), outputs.stack()

        def grad(d_outputs):
            previous_cells = tf.concat([zeros[None], cells[:-1]], 0)

            def back(t, dh_next, dc_next, d_gates):
                i, f, g, o = tf.split(gates[t], 4, axis=1)
                dh = d_outputs[t] + dh_next
                tanh_c = tf.tanh(cells[t])
                dc = dc_next + dh * o * (1 - tanh_c * tanh_c)
                dz = tf.concat([dc * g * i * (1 - i), dc * previous_cells[t] * f * (1 - f), dc * i * (1 - g * g),
                                dh * tanh_c * o * (1 - o)], 1)
                return t - 1, tf.matmul(dz, u, transpose_b=True), dc * f, d_gates.write(t, dz)

            *_, d_gates = tf.while_loop(lambda t, *_: t >= 0, back,
                                        (t_steps - 1, zeros, zeros, tf.TensorArray(tf.float32, size=t_steps)))
            d_gates = tf.reshape(d_gates.stack(), [-1, 4 * hidden])
            previous_h = tf.reshape(tf.concat([zeros[None], outputs[:-1]], 0), [-1, hidden])
            flat_x = tf.reshape(x, [-1, x.shape[2]])
            return (tf.reshape(tf.matmul(d_gates, w, transpose_b=True), tf.shape(x)),
                    tf.matmul(flat_x, d_gates, transpose_a=True), tf.matmul(previous_h, d_gates, transpose_a=True),
                    tf.reduce_sum(d_gates, 0))

        return outputs, grad

    # tensors, not variables: custom_gradient would otherwise ask for the variables' gradients
    return run(x, tf.identity(kernel), tf.identity(recurrent_kernel), tf.identity(bias))


def training_steps(task):
    """(step, forward, model) for Keras autodiff and for the custom gradient, same weights."""
    import keras
    import tensorflow as tf

    from tf_emnist.model import build_model

    made = {}
    for kind in ("keras autodiff", "custom gradient"):
        model = build_model(task.preset, task.num_classes)
        optimizer = keras.optimizers.Adam(1e-3)
        optimizer.build(model.trainable_variables)
        lstms, dropout, dense = model.layers[:-2], model.layers[-2], model.layers[-1]

        def forward(x, training, kind=kind, model=model, lstms=lstms, dropout=dropout, dense=dense):
            if kind == "keras autodiff":
                return model(x, training=training)
            sequence = tf.transpose(x, [1, 0, 2])
            for layer in lstms:
                sequence = lstm_sequence(sequence, layer.cell.kernel, layer.cell.recurrent_kernel, layer.cell.bias)
            return dense(dropout(sequence[-1], training=training))

        def loss_of(x, y, forward=forward):
            return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, forward(x, True)))

        @tf.function(jit_compile=True)
        def step(x, y, model=model, optimizer=optimizer, loss_of=loss_of):
            with tf.GradientTape() as tape:
                loss = loss_of(x, y)
            optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
            return loss

        made[kind] = (step, forward, model)
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()

    import tensorflow as tf

    from tf_emnist.bench import cpu_name, synthetic
    from tf_emnist.export import make_serving_function
    from tf_emnist.model import build_model
    from tf_emnist.tasks import get_task

    task = get_task("merged")
    print(f"CPU: {cpu_name()}; merged preset ({task.preset.num_layers} x {task.preset.hidden_dim} LSTM)")
    for shape in ((512, 28, 1024), (512, 256, 1024), (512, 512, 1024), (14336, 256, 1024), (4096, 4096, 4096)):
        print(f"  matmul {'x'.join(map(str, shape)):>16}: XLA {matmul_gflops(*shape, True):4.0f} GFLOP/s, "
              f"plain {matmul_gflops(*shape, False):4.0f} GFLOP/s", flush=True)

    flops = lstm_flops_per_sample(task.preset, task.num_classes)
    images, labels = synthetic(10240, task.num_classes)
    serve = make_serving_function(build_model(task.preset, task.num_classes), task.class_names, task.preset)
    serve(tf.constant(images[:1024]))
    rates = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        for i in range(0, len(images), 1024):
            serve(tf.constant(images[i:i + 1024]))["logits"].numpy()
        rates.append(len(images) / (time.perf_counter() - start))
    rate = statistics.median(rates)
    print(f"  serving function, batch 1024: {rate:,.0f} samples/s = {rate * flops / 1e9:.0f} GFLOP/s "
          f"({flops / 1e6:.0f} MFLOP a forward pass)", flush=True)

    made = training_steps(task)
    x = tf.constant(images[:256].astype(np.float32) / 255)
    y = tf.constant(labels[:256])
    weights = made["keras autodiff"][2].get_weights()
    made["custom gradient"][2].set_weights(weights)
    gradients = []
    for _, forward, model in made.values():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, forward(x, False)))
        gradients.append(tape.gradient(loss, model.trainable_variables))
    gap = max(float(tf.reduce_max(tf.abs(a - b))) for a, b in zip(*gradients))
    print(f"  training step, batch 256: largest gradient difference between the two {gap:.1e}")
    train_rates = {kind: [] for kind in made}
    for step, _, _ in made.values():
        step(x, y).numpy()
    for _ in range(args.rounds):
        for kind, (step, _, _) in made.items():
            start = time.perf_counter()
            for _ in range(20):
                loss = step(x, y)
            loss.numpy()
            train_rates[kind].append(20 * 256 / (time.perf_counter() - start))
    medians = {kind: statistics.median(r) for kind, r in train_rates.items()}
    for kind, r in medians.items():
        print(f"    {kind:16}: {r:5,.0f} samples/s = {3 * r * flops / 1e9:.0f} GFLOP/s (3 x forward); "
              f"rounds {', '.join(f'{v:,.0f}' for v in train_rates[kind])}")
    print(f"    ratio custom / keras: {medians['custom gradient'] / medians['keras autodiff']:.2f}")


if __name__ == "__main__":
    main()
