"""SavedModel export in the TF Serving layout, with a raw-image serving signature."""
from __future__ import annotations

import logging
import os
import shutil

from tf_emnist.config import TrainConfig
from tf_emnist.files import atomic_path, write_json
from tf_emnist.training import load_run

log = logging.getLogger("tf_emnist")

IMAGE_SHAPE = (None, 28, 28)


SPLIT_FROM = 256  # batches this large are classified in two halves at once


def make_serving_function(model, class_names, config: TrainConfig, *, stored_orientation: bool = False,
                          jit_compile: bool = True):
    """A tf.function: uint8 images [N, 28, 28] -> logits, probabilities, class_ids, characters.

    Images are upright (rows are the character's rows, light ink on dark, as EMNIST shows
    them), or as NIST/tfds store them with `stored_orientation`. Scaling and orientation
    happen inside the graph.
    """
    import tensorflow as tf

    names = tf.constant(list(class_names))
    # The model reads upright rows when trained with config.upright, stored rows otherwise.
    transpose = stored_orientation == config.upright

    def classify(images):  # the numeric part, XLA-compiled when asked (strings cannot be)
        x = tf.cast(images, tf.float32) / 255.0
        if transpose:
            x = tf.transpose(x, [0, 2, 1])
        logits = tf.cast(model(x, training=False), tf.float32)
        return logits, tf.nn.softmax(logits), tf.argmax(logits, axis=-1, output_type=tf.int32)

    classify = tf.function(classify, jit_compile=jit_compile)

    def in_halves(images):
        # Two independent launches, which TensorFlow's executor runs side by side: 1.17x the
        # throughput of one launch at batch 1024 on 2 cores (benchmarks/levers.py).
        half = tf.shape(images)[0] // 2
        first, second = classify(images[:half]), classify(images[half:])
        return tuple(tf.concat([a, b], axis=0) for a, b in zip(first, second))

    @tf.function(input_signature=[tf.TensorSpec(IMAGE_SHAPE, tf.uint8, name="images")])
    def serve(images):
        logits, probabilities, class_ids = tf.cond(
            tf.shape(images)[0] >= SPLIT_FROM, lambda: in_halves(images), lambda: classify(images))
        return {"logits": logits, "probabilities": probabilities, "class_ids": class_ids,
                "characters": tf.gather(names, class_ids)}

    return serve


def next_version(task_dir: str) -> int:
    """1 + the highest integer version folder in task_dir (1 when there is none)."""
    versions = [int(name) for name in os.listdir(task_dir) if name.isdigit()] if os.path.isdir(task_dir) else []
    return max(versions, default=0) + 1


def export_model(run_dir: str, output_root: str = "saved_models", *, version: int | None = None,
                 force: bool = False, jit_compile: bool = True) -> str:
    """Export a run's model to output_root/<task>/<version>/ as a SavedModel; returns its path.

    Signatures: `serving_default` (upright uint8 images) and `serve_stored` (NIST/tfds
    orientation). The class names and the training config travel in assets.extra/.
    Written to a hidden temporary folder and renamed, so a server never sees half a model;
    an existing version is replaced only with `force`.
    """
    import keras

    model, config, task = load_run(run_dir)
    task_dir = os.path.join(output_root, task.name)
    version = next_version(task_dir) if version is None else version
    if version < 1:
        raise ValueError(f"version must be a positive integer, got {version}")
    target = os.path.join(task_dir, str(version))
    if os.path.exists(target) and not force:
        raise FileExistsError(f"{target} already exists; pass --force to replace it or --version N for another version")

    archive = keras.export.ExportArchive()
    archive.track(model)
    for name, stored in (("serve", False), ("serve_stored", True)):
        archive.add_endpoint(name, make_serving_function(model, task.class_names, config,
                                                         stored_orientation=stored, jit_compile=jit_compile))
    with atomic_path(target, directory=True) as tmp:
        archive.write_out(tmp, verbose=False)
        extra = os.path.join(tmp, "assets.extra")
        os.makedirs(extra, exist_ok=True)
        write_json(os.path.join(extra, "config.json"), config.to_dict())
        with open(os.path.join(extra, "labels.txt"), "w") as f:
            f.write("\n".join(task.class_names) + "\n")
        if os.path.exists(target):  # --force: move the old version aside only once the new one is complete
            trash = f"{tmp}.old"
            os.replace(target, trash)
            shutil.rmtree(trash)
    log.info("exported %s to %s", run_dir, target)
    return target
