"""The pretrained SavedModels shipped in saved_models/<task>/<version>: plain TensorFlow loads them and they classify.

With TF_EMNIST_DATA_DIR set, they are also checked on real test images.
"""
import json
import os

import numpy as np
import pytest

from tf_emnist.tasks import get_task

ROOT = os.path.join(os.path.dirname(__file__), "..", "saved_models")
SHIPPED = {f"{task}/{version}": os.path.join(ROOT, task, version)  # e.g. "merged/1"
           for task in sorted(os.listdir(ROOT)) if os.path.isdir(os.path.join(ROOT, task))
           for version in sorted(os.listdir(os.path.join(ROOT, task))) if version.isdigit()}


def test_a_merged_model_ships():
    assert "merged/1" in SHIPPED


@pytest.fixture(scope="module")
def loaded():
    import tensorflow as tf

    return {name: tf.saved_model.load(path) for name, path in SHIPPED.items()}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_model_is_the_best_preset_and_names_its_classes(name):
    path, task_name = SHIPPED[name], name.split("/")[0]
    with open(os.path.join(path, "assets.extra", "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(path, "assets.extra", "labels.txt")) as f:
        labels = f.read().split()
    assert config["task"] == task_name and config["bidirectional"] and config["augment"] == 1.0
    assert labels == list(get_task(task_name).class_names)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_model_serves_both_orientations_alike(loaded, name):
    import tensorflow as tf

    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    model, task_name = loaded[name], name.split("/")[0]
    upright = model.signatures["serving_default"](images=tf.constant(images))
    stored = model.signatures["serve_stored"](images=tf.constant(images.transpose(0, 2, 1)))
    num_classes = get_task(task_name).num_classes
    assert upright["probabilities"].shape == (3, num_classes)
    np.testing.assert_allclose(upright["probabilities"].numpy().sum(axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(upright["logits"], stored["logits"], atol=1e-5)
    assert upright["characters"].dtype == tf.string


@pytest.mark.real_data
@pytest.mark.parametrize("name", [name for name in sorted(SHIPPED) if name.startswith("merged/")])
def test_shipped_model_reads_real_test_images(loaded, real_data_dir, name):
    import tensorflow as tf

    from tf_emnist.config import TrainConfig
    from tf_emnist.data import load_split

    task = get_task("merged")
    stored, labels = load_split(task, "test", TrainConfig(data_dir=real_data_dir, limit_test=3000))
    merged = loaded[name].signatures["serve_stored"](images=tf.constant(stored))
    assert np.mean(merged["class_ids"].numpy() == labels) > 0.85  # 89.75 % and more on the whole test split
