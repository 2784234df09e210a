"""Training without fast bfloat16 matmuls: Keras's LSTM all in XLA against tf-emnist's kernel in float32.

Run: python benchmarks/kernel_float32.py TASK [--rounds 6] [--steps 30]
     (output kept in results/kernel_float32.txt, AMD EPYC, and results/kernel_float32-intel*.txt)

A CPU without fast bfloat16 matmuls (no AVX512-BF16 or AMX, or slow ones: `bf16_matmul_pays`)
trains tf-emnist's LSTM kernel (tf_emnist/lstm_kernel.py) with its large matmuls in float32,
through oneDNN. This script measures it against Keras's LSTM all in XLA (`--no-lstm-kernel`,
the default until the fifteenth session), and the kernel over the whole batch at once against
each half of the batch as its own LSTM, side by side (`lstm_kernel.BATCH_HALVES`, the
default; "one launch" and "halves" below, the names they had when halves split only the
recurrences). The variants alternate in one process, the order flipping every round, through the
benchmark's own training measure (Keras fit after a warm-up).
"""
from __future__ import annotations

import functools
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# name -> (config options, lstm_kernel.BATCH_HALVES)
VARIANTS = {"Keras's LSTM, all in XLA": ({"lstm_kernel": False}, False),
            "kernel, float32, one launch": ({"lstm_kernel": True, "bf16_gradients": False}, False),
            "kernel, float32, halves": ({"lstm_kernel": True, "bf16_gradients": False}, True)}


def measure(config, images, labels, steps: int, halves: bool) -> float:
    from tf_emnist import lstm_kernel
    from tf_emnist.bench import training_samples_per_s

    lstm_kernel.BATCH_HALVES = halves  # read when the model's train step is traced
    return training_samples_per_s(config, images, labels, steps=steps)


def main() -> None:
    from tf_emnist.bench import alternate, alternating_args, cpu_name, median_ratio, synthetic
    from tf_emnist.tasks import get_task

    args = alternating_args(__doc__.splitlines()[0])

    task = get_task(args.task)
    images, labels = synthetic(10240, task.num_classes)
    print(f"CPU: {cpu_name()}; {args.task} ({task.preset.num_layers} x {task.preset.hidden_dim} LSTM), "
          f"{args.steps} steps of batch {task.preset.batch_size}, samples/s")
    rates = alternate({name: functools.partial(measure, task.preset.replace(**options), images, labels, args.steps,
                                               halves)
                       for name, (options, halves) in VARIANTS.items()}, args.rounds)
    keras_, one_launch, halves = VARIANTS
    for pair in ((keras_, one_launch), (keras_, halves), (one_launch, halves)):
        print(median_ratio({name: rates[name] for name in pair}))


if __name__ == "__main__":
    main()
