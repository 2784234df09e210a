"""TensorFlow's thread pools against the defaults, for serving and training on this CPU.

Run: python benchmarks/threads.py [--tasks merged] [--rounds 3]

TensorFlow sizes its pools when it starts, so each setting runs in a child process:
intra-op threads (one op's parallelism, XLA's included) and inter-op threads (ops run side
by side, as the serving function's two halves are). The settings alternate `rounds` times;
each child prints the serving rate of the exported function at batch 1024 and the
training rate of `fit`; the best of each setting is printed with its ratio to the
default. A server sets the same pools (TF Serving: --tensorflow_intra_op_parallelism,
--tensorflow_inter_op_parallelism).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

SETTINGS = {"default": (0, 0), "intra 1, inter 2": (1, 2), "intra 2, inter 1": (2, 1), "intra 1, inter 1": (1, 1)}

CHILD = """
import json, sys, time
import numpy as np
import tensorflow as tf
intra, inter, task_name = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
tf.config.threading.set_intra_op_parallelism_threads(intra)
tf.config.threading.set_inter_op_parallelism_threads(inter)
from tf_emnist.bench import synthetic, training_samples_per_s
from tf_emnist.export import make_serving_function
from tf_emnist.model import build_model
from tf_emnist.tasks import get_task
task = get_task(task_name)
config = task.preset
images, labels = synthetic(4096, task.num_classes)
serve = make_serving_function(build_model(config, task.num_classes), task.class_names, config)
batch = tf.constant(images[:1024])
serve(batch)
times = []
for _ in range(5):
    start = time.perf_counter(); serve(batch)["logits"].numpy(); times.append(time.perf_counter() - start)
train = training_samples_per_s(config, images, labels, steps=15)
print(json.dumps({"serving": 1024 / min(times), "training": train}))
"""


def measure(intra: int, inter: int, task: str) -> dict:
    root = os.path.join(os.path.dirname(__file__), "..")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": root}
    out = subprocess.run([sys.executable, "-c", CHILD, str(intra), str(inter), task], capture_output=True,
                         text=True, env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["merged"])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    for task in args.tasks:
        best = {name: {"serving": 0.0, "training": 0.0} for name in SETTINGS}
        for _ in range(args.rounds):
            for name, (intra, inter) in SETTINGS.items():
                figures = measure(intra, inter, task)
                best[name] = {k: max(best[name][k], v) for k, v in figures.items()}
        print(f"{task}: best of {args.rounds} rounds, samples/s (ratio to the default)")
        for name, figures in best.items():
            print(f"  {name:18s} serving at batch 1024 {figures['serving']:8.0f} "
                  f"({figures['serving'] / best['default']['serving']:.2f}x)   "
                  f"training {figures['training']:6.0f} ({figures['training'] / best['default']['training']:.2f}x)")


if __name__ == "__main__":
    main()
