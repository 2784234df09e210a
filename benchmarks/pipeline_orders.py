"""The order of cache / shuffle / batch / map in tf.data: speed and memory of each, on a full-size split.

Run: python benchmarks/pipeline_orders.py [--examples 697932] [--epochs 2]

Each pipeline runs in its own process over the same synthetic uint8 split of ByMerge's
train size and yields what training consumes: shuffled batches of 256, upright, float32
in [0, 1], with their labels. Printed: samples/s over whole epochs after one warm-up
epoch, and the process's peak RSS (VmHWM). The pipelines:

- tf-emnist: the indices are shuffled in numpy; each batch is gathered from the uint8
  array, then transposed and scaled as a batch (`tf_emnist.data.make_dataset`).
- batch-map: from_tensor_slices of the arrays, cache, shuffle (a full-size buffer),
  batch, then map on the batch.
- map-batch: the same, but mapped per image before batching.
- map-cache: mapped per image first and cached as float32, then shuffle and batch.

The last three keep tf.data's defaults (its autotuner on), as a user's pipeline would.
"""
import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

ORDERS = ("tf-emnist", "batch-map", "map-batch", "map-cache")


def dataset(order: str, images, labels, batch: int = 256):
    import tensorflow as tf

    from tf_emnist.data import make_dataset, to_model_input

    if order == "tf-emnist":
        return make_dataset(images, labels, batch, training=True)
    ds = tf.data.Dataset.from_tensor_slices((images, labels))

    def scale(x, y):  # what to_model_input does to a batch, for a batch or one image
        return (to_model_input(x) if x.shape.rank == 3 else tf.cast(tf.transpose(x), tf.float32) / 255.0), y

    options = {"num_parallel_calls": tf.data.AUTOTUNE}
    if order == "batch-map":
        ds = ds.cache().shuffle(len(labels), seed=0).batch(batch).map(scale, **options)
    elif order == "map-batch":
        ds = ds.cache().shuffle(len(labels), seed=0).map(scale, **options).batch(batch)
    elif order == "map-cache":
        ds = ds.map(scale, **options).cache().shuffle(len(labels), seed=0).batch(batch)
    else:
        raise ValueError(f"unknown order {order!r}; choose one of: {', '.join(ORDERS)}")
    return ds.prefetch(tf.data.AUTOTUNE)


def measure(order: str, examples: int, epochs: int) -> dict:
    """In this process: samples/s of `epochs` epochs after a warm-up epoch (which fills any cache), and peak RSS."""
    from tf_emnist.bench import peak_rss_mb, synthetic

    images, labels = synthetic(examples, 47)
    ds = dataset(order, images, labels)
    for _ in ds:  # warm-up epoch: fills the cache and the shuffle buffer once
        pass
    start = time.perf_counter()
    for _ in range(epochs):
        for _ in ds:
            pass
    return {"order": order, "samples_per_s": epochs * examples / (time.perf_counter() - start),
            "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=697_932, help="images in the split (default: ByMerge train)")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per pipeline (after a warm-up epoch)")
    parser.add_argument("--only", choices=ORDERS, help=argparse.SUPPRESS)  # the child process's pipeline
    args = parser.parse_args()
    if args.only:
        print(json.dumps(measure(args.only, args.examples, args.epochs)))
        return
    print(f"{args.examples:,} synthetic images, batches of 256, {args.epochs} epochs after a warm-up epoch")
    print(f"{'pipeline':<12}{'samples/s':>12}{'peak RSS, MB':>15}")
    for order in ORDERS:
        run = subprocess.run([sys.executable, __file__, "--only", order, "--examples", str(args.examples),
                              "--epochs", str(args.epochs)], capture_output=True, text=True, check=True,
                             env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        row = json.loads(run.stdout.strip().splitlines()[-1])
        print(f"{order:<12}{row['samples_per_s']:>12,.0f}{row['peak_rss_mb']:>15,.0f}", flush=True)


if __name__ == "__main__":
    main()
