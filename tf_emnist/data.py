"""EMNIST splits from tensorflow-datasets or NIST files, and the batches a model reads (numpy, any backend)."""
from __future__ import annotations

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


TTA_STRENGTH = 0.5  # test-time augmentation's views: half the training augmentation's transforms
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


def to_model_input(images: np.ndarray, upright: bool = True) -> np.ndarray:
    """uint8 images as stored [B, 28, 28] -> float32 in [0, 1], rows as time steps."""
    images = np.asarray(images)
    if upright:  # NIST and tfds store EMNIST transposed: the upright rows are stored columns
        images = images.transpose(0, 2, 1)
    return images.astype(np.float32) / 255.0


def random_transforms(n: int, strength: float, rng: np.random.Generator) -> np.ndarray:
    """n random affine maps [n, 6] (see affine_transform) of rotation, shift, scale and shear.

    strength 1 means up to +-10 degrees, +-10% shift, +-10% scale and +-0.1 shear, about the centre.
    """
    angle, scale, shear, shift_x, shift_y = (rng.uniform(-limit, limit, n) for limit in (
        strength * math.radians(10), strength * 0.1, strength * 0.1, strength * 2.8, strength * 2.8))
    cos, sin = np.cos(angle) / (1.0 + scale), np.sin(angle) / (1.0 + scale)
    # Output pixel (x, y) samples input (a0 x + a1 y + a2, b0 x + b1 y + b2), about the centre c.
    a0, a1, b0, b1 = cos, -sin + shear, sin, cos
    c = 13.5
    return np.stack([a0, a1, c - a0 * c - a1 * c + shift_x, b0, b1, c - b0 * c - b1 * c + shift_y], axis=1)


_ROWS, _COLS = (grid.ravel().astype(np.float32) for grid in np.mgrid[0:28, 0:28])


def affine_transform(images: np.ndarray, transforms: np.ndarray) -> np.ndarray:
    """Float images [B, 28, 28], each resampled bilinearly through its map [a0, a1, a2, b0, b1, b2]: output
    pixel (x, y) (column, row) reads input (a0 x + a1 y + a2, b0 x + b1 y + b2); outside the image is 0.

    The same sampling as TensorFlow's ImageProjectiveTransformV3 (bilinear, constant fill 0).
    """
    n = len(images)
    a0, a1, a2, b0, b1, b2 = (t[:, None].astype(np.float32) for t in np.asarray(transforms).T)
    x, y = a0 * _COLS + a1 * _ROWS + a2, b0 * _COLS + b1 * _ROWS + b2  # [B, 784] input coordinates
    x0, y0 = np.floor(x), np.floor(y)
    fx, fy = x - x0, y - y0
    x0, y0 = x0.astype(np.int32), y0.astype(np.int32)
    flat = np.asarray(images, np.float32).reshape(n, 28 * 28)
    out = np.zeros_like(flat)
    for dy, dx, weight in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx), (1, 0, fy * (1 - fx)), (1, 1, fy * fx)):
        row, col = y0 + dy, x0 + dx
        inside = (row >= 0) & (row < 28) & (col >= 0) & (col < 28)
        pixels = np.take_along_axis(flat, np.where(inside, row * 28 + col, 0), axis=1)
        out += np.where(inside, weight * pixels, 0.0)
    return out.reshape(n, 28, 28)


def random_affine(images: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Float images [B, 28, 28], each randomly rotated, shifted, scaled and sheared (random_transforms)."""
    return affine_transform(images, random_transforms(len(images), strength, rng))


class Batches:
    """Batches of uint8 images held in memory once, as a model reads them; numpy, so any backend feeds them.

    `images` (uint8 [N, 28, 28] as stored, shared by the train and validation batches) is
    the cache: 522 MiB for all of ByMerge train, a quarter of float32. Each batch gathers
    its `indices` (default: all) from the array, in order, or with `training` in a
    permutation seeded by (seed, epoch), so a resumed run draws the epoch's order the
    uninterrupted run drew (`set_epoch`; tf_emnist.callbacks.SetEpoch calls it). Then the
    rows turn upright, scale to [0, 1] and, with `augment`, transform at random, seeded by
    (seed, epoch, step) when training, or by (view, step) for test-time augmentation's
    seeded `view`s.

    Several devices and processes: each batch is cut to a multiple of `multiple` (the
    devices; the last batch of an epoch drops at most multiple - 1 images), and `shard`
    (index, count) keeps this process's part of it.

    Targets: the labels, or with `soft_targets` (float16 or float32 [N, classes], a
    teacher's logits for each image) [label, its teacher's logits...] (`tf_emnist.distill`);
    with `teacher` (a `tf_emnist.distill.Teacher`), the same, the teacher reading each
    batch as the model does, augmented.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int, *, training: bool = False,
                 indices: np.ndarray | None = None, seed: int = 0, upright: bool = True, augment: float = 0.0,
                 view: int | None = None, soft_targets: np.ndarray | None = None, teacher=None,
                 multiple: int = 1, shard: tuple[int, int] = (0, 1)):
        self.images, self.labels = np.asarray(images, np.uint8), np.asarray(labels, np.int32)
        self.order = np.arange(len(self.images)) if indices is None else np.asarray(indices, np.int64)
        self.batch_size, self.training, self.seed, self.upright = batch_size, training, seed, upright
        self.augment = augment if (training or view is not None) else 0.0
        self.view, self.soft_targets, self.teacher = view, soft_targets, teacher
        self.multiple, self.shard = multiple, shard
        full, rest = divmod(len(self.order), batch_size)
        self.steps = full + (rest >= multiple)
        self.epoch = None
        self.set_epoch(0)

    def __len__(self) -> int:
        return self.steps

    @property
    def classes(self) -> int | None:
        """The teacher's classes in the targets, None without one."""
        if self.teacher is not None:
            return self.teacher.classes
        return None if self.soft_targets is None else self.soft_targets.shape[1]

    def set_epoch(self, epoch: int) -> None:
        """Draw epoch's permutation (training); idempotent."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.permutation = (np.random.default_rng([self.seed, epoch]).permutation(self.order) if self.training
                                else self.order)

    def indices(self, step: int) -> np.ndarray:
        """The image indices of this process's part of batch `step`."""
        batch = self.permutation[step * self.batch_size: (step + 1) * self.batch_size]
        batch = batch[:len(batch) - len(batch) % self.multiple]
        index, count = self.shard
        return batch[index * len(batch) // count: (index + 1) * len(batch) // count]

    def __getitem__(self, step: int):
        """(model input float32 [b, 28, 28], targets) of batch `step`."""
        if not 0 <= step < self.steps:
            raise IndexError(f"batch {step} of {self.steps}")
        index = self.indices(step)
        x = to_model_input(self.images[index], self.upright)
        if self.augment > 0:
            seeds = [self.seed, self.epoch, step] if self.view is None else [self.view, step]
            x = random_affine(x, self.augment, np.random.default_rng(seeds))
        y = self.labels[index]
        if self.teacher is not None:
            y = np.concatenate([y[:, None].astype(np.float32), self.teacher.on_model_input(x)], axis=1)
        elif self.soft_targets is not None:  # the cache stays float16; a batch's rows become float32
            y = np.concatenate([y[:, None].astype(np.float32), self.soft_targets[index].astype(np.float32)], axis=1)
        return x, y
