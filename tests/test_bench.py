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
def test_gpu_check_script_runs_its_smoke_mode_without_tensorflow():
    """scripts/gpu_check.py is meant for a GPU machine without TensorFlow: its tiny mode checks it on a CPU."""
    import json
    import os

    from tests.test_backends import WITHOUT_TENSORFLOW

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run_script = "import runpy\nsys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')"
    script = WITHOUT_TENSORFLOW.replace("from tf_emnist.cli.main import run\nrun(sys.argv[1:])", run_script)
    done = subprocess.run([sys.executable, "-c", script, os.path.join("scripts", "gpu_check.py"), "--smoke",
                           "--rounds", "2"], cwd=root, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(results["tasks"]) == {"digit-letter", "merged"} and results["examples"] == 2048
    for row in results["tasks"].values():
        for name in ("keras_fit", "keras_fit_spe8", "keras_fit_device_data", "jax_step"):
            assert row[f"{name}_s_per_epoch"] > 0, row
        assert 0 < row["forward_ms"] < row["forward_backward_ms"]
        torch_ran = "torch_s_per_epoch" in row
        assert torch_ran == ("keras_fit_over_torch" in row)  # PyTorch's figures and ratios, where it is installed


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
