"""The pretrained models shipped in saved_models/: plain TensorFlow loads them and they classify.

SavedModels in <task>/<version>, TFLite models in <task>-tflite/<version>. With
TF_EMNIST_DATA_DIR set, they are also checked on real test images.
"""
import json
import os

import numpy as np
import pytest

from tests.conftest import shipped_models
from tf_emnist.tasks import get_task

SHIPPED = shipped_models()  # saved_models/shipped.json: "merged/6" -> its path


def test_one_merged_model_ships_in_each_format():
    assert sorted(name.split("/")[0] for name in SHIPPED) == ["merged", "merged-tflite"]
    assert all(os.path.isdir(path) for path in SHIPPED.values())


def test_every_model_git_tracks_in_saved_models_is_in_the_manifest():
    """Exports of a user's own sit beside the shipped ones and are never taken for them."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tracked = subprocess.run(["git", "ls-files", "saved_models"], cwd=root, capture_output=True, text=True)
    if tracked.returncode != 0 or not tracked.stdout:
        pytest.skip("not a git checkout")
    folders = {"/".join(p.split("/")[1:3]) for p in tracked.stdout.split() if p.count("/") >= 3}
    assert folders == set(SHIPPED)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_model_is_one_network(name):
    """A request costs one network's time (a distilled student), not an ensemble's."""
    assert not os.path.exists(os.path.join(SHIPPED[name], "assets.extra", "ensemble.json"))


@pytest.mark.parametrize("name", [name for name in sorted(SHIPPED) if "tflite" not in name])
def test_shipped_savedmodel_is_portable(name):
    from tf_emnist.export import xla_functions

    assert xla_functions(SHIPPED[name]) == []  # TensorFlow Serving runs it without XLA


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_model_holds_no_path_of_the_machine_that_made_it(name):
    def strings(value):
        if isinstance(value, dict):
            return [s for k, v in value.items() for s in (k, *strings(v))]
        return [s for v in value for s in strings(v)] if isinstance(value, list) else [value]

    for folder, _, files in os.walk(os.path.join(SHIPPED[name], "assets.extra")):
        for file in files:
            text = open(os.path.join(folder, file)).read()
            found = strings(json.loads(text)) if file.endswith(".json") else text.split()
            # names and paths inside the export only (its own files), nothing of the machine
            assert not [s for s in found if isinstance(s, str) and (os.path.isabs(s) or ".." in s.split("/"))], file


def task_of(name: str) -> str:
    return name.split("/")[0].removesuffix("-tflite")


@pytest.fixture(scope="module")
def loaded():
    """name -> {signature name: function(images=uint8 array) -> outputs}, loaded with plain TensorFlow."""
    import tensorflow as tf

    functions = {}
    for name, path in SHIPPED.items():
        if name.split("/")[0].endswith("-tflite"):
            interpreter = tf.lite.Interpreter(os.path.join(path, "model.tflite"))
            functions[name] = {"serving_default": interpreter.get_signature_runner("serving_default")}
        else:
            functions[name] = tf.saved_model.load(path).signatures
    return functions


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_model_is_the_best_preset_and_names_its_classes(name):
    path, task_name = SHIPPED[name], task_of(name)
    with open(os.path.join(path, "assets.extra", "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(path, "assets.extra", "labels.txt")) as f:
        labels = f.read().split()
    assert config["task"] == task_name and config["bidirectional"] and config["augment"] == 1.0
    assert labels == list(get_task(task_name).class_names)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_model_serves_both_orientations_alike(loaded, name):
    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    signatures = loaded[name]
    upright = {k: np.asarray(v) for k, v in signatures["serving_default"](images=images).items()}
    assert upright["probabilities"].shape == (3, get_task(task_of(name)).num_classes)
    np.testing.assert_allclose(upright["probabilities"].sum(axis=1), 1, atol=1e-5)
    assert [c.decode() for c in upright["characters"]] == [get_task(task_of(name)).class_names[i]
                                                          for i in upright["logits"].argmax(1)]
    if "serve_stored" in signatures:  # TFLite exports have the upright signature only
        stored = signatures["serve_stored"](images=images.transpose(0, 2, 1))
        np.testing.assert_allclose(upright["logits"], stored["logits"], atol=1e-5)


@pytest.mark.real_data
@pytest.mark.parametrize("name", [name for name in sorted(SHIPPED) if task_of(name) == "merged"])
def test_shipped_model_reads_real_test_images(loaded, real_data_dir, name):
    from tf_emnist.config import TrainConfig
    from tf_emnist.data import load_split

    task = get_task("merged")
    stored, labels = load_split(task, "test", TrainConfig(data_dir=real_data_dir, limit_test=1000))
    merged = loaded[name]["serving_default"](images=np.ascontiguousarray(stored.transpose(0, 2, 1)))
    assert np.mean(np.asarray(merged["class_ids"]) == labels) > 0.85  # 89.59 % and more on the whole test split


def test_no_committed_result_names_a_path_of_the_machine_that_made_it():
    """results/ holds the evidence the docs cite, with data folders and runs by relative path or by name."""
    import re

    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "results")
    absolute = re.compile(r"(?<![\w.~-])/(?:work|root|home|tmp|Users|mnt|opt|var)/")
    found = []
    for folder, _, files in os.walk(root):
        for file in files:
            if file.endswith((".json", ".csv", ".txt", ".log", ".md")):
                with open(os.path.join(folder, file), errors="replace") as f:
                    if absolute.search(f.read()):
                        found.append(os.path.relpath(os.path.join(folder, file), root))
    assert found == []
