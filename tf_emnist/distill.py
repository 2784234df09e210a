"""Knowledge distillation: a student learns from a teacher's softened probabilities and the true labels.

The teacher (one or several exports or run directories, averaged like an ensemble) reads
the clean train images once; its logits are cached next to the run as float16 [N, classes]
with a record of the teacher's files (path and sha256), so a resume reuses them. Online
(`distill_online`), it reads each training batch as augmented instead, during training. Each
batch carries [label, teacher logits...] as its target, and the loss is

    alpha * cross-entropy(label, student) + (1 - alpha) * T^2 * KL(teacher_T || student_T),

where x_T is softmax(logits / T) (Hinton et al., 2015); the loss is
`tf_emnist.layers.DistillationLoss`.
"""
from __future__ import annotations

import logging
import os
import threading

import numpy as np

from tf_emnist.files import atomic_path, read_json, sha256_file, write_json

log = logging.getLogger("tf_emnist")

CACHE, RECORD = "teacher_logits.npy", "teacher.json"


def teacher_sources(config) -> list[str]:
    """The teacher's sources from config.teacher (comma-separated paths)."""
    return [p.strip() for p in (config.teacher or "").split(",") if p.strip()]


def check_teacher(config, task) -> None:
    """A one-line ValueError, before anything is written, for a teacher that is missing or of another task."""
    from tf_emnist.sources import read_task

    for path in teacher_sources(config):
        taught = read_task(path)
        if taught is None:
            raise ValueError(f"the teacher {path} is neither a tf-emnist run nor an export; "
                             "give run directories or exports from `tf-emnist export`")
        if taught != task.name:
            raise ValueError(f"the teacher {path} is a {taught} model; the student learns {task.name}")


def teacher_record(sources: list[str], num_images: int) -> dict:
    """What identifies a teacher: its sources and the sha256 of each model file in them."""
    from tf_emnist.sources import model_files

    digests = {}
    for source in sources:
        for path in model_files(source):
            digests[os.path.relpath(path, source) if len(sources) == 1 else path] = sha256_file(path)
    if not digests:
        raise ValueError(f"--teacher {','.join(sources)} holds no model (model.keras, saved_model.pb or "
                         "model.tflite); give run directories or exports")
    return {"sources": sources, "sha256": digests, "images": num_images}


class Teacher:
    """The teacher's models, loaded: `logits(images)` on uint8 [N, 28, 28] images is the log of its
    members' mean probability (each model counted once), float64 [N, classes].

    A run directory's model runs on the backend this process runs; an export needs TensorFlow.
    """

    def __init__(self, sources: list[str], task, stored_orientation: bool = True):
        from tf_emnist.sources import load_source

        self.source = load_source(sources)
        if self.source.task.name != task.name:
            raise ValueError(f"the teacher {self.source.path} is a {self.source.task.name} model; the student "
                             f"learns {task.name}")
        self.stored_orientation = stored_orientation
        self.classes = task.num_classes
        self._lock = threading.Lock()  # the batches' worker threads share one model

    def logits(self, images: np.ndarray) -> np.ndarray:
        with self._lock:
            return self.source.logits(images, stored_orientation=self.stored_orientation)

    def on_model_input(self, x: np.ndarray) -> np.ndarray:
        """float32 logits of model inputs (float [B, 28, 28] in [0, 1], augmented or not), read as uint8
        images again; for `tf_emnist.data.Batches`'s online teacher."""
        images = np.clip(np.rint(np.asarray(x) * 255.0), 0, 255).astype(np.uint8)
        return self.logits(images).astype(np.float32)


def teacher_logits(sources: list[str], images: np.ndarray, task) -> np.ndarray:
    """Logits [N, classes] of the teacher on stored-orientation uint8 images (see Teacher)."""
    log.info("teacher %s reads %d train images", ",".join(sources), len(images))
    return Teacher(sources, task).logits(images)


def online_teacher(run_dir: str, config, num_images: int, task, writes: bool = True) -> Teacher:
    """The teacher for reading augmented batches in the model's orientation; recorded in run_dir."""
    sources = teacher_sources(config)
    if writes:
        write_json(os.path.join(run_dir, RECORD), {**teacher_record(sources, num_images), "online": True})
    return Teacher(sources, task, stored_orientation=not config.upright)


def cached_teacher_logits(run_dir: str, config, images: np.ndarray, task, writes: bool = True) -> np.ndarray:
    """The teacher's logits on `images`, from run_dir's cache when it holds this teacher's, else computed
    (and cached, by the process that writes the run: float16 [N, classes]).

    A cache read back needs no model: a run whose teacher is an export resumes on a backend
    without TensorFlow once the cache is made.
    """
    sources = teacher_sources(config)
    record = teacher_record(sources, len(images))
    cache, record_path = os.path.join(run_dir, CACHE), os.path.join(run_dir, RECORD)
    if os.path.exists(cache) and os.path.exists(record_path) and read_json(record_path) == record:
        return np.load(cache, allow_pickle=False)
    if os.path.exists(record_path):
        log.warning("the teacher's files changed since this run began; its outputs are computed again")
    logits = teacher_logits(sources, images, task).astype(np.float16)
    if writes:
        with atomic_path(cache) as tmp:
            np.save(tmp, logits)
        write_json(record_path, record)
    return logits
