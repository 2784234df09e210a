"""tf-emnist's LSTM kernel against an earlier revision of it, training the same model.

Run: python benchmarks/kernel_revisions.py TASK --against REV [--rounds 6] [--steps 30]
     (output kept in results/kernel_revisions-*.txt)

REV is a git revision of this repository: its tf_emnist/lstm_kernel.py is loaded beside the
current one, and the two alternate in one process, the order flipping every round, through the
benchmark's own training measure (Keras fit after a warm-up), in the dtype the CPU's default
picks (`--no-bf16-gradients` forces float32). A revision whose kernel takes time-major input
and halves the batch inside `lstm_function` (before the sixteenth session) is run that way.
"""
from __future__ import annotations

import importlib.util
import inspect
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = os.path.join(os.path.dirname(__file__), "..")


def load_revision(rev: str):
    """The module tf_emnist/lstm_kernel.py as it was at git revision `rev`."""
    source = subprocess.run(["git", "show", f"{rev}:tf_emnist/lstm_kernel.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = os.path.join(tempfile.mkdtemp(), f"lstm_kernel_{rev}.py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location(f"lstm_kernel_{rev}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def in_parts_of(module):
    """`lstm_in_parts` as the revision computes it: its own, or its time-major `lstm_function` with halves."""
    import tensorflow as tf

    if hasattr(module, "lstm_in_parts"):
        def three_outputs(*args, **kwargs):  # (hs, c_last) at 0c70d5f; (last h, hs, c_last) since
            outputs = module.lstm_in_parts(*args, **kwargs)
            return outputs if len(outputs) == 3 else (outputs[0][:, -1], *outputs)

        return three_outputs

    def lstm_in_parts(sequences, h0, c0, kernel, recurrent_kernel, bias, matmul_dtype="bfloat16", halves=True):
        options = {"halves": halves} if "halves" in inspect.signature(module.lstm_function).parameters else {}
        lstm = module.lstm_function(matmul_dtype, **options)
        hs, c_last = lstm(tf.transpose(sequences, (1, 0, 2)), h0, c0, kernel, recurrent_kernel, bias)
        return hs[-1], tf.transpose(hs, (1, 0, 2)), c_last

    return lstm_in_parts


def main() -> None:
    import argparse
    import functools

    from tf_emnist import lstm_kernel
    from tf_emnist.bench import alternate, alternating_args, cpu_name, median_ratio, synthetic, training_samples_per_s
    from tf_emnist.model import kernel_matmul_dtype
    from tf_emnist.tasks import get_task

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--against", required=True)
    parser.add_argument("--no-bf16-gradients", action="store_true")
    extra, rest = parser.parse_known_args()
    args = alternating_args(__doc__.splitlines()[0], rest)

    task = get_task(args.task)
    config = task.preset.replace(lstm_kernel=True, bf16_gradients=False if extra.no_bf16_gradients else None)
    current = lstm_kernel.lstm_in_parts
    variants = {f"kernel at {extra.against}": in_parts_of(load_revision(extra.against)), "kernel now": current}

    def measure(in_parts):
        lstm_kernel.lstm_in_parts = in_parts  # looked up when the model's train step is traced
        try:
            return training_samples_per_s(config, images, labels, steps=args.steps)
        finally:
            lstm_kernel.lstm_in_parts = current

    images, labels = synthetic(10240, task.num_classes)
    print(f"CPU: {cpu_name()}; {args.task} ({task.preset.num_layers} x {task.preset.hidden_dim} LSTM), "
          f"kernel matmuls in {kernel_matmul_dtype(config)}, {args.steps} steps of batch {task.preset.batch_size}, "
          "samples/s")
    rates = alternate({name: functools.partial(measure, fn) for name, fn in variants.items()}, args.rounds)
    print(median_ratio(rates))


if __name__ == "__main__":
    main()
