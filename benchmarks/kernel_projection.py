"""The LSTM kernel's forward input projection in bfloat16 (the default) against float32.

Run: python benchmarks/kernel_projection.py TASK [--rounds 6] [--steps 30]
     (output kept in results/kernel_projection.txt)

tf-emnist's LSTM kernel (tf_emnist/lstm_kernel.py) runs four large matmuls over all 28
steps outside XLA: the forward pass's input projection and three in the backward pass.
Until the thirteenth session the projection stayed float32 while the other three ran in
bfloat16. This script measures what the bfloat16 projection gains: the two alternate in one
process, the order flipping every round, through the benchmark's own training measure
(Keras fit after a warm-up), the rest of the kernel in bfloat16 in both.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

VARIANTS = ("float32", "bfloat16")  # the forward input projection's dtype


def main() -> None:
    import tf_emnist.lstm_kernel as lstm_kernel
    from tf_emnist.bench import (alternate, alternating_args, cpu_name, median_ratio, synthetic,
                                 training_samples_per_s)
    from tf_emnist.tasks import get_task

    args = alternating_args(__doc__.splitlines()[0])

    # KernelLSTM looks lstm_function up at trace time, and each measure builds a new model.
    projection = {"dtype": None}
    kernel_function = lstm_kernel.lstm_function
    lstm_kernel.lstm_function = lambda matmul_dtype, **options: kernel_function(matmul_dtype, projection["dtype"], **options)

    task = get_task(args.task)
    images, labels = synthetic(10240, task.num_classes)
    config = task.preset.replace(lstm_kernel=True, bf16_gradients=True)
    print(f"CPU: {cpu_name()}; {args.task} ({task.preset.num_layers} x {task.preset.hidden_dim} LSTM), "
          f"{args.steps} steps of batch {task.preset.batch_size}, samples/s, by the input projection's dtype")

    def measure(dtype):
        def run():
            projection["dtype"] = dtype
            return training_samples_per_s(config, images, labels, steps=args.steps)
        return run

    print(median_ratio(alternate({dtype: measure(dtype) for dtype in VARIANTS}, args.rounds)))


if __name__ == "__main__":
    main()
