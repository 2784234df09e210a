"""Process-wide runtime settings against the defaults, for serving and training on this CPU.

Run: python benchmarks/runtime_settings.py {threads,xla,xla-fusions} [--tasks merged] [--rounds 3]

TensorFlow sizes its thread pools and XLA reads XLA_FLAGS once per process, so each setting
runs in a child process. The groups:

- threads: intra-op threads (one op's parallelism, XLA's included) and inter-op threads
  (ops run side by side, as the serving function's two halves are). A server sets the
  same pools (TF Serving: --tensorflow_intra_op_parallelism, --tensorflow_inter_op_parallelism).
- xla: XLA's CPU back-end options (`XLA_FLAGS=--help` lists them): YNNPACK for the
  matrix products, 512-bit vectors on AVX-512, fast math. Two more were tried with
  `--xla_dump_to` and left out because this TensorFlow build ignores them for our
  graphs: `--xla_cpu_use_onednn=true` (no oneDNN in the optimized HLO; the wheel's XLA is
  built without it) and `--xla_cpu_experimental_xnn_fusion_type=dot` (no XNNPACK fusion).
- xla-fusions: XLA's experimental hand-offs to XNNPACK and YNNPACK: XNNPACK's graph fusion
  (with and without its cost model), and both libraries' dot and element-wise fusions.

The settings alternate `rounds` times. Each child prints the serving rate of the exported
function at batch 1024, the training rate of `fit`, and the serving logits of a fixed
model; the best rate of each setting is printed with its ratio to the default, and the
largest logit difference from the default's (the export promises 1e-5).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

# name -> (intra-op threads, inter-op threads, XLA_FLAGS); 0 threads = TensorFlow's choice.
GROUPS = {
    "threads": {
        "default": (0, 0, ""),
        "intra 1, inter 2": (1, 2, ""),
        "intra 2, inter 1": (2, 1, ""),
        "intra 1, inter 1": (1, 1, ""),
    },
    "xla": {
        "default": (0, 0, ""),
        "YNNPACK dots": (0, 0, "--xla_cpu_experimental_ynn_fusion_type=dot"),
        "512-bit vectors": (0, 0, "--xla_cpu_prefer_vector_width=512"),
        "fast math": (0, 0, "--xla_cpu_enable_fast_math=true"),
        "512-bit vectors, fast math": (0, 0, "--xla_cpu_prefer_vector_width=512 --xla_cpu_enable_fast_math=true"),
    },
    "xla-fusions": {
        "default": (0, 0, ""),
        "XNNPACK graph fusion": (0, 0, "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY"),
        "XNNPACK graph, no cost model": (
            0, 0, "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_BYPASS_COST_MODEL"),
        "XNNPACK dot, eltwise": (0, 0, "--xla_cpu_experimental_xnn_fusion_type=dot,eltwise"),
        "YNNPACK dot, eltwise": (0, 0, "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise"),
    },
}

CHILD = """
import json, sys, time
import keras
import tensorflow as tf
intra, inter, task_name, steps = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
tf.config.threading.set_intra_op_parallelism_threads(intra)
tf.config.threading.set_inter_op_parallelism_threads(inter)
from tf_emnist.bench import synthetic, training_samples_per_s
from tf_emnist.export import make_serving_function
from tf_emnist.model import build_model
from tf_emnist.tasks import get_task
task = get_task(task_name)
config = task.preset
images, labels = synthetic(4096, task.num_classes)
keras.utils.set_random_seed(0)
serve = make_serving_function(build_model(config, task.num_classes), task.class_names, config)
batch = tf.constant(images[:1024])
logits = serve(batch)["logits"].numpy()
times = []
for _ in range(5):
    start = time.perf_counter(); serve(batch)["logits"].numpy(); times.append(time.perf_counter() - start)
train = training_samples_per_s(config, images, labels, steps=steps) if steps else 0.0
print(json.dumps({"serving": 1024 / min(times), "training": train, "logits": logits[:256].tolist()}))
"""


def measure(intra: int, inter: int, xla_flags: str, task: str, steps: int) -> dict:
    root = os.path.join(os.path.dirname(__file__), "..")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": root}
    env["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS", ""), xla_flags]))
    out = subprocess.run([sys.executable, "-c", CHILD, str(intra), str(inter), task, str(steps)],
                         capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("group", choices=sorted(GROUPS))
    parser.add_argument("--tasks", nargs="+", default=["merged"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=15, help="training steps a child times (0: serving only)")
    args = parser.parse_args()
    settings = GROUPS[args.group]
    for task in args.tasks:
        best = {name: {"serving": 0.0, "training": 0.0} for name in settings}
        logits = {}
        for _ in range(args.rounds):
            for name, (intra, inter, flags) in settings.items():
                figures = measure(intra, inter, flags, task, args.steps)
                logits[name] = np.asarray(figures.pop("logits"))
                best[name] = {k: max(best[name][k], v) for k, v in figures.items()}
        print(f"{task}: best of {args.rounds} rounds, samples/s (ratio to the default)")
        for name, figures in best.items():
            training = (f"training {figures['training']:6.0f} ({figures['training'] / best['default']['training']:.2f}x)"
                        if args.steps else "training not measured")
            print(f"  {name:28s} serving at batch 1024 {figures['serving']:8.0f} "
                  f"({figures['serving'] / best['default']['serving']:.2f}x)   {training}   "
                  f"largest logit difference {np.abs(logits[name] - logits['default']).max():.1e}")


if __name__ == "__main__":
    main()
