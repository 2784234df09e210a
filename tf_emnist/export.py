"""SavedModel (TF Serving layout) and TFLite export with a raw-image serving signature; ensembles of exports."""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass

import numpy as np

from tf_emnist.config import TrainConfig, config_from_dict
from tf_emnist.files import exchange_paths, pid_alive, read_json, remove_stale_temporaries, write_json
from tf_emnist.tasks import Task, get_task
from tf_emnist.runs import MODEL, load_run

log = logging.getLogger("tf_emnist")

IMAGE_SHAPE = (None, 28, 28)
EXTRA = "assets.extra"
ENSEMBLE = "ensemble.json"  # in EXTRA: the config of each model an ensemble export averages

SPLIT_FROM = 256  # batches this large are classified in two halves at once
FORMATS = ("savedmodel", "tflite")
TFLITE_FILE = "model.tflite"
# TFLite post-training quantization: "dynamic" stores the weights in int8 and quantizes the
# activations batch by batch (int8 matmuls); "float16" halves the file and computes in float32.
QUANTIZATIONS = ("none", "dynamic", "float16")
EXPORT_INFO = "export.json"  # in EXTRA: the format and quantization of the export
CLAIM = ".claim"  # task_dir/.<version>.claim: a running export holds this version (its pid inside)


class ExportError(ValueError):
    """An export cannot be written where asked (message: one line)."""
# Signature name -> whether it takes images in the NIST/tfds stored orientation.
SIGNATURES = {"serve": False, "serve_stored": True}


def make_serving_function(model, class_names, config: TrainConfig, *, stored_orientation: bool = False,
                          jit_compile: bool = False, split: bool = True):
    """A tf.function: uint8 images [N, 28, 28] -> logits, probabilities, class_ids, characters.

    Images are upright (rows are the character's rows, light ink on dark, as EMNIST shows
    them), or as NIST/tfds store them with `stored_orientation`. Scaling and orientation
    happen inside the graph. `split`: classify large batches in two halves side by side.
    """
    import tensorflow as tf

    # The model reads upright rows when trained with config.upright, stored rows otherwise.
    transpose = stored_orientation == config.upright

    def classify(images):  # the numeric part, XLA-compiled when asked (strings cannot be)
        x = tf.cast(images, tf.float32) / 255.0
        if transpose:
            x = tf.transpose(x, [0, 2, 1])
        return tf.cast(model(x, training=False), tf.float32)

    classify = tf.function(classify, jit_compile=jit_compile)

    def in_halves(images):
        # Two independent launches, which TensorFlow's executor runs side by side: 1.17x the
        # throughput of one launch at batch 1024 on 2 cores (docs/performance.md).
        half = tf.shape(images)[0] // 2
        return tf.concat([classify(images[:half]), classify(images[half:])], axis=0)

    @tf.function(input_signature=[tf.TensorSpec(IMAGE_SHAPE, tf.uint8, name="images")])
    def serve(images):
        if not split:
            return _outputs(classify(images), class_names)
        logits = tf.cond(tf.shape(images)[0] >= SPLIT_FROM, lambda: in_halves(images), lambda: classify(images))
        return _outputs(logits, class_names)

    return serve


def make_ensemble_function(members: list, weights: list[int], class_names):
    """A tf.function like make_serving_function's, answering with the members' weighted mean probability.

    `members` are serving functions (uint8 images -> a dict with "logits"); a member that is
    itself an ensemble of k models weighs k, so every model counts once. The logits are the
    log of the mean probability, so softmax gives the ensemble's probabilities back.
    """
    import tensorflow as tf

    log_weights = tf.math.log(tf.constant(weights, tf.float32) / sum(weights))

    @tf.function(input_signature=[tf.TensorSpec(IMAGE_SHAPE, tf.uint8, name="images")])
    def serve(images):
        log_probabilities = tf.stack([tf.nn.log_softmax(member(images=images)["logits"]) for member in members])
        logits = tf.reduce_logsumexp(log_probabilities + log_weights[:, None, None], axis=0)
        return _outputs(logits, class_names)

    return serve


def _outputs(logits, class_names) -> dict:
    import tensorflow as tf

    class_ids = tf.argmax(logits, axis=-1, output_type=tf.int32)
    return {"logits": logits, "probabilities": tf.nn.softmax(logits), "class_ids": class_ids,
            "characters": tf.gather(tf.constant(list(class_names)), class_ids)}


def is_saved_model(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(path, "saved_model.pb"))


def is_tflite_export(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(path, TFLITE_FILE))


def is_export(path: str | os.PathLike) -> bool:
    return is_saved_model(path) or is_tflite_export(path)


def newest_version(path: str | os.PathLike) -> str:
    """A model base path as TensorFlow Serving reads it (a folder of numbered versions, e.g.
    saved_models/merged) -> its highest version that holds an export; any other path unchanged."""
    path = os.fspath(path)
    if not os.path.isdir(path) or is_export(path) or os.path.isfile(os.path.join(path, MODEL)):
        return path
    versions = [int(name) for name in os.listdir(path) if name.isdigit() and is_export(os.path.join(path, name))]
    return os.path.join(path, str(max(versions))) if versions else path


def unroll_lstms(model):
    """A copy of a Keras model, same weights, whose LSTMs (plain or Bidirectional) are unrolled.

    TFLite's built-in ops cannot run the LSTM's loop at a variable batch size (the
    converter fails on tf.TensorListReserve); the unrolled 28 steps are plain matmuls and
    element-wise ops, which they can.
    """
    import keras

    def clone(layer):
        config = layer.get_config()
        if isinstance(layer, keras.layers.Bidirectional):
            for direction in ("layer", "backward_layer"):
                if config.get(direction):
                    config[direction]["config"]["unroll"] = True
        elif isinstance(layer, keras.layers.LSTM):
            config["unroll"] = True
        return layer.__class__.from_config(config)

    twin = keras.models.clone_model(model, clone_function=clone)
    twin.set_weights(model.get_weights())
    return twin


def convert_to_tflite(sources: list, class_names, quantize: str = "none") -> bytes:
    """A TFLite flatbuffer with signature serving_default, as the SavedModel's (upright images).

    `sources` are run directories' Sources; several make their ensemble. Built-in ops only,
    any batch size: each model is unrolled (see `unroll_lstms`) and its weights frozen into
    constants. The TFLite converter does not freeze Keras 3's variables itself: its model
    then reads uninitialised variables. `quantize`: one of QUANTIZATIONS.
    """
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantize!r}; choose one of {', '.join(QUANTIZATIONS)}")
    import tempfile

    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    spec = tf.TensorSpec(IMAGE_SHAPE, tf.uint8, name="images")
    functions = [make_serving_function(unroll_lstms(s.model), class_names, s.config, jit_compile=False, split=False)
                 for s in sources]
    serve = functions[0] if len(functions) == 1 else make_ensemble_function(functions, [1] * len(functions),
                                                                            class_names)
    logits = tf.function(lambda images: serve(images=images)["logits"], input_signature=[spec])
    frozen = convert_variables_to_constants_v2(logits.get_concrete_function())

    @tf.function(input_signature=[spec])
    def signature(images):
        return _outputs(frozen(images)[0], class_names)

    tf_log = logging.getLogger("tensorflow")
    level = tf_log.level
    tf_log.setLevel(logging.WARNING)  # not "Assets written to: <a temporary folder>"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tf.saved_model.save(tf.Module(), tmp, signatures={"serving_default": signature.get_concrete_function()})
            converter = tf.lite.TFLiteConverter.from_saved_model(tmp)
            if quantize != "none":
                converter.optimizations = [tf.lite.Optimize.DEFAULT]
            if quantize == "float16":
                converter.target_spec.supported_types = [tf.float16]
            return converter.convert()
    finally:
        tf_log.setLevel(level)


def load_tflite_signature(path: str | os.PathLike, num_threads: int | None = None):
    """The serving_default signature of a TFLite export: runner(images=uint8 [N, 28, 28]) -> dict of arrays.

    LiteRT's interpreter (package ai-edge-litert) when installed, else TensorFlow's
    tf.lite.Interpreter, which TensorFlow deprecates in its favour.
    """
    import warnings

    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated.*")
        interpreter = Interpreter(model_path=os.path.join(path, TFLITE_FILE), num_threads=num_threads or os.cpu_count())
    return interpreter.get_signature_runner("serving_default")


@dataclass
class Source:
    """What export and evaluate need of a run directory or of a tf-emnist export (SavedModel or TFLite)."""

    path: str
    task: Task
    configs: list[TrainConfig]  # one per model: several for an exported ensemble
    model: object = None  # the Keras model of a run directory
    saved_model: object = None  # the loaded SavedModel of a SavedModel export
    tflite: object = None  # the serving signature of a TFLite export (see load_tflite_signature)

    @property
    def config(self) -> TrainConfig:
        return self.configs[0]

    def serving_function(self, stored_orientation: bool, jit_compile: bool = False):
        """images=uint8 [N, 28, 28] -> a dict with logits, probabilities, class_ids, characters."""
        if self.saved_model is not None:
            return self.saved_model.signatures["serve_stored" if stored_orientation else "serving_default"]
        if self.tflite is not None:  # a TFLite export has only the upright signature
            def serve(images):
                images = np.asarray(images)
                return self.tflite(images=np.ascontiguousarray(images.transpose(0, 2, 1)) if stored_orientation
                                   else images)
            return serve
        return make_serving_function(self.model, self.task.class_names, self.config,
                                     stored_orientation=stored_orientation, jit_compile=jit_compile)


def load_source(path: str | os.PathLike) -> Source:
    """A run directory (model.keras) or an export written by `tf-emnist export`, ready to serve."""
    path = os.fspath(path)
    if not is_export(path):
        if not os.path.isfile(os.path.join(path, MODEL)):
            raise FileNotFoundError(f"{path} is neither a tf-emnist run ({MODEL}) nor an export (saved_model.pb or "
                                    f"{TFLITE_FILE}); train with `tf-emnist train` or export with `tf-emnist export`")
        model, config, task = load_run(path)
        return Source(path, task, [config], model=model)
    extra = os.path.join(path, EXTRA)
    if not os.path.isfile(os.path.join(extra, "config.json")):
        raise FileNotFoundError(f"{path} is an export without {EXTRA}/config.json, so not a tf-emnist export; "
                                "export a run with `tf-emnist export RUN_DIR`")
    configs = [read_json(os.path.join(extra, "config.json"))]
    if os.path.isfile(os.path.join(extra, ENSEMBLE)):
        configs = read_json(os.path.join(extra, ENSEMBLE))["members"]
    configs = [config_from_dict(c, os.path.join(extra, "config.json")) for c in configs]
    task = get_task(configs[0].task)
    if is_tflite_export(path):
        return Source(path, task, configs, tflite=load_tflite_signature(path))
    import tensorflow as tf

    return Source(path, task, configs, saved_model=tf.saved_model.load(path))


def next_version(task_dir: str) -> int:
    """1 + the highest integer version in task_dir, written or claimed by a running export (1 when none)."""
    names = os.listdir(task_dir) if os.path.isdir(task_dir) else []
    versions = [int(name) for name in names if name.isdigit()]
    versions += [int(name[1:-len(CLAIM)]) for name in names
                 if name.startswith(".") and name.endswith(CLAIM) and name[1:-len(CLAIM)].isdigit()]
    return max(versions, default=0) + 1


@contextlib.contextmanager
def claim_version(task_dir: str, version: int | None, force: bool):
    """Claim task_dir/<version> for one export; yield (target, a temporary folder to fill).

    The claim is a file `.<version>.claim` created exclusively, so concurrent exports get
    distinct versions (or, for one explicit version, a clear error). On success the folder
    is renamed into place; with `force` it is swapped with the old version in one step
    where the platform allows it, so the path always holds a complete model.
    """
    if version is not None and version < 1:
        raise ValueError(f"version must be a positive integer, got {version}")
    try:
        os.makedirs(task_dir, exist_ok=True)
    except OSError as e:
        raise ExportError(f"cannot create {task_dir} ({e.strerror}); choose another --output") from None
    _remove_stale_claims(task_dir)
    while True:
        number = next_version(task_dir) if version is None else version
        target, claim = os.path.join(task_dir, str(number)), os.path.join(task_dir, f".{number}{CLAIM}")
        if os.path.exists(target) and not force:
            if version is None:
                continue
            raise ExportError(f"{target} already exists; pass --force to replace it or --version N for another version")
        try:
            fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if version is None:
                continue  # another export took this number first: take the next
            raise ExportError(f"{target} is being written by another export (see {claim}); "
                              "wait for it, or choose another --version") from None
        except OSError as e:
            raise ExportError(f"cannot write in {task_dir} ({e.strerror}); choose another --output") from None
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        break
    tmp = None
    try:
        remove_stale_temporaries(target)
        tmp = tempfile.mkdtemp(prefix=f".{number}.tmp-{os.getpid()}-", dir=task_dir)
        yield target, tmp
        os.chmod(tmp, 0o755)
        if os.path.exists(target):
            if not exchange_paths(tmp, target):  # no atomic swap here: old aside, new in, at once
                os.replace(target, tmp + ".old")
                os.replace(tmp, target)
                tmp = tmp + ".old"
        else:
            os.replace(tmp, target)
            tmp = None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        os.remove(claim)


def _remove_stale_claims(task_dir: str) -> None:
    for name in os.listdir(task_dir):
        if name.startswith(".") and name.endswith(CLAIM):
            path = os.path.join(task_dir, name)
            try:
                with open(path) as f:
                    pid = int(f.read().strip() or 0)
            except (OSError, ValueError):
                continue
            if pid and not pid_alive(pid):
                with contextlib.suppress(OSError):
                    os.remove(path)


def _write_extra(folder: str, loaded: list, paths: list[str], task: Task, format: str, quantize: str) -> None:
    """assets.extra/: config.json, labels.txt, export.json, and for an ensemble ensemble.json (sources by name)."""
    extra = os.path.join(folder, EXTRA)
    os.makedirs(extra, exist_ok=True)
    configs = [portable_config(config) for source in loaded for config in source.configs]
    write_json(os.path.join(extra, "config.json"), configs[0])
    write_json(os.path.join(extra, EXPORT_INFO), {"format": format,
                                                   **({"quantize": quantize} if format == "tflite" else {})})
    if len(configs) > 1:
        write_json(os.path.join(extra, ENSEMBLE), {"members": configs,
                                                   "sources": [os.path.basename(os.path.normpath(p)) for p in paths]})
    with open(os.path.join(extra, "labels.txt"), "w") as f:
        f.write("\n".join(task.class_names) + "\n")
    run_metrics = os.path.join(paths[0], "metrics.json")
    if len(loaded) == 1 and loaded[0].model is not None and os.path.isfile(run_metrics):
        figures = {k: v for k, v in read_json(run_metrics).items() if isinstance(v, (int, float, str))}
        write_json(os.path.join(extra, "metrics.json"), figures)  # the test figures `serve` shows


def portable_config(config: TrainConfig) -> dict:
    """A run's config as an export records it: data folders, the run a refit refits, the model it
    started from and teachers by name only, no path of this machine."""
    values = config.to_dict()
    for name in ("data_dir", "tfds_dir", "refit", "init_from"):
        if values.get(name):
            values[name] = os.path.basename(os.path.normpath(values[name]))
    if values.get("teacher"):  # a distilled model's teacher, by name
        values["teacher"] = ",".join(os.path.basename(os.path.normpath(p)) for p in values["teacher"].split(","))
    return values


def xla_functions(path: str | os.PathLike) -> list[str]:
    """Names of the functions in a SavedModel that must be XLA-compiled to run (empty for a portable export)."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    return [function.signature.name for graph in proto.meta_graphs for function in graph.graph_def.library.function
            if function.attr["_XlaMustCompile"].b]


def export_model(sources, output_root: str = "saved_models", *, version: int | None = None,
                 force: bool = False, jit_compile: bool = False, format: str = "savedmodel",
                 quantize: str = "none") -> str:
    """Export a run's model, or an ensemble, to output_root/<task>/<version>/ as a SavedModel; returns its path.

    `sources`: a run directory, or several run directories and tf-emnist SavedModels, whose
    models are averaged (see make_ensemble_function). Signatures: `serving_default`
    (upright uint8 images) and `serve_stored` (NIST/tfds orientation). The class names and
    the training config travel in assets.extra/ (an ensemble's: the first model's in
    config.json, every model's in ensemble.json, with data folders and sources by name).

    The export is portable: no function in it needs XLA, so it loads wherever SavedModels
    load (TensorFlow Serving included). `jit_compile=True` marks the numeric part for XLA,
    for users who serve it in-process only. See `claim_version` for how concurrent exports
    and `force` stay safe.

    `format="tflite"` writes output_root/<task>-tflite/<version>/model.tflite instead, with
    the same assets.extra/ (see `convert_to_tflite`); its sources must be run directories.
    `quantize` (TFLite only): one of QUANTIZATIONS, recorded in assets.extra/export.json.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantize!r}; choose one of {', '.join(QUANTIZATIONS)}")
    if quantize != "none" and format != "tflite":
        raise ValueError(f"quantization {quantize!r} is for TFLite exports; add --format tflite")
    paths = [os.fspath(sources)] if isinstance(sources, (str, os.PathLike)) else [os.fspath(s) for s in sources]
    if len(paths) == 1 and is_export(paths[0]):
        raise ValueError(f"{paths[0]} is already an export; export a run directory, or list several "
                         "sources to export their ensemble")
    loaded = [load_source(p) for p in paths]
    task = loaded[0].task
    for source in loaded:
        if source.task.name != task.name:
            raise ValueError(f"{source.path} is a {source.task.name} model and {paths[0]} a {task.name} model; "
                             "an ensemble needs one task")
        if format == "tflite" and source.model is None:
            raise ValueError(f"{source.path} is an export; a TFLite export is built from the Keras models, "
                             "so list run directories (model.keras)")
        if source.tflite is not None:
            raise ValueError(f"{source.path} is a TFLite export, which cannot join a SavedModel; "
                             "list its run directories instead")
    task_dir = os.path.join(output_root, task.name + ("-tflite" if format == "tflite" else ""))
    with claim_version(task_dir, version, force) as (target, tmp):
        if format == "tflite":
            log.info("converting to TFLite (%s quantization)", quantize)
            with open(os.path.join(tmp, TFLITE_FILE), "wb") as f:
                f.write(convert_to_tflite(loaded, task.class_names, quantize))
        else:
            log.info("writing the SavedModel (%d model%s)", sum(len(s.configs) for s in loaded),
                     "s" if sum(len(s.configs) for s in loaded) > 1 else "")
            _build_archive(loaded, task, jit_compile).write_out(tmp, verbose=False)
        _write_extra(tmp, loaded, paths, task, format, quantize)
    log.info("exported %s to %s", " + ".join(paths), target)
    return target


def _build_archive(loaded: list, task: Task, jit_compile: bool):
    """A keras ExportArchive with the SIGNATURES of `loaded`'s model, or of their ensemble."""
    import keras

    # The endpoints capture the variables they use, so nothing else is tracked: tracking the
    # Keras model as well would store every weight twice.
    archive = keras.export.ExportArchive()
    for source in loaded:
        if source.saved_model is not None:
            archive.track(source.saved_model)
    for name, stored in SIGNATURES.items():
        functions = [source.serving_function(stored, jit_compile) for source in loaded]
        if len(loaded) > 1:
            functions = [make_ensemble_function(functions, [len(s.configs) for s in loaded], task.class_names)]
        archive.add_endpoint(name, functions[0])
    return archive
