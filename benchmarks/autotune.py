"""Keras fit with tf.data's autotuner on and off: epoch times, and the input pipeline alone.

Run: python benchmarks/autotune.py [--task digit-letter] [--steps 100] [--epochs 3] [--rounds 2]
     (output kept in results/autotune.txt)

tf-emnist's training pipeline (`make_dataset`) turns tf.data's autotuner off. The
autotuner re-plans the pipeline on a timer that starts at 10 ms and doubles. On this
2-core CPU, with it on, a Keras epoch that ended between two of its rounds often took
until the next one: fits of 30 steps then lasted exactly 5.12 s or 10.24 s, whatever
their work. This script trains the study's model on synthetic data, epochs of `--steps`
steps over a finite dataset as `train` runs them, alternating the two settings in one
process, and prints every epoch's seconds.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def with_autotune(ds, enabled: bool):
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = enabled
    return ds.with_options(options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="digit-letter", choices=["digit-letter", "merged"])
    parser.add_argument("--steps", type=int, default=100, help="steps an epoch")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    import keras

    from tf_emnist.bench import cpu_name, synthetic
    from tf_emnist.data import make_dataset
    from tf_emnist.model import build_model, compile_model, describe_lstm_training
    from tf_emnist.tasks import get_task

    task = get_task(args.task)
    config = task.preset
    images, labels = synthetic(args.steps * config.batch_size, task.num_classes)
    ds = make_dataset(images, labels, config.batch_size, training=True)
    model = compile_model(build_model(config, task.num_classes), config, track_batch_loss=True)
    model.fit(ds.take(5), epochs=1, verbose=0)  # compile
    print(f"CPU: {cpu_name()}; {args.task}, {args.steps} steps an epoch of batch {config.batch_size}, "
          f"{describe_lstm_training(config)}")

    class EpochTimes(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self.start)

    seconds = {True: [], False: []}
    for round_ in range(args.rounds):
        for enabled in (True, False) if round_ % 2 == 0 else (False, True):
            times = EpochTimes()
            times.seconds = []
            model.fit(with_autotune(ds, enabled), epochs=args.epochs, verbose=0, callbacks=[times])
            seconds[enabled] += times.seconds
            print(f"  autotuner {'on ' if enabled else 'off'}: epochs of {', '.join(f'{s:.2f}' for s in times.seconds)} s",
                  flush=True)
    for enabled in (True, False):
        s = seconds[enabled]
        print(f"autotuner {'on ' if enabled else 'off'}: median epoch {statistics.median(s):.2f} s, "
              f"max {max(s):.2f} s, {args.steps * config.batch_size / statistics.median(s):,.0f} samples/s")

    for enabled in (True, False):
        pipeline = with_autotune(ds, enabled)
        for _ in pipeline.take(5):
            pass
        start = time.perf_counter()
        for _ in range(2):
            for _ in pipeline:
                pass
        rate = 2 * len(labels) / (time.perf_counter() - start)
        print(f"input pipeline alone, autotuner {'on ' if enabled else 'off'}: {rate:,.0f} samples/s")


if __name__ == "__main__":
    main()
