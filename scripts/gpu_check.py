#!/usr/bin/env python3
"""GPU check (under 5 minutes on one GPU): epoch time of both presets on full-size synthetic data.

First, where training puts things: the device a batch reaches from the training strategy's
distributed dataset (the GPU, copied ahead of the step), and the dtypes of the LSTMs and the
logits under --mixed-precision (float16 and float32 on a GPU).

Then, for each preset: float32 with cuDNN, mixed precision (float16) with cuDNN, float32
without cuDNN (use_cudnn=False), and mixed precision at batch 1024 with the scaled rate,
each on a slice, scaled to an epoch. Prints a table and JSON. On a GPU the cuDNN rows build
their LSTMs with use_cudnn=True, so Keras raises instead of silently timing its fallback;
a row that fails holds its error, and the others still run.

Usage: python scripts/gpu_check.py [--fraction 0.25]
       python scripts/gpu_check.py --smoke   (2,048 images, 16 units: checks on any machine that it runs)
"""
import argparse
import json
import time

import numpy as np

from tf_emnist.bench import FULL_TRAIN, synthetic
from tf_emnist.data import make_dataset
from tf_emnist.model import build_model, compile_model, steps_per_epoch
from tf_emnist.tasks import get_task
from tf_emnist.training import distribution_strategy


def epoch_seconds(config, images, labels, *, use_cudnn="auto", max_steps=None):
    task = get_task(config.task)
    with distribution_strategy("default").scope():  # as training runs: batches copied to the GPU ahead of the step
        model = compile_model(build_model(config, task.num_classes, use_cudnn=use_cudnn), config)
    ds = make_dataset(images, labels, config.batch_size, training=True)
    model.fit(ds.take(10), verbose=0, shuffle=False)  # build, trace, warm up
    steps = steps_per_epoch(len(labels), config.batch_size)
    timed = min(steps, max_steps or steps)
    start = time.perf_counter()
    model.fit(ds.take(timed), verbose=0, shuffle=False)
    return (time.perf_counter() - start) * steps / timed


def placement(images, labels) -> dict:
    """Where a training batch lands, and the dtypes mixed precision trains in (merged preset)."""
    import keras

    config = get_task("merged").preset.replace(mixed_precision=True, jit_compile=False)
    strategy = distribution_strategy("default")
    batch, _ = next(iter(strategy.experimental_distribute_dataset(make_dataset(images, labels, 256, training=True))))
    with strategy.scope():
        model = build_model(config, get_task("merged").num_classes)
    lstm = next(layer for layer in model.layers if isinstance(layer, keras.layers.LSTM))
    return {"batch_device": batch.device, "strategy": type(strategy).__name__,
            "lstm_compute_dtype": lstm.compute_dtype, "lstm_variable_dtype": lstm.variable_dtype,
            "logits_dtype": model(batch[:2]).dtype.name}


def attempt(config, images, labels, **options):
    """epoch_seconds, or the error that stopped it in one line: a GPU run should report every row."""
    try:
        return epoch_seconds(config, images, labels, **options)
    except Exception as e:  # e.g. Keras refusing use_cudnn=True for a configuration
        return f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"


def main():
    import tensorflow as tf

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fraction", type=float, default=0.25, help="share of an epoch timed (then scaled)")
    parser.add_argument("--smoke", action="store_true", help="a tiny run (2,048 images, 16 units) that checks the script runs")
    args = parser.parse_args()
    examples = 2048 if args.smoke else FULL_TRAIN
    gpus = tf.config.list_logical_devices("GPU")
    print(f"GPUs: {[g.name for g in gpus]}, TensorFlow {tf.__version__}")
    cudnn = True if gpus else "auto"  # on a CPU (--smoke) there is no cuDNN to ask for
    rows = {"placement": placement(*synthetic(1024, get_task("merged").num_classes))}
    print("placement", rows["placement"], flush=True)
    for name in ("digit-letter", "merged"):
        task = get_task(name)
        images, labels = synthetic(examples, task.num_classes)
        steps = max(1, int(steps_per_epoch(examples, 256) * args.fraction))
        base = task.preset.replace(jit_compile=False, **({"hidden_dim": 16} if args.smoke else {}))
        row = {
            "float32_cudnn_s": attempt(base, images, labels, use_cudnn=cudnn, max_steps=steps),
            "mixed_float16_cudnn_s": attempt(base.replace(mixed_precision=True), images, labels,
                                             use_cudnn=cudnn, max_steps=steps),
            "float32_no_cudnn_s": attempt(base, images, labels, use_cudnn=False, max_steps=max(20, steps // 10)),
            # the large-batch option: 4x the batch, the rate scaled with it (--batch-size 1024 --scale-lr)
            "mixed_float16_batch1024_s": attempt(
                base.replace(mixed_precision=True, batch_size=1024, scale_lr=True), images, labels,
                use_cudnn=cudnn, max_steps=max(10, steps // 4)),
        }
        if isinstance(seconds := row["float32_cudnn_s"], float):
            row["samples_per_s_float32"] = examples / seconds
            row["study_epochs_min_float32"] = seconds * task.preset.epochs / 60
        rows[name] = row
        print(name, {k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    np.random.seed(0)
    main()
