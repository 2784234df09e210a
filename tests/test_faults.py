"""Injected faults: real `tf-emnist` processes killed mid-write, concurrent commands, damaged files.

Each test asserts that nothing is lost and that the same command then completes.
"""
import csv
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import run_cli, write_nist_folder

pytestmark = pytest.mark.slow  # real processes and servers: the slow tier (make test-slow)

TINY = ["--hidden-dim", "8", "--num-layers", "1", "--batch-size", "32", "--no-jit-compile"]
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Enough fake images that an epoch takes a moment (a kill can land inside one)."""
    return write_nist_folder(tmp_path_factory.mktemp("faults") / "nist", n_train=4000, n_test=200)


def start(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tf_emnist.cli.main", *map(str, args)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def kill_when(process: subprocess.Popen, appeared, timeout: float = 180) -> None:
    """SIGKILL the process as soon as appeared() is true (fails if it ends first)."""
    deadline = time.time() + timeout
    while not appeared():
        if process.poll() is not None:
            pytest.fail(f"the process ended before the fault: {process.stdout.read()[-2000:]}")
        if time.time() > deadline:
            process.kill()
            pytest.fail("the awaited file never appeared")
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stdout.close()


def val_accuracies(run) -> list[str]:
    with open(run / "history.csv", newline="") as f:
        return [row["val_accuracy"] for row in csv.DictReader(f)]


def train_args(data, run, epochs=3, *extra):
    return ["train", "--data-dir", data, "--output", run, "--epochs", epochs, "--no-evaluate", *TINY, *extra]


def run_to_the_end(*args) -> None:
    # In a process of its own: --deterministic is process-wide TensorFlow state.
    done = subprocess.run([sys.executable, "-m", "tf_emnist.cli.main", *map(str, args)], env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def test_a_run_killed_after_a_backup_resumes_to_the_uninterrupted_result(data, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run_to_the_end(*train_args(data, whole, 3, "--deterministic"))
    kill_when(start(*train_args(data, killed, 3, "--deterministic")),
              lambda: (killed / "backup" / "training_metadata.json").exists())
    run_to_the_end(*train_args(data, killed, 3, "--deterministic"))  # the same command completes the run
    assert val_accuracies(killed)[-3:] == val_accuracies(whole)  # exact under --deterministic
    assert not (killed / "run.lock").exists()


def test_a_damaged_backup_falls_back_and_the_run_completes(data, tmp_path, caplog):
    run = tmp_path / "run"
    kill_when(start(*train_args(data, run)), lambda: (run / "backup" / "training_metadata.json").exists())
    latest = run / "backup" / "latest.weights.h5"
    latest.write_bytes(latest.read_bytes()[:1000])  # as a kill or a full disk mid-write would leave it
    assert run_cli(*train_args(data, run)) == 0
    assert "unreadable" in caplog.text
    assert len(val_accuracies(run)) >= 3 and (run / "model.keras").exists()


def test_a_second_trainer_on_the_same_run_is_refused(data, tmp_path, capsys):
    run = tmp_path / "run"
    first = start(*train_args(data, run, epochs=30))
    try:
        deadline = time.time() + 120
        while not (run / "run.lock").exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.05)
        assert run_cli(*train_args(data, run, epochs=30)) == 2
        assert "is being trained by another process" in capsys.readouterr().err
    finally:
        first.kill()
        first.wait()
        first.stdout.close()
    # The killed holder's lock is stale: the same command takes it over and can resume.
    assert (run / "run.lock").exists()
    assert run_cli("evaluate", run) == 2  # unfinished: refused, and the run stays resumable
    assert "has not finished training" in capsys.readouterr().err
    assert not (run / "metrics.json").exists()


@pytest.fixture(scope="module")
def finished_run(data, tmp_path_factory):
    run = tmp_path_factory.mktemp("finished") / "run"
    assert run_cli(*train_args(data, run, epochs=1)) == 0
    return run


def test_concurrent_exports_each_get_a_version(finished_run, tmp_path):
    processes = [start("export", finished_run, "--output", tmp_path) for _ in range(3)]
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0, 0], outputs
    assert sorted(os.listdir(tmp_path / "merged")) == ["1", "2", "3"]  # no claims or temporaries left
    assert all((tmp_path / "merged" / v / "saved_model.pb").exists() for v in ("1", "2", "3"))


def test_a_killed_export_leaves_the_old_version_and_the_next_cleans_up(finished_run, tmp_path):
    assert run_cli("export", finished_run, "--output", tmp_path) == 0
    old = (tmp_path / "merged" / "1" / "saved_model.pb").read_bytes()
    process = start("export", finished_run, "--output", tmp_path, "--version", 1, "--force")
    kill_when(process, lambda: any(n.startswith(".1.tmp-") for n in os.listdir(tmp_path / "merged")))
    assert (tmp_path / "merged" / "1" / "saved_model.pb").read_bytes() == old  # the old version is whole
    assert run_cli("export", finished_run, "--output", tmp_path, "--version", 1, "--force") == 0
    assert os.listdir(tmp_path / "merged") == ["1"]  # the killed export's claim and folder are gone


def test_a_killed_plot_is_made_again(data, finished_run):
    plot = finished_run / "loss_epochs.png"
    plot.unlink()
    dead_pid = 2**22 + 7  # above Linux's largest pid: no process has it
    (finished_run / f".loss_epochs.png.tmp-{dead_pid}-x.png").write_bytes(b"half a plot")
    assert run_cli(*train_args(data, finished_run, epochs=1)) == 0  # the finished run: its plots are redone
    assert plot.exists() and not [n for n in os.listdir(finished_run) if ".tmp-" in n]


def test_a_damaged_test_file_is_found_before_training(tmp_path, capsys):
    data = write_nist_folder(tmp_path / "nist")
    test_images = os.path.join(data, "emnist-bymerge-test-images-idx3-ubyte.gz")
    with open(test_images, "r+b") as f:
        f.truncate(os.path.getsize(test_images) // 2)  # a download cut short
    start = time.time()
    assert run_cli("train", "--data-dir", data, "--output", tmp_path / "run", "--epochs", 50, *TINY) == 3
    assert "test" in capsys.readouterr().err and time.time() - start < 30  # no 50 epochs first
    assert not (tmp_path / "run").exists()
