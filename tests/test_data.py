"""Data sources and the tf.data pipeline: orientation, labels, splits, shuffling, augmentation."""
import time

import numpy as np
import pytest

from tests.conftest import make_images
from tf_emnist import data as data_module
from tf_emnist.config import TrainConfig
from tf_emnist.data import Batches, affine_transform, load_split, random_affine, split_validation, to_model_input
from tf_emnist.nist import DataError
from tf_emnist.tasks import BYMERGE_CHARS, get_task


def test_transpose_puts_upright_rows_as_time_steps():
    labels = np.array([3, 17])
    stored = make_images(labels, np.random.default_rng(0))  # stored column = upright row
    x = to_model_input(stored)
    assert x.dtype == np.float32 and x.shape == (2, 28, 28)
    np.testing.assert_allclose(x[0, 3, :], 1.0)  # time step 3 is the whole bright row
    np.testing.assert_allclose(x[1, 17, :], 1.0)
    raw = to_model_input(stored, upright=False)
    np.testing.assert_allclose(raw[0, :, 3], 1.0)  # raw orientation keeps the stored columns
    assert 0.0 <= x.min() and x.max() <= 1.0


def test_digit_letter_label_map():
    task = get_task("digit-letter")
    source = np.arange(47)
    mapped = task.map_labels(source)
    assert mapped.tolist() == [0] * 10 + [1] * 37
    assert task.class_names == ("digit", "letter")
    assert [BYMERGE_CHARS[i] for i in np.flatnonzero(mapped == 0)] == list("0123456789")
    assert get_task("merged").map_labels(source).tolist() == list(range(47))


def test_unknown_task_names_the_choices():
    with pytest.raises(ValueError, match="unknown task 'letters'.*merged, digit-letter"):
        get_task("letters")


def test_load_split_from_nist_folder_applies_limits_and_labels(nist_dir):
    config = TrainConfig(task="digit-letter", data_dir=nist_dir, limit_train=100)
    images, labels = load_split(get_task("digit-letter"), "train", config)
    assert images.shape == (100, 28, 28) and images.dtype == np.uint8
    assert set(np.unique(labels)) <= {0, 1}
    test_images, _ = load_split(get_task("digit-letter"), "test", config)
    assert len(test_images) == 120  # limit_train does not touch the test split


def test_wrong_split_mapping_is_rejected(tmp_path):
    from tests.conftest import write_nist_folder

    path = write_nist_folder(tmp_path / "d", n_train=10, n_test=10, chars="0123456789")
    with pytest.raises(DataError, match="mapping.txt .* is this the bymerge split"):
        load_split(get_task("merged"), "train", TrainConfig(data_dir=path))


def test_validation_split_is_seeded_and_disjoint():
    train, val = split_validation(1000, 0.1, seed=3)
    assert len(val) == 100 and len(train) == 900
    assert not set(train) & set(val) and set(train) | set(val) == set(range(1000))
    assert split_validation(1000, 0.1, seed=3)[1].tolist() == val.tolist()
    assert split_validation(1000, 0.1, seed=4)[1].tolist() != val.tolist()


def labels_of(batches):
    return np.concatenate([batches[i][1] for i in range(len(batches))])


def test_batches_over_indices_gather_only_those_images():
    labels = np.arange(40, dtype=np.int32) % 28
    images = make_images(labels, np.random.default_rng(0))
    train, val = split_validation(40, 0.25, seed=0)
    assert labels_of(Batches(images, labels, 8, indices=val)).tolist() == labels[val].tolist()
    seen = labels_of(Batches(images, labels, 8, training=True, indices=train))
    assert sorted(seen.tolist()) == sorted(labels[train].tolist())


def test_batches_shuffle_each_epoch_and_keep_pairs():
    labels = np.arange(64, dtype=np.int32) % 28
    images = make_images(labels, np.random.default_rng(0))
    batches = Batches(images, labels, 16, training=True, seed=1)
    epochs = []
    for epoch in range(2):
        batches.set_epoch(epoch)
        epochs.append([batches[i] for i in range(len(batches))])
    first, second = (np.concatenate([y for _, y in e]) for e in epochs)
    assert sorted(first) == sorted(labels) and first.tolist() != second.tolist()
    rerun = labels_of(Batches(images, labels, 16, training=True, seed=1))
    assert rerun.tolist() == first.tolist()  # the same seed and epoch, the same order
    assert len(batches) == 4
    for x, y in epochs[0]:
        assert x.shape[1:] == (28, 28) and x.dtype == np.float32
        for xi, yi in zip(x, y):
            np.testing.assert_allclose(xi[yi], 1.0)  # the bright row is the label's row
    assert labels_of(Batches(images, labels, 16)).tolist() == labels.tolist()  # evaluation keeps the order


def test_processes_share_each_batch_and_the_last_batch_splits_evenly():
    labels = np.arange(70, dtype=np.int32) % 28
    images = make_images(labels, np.random.default_rng(0))
    whole = Batches(images, labels, 16, training=True, seed=3, multiple=2)
    halves = [Batches(images, labels, 16, training=True, seed=3, multiple=2, shard=(p, 2)) for p in range(2)]
    assert len(whole) == len(halves[0]) == 5  # 4 full batches and 6 of the last 6 images
    for step in range(len(whole)):
        together = np.concatenate([h.indices(step) for h in halves])
        assert together.tolist() == whole.indices(step).tolist() and len(together) % 2 == 0
    assert len(Batches(images, labels, 16, multiple=4)) == 5 and len(Batches(images, labels, 20, multiple=16)) == 3


def test_the_tf_data_pipeline_keeps_the_batches_and_runs_without_the_autotuner():
    # Under Keras fit, the autotuner's timer made epochs wait for its next round (docs/performance.md).
    from tf_emnist.feeding import tf_dataset

    labels = np.arange(20, dtype=np.int32) % 28
    images = make_images(labels, np.random.default_rng(0))
    for training in (True, False):
        batches = Batches(images, labels, 8, training=training, augment=1.0)
        ds = tf_dataset(batches)
        assert ds.options().autotune.enabled is False and ds.cardinality().numpy() == 3
        for step, (x, y) in enumerate(ds):
            np.testing.assert_array_equal(x.numpy(), batches[step][0])
            np.testing.assert_array_equal(y.numpy(), batches[step][1])


def test_augmentation_changes_pixels_keeps_shapes_and_is_off_for_evaluation():
    labels = np.arange(32, dtype=np.int32) % 28
    images = make_images(labels, np.random.default_rng(0))
    plain = Batches(images, labels, 32, augment=1.0)[0][0]
    np.testing.assert_allclose(plain, to_model_input(images))
    x, y = Batches(images, labels, 32, training=True, seed=0, augment=1.0)[0]
    assert x.shape == (32, 28, 28) and x.dtype == np.float32 and y.dtype == np.int32
    clean = to_model_input(images)
    # Each augmented image differs from the clean image of its own label.
    clean_by_label = {int(label): clean[i] for i, label in enumerate(labels)}
    changed = [not np.allclose(xi, clean_by_label[int(yi)]) for xi, yi in zip(x, y)]
    assert sum(changed) >= 30
    assert 0.0 <= x.min() and x.max() <= 1.0
    still = random_affine(clean, 0.0, np.random.default_rng(0))
    np.testing.assert_allclose(still, clean, atol=1e-5)  # strength 0 is the identity
    again = Batches(images, labels, 32, training=True, seed=0, augment=1.0)[0][0]
    np.testing.assert_array_equal(again, x)  # seeded by (seed, epoch, step): a resumed run draws the same


def test_the_affine_transform_samples_as_tensorflows_image_projective_transform():
    import tensorflow as tf

    from tf_emnist.data import random_transforms

    rng = np.random.default_rng(0)
    images = rng.random((16, 28, 28), dtype=np.float32)
    transforms = random_transforms(16, 2.0, rng)
    ours = affine_transform(images, transforms)
    eight = np.concatenate([transforms, np.zeros((16, 2))], axis=1).astype(np.float32)
    theirs = tf.raw_ops.ImageProjectiveTransformV3(
        images=images[..., None], transforms=eight, output_shape=[28, 28], interpolation="BILINEAR",
        fill_mode="CONSTANT", fill_value=0.0).numpy()[..., 0]
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_tfds_source_under_mock_data(monkeypatch, tmp_path):
    import tensorflow_datasets as tfds

    monkeypatch.setattr(data_module, "check_download_reachable", lambda *a, **k: None)
    with tfds.testing.mock_data(num_examples=20):
        images, labels = load_split(get_task("merged"), "train", TrainConfig(tfds_dir=str(tmp_path)))
    assert images.shape == (20, 28, 28) and images.dtype == np.uint8
    assert labels.dtype == np.int32 and labels.max() < 47


def test_offline_download_fails_fast_and_leaves_nothing(monkeypatch, tmp_path):
    # A proxy that refuses: the check goes through requests, which honours HTTPS_PROXY as tfds does.
    from tests.conftest import free_port

    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{free_port()}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    root = tmp_path / "tfds"
    start = time.monotonic()
    with pytest.raises(DataError, match="cannot reach .* --data-dir"):
        load_split(get_task("merged"), "train", TrainConfig(tfds_dir=str(root)))
    assert time.monotonic() - start < 30
    assert not root.exists()


def test_tfds_preparation_errors_become_one_line_naming_the_offline_way(monkeypatch, tmp_path):
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.download.download_manager import NonMatchingChecksumError

    def fail(self, *args, **kwargs):
        raise NonMatchingChecksumError("https://example.invalid/gzip.zip has wrong checksum\nmore")

    monkeypatch.setattr(data_module, "check_download_reachable", lambda *a, **k: None)
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", fail)
    with pytest.raises(DataError, match="could not prepare emnist/bymerge .*--data-dir") as caught:
        load_split(get_task("merged"), "train", TrainConfig(tfds_dir=str(tmp_path / "tfds")))
    assert "\n" not in str(caught.value)
