"""Models to read images with, whatever their format: one class per format behind one interface.

A source answers what its callers need, and none of them asks its kind: the task and the
training config, `logits` of uint8 images, its own test figures, and for exporting and
serving a TensorFlow serving function or its Keras models. Formats: a run directory
(model.keras, any backend), a SavedModel and a TFLite file written by `tf-emnist export`,
an ensemble of any of them, and a folder of numbered versions (its newest, as TensorFlow
Serving reads a base path). A new format is one class here and its entry in FORMATS.
"""
from __future__ import annotations

import os
import threading

import numpy as np

from tf_emnist.config import TrainConfig, config_from_dict
from tf_emnist.data import TTA_STRENGTH
from tf_emnist.files import damaged_files, read_json, read_json_object
from tf_emnist.tasks import Task, get_task

EXTRA = "assets.extra"  # an export's files beside the model: config.json, labels.txt, export.json, metrics.json
ENSEMBLE = "ensemble.json"  # in EXTRA: the config of each model an exported ensemble averages
EXPORT_INFO = "export.json"  # in EXTRA: the format, the quantization, and the model's files by size and sha256
TFLITE_FILE = "model.tflite"
SAVED_MODEL_FILE = "saved_model.pb"
KERAS_FILE = "model.keras"  # a run directory's model (tf_emnist.runs.MODEL)


class SourceError(ValueError):
    """A model cannot be read, or cannot do what was asked of it (message: one line)."""


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities [N, classes] from logits, in numpy."""
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def ensemble_logits(members: list[np.ndarray], weights: list[int]) -> np.ndarray:
    """Several models' logits -> the log of their weighted mean probability (softmax gives it back).

    A member that is itself an ensemble of k models weighs k, so every model counts once.
    tf_emnist.signatures.make_ensemble_function computes the same inside an exported graph.
    """
    if len(members) == 1:
        return members[0]
    weights = np.asarray(weights, np.float64)
    return np.log(np.tensordot(weights / weights.sum(), [softmax(member) for member in members], axes=1))


def outputs(logits: np.ndarray, class_names) -> dict[str, np.ndarray]:
    """What a signature answers, from logits: characters, class ids, logits, probabilities (numpy)."""
    class_ids = logits.argmax(axis=1).astype(np.int32)
    return {"characters": np.asarray(class_names)[class_ids], "class_ids": class_ids, "logits": logits,
            "probabilities": softmax(logits)}


def predict_logits(model, images: np.ndarray, upright: bool = True, batch_size: int = 1024, *,
                   tta: int = 1, tta_strength: float = TTA_STRENGTH) -> np.ndarray:
    """Logits [N, classes] of a Keras model for uint8 images as stored, through the same input transform as
    training (tf_emnist.data.Batches), on any backend.

    tta > 1 (test-time augmentation): the log of the mean probability over the images and
    tta - 1 randomly transformed copies (random_affine at `tta_strength`). Each copy is
    seeded by its view and batch, so a rerun sees the same views.
    """
    from tf_emnist.data import Batches
    from tf_emnist.feeding import predict_batches

    if tta < 1:
        raise ValueError(f"tta must be >= 1 (the number of views, the image itself included), got {tta}")
    labels = np.zeros(len(images), np.int32)
    logits = predict_batches(model, Batches(images, labels, batch_size, upright=upright))
    if tta == 1:
        return logits
    probabilities = softmax(logits)
    for view in range(1, tta):
        views = Batches(images, labels, batch_size, upright=upright, augment=tta_strength, view=view)
        probabilities += softmax(predict_batches(model, views))
    return np.log(probabilities / tta)


class ModelSource:
    """A model that reads uint8 images [N, 28, 28]: upright, or as NIST/tfds store them."""

    kind = "model"
    batch_size = 1024  # images a call reads at most

    def __init__(self, path: str, task: Task, configs: list[TrainConfig]):
        self.path, self.task, self.configs = path, task, configs

    @property
    def config(self) -> TrainConfig:
        """The training config (an ensemble's first model's)."""
        return self.configs[0]

    @property
    def members(self) -> int:
        """How many models it averages (an ensemble counts each of its models)."""
        return len(self.configs)

    @property
    def class_names(self) -> list[str]:
        return list(self.task.class_names)

    @property
    def metrics(self) -> dict:
        """Its own test figures, where it ships them (an export's assets.extra/metrics.json)."""
        return {}

    @property
    def version(self) -> int:
        """Its version: the number of its folder (TF Serving's layout), else 1."""
        base = os.path.basename(os.path.normpath(self.path))
        return int(base) if base.isdigit() else 1

    @property
    def identity(self) -> str:
        """What tells this model from another (its absolute path), for caching its answers."""
        return os.path.abspath(self.path)

    @property
    def run_dir(self) -> str | None:
        """The run directory it is the model of, None for an export."""
        return None

    @property
    def finished(self) -> bool:
        """Whether its training finished (an export's did)."""
        return True

    def logits(self, images: np.ndarray, stored_orientation: bool = False, *, tta: int = 1,
               tta_strength: float = TTA_STRENGTH) -> np.ndarray:
        """float64 logits [N, classes] of uint8 images [N, 28, 28], read in batches.

        `tta` > 1 (test-time augmentation, run directories only): the log of the mean
        probability over the image and tta - 1 seeded random views (`predict_logits`).
        """
        self.check_tta(tta)
        images = np.asarray(images, np.uint8)
        if not len(images):
            return np.zeros((0, self.task.num_classes))
        return np.concatenate([self._logits(images[i: i + self.batch_size], stored_orientation)
                               for i in range(0, len(images), self.batch_size)]).astype(np.float64)

    def outputs(self, images: np.ndarray, stored_orientation: bool = False) -> dict[str, np.ndarray]:
        """characters, class_ids, logits and probabilities of uint8 images (see `outputs`)."""
        return outputs(self.logits(images, stored_orientation), self.class_names)

    def check_tta(self, tta: int) -> None:
        """A one-line error unless this model can average `tta` views of an image (run directories can)."""
        if tta > 1:
            raise SourceError("--tta needs run directories (Keras models), not exports; drop --tta or pass the runs")

    def _logits(self, images: np.ndarray, stored_orientation: bool) -> np.ndarray:
        raise NotImplementedError

    def logits_function(self, xla: bool = False):
        """f(uint8 upright images [N, 28, 28]) -> float32 logits, as fast as the format runs: a serving
        function compiled by XLA in this process with `xla` where it has one, else its own runtime."""
        try:
            serve = self.serving_function()
        except SourceError:
            return lambda images: self._logits(images, False)
        import tensorflow as tf

        return tf.function(lambda images: serve(images=images)["logits"], jit_compile=xla)

    def serving_function(self, stored_orientation: bool = False, xla: bool = False):
        """A TensorFlow function images=uint8 [N, 28, 28] -> a dict with logits, probabilities, class_ids,
        characters: what an exported SavedModel's signatures hold."""
        raise SourceError(f"{self.path} is a {self.kind} export, which cannot join a SavedModel; list its run "
                          "directories instead")

    def resources(self) -> list:
        """What an export of its serving function must track to save the variables that function reads."""
        return []

    def keras_models(self) -> list:
        """[(Keras model, its TrainConfig)], what a TFLite export is converted from."""
        raise SourceError(f"{self.path} is an export; a TFLite export is built from the Keras models, so list "
                          "run directories (model.keras)")

    def validation_images(self, images: np.ndarray, labels: np.ndarray):
        """The validation images its training held out of train `images` (see tf_emnist.data.split_validation)."""
        from tf_emnist.data import split_validation

        if not self.config.validation_split:
            raise SourceError(f"{self.path} held out no validation images (a refit); evaluate it on the test split")
        _, val_idx = split_validation(len(labels), self.config.validation_split, self.config.split_seed)
        return images[val_idx], labels[val_idx]


class RunSource(ModelSource):
    """A run directory's model.keras, on whichever Keras backend this process runs."""

    kind = "Keras run"
    settings_file = "config.json"

    @staticmethod
    def model_files(path: str) -> list[str]:
        return [os.path.join(path, KERAS_FILE)]

    def __init__(self, path: str):
        from tf_emnist.runs import load_run

        model, config, task = load_run(path)
        super().__init__(path, task, [config])
        self.model = model

    @property
    def run_dir(self) -> str:
        return self.path

    @property
    def finished(self) -> bool:
        from tf_emnist.runs import read_state

        return bool(read_state(self.path)["finished"])

    def check_tta(self, tta: int) -> None:
        pass

    def _logits(self, images, stored_orientation):
        return self.logits(images, stored_orientation)

    def logits(self, images: np.ndarray, stored_orientation: bool = False, *, tta: int = 1,
               tta_strength: float = TTA_STRENGTH) -> np.ndarray:
        stored = np.asarray(images, np.uint8)
        if not stored_orientation:
            stored = np.ascontiguousarray(stored.transpose(0, 2, 1))
        return predict_logits(self.model, stored, self.config.upright, batch_size=self.batch_size, tta=tta,
                              tta_strength=tta_strength)

    def serving_function(self, stored_orientation: bool = False, xla: bool = False):
        from tf_emnist.signatures import make_serving_function

        return make_serving_function(self.model, self.class_names, self.config, stored_orientation=stored_orientation,
                                     xla=xla)

    def keras_models(self) -> list:
        return [(self.model, self.config)]


class ExportSource(ModelSource):
    """What SavedModel and TFLite exports share: their assets.extra (task, configs, figures)."""

    settings_file = os.path.join(EXTRA, "config.json")

    def __init__(self, path: str):
        extra = os.path.join(path, EXTRA)
        settings = os.path.join(extra, "config.json")
        if not os.path.isfile(settings):
            raise SourceError(f"{path} is an export without {EXTRA}/config.json, so not a tf-emnist export; "
                              "export a run with `tf-emnist export RUN_DIR`")
        configs = [read_json_object(settings, "the export's settings")]
        if os.path.isfile(os.path.join(extra, ENSEMBLE)):
            configs = read_json(os.path.join(extra, ENSEMBLE))["members"]
        configs = [config_from_dict(c, settings) for c in configs]
        super().__init__(path, get_task(configs[0].task), configs)
        figures = os.path.join(extra, "metrics.json")
        self._metrics = read_json(figures) if os.path.isfile(figures) else {}
        self._check_files()

    def _check_files(self) -> None:
        """A one-line error for a model file that is not what the export wrote (truncated, damaged), before
        any runtime reads it: a truncated TFLite file crashes its interpreter."""
        info = os.path.join(self.path, EXTRA, EXPORT_INFO)
        recorded = read_json_object(info, "the export's record").get("files", {}) if os.path.isfile(info) else {}
        problems = damaged_files(self.path, recorded)
        for name in self.model_files(self.path):
            relative = os.path.relpath(name, self.path)
            if relative not in recorded and not os.path.isfile(name):
                problems.append(f"{relative} is missing")
        if problems:
            raise SourceError(f"{self.path} is damaged: {problems[0]}; export it again, or restore it from a copy")

    @property
    def metrics(self) -> dict:
        return self._metrics


class SavedModelSource(ExportSource):
    """A SavedModel export: its signatures serving_default (upright) and serve_stored."""

    kind = "SavedModel"

    @staticmethod
    def model_files(path: str) -> list[str]:
        variables = os.path.join(path, "variables")
        data = sorted(os.path.join(variables, n) for n in os.listdir(variables)) if os.path.isdir(variables) else []
        return [os.path.join(path, SAVED_MODEL_FILE), *(f for f in data if ".data-" in f)]

    def __init__(self, path: str):
        super().__init__(path)
        tf = _tensorflow(self)
        try:
            self.saved_model = tf.saved_model.load(path)
        except Exception as e:  # damaged files, whatever TensorFlow's reader raises (the record finds most first)
            raise SourceError(f"{path} cannot be loaded ({e.__class__.__name__}): its files are damaged; export it "
                              "again, or restore it from a copy") from None

    def serving_function(self, stored_orientation: bool = False, xla: bool = False):
        return self.saved_model.signatures["serve_stored" if stored_orientation else "serving_default"]

    def resources(self) -> list:
        return [self.saved_model]

    def _logits(self, images, stored_orientation):
        return np.asarray(self.serving_function(stored_orientation)(images=images)["logits"])


class TFLiteSource(ExportSource):
    """A TFLite export: its one signature, serving_default (upright images).

    LiteRT's interpreter (package ai-edge-litert) when installed, else TensorFlow's
    tf.lite.Interpreter, which TensorFlow deprecates in its favour. An interpreter runs one
    call at a time.
    """

    kind = "TFLite"

    @staticmethod
    def model_files(path: str) -> list[str]:
        return [os.path.join(path, TFLITE_FILE)]

    def __init__(self, path: str, num_threads: int | None = None):
        super().__init__(path)
        self.runner = load_tflite_signature(path, num_threads)
        self._lock = threading.Lock()

    def _logits(self, images, stored_orientation):
        if stored_orientation:
            images = np.ascontiguousarray(images.transpose(0, 2, 1))
        with self._lock:
            return np.asarray(self.runner(images=images)["logits"])


def load_tflite_signature(path: str | os.PathLike, num_threads: int | None = None):
    """The serving_default signature of a TFLite export: runner(images=uint8 [N, 28, 28]) -> dict of arrays.

    The interpreter reads the file's bytes, which it verifies as a flatbuffer first: given the
    file's path instead, it crashes the process on a truncated file.
    """
    import warnings

    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        Interpreter = _tensorflow(path).lite.Interpreter
    with open(os.path.join(path, TFLITE_FILE), "rb") as f:
        content = f.read()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated.*")
        try:
            interpreter = Interpreter(model_content=content, num_threads=num_threads or os.cpu_count())
            return interpreter.get_signature_runner("serving_default")
        except ValueError as e:
            raise SourceError(f"{path}/{TFLITE_FILE} is not a valid TFLite model ({e}); export it again, or "
                              "restore it from a copy") from None


def _tensorflow(what):
    """TensorFlow, which reads exports, or a one-line error where it is not installed."""
    try:
        import tensorflow as tf
    except ImportError:
        path = getattr(what, "path", what)
        raise SourceError(f"reading the export {path} needs TensorFlow (pip install tensorflow); without it, "
                          "give the run directory it was exported from") from None
    return tf


class EnsembleSource(ModelSource):
    """Several sources of one task, answering with their mean probability (each model counted once)."""

    kind = "ensemble"

    def __init__(self, sources: list[ModelSource]):
        first = sources[0]
        for source in sources[1:]:
            if source.task.name != first.task.name:
                raise SourceError(f"{source.path} is a {source.task.name} model and {first.path} a "
                                  f"{first.task.name} model; an ensemble needs one task")
        super().__init__(first.path, first.task, [c for s in sources for c in s.configs])
        self.sources = sources

    @property
    def identity(self) -> str:
        return ",".join(source.identity for source in self.sources)

    @property
    def finished(self) -> bool:
        return all(source.finished for source in self.sources)

    def check_tta(self, tta: int) -> None:
        for source in self.sources:
            source.check_tta(tta)

    def _logits(self, images, stored_orientation):
        return self.logits(images, stored_orientation)

    def logits(self, images, stored_orientation=False, **options):
        return ensemble_logits([s.logits(images, stored_orientation, **options) for s in self.sources],
                               [s.members for s in self.sources])

    def serving_function(self, stored_orientation: bool = False, xla: bool = False):
        from tf_emnist.signatures import make_ensemble_function

        functions = [s.serving_function(stored_orientation, xla) for s in self.sources]
        return make_ensemble_function(functions, [s.members for s in self.sources], self.class_names)

    def resources(self) -> list:
        return [resource for source in self.sources for resource in source.resources()]

    def keras_models(self) -> list:
        return [model for source in self.sources for model in source.keras_models()]


FORMATS = ((KERAS_FILE, RunSource), (SAVED_MODEL_FILE, SavedModelSource), (TFLITE_FILE, TFLiteSource))


def source_class(path: str | os.PathLike):
    """The class that reads `path` (by the file it holds), or None."""
    return next((cls for name, cls in FORMATS if os.path.isfile(os.path.join(path, name))), None)


def newest_version(path: str | os.PathLike) -> str:
    """A model base path as TensorFlow Serving reads it (a folder of numbered versions, e.g.
    saved_models/merged) -> its highest version that holds a model; any other path unchanged."""
    path = os.fspath(path)
    if not os.path.isdir(path) or source_class(path) is not None:
        return path
    versions = [int(name) for name in os.listdir(path) if name.isdigit() and source_class(os.path.join(path, name))]
    return os.path.join(path, str(max(versions))) if versions else path


def load_source(paths) -> ModelSource:
    """The model at a path (a folder of versions means its newest), or the ensemble of several paths."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    sources = [_load_one(newest_version(p)) for p in paths]
    return sources[0] if len(sources) == 1 else EnsembleSource(sources)


def _load_one(path: str) -> ModelSource:
    cls = source_class(path)
    if cls is None and os.path.isfile(os.path.join(path, RunSource.settings_file)):
        raise SourceError(f"{path} has not finished training and holds no model yet; resume it with the same "
                          "`tf-emnist train` command")
    if cls is None:
        raise SourceError(f"{path} is neither a tf-emnist run ({KERAS_FILE}) nor an export ({SAVED_MODEL_FILE} or "
                          f"{TFLITE_FILE}); train with `tf-emnist train` or export with `tf-emnist export`")
    return cls(path)


def is_model(path: str | os.PathLike) -> bool:
    """Whether `path` holds a model some source reads (a folder of versions counts)."""
    return source_class(newest_version(path)) is not None


def keras_file(path: str | os.PathLike) -> str | None:
    """The .keras file of a run directory, or `path` itself if it is one; None where there is none."""
    path = os.fspath(path)
    file = os.path.join(path, KERAS_FILE) if os.path.isdir(path) else path
    return file if os.path.isfile(file) and file.endswith(".keras") else None


def read_task(path: str | os.PathLike) -> str | None:
    """The task a model answers, from its recorded settings, without loading it (None: no model there)."""
    path = newest_version(path)
    cls = source_class(path)
    settings = os.path.join(path, cls.settings_file) if cls else None
    if settings is None or not os.path.isfile(settings):
        return None
    return read_json_object(settings, "the model's settings").get("task")


def model_files(path: str | os.PathLike) -> list[str]:
    """The files that hold a model's weights and graph (what identifies it); empty where none is."""
    path = newest_version(path)
    cls = source_class(path)
    return cls.model_files(path) if cls else []
