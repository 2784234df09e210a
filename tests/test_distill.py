"""Distillation: a student trained from a teacher export on fake data, resumed and recorded."""
import json
import os

import numpy as np
import pytest

from tests.conftest import run_cli
from tf_emnist.config import TrainConfig
from tf_emnist.distill import CACHE, RECORD
from tf_emnist.layers import DistillationLoss
from tf_emnist.export import export_model
from tf_emnist.runs import read_history
from tf_emnist.training import train

TINY = ["--hidden-dim", "8", "--num-layers", "1", "--batch-size", "32", "--no-jit-compile"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from tests.conftest import write_nist_folder

    root = tmp_path_factory.mktemp("teacher")
    data = write_nist_folder(root / "nist")
    train(TrainConfig(data_dir=data, epochs=2, hidden_dim=16, num_layers=1, batch_size=32, jit_compile=False),
          str(root / "run"), verbose=0)
    return data, export_model(str(root / "run"), str(root / "models"))


def test_the_loss_is_cross_entropy_at_alpha_1_and_the_teacher_gap_at_alpha_0():
    import keras

    rng = np.random.default_rng(0)
    student = rng.normal(size=(6, 5)).astype(np.float32)
    labels = rng.integers(0, 5, 6)
    target = np.concatenate([labels[:, None], student], axis=1).astype(np.float32)  # teacher == student
    loss = DistillationLoss
    plain = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(labels, student)
    assert float(loss(temperature=2.0, alpha=1.0)(target, student)) == pytest.approx(float(plain), rel=1e-5)
    assert float(loss(temperature=2.0, alpha=0.0)(target, student)) == pytest.approx(0.0, abs=1e-5)
    other = np.concatenate([labels[:, None], rng.normal(size=(6, 5))], axis=1).astype(np.float32)
    assert float(loss(temperature=2.0, alpha=0.0)(other, student)) > 0.01  # the student is pulled to the teacher


def test_a_student_learns_from_a_teacher_export_resumes_and_records_it(teacher, tmp_path, monkeypatch):
    from tests.test_train import interrupt_in_epoch_2

    data, export = teacher
    run = tmp_path / "student"
    args = ["train", "--data-dir", data, "--output", run, "--epochs", 3, "--no-evaluate", "--teacher", export,
            "--distill-temperature", 3, "--distill-alpha", 0.3, *TINY]
    interrupt_in_epoch_2(args, monkeypatch)  # interrupted after epoch 1
    cached = np.load(run / CACHE)
    assert cached.dtype == np.float16 and cached.shape == (240, 47)
    written = os.path.getmtime(run / CACHE)
    assert run_cli(*args) == 0  # resumed: the teacher's outputs come from the cache
    assert os.path.getmtime(run / CACHE) == written and len(read_history(str(run))) == 3
    config = json.loads((run / "config.json").read_text())
    assert (config["teacher"], config["distill_temperature"], config["distill_alpha"]) == (export, 3.0, 0.3)
    record = json.loads((run / RECORD).read_text())
    assert record["sources"] == [export] and len(record["sha256"]["saved_model.pb"]) == 64
    # The student is a plain model: it exports like any run, its teacher recorded by name.
    assert run_cli("export", run, "--output", tmp_path / "models") == 0
    exported = json.loads((tmp_path / "models" / "merged" / "1" / "assets.extra" / "config.json").read_text())
    assert exported["teacher"] == os.path.basename(export)


def test_a_teacher_of_another_task_is_refused_with_one_line(teacher, tmp_path, capsys):
    data, export = teacher
    assert run_cli("train", "--task", "digit-letter", "--data-dir", data, "--output", tmp_path / "run",
                   "--teacher", export, "--epochs", 1, "--no-evaluate", *TINY) == 2
    err = capsys.readouterr().err.strip()
    assert "the teacher" in err and "merged model" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_the_online_teacher_reads_model_inputs_as_the_cached_teacher_reads_images(teacher):
    from tf_emnist.config import TrainConfig
    from tf_emnist.data import load_split, to_model_input
    from tf_emnist.distill import Teacher, teacher_logits
    from tf_emnist.tasks import get_task

    data, export = teacher
    task = get_task("merged")
    images, _ = load_split(task, "train", TrainConfig(data_dir=data))
    cached = teacher_logits([export], images[:50], task)
    online = Teacher([export], task, stored_orientation=False).on_model_input(to_model_input(images[:50]))
    np.testing.assert_allclose(online, cached, atol=1e-4)


def test_an_online_student_trains_on_augmented_batches_and_records_its_teacher(teacher, tmp_path):
    data, export = teacher
    run = tmp_path / "student"
    assert run_cli("train", "--data-dir", data, "--output", run, "--epochs", 1, "--no-evaluate", "--teacher", export,
                   "--distill-online", "--augment", 1.0, *TINY) == 0
    assert not (run / CACHE).exists()  # nothing cached: the teacher read every batch as trained on
    record = json.loads((run / RECORD).read_text())
    assert record["online"] and record["sources"] == [export]
    assert json.loads((run / "config.json").read_text())["distill_online"] is True
    assert np.isfinite(float(read_history(str(run))[0]["loss"]))


def test_online_distillation_without_a_teacher_is_refused_with_one_line(tmp_path, capsys):
    assert run_cli("train", "--output", tmp_path / "run", "--distill-online", "--epochs", 1) == 2
    err = capsys.readouterr().err.strip()
    assert "distill_online needs a teacher" in err and len(err.splitlines()) == 1
