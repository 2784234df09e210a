"""The benchmark's own measurements (its figures are printed, never asserted)."""
import subprocess
import sys

import numpy as np
import pytest

from tf_emnist.bench import peak_rss_mb


def test_peak_memory_of_a_child_is_its_own_not_its_parents():
    ballast = np.ones(400 * 2**20 // 8)  # the parent holds 400 MB more than the child ever will
    assert peak_rss_mb() > 400
    child = subprocess.run([sys.executable, "-c", "from tf_emnist.bench import peak_rss_mb; print(peak_rss_mb())"],
                           capture_output=True, text=True, check=True)
    assert 0 < float(child.stdout.strip().splitlines()[-1]) < 300
    del ballast


def test_inference_figures_cover_every_serving_path():
    from tf_emnist.bench import inference_figures, synthetic
    from tf_emnist.config import TrainConfig

    images, _ = synthetic(64, 47)
    # bf16_gradients: the live model holds tf-emnist's LSTM layers, which must export as Keras's
    config = TrainConfig(hidden_dim=8, num_layers=1, bf16_gradients=True)
    figures = inference_figures(config, images, batch_size=32, repeats=1)
    for name in ("serving_xla", "serving_plain", "tflite", "tflite_int8"):
        assert figures[f"{name}_samples_per_s"] > 0 and figures[f"{name}_latency_ms"] > 0
    assert figures["keras_predict_samples_per_s"] > 0


@pytest.mark.slow
def test_gpu_check_script_runs_its_smoke_mode_on_a_cpu():
    """scripts/gpu_check.py is meant for a GPU machine: its tiny mode catches a broken script on a CPU."""
    import json
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, os.path.join("scripts", "gpu_check.py"), "--smoke"], cwd=root,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    # On a CPU the batches stay on it and mixed precision is bfloat16; the logits stay float32 everywhere.
    assert rows.pop("placement") == {"batch_device": "/job:localhost/replica:0/task:0/device:CPU:0",
                                     "strategy": "_DefaultDistributionStrategy", "lstm_compute_dtype": "bfloat16",
                                     "lstm_variable_dtype": "float32", "logits_dtype": "float32"}
    assert set(rows) == {"digit-letter", "merged"}
    for row in rows.values():  # a row that failed holds its error instead of seconds
        seconds = [row[f"{name}_s"] for name in ("float32_cudnn", "mixed_float16_cudnn", "float32_no_cudnn",
                                                 "mixed_float16_batch1024")]
        assert all(isinstance(s, float) and s > 0 for s in seconds), row


def test_alternate_flips_the_order_every_round_and_sums_up_the_medians(capsys):
    from tf_emnist.bench import alternate, median_ratio

    calls, figures = [], {"a": iter([100, 110, 90]), "b": iter([120, 99, 135])}

    def measure(name):
        return lambda: calls.append(name) or next(figures[name])

    rates = alternate({"a": measure("a"), "b": measure("b")}, rounds=3)
    assert calls == ["a", "b", "b", "a", "a", "b"]
    assert rates == {"a": [100, 110, 90], "b": [120, 99, 135]}
    assert "round 3: a 90, b 135" in capsys.readouterr().out
    assert median_ratio(rates) == "median: a 100, b 120: 1.20x; round by round 1.20, 0.90, 1.50"


def test_alternating_benchmarks_read_task_rounds_and_steps():
    from tf_emnist.bench import alternating_args

    args = alternating_args("x", ["merged", "--rounds", "2"])
    assert (args.task, args.rounds, args.steps) == ("merged", 2, 30)
    with pytest.raises(SystemExit):
        alternating_args("x", ["balanced"])
