"""Training on a CPU without fast bfloat16 matmuls: Keras's LSTM all in XLA against tf-emnist's kernel in float32.

Run: python benchmarks/kernel_float32.py TASK [--rounds 6] [--steps 30]
     (output kept in results/kernel_float32.txt, AMD EPYC, and results/kernel_float32-intel.txt)

A CPU without fast bfloat16 matmuls (no AVX512-BF16 or AMX, or slow ones: `bf16_matmul_pays`)
trains Keras's LSTM, all in XLA. tf-emnist's LSTM kernel
(tf_emnist/lstm_kernel.py) can run there too, its large matmuls in float32
through oneDNN (`--lstm-kernel --no-bf16-gradients`), whose float32 matmul beats XLA's dot
at those shapes. This script measures whether the whole training step gains, on any CPU.
The two alternate in one process, the order flipping every round, through the benchmark's
own training measure (Keras fit after a warm-up).
"""
from __future__ import annotations

import functools
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

VARIANTS = {"Keras's LSTM, all in XLA": {"lstm_kernel": False},
            "tf-emnist's kernel, float32": {"lstm_kernel": True, "bf16_gradients": False}}


def main() -> None:
    from tf_emnist.bench import (alternate, alternating_args, cpu_name, median_ratio, synthetic,
                                 training_samples_per_s)
    from tf_emnist.tasks import get_task

    args = alternating_args(__doc__.splitlines()[0])

    task = get_task(args.task)
    images, labels = synthetic(10240, task.num_classes)
    print(f"CPU: {cpu_name()}; {args.task} ({task.preset.num_layers} x {task.preset.hidden_dim} LSTM), "
          f"{args.steps} steps of batch {task.preset.batch_size}, samples/s")
    rates = alternate({name: functools.partial(training_samples_per_s, task.preset.replace(**options), images, labels,
                                               steps=args.steps)
                       for name, options in VARIANTS.items()}, args.rounds)
    print(median_ratio(rates))


if __name__ == "__main__":
    main()
