"""How close the LSTM runs to this CPU's matmul limit, and one more training lever.

Run: python benchmarks/cpu_ceiling.py [--rounds 4]   (output kept in results/cpu_ceiling.txt)

1. A plain float32 matmul at the LSTM's shapes (batch 512: one half of the serving batch)
   and at 4096^3, XLA and not: the most this CPU does with TensorFlow. When PyTorch is
   installed, torch.mm at the same shapes too: the matmul library the yardstick trains on.
2. The exported serving function (XLA, batch 1024 in two halves) in GFLOP/s, counting
   2 * 4h * (inputs + h) multiply-adds per step and layer, 28 steps.
3. Training the study's merged model (Keras fit, as `train` runs it): Keras's LSTM with
   the whole step in XLA, against tf-emnist's LSTM kernel (tf_emnist/lstm_kernel.py) with
   its large matmuls in float32, then in bfloat16 (the default on CPUs whose
   bfloat16 matmuls measure faster: tf_emnist.lstm_kernel.bf16_matmul_pays).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

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


def matmul_gflops(m: int, k: int, n: int, jit: bool, dtype: str = "float32") -> float:
    import tensorflow as tf

    a, b = tf.cast(tf.random.normal([m, k]), dtype), tf.cast(tf.random.normal([k, n]), dtype)
    fn = tf.function(lambda a, b: tf.matmul(a, b), jit_compile=jit)
    fn(a, b).numpy()
    repeats = max(3, int(2e10 / (2 * m * k * n)))
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn(a, b)
    out.numpy()
    return 2 * m * k * n * repeats / (time.perf_counter() - start) / 1e9


def torch_matmul_gflops(m: int, k: int, n: int) -> float | None:
    """PyTorch's float32 torch.mm at the same shape, timed as above; None without PyTorch."""
    try:
        import torch
    except ImportError:
        return None
    a, b = torch.randn(m, k), torch.randn(k, n)
    a @ b
    repeats = max(3, int(2e10 / (2 * m * k * n)))
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * m * k * n * repeats / (time.perf_counter() - start) / 1e9


def training_rates(task, images, labels, rounds: int) -> dict:
    """Training samples/s of the merged preset with Keras's LSTM under XLA and with tf-emnist's kernel."""
    from tf_emnist.bench import training_samples_per_s

    variants = {"keras, XLA": {"lstm_kernel": False}, "kernel, float32": {"lstm_kernel": True, "bf16_gradients": False},
                "kernel, bfloat16": {"lstm_kernel": True, "bf16_gradients": True}}
    rates = {name: [] for name in variants}
    for _ in range(rounds):
        for name, options in variants.items():
            rates[name].append(training_samples_per_s(task.preset.replace(**options), images, labels, steps=20))
    return rates


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
    # Batch 256 is a training step's recurrence (forward, then backward); batch 512 half a serving batch.
    shapes = ((256, 256, 1024), (256, 1024, 256), (512, 28, 1024), (512, 256, 1024), (512, 512, 1024),
              (14336, 256, 1024), (4096, 4096, 4096))
    for shape in shapes:
        torch_rate = torch_matmul_gflops(*shape)
        print(f"  matmul {'x'.join(map(str, shape)):>16}: XLA {matmul_gflops(*shape, True):4.0f} GFLOP/s, "
              f"plain {matmul_gflops(*shape, False):4.0f} GFLOP/s, "
              f"XLA bfloat16 {matmul_gflops(*shape, True, 'bfloat16'):4.0f} GFLOP/s, "
              f"plain bfloat16 (oneDNN) {matmul_gflops(*shape, False, 'bfloat16'):4.0f} GFLOP/s"
              + (f", PyTorch float32 {torch_rate:4.0f} GFLOP/s" if torch_rate else ""), flush=True)

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

    rates = training_rates(task, images, labels, args.rounds)
    medians = {name: statistics.median(r) for name, r in rates.items()}
    print("  training, batch 256 (Keras fit):")
    for name, r in medians.items():
        print(f"    {name:16}: {r:5,.0f} samples/s = {3 * r * flops / 1e9:.0f} GFLOP/s (3 x forward); "
              f"{medians[name] / medians['keras, XLA']:.2f}x Keras; rounds {', '.join(f'{v:,.0f}' for v in rates[name])}")


if __name__ == "__main__":
    main()
