#!/usr/bin/env python3
"""GPU benchmark on Keras's JAX backend beside the study's PyTorch model: seconds per full ByMerge epoch.

Runs with PyTorch, JAX and Keras alone (no TensorFlow): both presets at full size (697,932
synthetic images of EMNIST's shape) and batch 256, float32. The GPU is warmed first; then, for
each preset, every round times, in an order that flips each round:

- `torch`: the study's model (benchmarks/seed_torch_lstm.py) and training loop, cuDNN, the data
  on the GPU;
- `keras_fit`: tf-emnist's training as `train` runs it (Keras fit over numpy batches);
- `keras_fit_spe8`: the same, 8 steps to one compiled call (steps_per_execution), fewer
  round trips between host and GPU;
- `keras_fit_device_data`: the same, the images on the GPU already, each batch gathered there;
- `jax_step`: a bare jitted step of the same model (Keras's stateless_call, its optimizer's
  stateless_apply) on data on the GPU, no fit loop: what the device alone needs.

Each figure is a slice of an epoch scaled to the whole; the medians of the rounds and their
ratios over torch are printed, then where a step's time goes (jitted forward, forward and
backward, and the whole step, in ms) and a JSON line of everything.

Usage: python scripts/gpu_check.py [--rounds 3] [--fraction 0.2]
       python scripts/gpu_check.py --smoke   (2,048 images, 16 units: checks on any machine that it runs)
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from tf_emnist.backend import select_backend  # noqa: E402

select_backend("jax")

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

from tf_emnist.bench import FULL_TRAIN, synthetic  # noqa: E402
from tf_emnist.data import Batches  # noqa: E402
from tf_emnist.model import build_model, compile_model  # noqa: E402
from tf_emnist.tasks import get_task  # noqa: E402
from tf_emnist.training import fit_model  # noqa: E402

BATCH = 256


def keras_model(config, num_classes: int, steps_per_execution: int = 1):
    return compile_model(build_model(config, num_classes), config, track_batch_loss=True,
                         steps_per_execution=steps_per_execution)


def keras_fit_seconds(config, images, labels, steps: int, *, steps_per_execution: int = 1, on_device=False):
    """Seconds for `steps` steps of Keras fit (after a warm-up fit that compiles)."""
    model = keras_model(config, get_task(config.task).num_classes, steps_per_execution)
    batches = Batches(images, labels, BATCH, training=True)
    if on_device:
        batches = DeviceBatches(batches)
    warm = max(2, steps_per_execution)
    fit_model(model, config.replace(epochs=1), Slice(batches, warm), verbose=0)
    start = time.perf_counter()
    fit_model(model, config.replace(epochs=1), Slice(batches, steps), verbose=0)
    return time.perf_counter() - start


class Slice:
    """The first `steps` batches of `batches`."""

    def __init__(self, batches, steps):
        self.batches, self.steps = batches, min(steps, len(batches))

    def __len__(self):
        return self.steps

    def __getitem__(self, step):
        return self.batches[step]

    def set_epoch(self, epoch):
        self.batches.set_epoch(epoch)

    classes = None


class DeviceBatches:
    """Batches whose images wait on the accelerator: each batch is gathered there (no copy per step)."""

    def __init__(self, batches):
        self.batches = batches
        self.images = jax.device_put(batches.images.transpose(0, 2, 1).astype(np.float32) / 255.0)
        self.labels = jax.device_put(batches.labels)

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, step):
        index = jax.device_put(self.batches.indices(step))
        return self.images[index], self.labels[index]

    def set_epoch(self, epoch):
        self.batches.set_epoch(epoch)

    classes = None


def jax_step_seconds(config, images, labels, steps: int) -> dict:
    """A bare jitted training step of the Keras model on data on the device: seconds for `steps` of it, and
    the milliseconds of its parts (forward; forward and backward; the whole step)."""
    num_classes = get_task(config.task).num_classes
    model = keras_model(config, num_classes)
    optimizer, loss_fn = model.optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    optimizer.build(model.trainable_variables)
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    opt_state = [v.value for v in optimizer.variables]
    x = jax.device_put(images[:BATCH * 8].astype(np.float32) / 255.0)
    y = jax.device_put(labels[:BATCH * 8])

    def loss(trainable, non_trainable, xb, yb):
        logits, non_trainable = model.stateless_call(trainable, non_trainable, xb, training=True)
        return loss_fn(yb, logits), non_trainable

    forward = jax.jit(lambda t, n, xb, yb: loss(t, n, xb, yb)[0])
    backward = jax.jit(jax.grad(lambda t, n, xb, yb: loss(t, n, xb, yb)[0]))

    @jax.jit
    def step(trainable, non_trainable, opt_state, xb, yb):
        (_, non_trainable), grads = jax.value_and_grad(loss, has_aux=True)(trainable, non_trainable, xb, yb)
        trainable, opt_state = optimizer.stateless_apply(opt_state, grads, trainable)
        return trainable, non_trainable, opt_state

    def timed(fn, *args, repeat):
        jax.block_until_ready(fn(*args))
        start = time.perf_counter()
        for i in range(repeat):
            out = fn(*args)
        jax.block_until_ready(out)
        return (time.perf_counter() - start) / repeat

    xb, yb = x[:BATCH], y[:BATCH]
    parts = {"forward_ms": 1000 * timed(forward, trainable, non_trainable, xb, yb, repeat=20),
             "forward_backward_ms": 1000 * timed(backward, trainable, non_trainable, xb, yb, repeat=20)}
    state = step(trainable, non_trainable, opt_state, xb, yb)  # compile
    jax.block_until_ready(state)
    start = time.perf_counter()
    for i in range(steps):
        state = step(*state, x[(i % 8) * BATCH:(i % 8 + 1) * BATCH], y[(i % 8) * BATCH:(i % 8 + 1) * BATCH])
    jax.block_until_ready(state)
    seconds = time.perf_counter() - start
    parts["step_ms"] = 1000 * seconds / steps
    return {"seconds": seconds, **parts}


def torch_seconds(preset: dict, images, labels, steps: int):
    """Seconds for `steps` steps of the study's PyTorch training loop, its data on the GPU (else None)."""
    try:
        import torch
    except ImportError:
        return None
    spec = importlib.util.spec_from_file_location("seed", os.path.join(ROOT, "benchmarks", "seed_torch_lstm.py"))
    seed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = seed.SeedLSTM(preset["hidden"], preset["layers"], preset["classes"]).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 2, 1))).float().div(255.0).to(device)
    y = torch.from_numpy(labels.astype(np.int64)).to(device)
    order = torch.randperm(len(x), device=device)

    def train(count):
        best = float("inf")
        for i in range(count):
            index = order[(i * BATCH) % (len(x) - BATCH):][:BATCH]
            loss = loss_fn(model(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            best = min(best, loss.item())  # the study's loop reads every batch's loss
        return best

    train(3)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    train(steps)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measures(name: str, images, labels, steps: int, smoke: bool) -> dict:
    """name -> f() giving seconds for `steps` steps (or None where it cannot run)."""
    task = get_task(name)
    config = task.preset.replace(backend="jax", jit_compile=True, **({"hidden_dim": 16} if smoke else {}))
    study = {"digit-letter": dict(classes=2, hidden=128, layers=3), "merged": dict(classes=47, hidden=256, layers=3)}
    preset = {**study[name], **({"hidden": 16} if smoke else {})}
    labels = labels % task.num_classes
    return {
        "torch": lambda: torch_seconds(preset, images, labels, steps),
        "keras_fit": lambda: keras_fit_seconds(config, images, labels, steps),
        "keras_fit_spe8": lambda: keras_fit_seconds(config, images, labels, steps, steps_per_execution=8),
        "keras_fit_device_data": lambda: keras_fit_seconds(config, images, labels, steps, on_device=True),
        "jax_step": lambda: jax_step_seconds(config, images, labels, steps),
    }


def warm_up(seconds: float) -> None:
    """Matmuls until the GPU has run at full clocks for a while (it idles low)."""
    a = jax.random.normal(jax.random.key(0), (4096, 4096))
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        a = jax.block_until_ready(a @ a / 64.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the medians are kept (default 3)")
    parser.add_argument("--fraction", type=float, default=0.2, help="share of an epoch each figure times")
    parser.add_argument("--smoke", action="store_true", help="a tiny run (2,048 images, 16 units) on any machine")
    args = parser.parse_args()
    examples = 2048 if args.smoke else FULL_TRAIN
    epoch_steps = -(-examples // BATCH)
    steps = 4 if args.smoke else max(50, int(epoch_steps * args.fraction))
    devices = jax.devices()
    print(f"devices: {[str(d) for d in devices]}, JAX {jax.__version__}, Keras {keras.__version__}", flush=True)
    warm_up(1 if args.smoke else 20)
    images, labels = synthetic(examples, 47)
    results = {"devices": [str(d) for d in devices], "examples": examples, "timed_steps": steps, "tasks": {}}
    for name in ("digit-letter", "merged"):
        timings = {k: [] for k in measures(name, images, labels, steps, args.smoke)}
        parts = []
        for round_ in range(args.rounds):
            order = list(measures(name, images, labels, steps, args.smoke).items())
            for key, measure in (order if round_ % 2 == 0 else order[::-1]):
                figure = measure()
                if isinstance(figure, dict):
                    parts.append({k: v for k, v in figure.items() if k != "seconds"})
                    figure = figure["seconds"]
                if figure is not None:
                    timings[key].append(figure * epoch_steps / steps)
            print(f"{name} round {round_ + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s/epoch" for k, v in timings.items()
                                                           if v), flush=True)
        results["tasks"][name] = summary(timings, parts)
    print(table(results))
    print(json.dumps(results))


def summary(timings: dict, parts: list[dict]) -> dict:
    row = {f"{k}_s_per_epoch": statistics.median(v) for k, v in timings.items() if v}
    if "torch_s_per_epoch" in row:
        for key in timings:
            if key != "torch" and f"{key}_s_per_epoch" in row:
                row[f"{key}_over_torch"] = row["torch_s_per_epoch"] / row[f"{key}_s_per_epoch"]
    for part in ("forward_ms", "forward_backward_ms", "step_ms"):
        row[part] = statistics.median(p[part] for p in parts)
    return row


def table(results: dict) -> str:
    keys = list(dict.fromkeys(k for row in results["tasks"].values() for k in row))
    lines = [f"{'figure':32}" + "".join(f"{name:>14}" for name in results["tasks"])]
    for key in keys:
        lines.append(f"{key:32}" + "".join(f"{row[key]:14.2f}" if key in row else f"{'-':>14}"
                                           for row in results["tasks"].values()))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
