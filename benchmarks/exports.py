"""Serving speed of exports as shipped: samples/s at batch 1024 and one-image latency, alternating.

Run: python benchmarks/exports.py saved_models/merged-tflite/1 saved_models/merged-tflite/2

Any exports (SavedModel or TFLite) or run directories, as `tf-emnist predict` takes them;
`tf-emnist bench` measures untrained study-preset models instead. Each export runs 8,192
random images in batches of 1024, and one image 50 times; 3 rounds, medians printed.
"""
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main(paths: list[str], rounds: int = 3) -> None:
    import numpy as np

    from tf_emnist.export import load_source

    images = np.random.default_rng(0).integers(0, 256, (8192, 28, 28), dtype=np.uint8)
    serving = {path: load_source(path).serving_function(stored_orientation=False) for path in paths}
    rates, latencies = {p: [] for p in paths}, {p: [] for p in paths}
    for _ in range(rounds):
        for path, serve in serving.items():
            serve(images=images[:1024])  # compile / allocate
            start = time.perf_counter()
            for i in range(0, len(images), 1024):
                serve(images=images[i: i + 1024])
            rates[path].append(len(images) / (time.perf_counter() - start))
            times = []
            for _ in range(50):
                start = time.perf_counter()
                serve(images=images[:1])
                times.append(time.perf_counter() - start)
            latencies[path].append(1000 * statistics.median(times))
    for path in paths:
        print(f"{path}: {statistics.median(rates[path]):,.0f} samples/s at batch 1024, "
              f"{statistics.median(latencies[path]):.2f} ms for one image")


if __name__ == "__main__":
    main(sys.argv[1:])
