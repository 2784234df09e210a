"""Benchmark: tf-emnist beside the study's PyTorch yardstick, same shapes, same machine, one run."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

from tf_emnist.config import TrainConfig
from tf_emnist.tasks import get_task

FULL_TRAIN = 697_932  # images in ByMerge train: the memory goal's size
# The PyTorch yardstick: the study's model and training loop, shipped beside the benchmarks.
DEFAULT_BASELINE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                                "seed_torch_lstm.py")


def cpu_name() -> str:
    """The CPU and its core count, for the benchmark's header."""
    from tf_emnist.runs import cpu_name as model_name

    return f"{model_name()} ({os.cpu_count()} cores)"


def synthetic(n: int, num_classes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, num_classes, n).astype(np.int32)


def pipeline_samples_per_s(images, labels, batch_size: int, epochs: int = 2) -> float:
    """The input pipeline alone, as training feeds it (shuffle, gather, transpose, scale; tf.data on
    TensorFlow, numpy batches elsewhere)."""
    from tf_emnist.data import Batches
    from tf_emnist.feeding import feed

    batches = Batches(images, labels, batch_size, training=True)
    fed = feed(batches)
    for _, _ in zip(range(5), fed):  # warm up
        pass
    start = time.perf_counter()
    for epoch in range(epochs):
        batches.set_epoch(epoch)
        for _ in fed:
            pass
    return epochs * len(labels) / (time.perf_counter() - start)


def training_samples_per_s(config: TrainConfig, images, labels, steps: int, warmup: int = 5) -> float:
    """Steady-state Keras training (compile + fit, as `train` runs it) after `warmup` steps, on the backend
    this process runs."""
    from tf_emnist.data import Batches
    from tf_emnist.model import build_model, compile_model
    from tf_emnist.training import fit_model

    task = get_task(config.task)
    model = compile_model(build_model(config, task.num_classes), config, track_batch_loss=True)
    batches = Batches(images[:warmup * config.batch_size], labels[:warmup * config.batch_size], config.batch_size,
                      training=True)
    fit_model(model, config.replace(epochs=1), batches, verbose=0)
    batches = Batches(images[:steps * config.batch_size], labels[:steps * config.batch_size], config.batch_size,
                      training=True)
    start = time.perf_counter()
    fit_model(model, config.replace(epochs=1), batches, verbose=0)
    return len(batches) * config.batch_size / (time.perf_counter() - start)


def backend_training_samples_per_s(backend: str, config: TrainConfig, steps: int) -> float:
    """training_samples_per_s on another Keras backend, in a process of its own (a process runs one)."""
    code = ("import json, sys; from tf_emnist.backend import select_backend; select_backend(sys.argv[1])\n"
            "from tf_emnist.bench import synthetic, training_samples_per_s\n"
            "from tf_emnist.config import TrainConfig; from tf_emnist.tasks import get_task\n"
            "config = TrainConfig(**json.loads(sys.argv[2])); steps = int(sys.argv[3])\n"
            "images, labels = synthetic(max(steps, 40) * config.batch_size, get_task(config.task).num_classes)\n"
            "print(json.dumps(training_samples_per_s(config, images, labels, steps)))\n")
    settings = config.replace(backend=backend, jit_compile=None, lstm_kernel=None, bf16_gradients=None).to_dict()
    run = subprocess.run([sys.executable, "-c", code, backend, json.dumps(settings), str(steps)],
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"})
    return float(run.stdout.strip().splitlines()[-1])


def alternating_args(description: str, argv=None):
    """The command line of a benchmark that alternates training variants: TASK, --rounds, --steps."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("task", choices=["digit-letter", "merged"])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=30, help="timed training steps a measure")
    return parser.parse_args(argv)


def alternate(measures: dict, rounds: int) -> dict[str, list[float]]:
    """Run each of `measures` (name -> a function returning samples/s) once a round, the order flipping
    every round so that neither side always runs first; print each round. Returns name -> its figures."""
    rates = {name: [] for name in measures}
    for round_ in range(rounds):
        for name in measures if round_ % 2 == 0 else reversed(measures):
            rates[name].append(measures[name]())
        print(f"  round {round_ + 1}: " + ", ".join(f"{name} {r[-1]:,.0f}" for name, r in rates.items()), flush=True)
    return rates


def median_ratio(rates: dict[str, list[float]]) -> str:
    """The line that sums up `alternate` over two measures: both medians, the second over the first, and
    the same ratio round by round."""
    (first, base), (second, other) = rates.items()
    pairs = ", ".join(f"{b / a:.2f}" for a, b in zip(base, other))
    return (f"median: {first} {statistics.median(base):,.0f}, {second} {statistics.median(other):,.0f}: "
            f"{statistics.median(other) / statistics.median(base):.2f}x; round by round {pairs}")


def inference_figures(config: TrainConfig, images, batch_size: int = 1024, repeats: int = 3) -> dict:
    """Keras predict, the exported serving function (XLA and not), the TFLite export in float32 and int8
    (dynamic-range quantization): samples/s and 1-image latency."""
    import tempfile

    import tensorflow as tf

    from tf_emnist.export import convert_to_tflite
    from tf_emnist.model import build_model
    from tf_emnist.signatures import make_serving_function
    from tf_emnist.sources import TFLITE_FILE, load_tflite_signature

    task = get_task(config.task)
    model = build_model(config, task.num_classes)
    floats = images.astype(np.float32) / 255.0
    figures = {}

    def best_rate(fn, data):
        fn(data[:batch_size])  # trace / compile
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for i in range(0, len(data), batch_size):
                fn(data[i: i + batch_size])
            times.append(time.perf_counter() - start)
        return len(data) / min(times)

    def median_latency_ms(fn):
        fn(images[:1])
        latencies = []
        for _ in range(100):
            start = time.perf_counter()
            fn(images[:1])
            latencies.append(time.perf_counter() - start)
        return 1000 * statistics.median(latencies)

    figures["keras_predict_samples_per_s"] = best_rate(lambda x: model.predict(x, batch_size=batch_size, verbose=0), floats)
    servers = {name: make_serving_function(model, task.class_names, config, xla=xla)
               for name, xla in (("serving_xla", True), ("serving_plain", False))}
    for name, quantize in (("tflite", "none"), ("tflite_int8", "dynamic")):
        with tempfile.TemporaryDirectory() as tmp:
            with open(os.path.join(tmp, TFLITE_FILE), "wb") as f:
                f.write(convert_to_tflite([(model, config)], task.class_names, quantize))
            servers[name] = load_tflite_signature(tmp)
    for name, serve in servers.items():
        if name.startswith("tflite"):
            logits = lambda x: serve(images=x)["logits"]  # noqa: E731
        else:
            logits = lambda x: serve(tf.constant(x))["logits"].numpy()  # noqa: E731
        figures[f"{name}_samples_per_s"] = best_rate(logits, images)
        figures[f"{name}_latency_ms"] = median_latency_ms(logits)
    return figures


# The yardstick's model at inference: 1-image latency, and its dynamic int8 quantization
# (torch.ao, as TFLite's "dynamic"), to set beside tf-emnist's int8 TFLite export.
TORCH_INFERENCE = """
import importlib.util, json, statistics, sys, time, warnings, torch
spec = importlib.util.spec_from_file_location("seed", sys.argv[1]); seed = importlib.util.module_from_spec(spec)
spec.loader.exec_module(seed)
cfg = seed.PRESETS[sys.argv[2]]
model = seed.SeedLSTM(cfg["hidden"], cfg["layers"], cfg["classes"]).eval()
def latency_ms(m):
    x = torch.rand(1, 28, 28)
    times = []
    for _ in range(110):
        t = time.perf_counter(); m(x); times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times[10:])
def samples_per_s(m, n=10240, batch=1024):
    x = torch.rand(n, 28, 28)
    m(x[:batch])
    t = time.perf_counter()
    for i in range(0, n, batch):
        m(x[i: i + batch])
    return n / (time.perf_counter() - t)
figures = {}
with torch.inference_mode():
    figures["latency_ms"] = latency_ms(model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
            int8 = torch.ao.quantization.quantize_dynamic(model, {torch.nn.LSTM, torch.nn.Linear}, dtype=torch.qint8)
        figures["int8_infer_samples_per_s"] = samples_per_s(int8)
        figures["int8_latency_ms"] = latency_ms(int8)
    except (AttributeError, RuntimeError) as e:  # a torch without eager dynamic quantization
        print(f"no int8 figures: {e}", file=sys.stderr)
print(json.dumps(figures))
"""


def torch_figures(baseline: str, task: str, steps: int) -> dict | None:
    """The PyTorch yardstick's own training/inference figures (its script), its 1-image latency and int8 figures."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return None
    if not os.path.isfile(baseline):
        raise FileNotFoundError(f"the PyTorch yardstick {baseline} does not exist; pass --baseline PATH to the "
                                "study's seed_torch_lstm.py")
    n = steps * 256
    run = subprocess.run([sys.executable, baseline, "--task", task, "--synthetic", str(max(n, 10240)),
                          "--max-steps", str(steps), "--epochs", "1"], capture_output=True, text=True, check=True)
    figures = json.loads(run.stdout.strip().splitlines()[-1])
    inference = subprocess.run([sys.executable, "-c", TORCH_INFERENCE, baseline, task], capture_output=True, text=True,
                               check=True)
    figures.update(json.loads(inference.stdout.strip().splitlines()[-1]))
    return figures


def peak_rss_mb() -> float:
    """This process's peak resident memory, MB.

    VmHWM where Linux has it: ru_maxrss of a child process started from a large parent
    keeps the parent's size (it survives fork and exec), which inflated the first
    benchmarks' memory figure by the benchmark process's own 2 GB.
    """
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        pass
    try:
        import resource  # Unix only
    except ImportError:  # Windows: the process's peak working set
        import psutil

        return psutil.Process().memory_info().peak_wset / 2**20
    scale = 2**20 if sys.platform == "darwin" else 2**10  # macOS reports bytes, Linux kilobytes
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def memory_probe(task: str = "merged", steps: int = 10) -> dict:
    """Peak RSS of a process that trains on a full-size (697,932-image) uint8 train split."""
    code = (
        "import json\n"
        "from tf_emnist.bench import peak_rss_mb, synthetic\n"
        "from tf_emnist.data import Batches, split_validation\n"
        "from tf_emnist.model import build_model, compile_model\n"
        "from tf_emnist.tasks import get_task\n"
        "from tf_emnist.training import fit_model\n"
        f"task = get_task({task!r}); config = task.preset.replace(epochs=1)\n"
        f"images, labels = synthetic({FULL_TRAIN}, task.num_classes)\n"
        "train_idx, val_idx = split_validation(len(labels), 0.1, 0)\n"
        f"batches = Batches(images, labels, 256, training=True, indices=train_idx[:{steps} * 256])\n"
        "model = compile_model(build_model(config, task.num_classes), config, track_batch_loss=True)\n"
        "fit_model(model, config, batches, verbose=0)\n"
        "print(json.dumps({'peak_rss_mb': peak_rss_mb()}))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    return json.loads(run.stdout.strip().splitlines()[-1])


def run_benchmark(tasks=("digit-letter", "merged"), *, steps: int = 30, rounds: int = 2,
                  baseline: str = DEFAULT_BASELINE, memory: bool = True, jit_compile: bool | None = None,
                  bf16_gradients: bool | None = None, lstm_kernel: bool | None = None,
                  backends: tuple[str, ...] = ("tensorflow",)) -> dict:
    """All figures for each preset: training alternates `rounds` times between TensorFlow (this process), the
    other `backends` (a process each) and PyTorch, and the medians are kept; then the serving figures."""
    import tensorflow as tf

    from tf_emnist.backend import describe_lstm_training

    results = {"cpu": cpu_name(), "tensorflow": tf.__version__, "gpus": len(tf.config.list_logical_devices("GPU")),
               "steps": steps, "rounds": rounds, "backends": list(backends), "tasks": {}}
    for name in tasks:
        config = get_task(name).preset.replace(jit_compile=jit_compile, bf16_gradients=bf16_gradients,
                                               lstm_kernel=lstm_kernel)
        results["lstm_training"] = describe_lstm_training(config)
        results["tasks"][name] = task_figures(config, steps, rounds, baseline, backends)
    if memory:
        results["full_train_peak_rss_mb"] = memory_probe()["peak_rss_mb"]
    results["process_peak_rss_mb"] = peak_rss_mb()
    return results


def training_measures(config: TrainConfig, steps: int, baseline: str, backends) -> dict:
    """name -> a function that measures one round of training: samples/s, or PyTorch's figures (a dict)."""
    from tf_emnist.backend import use_lstm_kernel

    images, labels = synthetic(max(steps, 40) * config.batch_size, get_task(config.task).num_classes)
    measures = {"train": lambda: training_samples_per_s(config, images, labels, steps)}
    if use_lstm_kernel(config):  # Keras's own LSTM, all in XLA, for the kernel's speed-up
        plain = config.replace(lstm_kernel=False, bf16_gradients=None)
        measures["train_xla_float32"] = lambda: training_samples_per_s(plain, images, labels, steps)
    for backend in backends:
        if backend != "tensorflow":
            measures[f"{backend}_train"] = (lambda backend=backend:
                                            backend_training_samples_per_s(backend, config, steps))
    if os.path.exists(baseline):
        measures["torch"] = lambda: torch_figures(baseline, config.task, steps)
    return measures


def task_figures(config: TrainConfig, steps: int, rounds: int, baseline: str, backends) -> dict:
    """One preset's row: training (medians of the alternated rounds), the pipeline, serving, and the ratios."""
    measures = training_measures(config, steps, baseline, backends)
    runs = {name: [] for name in measures}
    for _ in range(rounds):
        for name, measure in measures.items():
            figure = measure()
            if figure is not None:
                runs[name].append(figure)
    images, labels = synthetic(max(steps, 40) * config.batch_size, get_task(config.task).num_classes)
    row = {f"{name}_samples_per_s": statistics.median(rates) for name, rates in runs.items() if name != "torch"}
    row["pipeline_samples_per_s"] = pipeline_samples_per_s(images, labels, config.batch_size)
    row.update(inference_figures(config, images[:10240]))
    if "train_xla_float32_samples_per_s" in row:
        row["lstm_kernel_over_xla"] = row["train_samples_per_s"] / row["train_xla_float32_samples_per_s"]
    for backend in backends:
        if f"{backend}_train_samples_per_s" in row:
            row[f"{backend}_over_tensorflow"] = row[f"{backend}_train_samples_per_s"] / row["train_samples_per_s"]
    if runs.get("torch"):
        row.update(torch_rows(row, runs["torch"], backends))
    row["pipeline_over_training"] = row["pipeline_samples_per_s"] / row["train_samples_per_s"]
    return row


def torch_rows(row: dict, torch_runs: list[dict], backends) -> dict:
    """The PyTorch yardstick's medians, and every figure of `row` over its counterpart."""
    def median(key):
        return statistics.median(r[key] for r in torch_runs)

    torch = {"torch_train_samples_per_s": median("train_samples_per_s"),
             "torch_infer_samples_per_s": median("infer_samples_per_s"), "torch_latency_ms": median("latency_ms")}
    if all("int8_infer_samples_per_s" in r for r in torch_runs):
        torch.update(torch_int8_infer_samples_per_s=median("int8_infer_samples_per_s"),
                     torch_int8_latency_ms=median("int8_latency_ms"))
        torch["int8_ratio"] = row["tflite_int8_samples_per_s"] / torch["torch_int8_infer_samples_per_s"]
    torch["train_ratio"] = row["train_samples_per_s"] / torch["torch_train_samples_per_s"]
    for backend in backends:
        if f"{backend}_train_samples_per_s" in row:
            torch[f"{backend}_train_ratio"] = row[f"{backend}_train_samples_per_s"] / torch["torch_train_samples_per_s"]
    for name, key in (("serving", "serving_xla"), ("predict", "keras_predict"), ("tflite", "tflite"),
                      ("tflite_int8", "tflite_int8")):
        torch[f"{name}_ratio"] = row[f"{key}_samples_per_s"] / torch["torch_infer_samples_per_s"]
    return torch


def format_table(results: dict) -> str:
    rows = [("figure", *results["tasks"])]
    keys = list(dict.fromkeys(k for row in results["tasks"].values() for k in row))
    for key in keys:
        cells = []
        for row in results["tasks"].values():
            value = row.get(key)
            cells.append("-" if value is None else (f"{value:.2f}" if "ratio" in key or "over" in key or "ms" in key
                                                    else f"{value:,.0f}"))
        rows.append((key, *cells))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"CPU: {results['cpu']}, TensorFlow {results['tensorflow']}, GPUs: {results['gpus']}, "
             f"LSTM training: {results.get('lstm_training', 'Keras')}"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    if "full_train_peak_rss_mb" in results:
        lines.append(f"peak RSS training on a full-size ByMerge train split ({FULL_TRAIN:,} images): "
                     f"{results['full_train_peak_rss_mb']:,.0f} MB")
    return "\n".join(lines)
