"""keras-tuner search: the HyperModel, the space, a real tiny search, resume, failures, distributed."""
import csv
import json
import os
import re
import subprocess
import sys
import time

import keras
import keras_tuner as kt
import pytest

from tests.conftest import free_port, run_cli
from tf_emnist.config import TrainConfig
from tf_emnist.tuning import search as search_module
from tf_emnist.tuning.search import make_hypermodel, run_search
from tf_emnist.tuning.space import parse_override, resolve_space

TINY_SPACE = {"hidden_dim": {"min": 4, "max": 8}, "num_layers": {"type": "fixed", "value": 1},
              "batch_size": {"type": "fixed", "value": 32}, "bidirectional": {"type": "fixed", "value": False}}



def test_hypermodel_builds_with_default_hyperparameters():
    hp = kt.HyperParameters()
    model = make_hypermodel(TrainConfig(), resolve_space({}), 47, 1000).build(hp)
    lstm_units = [layer.units for layer in model.layers if isinstance(layer, keras.layers.LSTM)]
    assert lstm_units == [hp.values["hidden_dim"]] * hp.values["num_layers"]
    assert model.output_shape == (None, 47)
    assert set(hp.values) == {"hidden_dim", "num_layers", "dropout", "learning_rate", "batch_size", "bidirectional"}
    assert model.optimizer.learning_rate.numpy() == pytest.approx(hp.values["learning_rate"])


def test_fixed_hyperparameter_pins_the_value():
    space = resolve_space(dict([parse_override("hidden_dim=48"), parse_override("num_layers=2:2")]))
    hp = kt.HyperParameters()
    model = make_hypermodel(TrainConfig(), space, 2, 1000).build(hp)
    assert hp.values["hidden_dim"] == 48 and hp.values["num_layers"] == 2
    assert [layer.units for layer in model.layers if isinstance(layer, keras.layers.LSTM)] == [48, 48]


def test_space_overrides_narrow_and_are_checked():
    space = resolve_space(dict([parse_override("batch_size=128,256"), parse_override("dropout=0.1:0.3")]))
    assert space["batch_size"] == {"type": "choice", "values": [128, 256]}
    assert (space["dropout"]["min"], space["dropout"]["max"], space["dropout"]["type"]) == (0.1, 0.3, "float")
    assert space["hidden_dim"] == {"type": "int", "min": 64, "max": 512, "step": 64}  # untouched default
    with pytest.raises(ValueError, match="range 300:100 is empty"):
        resolve_space(dict([parse_override("hidden_dim=300:100")]))
    with pytest.raises(ValueError, match="empty value for batch_size"):
        parse_override("batch_size=")
    with pytest.raises(ValueError, match="empty list of choices"):
        resolve_space({"batch_size": {"type": "choice", "values": []}})
    with pytest.raises(ValueError, match="unknown hyperparameter 'hidden_size'"):
        resolve_space(dict([parse_override("hidden_size=64")]))
    with pytest.raises(ValueError, match="log sampling"):
        resolve_space({"weight_decay": {"min": 0, "max": 0.1, "sampling": "log"}})
    with pytest.raises(ValueError, match=r"learning_rate must be in \(0, 1\]"):
        resolve_space(dict([parse_override("learning_rate=0:0.1")]))


def tune_args(data, output, *extra):
    return ["tune", "--data-dir", data, "--output", output, "--epochs", 1, "--no-jit-compile",
            "--space", "hidden_dim=4:8", "--num-layers", 1, "--batch-size", 32, "--no-bidirectional", *extra]


def test_two_trial_search_writes_best_config_that_train_accepts(nist_dir, tmp_path, capsys):
    out = tmp_path / "search"
    assert run_cli(*tune_args(nist_dir, out, "--max-trials", 2)) == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 2 and all(r["status"] == "COMPLETED" for r in rows)
    assert float(rows[0]["val_accuracy"]) >= float(rows[1]["val_accuracy"])
    assert (out / "trials.png").stat().st_size > 0
    best = json.loads((out / "best_config.json").read_text())
    assert best["task"] == "merged" and 4 <= best["hidden_dim"] <= 8 and best["num_layers"] == 1
    assert "data_dir" not in best and best["epochs"] == 1
    assert "val_accuracy" in capsys.readouterr().out
    run = tmp_path / "run"
    assert run_cli("train", "--config", out / "best_config.json", "--data-dir", nist_dir, "--output", run,
                   "--no-jit-compile") == 0
    assert json.loads((run / "config.json").read_text())["hidden_dim"] == best["hidden_dim"]


def test_rerun_resumes_without_redoing_finished_trials(nist_dir, tmp_path, monkeypatch):
    out = tmp_path / "search"
    assert run_cli(*tune_args(nist_dir, out, "--max-trials", 1)) == 0
    fits = []
    original = search_module.make_hypermodel

    def counting(*args, **kwargs):
        hypermodel = original(*args, **kwargs)
        fit = hypermodel.fit
        hypermodel.fit = lambda *a, **k: fits.append(1) or fit(*a, **k)
        return hypermodel

    monkeypatch.setattr(search_module, "make_hypermodel", counting)
    assert run_cli(*tune_args(nist_dir, out, "--max-trials", 1)) == 0
    assert fits == []  # the finished trial was reloaded, not rerun
    assert run_cli(*tune_args(nist_dir, out, "--max-trials", 2)) == 0
    assert fits == [1]  # one more trial, only
    assert len(list(csv.DictReader(open(out / "results.csv")))) == 2
    assert run_cli(*tune_args(nist_dir, out, "--max-trials", 1, "--overwrite")) == 0
    assert len(list(csv.DictReader(open(out / "results.csv")))) == 1


def test_a_failing_trial_does_not_stop_the_search(nist_dir, tmp_path, monkeypatch):
    import tf_emnist.model

    build = tf_emnist.model.build_model

    def fragile(config, num_classes):
        if config.dropout > 0.3:
            raise RuntimeError("out of memory (simulated)")
        return build(config, num_classes)

    monkeypatch.setattr(tf_emnist.model, "build_model", fragile)
    base = TrainConfig(data_dir=nist_dir, jit_compile=False)
    space = resolve_space({**TINY_SPACE, "hidden_dim": {"type": "fixed", "value": 4},
                           "learning_rate": {"type": "fixed", "value": 1e-3},
                           "dropout": {"type": "choice", "values": [0.1, 0.4]}})  # two trials: one of each
    best = run_search(base, space, max_trials=2, max_epochs=1, output=str(tmp_path / "s"), verbose=0)
    rows = list(csv.DictReader(open(tmp_path / "s" / "results.csv")))
    assert sorted(r["status"] for r in rows) == ["COMPLETED", "FAILED"]
    assert best["dropout"] == 0.1


def test_one_gpu_runs_trials_under_its_one_device_strategy(nist_dir, tmp_path, monkeypatch):
    import tensorflow as tf

    from tf_emnist.backend import tf_strategy

    stand_in = tf.config.list_logical_devices("CPU")[1]  # conftest: 2 logical CPUs; the second plays the GPU
    monkeypatch.setattr(search_module, "tf_strategy", lambda name: tf_strategy(name, gpus=[stand_in]))
    made = []
    make_tuner = search_module.make_tuner
    monkeypatch.setattr(search_module, "make_tuner", lambda *a, **k: made.append(make_tuner(*a, **k)) or made[-1])
    space = resolve_space({**TINY_SPACE, "learning_rate": {"type": "fixed", "value": 1e-3}})
    best = run_search(TrainConfig(data_dir=nist_dir, jit_compile=False), space, max_trials=1, max_epochs=1,
                      output=str(tmp_path / "s"), verbose=0)
    assert isinstance(made[0].distribution_strategy, tf.distribute.OneDeviceStrategy)
    assert made[0].distribution_strategy.extended.worker_devices[0].endswith("CPU:1")
    assert best["hidden_dim"] in range(4, 9)
    # Without a GPU, keras-tuner gets no strategy: TensorFlow's default one.
    monkeypatch.setattr(search_module, "tf_strategy", tf_strategy)
    assert make_tuner("random", made[0].hypermodel, output=str(tmp_path / "t"), project="p", max_trials=1,
                      max_epochs=1, seed=0, overwrite=True).distribution_strategy is None

@pytest.mark.parametrize("args, message", [
    (["--tuner", "grid"], "unknown tuner 'grid'"),
    (["--space", "hidden_dim=300:100"], "is empty (min > max)"),
    (["--space", "batch_size="], "empty value"),
    (["--init-from", "runs"], "drop --init-from"),
    (["--teacher", "runs"], "tune does not distill"),
])
def test_tune_bad_input_one_line(nist_dir, tmp_path, capsys, args, message):
    assert run_cli("tune", "--data-dir", nist_dir, "--output", tmp_path / "s", *args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_worker_without_chief_exits_in_bounded_time(nist_dir, tmp_path, capsys):
    port = free_port()
    start = time.monotonic()
    code = run_cli("tune", "--data-dir", nist_dir, "--output", tmp_path / "s", "--distributed", "worker",
                   "--oracle-port", port, "--connect-timeout", 1)
    assert code == 2 and time.monotonic() - start < 10
    assert f"no chief oracle answers at 127.0.0.1:{port}" in capsys.readouterr().err


@pytest.mark.slow
def test_distributed_chief_and_two_workers(nist_dir, tmp_path):
    port, out = free_port(), tmp_path / "search"
    base = [sys.executable, "-m", "tf_emnist.cli.main", "-q", *map(str, tune_args(nist_dir, out, "--max-trials", 3)),
            "--oracle-port", str(port)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    chief = subprocess.Popen(base + ["--distributed", "chief"], cwd=root, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    workers = [subprocess.Popen(base + ["--distributed", "worker", "--worker-id", str(i)], cwd=root, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        logs = [w.communicate(timeout=240)[0] for w in workers]
        chief_log = chief.communicate(timeout=90)[0]
    finally:
        for process in (chief, *workers):
            process.kill()
    assert chief.returncode == 0, chief_log[-2000:]
    assert all(w.returncode == 0 for w in workers), [log[-2000:] for log in logs]
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 3 and all(r["status"] == "COMPLETED" for r in rows)
    # One epoch a trial: each progress line is one trial run by that worker.
    ran = [[line for line in log.splitlines() if re.match(r"\d+/\d+ - ", line)] for log in logs]
    assert sum(map(len, ran)) == 3  # each trial ran once, by one of the workers
    assert (out / "best_config.json").exists()


def test_each_accuracy_lever_can_be_searched():
    import numpy as np

    levers = ["augment=1.0", "label_smoothing=0.1", "weight_decay=0.0001", "lr_schedule=plateau", "clipnorm=1.0",
              "ema=0.9", "bidirectional=true"]
    space = resolve_space(dict(parse_override(text) for text in
                               ["hidden_dim=8", "num_layers=1", "batch_size=16", "learning_rate=0.001:0.01",
                                *levers]))
    hypermodel = make_hypermodel(TrainConfig(jit_compile=False), space, 4, 48, patience=1)
    hp = kt.HyperParameters()
    model = hypermodel.build(hp)
    config = hypermodel.config_for(hp)
    assert (config.augment, config.label_smoothing, config.weight_decay, config.lr_schedule, config.clipnorm,
            config.ema, config.bidirectional) == (1.0, 0.1, 0.0001, "plateau", 1.0, 0.9, True)
    assert model.optimizer.use_ema and model.optimizer.clipnorm == 1.0
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (64, 28, 28), dtype=np.uint8), rng.integers(0, 4, 64).astype(np.int32)
    result = hypermodel.fit(hp, model, (images, labels, np.arange(48)), (images, labels, np.arange(48, 64)),
                            epochs=2, verbose=0)
    # The objective is a share of the 16 validation images, from the best of the 2 epochs.
    assert result["val_accuracy"] * 16 == pytest.approx(round(result["val_accuracy"] * 16)) and (
        result["best_epoch"] in (1.0, 2.0))


def test_ctrl_c_stops_the_search_and_its_trial_runs_again_on_resume(nist_dir, tmp_path, monkeypatch):
    out = tmp_path / "search"
    args = tune_args(nist_dir, out, "--max-trials", 2)
    fail_on_nan = search_module.FailOnNaN

    class CtrlC(keras.callbacks.Callback):
        """Ctrl-C in a trial, as TensorFlow may hand it over: wrapped in an error of its own."""

        def on_train_batch_end(self, batch, logs=None):
            search_module.INTERRUPTED.set()
            raise RuntimeError("UnknownError: KeyboardInterrupt")

    monkeypatch.setattr(search_module, "FailOnNaN", CtrlC)
    assert run_cli(*args) == 130  # interrupted: resumable, not a finished search
    trial = json.loads((out / "merged-random" / "trial_0" / "trial.json").read_text())
    assert trial["status"] == "RUNNING"  # not recorded as failed
    monkeypatch.setattr(search_module, "FailOnNaN", fail_on_nan)
    assert run_cli(*args) == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert sorted(r["trial"] for r in rows) == ["0", "1"] and all(r["status"] == "COMPLETED" for r in rows)
