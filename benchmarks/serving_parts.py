"""Serving: the batch of 1024 classified in 1, 2 or 4 XLA launches at once, same process.

Run: python benchmarks/serving_parts.py merged   (or digit-letter)

The exported signature uses 2 parts (tf_emnist/export.py). This measures whether more
parts pay on this machine: the parts alternate 4 rounds and the median samples/s is printed.
"""
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main(task_name: str) -> None:
    import tensorflow as tf

    from tf_emnist.bench import synthetic
    from tf_emnist.model import build_model
    from tf_emnist.tasks import get_task

    task = get_task(task_name)
    model = build_model(task.preset, task.num_classes)
    images, _ = synthetic(10240, task.num_classes)

    def make(parts):
        @tf.function(jit_compile=True)
        def classify(x):
            return model(tf.transpose(tf.cast(x, tf.float32) / 255.0, [0, 2, 1]), training=False)

        @tf.function
        def serve(x):
            n = tf.shape(x)[0] // parts
            return tf.concat([classify(x[i * n:(i + 1) * n] if i < parts - 1 else x[i * n:])
                              for i in range(parts)], 0)
        return serve

    functions = {parts: make(parts) for parts in (1, 2, 4)}
    for serve in functions.values():
        serve(tf.constant(images[:1024]))  # compile
    rates = {parts: [] for parts in functions}
    for _ in range(4):
        for parts, serve in functions.items():
            start = time.perf_counter()
            for i in range(0, len(images), 1024):
                serve(tf.constant(images[i:i + 1024])).numpy()
            rates[parts].append(len(images) / (time.perf_counter() - start))
    print(task_name, "samples/s by parts:", {parts: round(statistics.median(r)) for parts, r in rates.items()})


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "merged")
