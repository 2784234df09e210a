"""Keras's JAX backend: training in a process where TensorFlow cannot be imported, one set of weights for
both backends, and data-parallel training across processes on 127.0.0.1 (JAX's Gloo collectives)."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import free_port
from tf_emnist.runs import read_history

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--hidden-dim", "8", "--num-layers", "1", "--batch-size", "32", "--log-every", "2"]
# A process that cannot import TensorFlow (as on a machine without it), then tf-emnist's command line.
WITHOUT_TENSORFLOW = """
import importlib.abc, importlib.machinery, sys

class NotInstalled(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "tensorflow_datasets", "tf_keras"):
            return importlib.machinery.ModuleSpec(name, self)  # found nowhere on disk (no origin)

    def create_module(self, spec):
        raise ModuleNotFoundError(f"No module named {spec.name!r}", name=spec.name)

    def exec_module(self, module):
        pass

sys.meta_path.insert(0, NotInstalled())
from tf_emnist.cli.main import run
run(sys.argv[1:])
"""


def tf_emnist(*args, tensorflow: bool = True, **options) -> subprocess.Popen:
    """`tf-emnist ARGS` in a new process, on the JAX backend unless ARGS say otherwise."""
    env = {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": "",
           "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    command = ["-m", "tf_emnist.cli.main"] if tensorflow else ["-c", WITHOUT_TENSORFLOW]
    return subprocess.Popen([sys.executable, *command, *map(str, args)], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **options)


def finish(process: subprocess.Popen, timeout: float = 300) -> str:
    out = process.communicate(timeout=timeout)[0]
    assert process.returncode == 0, out[-3000:]
    return out


def wait_for_backup(run, epoch: int, processes, timeout: float = 240) -> None:
    """Until run's backup holds `epoch` finished epochs (or a process ends)."""
    metadata = run / "backup" / "training_metadata.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and all(p.poll() is None for p in processes):
        try:
            if json.loads(metadata.read_text())["epoch"] >= epoch:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.2)
    pytest.fail(f"no backup of epoch {epoch}: " + "".join(p.communicate()[0][-2000:] for p in processes))


def weights(run) -> list[np.ndarray]:
    import keras

    return keras.saving.load_model(run / "model.keras", compile=False).get_weights()


@pytest.mark.slow
def test_jax_trains_resumes_and_evaluates_without_tensorflow_and_tensorflow_exports_the_same_model(
        nist_dir, tmp_path):
    from tf_emnist.export import export_model
    from tf_emnist.sources import load_source

    run = tmp_path / "run"
    args = ["train", "--backend", "jax", "--data-dir", nist_dir, "--output", run, "--epochs", 3, "--augment", 0.5,
            "--lr-schedule", "plateau", *TINY]
    first = tf_emnist(*args, tensorflow=False)
    wait_for_backup(run, 1, [first])
    first.send_signal(signal.SIGKILL)
    first.wait()
    log = finish(tf_emnist(*args, tensorflow=False))
    assert "resuming the run" in log and "Epoch 1/3" not in log  # from the backup, not from scratch
    assert [int(r["epoch"]) for r in read_history(str(run))] == [0, 1, 2]
    config = json.loads((run / "config.json").read_text())
    state = json.loads((run / "train_state.json").read_text())
    assert config["backend"] == "jax" and not config["lstm_kernel"]
    assert [e["backend"] for e in state["environments"]] == ["jax", "jax"]
    assert "tensorflow" not in state["environments"][0]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test_examples"] == 120
    for plot in ("loss_steps.png", "loss_epochs.png", "accuracy_epochs.png", "confusion.png"):
        assert (run / plot).stat().st_size > 0

    # The logits JAX computes, then TensorFlow's of the export of the same run.
    images = np.random.default_rng(0).integers(0, 256, (40, 28, 28), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    script = ("import sys, numpy as np; from tf_emnist.sources import load_source; "
              "np.save(sys.argv[2], load_source(sys.argv[1]).logits(np.load(sys.argv[3])))")
    subprocess.run([sys.executable, "-c", script, run, tmp_path / "jax.npy", tmp_path / "images.npy"], cwd=ROOT,
                   env={**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}, check=True,
                   capture_output=True)
    on_jax = np.load(tmp_path / "jax.npy")
    saved = load_source(export_model(str(run), str(tmp_path / "models")))
    np.testing.assert_allclose(saved.logits(images), on_jax, atol=1e-5)
    tflite = load_source(export_model(str(run), str(tmp_path / "models"), format="tflite"))
    np.testing.assert_allclose(tflite.logits(images), on_jax, atol=1e-5)
    assert load_source(str(run)).logits(images).argmax(1).tolist() == on_jax.argmax(1).tolist()

    # Distillation on JAX: from a run directory's model, which JAX runs itself; and from an export, whose
    # logits TensorFlow computed into the run's cache before a resume that has no TensorFlow.
    student = ["train", "--backend", "jax", "--data-dir", nist_dir, "--no-evaluate", *TINY]
    finish(tf_emnist(*student, "--output", tmp_path / "from-run", "--epochs", 1, "--teacher", run, tensorflow=False))
    assert (tmp_path / "from-run" / "teacher_logits.npy").exists()
    cached = [*student, "--output", tmp_path / "from-export", "--epochs", 3, "--teacher", saved.path]
    first = tf_emnist(*cached)
    wait_for_backup(tmp_path / "from-export", 1, [first])
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert "resuming the run" in finish(tf_emnist(*cached, tensorflow=False))
    assert json.loads((tmp_path / "from-export" / "train_state.json").read_text())["finished"]


@pytest.mark.slow
def test_two_processes_train_as_one_and_resume_together_after_a_kill(nist_dir, tmp_path):
    common = ["train", "--backend", "jax", "--data-dir", nist_dir, "--no-evaluate", *TINY]

    def cluster(run, epochs, port):
        return [tf_emnist(*common, "--output", run, "--epochs", epochs, "--coordinator", f"127.0.0.1:{port}",
                          "--num-processes", 2, "--process-id", i) for i in range(2)]

    # One epoch on two processes, each reading half of every batch of 32, against one process.
    for process in cluster(tmp_path / "two", 1, free_port()):
        finish(process)
    finish(tf_emnist(*common, "--output", tmp_path / "one", "--epochs", 1))
    for a, b in zip(weights(tmp_path / "two"), weights(tmp_path / "one")):
        np.testing.assert_allclose(a, b, atol=1e-5)
    state = json.loads((tmp_path / "two" / "train_state.json").read_text())
    assert state["environments"][0]["processes"] == 2

    # Killed after a backup: the other process leaves too, and rerunning both resumes from the backup.
    run = tmp_path / "killed"
    processes = cluster(run, 4, free_port())
    wait_for_backup(run, 2, processes)
    processes[1].send_signal(signal.SIGKILL)
    out = processes[0].communicate(timeout=120)[0]
    assert processes[0].returncode != 0 and "rerun every process" in out, out[-2000:]
    logs = [finish(p) for p in cluster(run, 4, free_port())]
    assert "resuming the run" in logs[0] and "Epoch 3/4" in logs[0] and "Epoch 1/4" not in logs[0]
    assert [int(r["epoch"]) for r in read_history(str(run))] == [0, 1, 2, 3]
    assert json.loads((run / "train_state.json").read_text())["finished"]
    assert not (run / "run.lock").exists()


def test_cluster_settings_come_from_flags_or_kerass_variables(monkeypatch):
    from tf_emnist.backend import Cluster

    assert not Cluster().distributed and Cluster().writes
    monkeypatch.setenv("KERAS_DISTRIBUTION_JOB_ADDRESSES", "10.0.0.1:1234")
    monkeypatch.setenv("KERAS_DISTRIBUTION_NUM_PROCESSES", "4")
    monkeypatch.setenv("KERAS_DISTRIBUTION_PROCESS_ID", "3")
    assert Cluster.from_settings() == Cluster("10.0.0.1:1234", 4, 3)
    assert not Cluster.from_settings().writes  # only process 0 writes the run
    assert Cluster.from_settings(process_id=0).writes
    with pytest.raises(ValueError, match="--process-id must be in 0..3"):
        Cluster.from_settings(process_id=4)
    with pytest.raises(ValueError, match="must be HOST:PORT"):
        Cluster.from_settings(coordinator="10.0.0.1")
    monkeypatch.delenv("KERAS_DISTRIBUTION_JOB_ADDRESSES")
    with pytest.raises(ValueError, match="need --coordinator"):
        Cluster.from_settings()


def test_several_processes_and_a_tensorflow_run_are_refused_in_one_line(nist_dir, tmp_path, capsys):
    from tests.conftest import run_cli

    # This test process runs Keras on TensorFlow: several processes train on JAX only.
    assert run_cli("train", "--data-dir", nist_dir, "--output", tmp_path / "r", "--coordinator", "127.0.0.1:1",
                   "--num-processes", 2, "--process-id", 0, *TINY) == 2
    assert "several processes train on JAX only" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    assert run_cli("train", "--backend", "jax", "--data-dir", nist_dir, "--output", tmp_path / "r", *TINY) == 2
    assert "already runs Keras on tensorflow" in capsys.readouterr().err
    assert run_cli("train", "--backend", "torch", "--output", tmp_path / "r", *TINY) == 2
    assert "unknown backend 'torch'" in capsys.readouterr().err
