"""EMNIST splits from tensorflow-datasets or NIST files, and the tf.data input pipeline."""
from __future__ import annotations

import itertools
import logging
import math
import os
import shutil
import time
import urllib.parse

import numpy as np

from tf_emnist.config import TrainConfig
from tf_emnist.nist import DataError, NistFolder, OFFICIAL_COUNTS, file_name
from tf_emnist.tasks import Task

log = logging.getLogger("tf_emnist")

EMNIST_URL = "https://biometrics.nist.gov/cs_links/EMNIST/gzip.zip"  # tfds's source


EMNIST_BUILDER_VERSION = (3, 1, 0)  # the first tfds EMNIST builder with NIST's current URL (tfds #5356)


def check_download_reachable(url: str = EMNIST_URL, timeout: float = 5.0) -> None:
    """Fail in seconds, not minutes, when the EMNIST download server cannot be reached.

    tfds retries a dead network for about 200 s; one HEAD request tells the same in
    `timeout`. It goes through `requests`, the HTTP stack tfds downloads with, so
    HTTPS_PROXY and the other proxy settings apply to both.
    """
    import requests

    try:
        requests.head(url, timeout=timeout, allow_redirects=True)
    except requests.RequestException as e:
        host = urllib.parse.urlsplit(url).hostname
        raise DataError(
            f"cannot reach the EMNIST download server {host} ({e.__class__.__name__}); "
            "download NIST's gzip.zip elsewhere and pass --data-dir DIR (offline data)"
        ) from None


def _prepare_tfds(task: Task, tfds_dir: str | None):
    """The tfds builder of the task's split, downloaded and prepared once."""
    import tensorflow_datasets as tfds

    builder = tfds.builder(task.tfds_name, data_dir=tfds_dir)
    if builder.is_prepared():
        return builder
    if tuple(builder.version.tuple) < EMNIST_BUILDER_VERSION:
        raise DataError(f"tensorflow-datasets {tfds.__version__} downloads EMNIST from a URL NIST has retired "
                        f"(builder {builder.version}); pip install -U tensorflow-datasets, or pass --data-dir DIR")
    root = os.path.expanduser(tfds_dir or tfds.core.constants.DATA_DIR)
    existed = os.path.exists(root)
    try:
        check_download_reachable()
        log.info("downloading and preparing %s into %s (once)", task.tfds_name, root)
        try:
            builder.download_and_prepare()
        except Exception as e:  # tfds's download, checksum and preparation errors have no common base
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise DataError(f"tensorflow-datasets could not prepare {task.tfds_name} ({e.__class__.__name__}: "
                            f"{first[:200]}); pass --data-dir DIR with NIST's files to train offline") from None
    except BaseException:
        # Leave no empty or half-prepared folders behind (tfds leaves *.incomplete dirs).
        dataset_dir = os.path.join(root, task.tfds_name.split("/")[0])
        for path in (dataset_dir if os.path.isdir(dataset_dir) else None, root if not existed else None):
            if path and os.path.isdir(path) and not _holds_files(path):
                shutil.rmtree(path, ignore_errors=True)
        raise
    return builder


def _holds_files(path: str) -> bool:
    return any(files for _, _, files in os.walk(path))


def load_split(task: Task, part: str, config: TrainConfig, *, source_labels: bool = False
               ) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28] as stored (transposed), task labels int32 [N]) of 'train' or 'test'.

    Reads config.data_dir (NIST files) when set, else tensorflow-datasets. Applies the
    config's limit_train / limit_test. `source_labels` keeps the split's own labels (for
    `fine_labels`) instead of the task's classes.
    """
    started = time.perf_counter()
    if config.data_dir:
        log.info("reading and checking the %s split in %s", part, config.data_dir)
        folder = NistFolder(config.data_dir, task.split)
        chars = folder.read_mapping()
        if chars != task.source_chars:
            raise DataError(
                f"emnist-{task.split}-mapping.txt in {config.data_dir} lists {chars!r}, "
                f"expected {task.source_chars!r}; is this the {task.split} split?"
            )
        images, labels = folder.load(part, len(task.source_chars))
        for name in (file_name(task.split, part, "images"), file_name(task.split, part, "labels")):
            if folder.provenance[name] != "official":
                log.warning("note: %s is %s", name, folder.provenance[name])
        official = OFFICIAL_COUNTS.get((task.split, part))
        if official and len(images) != official:
            log.warning("note: %s split has %d images; the official one has %d", part, len(images), official)
    else:
        import tensorflow_datasets as tfds

        builder = _prepare_tfds(task, config.tfds_dir)
        log.info("converting tfds's %s split of %s to arrays", part, task.tfds_name)
        ds = builder.as_dataset(split=part, as_supervised=True, shuffle_files=False)
        chunks = list(tfds.as_numpy(ds.batch(65536)))  # decoded once, straight to uint8 arrays
        images = np.concatenate([x for x, _ in chunks]).reshape(-1, 28, 28).astype(np.uint8, copy=False)
        labels = np.concatenate([y for _, y in chunks])
    log.info("%s split: %d images in %.1f s", part, len(images), time.perf_counter() - started)
    limit = config.limit_train if part == "train" else config.limit_test
    if limit:
        images, labels = images[:limit], labels[:limit]
    labels = labels.astype(np.int32) if source_labels else task.map_labels(labels)
    return np.ascontiguousarray(images), labels


def split_validation(num_examples: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, disjoint (train_indices, validation_indices), each sorted.

    Indices, not copies: train and validation datasets gather from the one image array.
    `fraction` 0 holds out nothing (a refit).
    """
    if fraction == 0:
        return np.arange(num_examples), np.arange(0)
    n_val = max(1, int(round(num_examples * fraction)))
    if n_val >= num_examples:
        raise DataError(f"{num_examples} train images are too few to hold out a validation split; use more data")
    order = np.random.default_rng(seed).permutation(num_examples)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def random_affine(images, strength: float, seed: int | None = None, *, stateless_seed=None):
    """Random rotation, shift, scale and shear of float images [B, 28, 28], one per image.

    strength 1 means up to +-10 degrees, +-10% shift, +-10% scale and +-0.1 shear.
    `stateless_seed` (an int64 pair) draws the same transforms on every call, whatever the
    order batches arrive in: test-time augmentation's views are reproducible.
    """
    import tensorflow as tf

    n = tf.shape(images)[0]
    draws = itertools.count()

    def uniform(limit):
        if stateless_seed is None:
            return tf.random.uniform([n], -limit, limit, seed=seed)
        pair = tf.cast(stateless_seed, tf.int64) + tf.constant([0, 1 << 20], tf.int64) * next(draws)
        return tf.random.stateless_uniform([n], pair, -limit, limit)

    angle = uniform(strength * math.radians(10))
    scale = 1.0 + uniform(strength * 0.1)
    shear = uniform(strength * 0.1)
    shift_x, shift_y = uniform(strength * 2.8), uniform(strength * 2.8)
    cos, sin = tf.cos(angle) / scale, tf.sin(angle) / scale
    # Output pixel (x, y) samples input (a0 x + a1 y + a2, b0 x + b1 y + b2), about the centre.
    a0, a1, b0, b1 = cos, -sin + shear, sin, cos
    c = 13.5
    a2 = c - a0 * c - a1 * c + shift_x
    b2 = c - b0 * c - b1 * c + shift_y
    zeros = tf.zeros_like(a0)
    transforms = tf.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=images[..., None], transforms=transforms, output_shape=[28, 28],
        interpolation="BILINEAR", fill_mode="CONSTANT", fill_value=0.0,
    )
    return out[..., 0]


def to_model_input(images, upright: bool = True):
    """uint8 images as stored [B, 28, 28] -> float32 in [0, 1], rows as time steps."""
    import tensorflow as tf

    if upright:  # NIST and tfds store EMNIST transposed: the upright rows are stored columns
        images = tf.transpose(images, [0, 2, 1])
    return tf.cast(images, tf.float32) / 255.0


class EpochClock:
    """Which epoch a training dataset draws its permutation for.

    Training sets `epoch` at each epoch's start (a Keras callback), so a resumed run draws
    the same permutation for an epoch as the uninterrupted run did. Left unset, each new
    iterator counts as the next epoch.
    """

    def __init__(self):
        self.epoch: int | None = None
        self._next = 0

    def draw(self) -> int:
        if self.epoch is not None:
            return self.epoch
        self._next += 1
        return self._next - 1


def _shuffled_batches(order: np.ndarray, batch_size: int, seed: int, clock: EpochClock | None = None):
    """Batches of `order`, in a permutation seeded by (seed, epoch) each epoch (each new iterator).

    The permutation is drawn in numpy: tf.data's shuffle buffer would hold one tensor per
    index, 141 MB of overhead for the ByMerge train split, against 5 MB here.
    """
    import tensorflow as tf

    clock = clock or EpochClock()
    permutation = tf.data.Dataset.from_tensors(0).map(lambda _: tf.ensure_shape(tf.numpy_function(
        lambda: np.random.default_rng([seed, clock.draw()]).permutation(order), [], tf.int64, stateful=True),
        [len(order)]))
    batches = permutation.flat_map(lambda p: tf.data.Dataset.from_tensor_slices(p).batch(batch_size))
    return batches.apply(tf.data.experimental.assert_cardinality(math.ceil(len(order) / batch_size)))


def make_dataset(images: np.ndarray, labels: np.ndarray, batch_size: int, *, training: bool,
                 indices: np.ndarray | None = None, seed: int = 0, upright: bool = True, augment: float = 0.0,
                 clock: EpochClock | None = None, soft_targets: np.ndarray | None = None, teacher=None):
    """A batched tf.data pipeline over uint8 images held in memory once.

    `images` (uint8 [N, 28, 28], shared by the train and validation datasets) is the cache:
    522 MiB for all of ByMerge train, a quarter of float32. The pipeline shuffles `indices`
    (default: all; reshuffled every epoch, seeded by seed and the `clock`'s epoch) and gathers each batch from the numpy
    array, so neither the shuffle buffer nor the graph holds a copy of the images (a
    captured tensor is copied per iterator: +0.5 GiB each). Scaling, the transpose and
    (training only) augmentation run per batch after the gather; batches are prefetched.
    Training's tf.distribute strategy copies them to the GPUs ahead of each step
    (`tf_emnist.training.distribution_strategy`). With `soft_targets` (float16 or float32 [N, classes], a
    teacher's logits for each image), a batch's targets are [label, its teacher's logits...]
    (`tf_emnist.distill`); with `teacher` (a `tf_emnist.distill.Teacher`), the same, the teacher
    reading each batch as the model does, augmented.
    """
    import tensorflow as tf

    images = np.asarray(images, np.uint8)
    labels_t = tf.constant(labels, tf.int32)
    order = np.arange(len(images), dtype=np.int64) if indices is None else np.asarray(indices, np.int64)
    if training:
        ds = _shuffled_batches(order, batch_size, seed, clock)
    else:
        ds = tf.data.Dataset.from_tensor_slices(order).batch(batch_size)

    def load_batch(index):
        batch = tf.numpy_function(lambda i: images[i], [index], tf.uint8, stateful=False)
        x = to_model_input(tf.ensure_shape(batch, [None, 28, 28]), upright)
        if training and augment > 0:
            x = random_affine(x, augment, seed=seed)
        y = tf.gather(labels_t, index)
        if soft_targets is not None or teacher is not None:
            if teacher is None:  # the cache stays float16; a batch's rows become float32
                soft = tf.numpy_function(lambda i: soft_targets[i].astype(np.float32), [index], tf.float32,
                                         stateful=False)
            else:
                soft = tf.numpy_function(teacher.on_model_input, [x], tf.float32, stateful=False)
            classes = soft_targets.shape[1] if teacher is None else teacher.classes
            y = tf.concat([tf.cast(y, tf.float32)[:, None], tf.ensure_shape(soft, [None, classes])], 1)
        return x, y

    # With the autotuner off, AUTOTUNE means one call per CPU core (at most 16) and the
    # prefetch buffer still grows on demand. The autotuner re-plans on a timer (10 ms,
    # doubling), and under Keras fit an epoch that ends between two of its rounds waited
    # for the next: epochs took up to 1.7x as long (docs/performance.md).
    options = tf.data.Options()
    options.autotune.enabled = False
    ds = ds.map(load_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).with_options(options)
    return ds.prefetch(tf.data.AUTOTUNE)
