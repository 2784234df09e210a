"""Writing exports: a SavedModel (TF Serving layout) or a TFLite file with raw-image signatures, from any
model or ensemble tf_emnist.sources reads. Reading them back is tf_emnist.sources' job."""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import tempfile

from tf_emnist.config import TrainConfig
from tf_emnist.files import (create_exclusive, disk_full, exchange_paths, file_digests, pid_alive, read_json,
                             remove_stale_temporaries, write_json)
from tf_emnist.sources import ENSEMBLE, EXPORT_INFO, EXTRA, TFLITE_FILE, ModelSource, load_source

log = logging.getLogger("tf_emnist")

FORMATS = ("savedmodel", "tflite")
# TFLite post-training quantization: "dynamic" stores the weights in int8 and quantizes the
# activations batch by batch (int8 matmuls); "float16" halves the file and computes in float32.
QUANTIZATIONS = ("none", "dynamic", "float16")
CLAIM = ".claim"  # task_dir/.<version>.claim: a running export holds this version (its pid inside)
# The SavedModel's endpoints -> whether they take images in the NIST/tfds stored orientation.
# Keras's ExportArchive writes the endpoint `serve` as the signature serving_default.
ENDPOINTS = {"serve": False, "serve_stored": True}


class ExportError(ValueError):
    """An export cannot be written where asked (message: one line)."""


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


def convert_to_tflite(models: list, class_names, quantize: str = "none") -> bytes:
    """A TFLite flatbuffer with signature serving_default, as the SavedModel's (upright images).

    `models`: [(Keras model, its TrainConfig)]; several make their ensemble. Built-in ops
    only, any batch size: each model is unrolled (see `unroll_lstms`) and its weights frozen
    into constants. The TFLite converter does not freeze Keras 3's variables itself: its
    model then reads uninitialised variables. `quantize`: one of QUANTIZATIONS.
    """
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantize!r}; choose one of {', '.join(QUANTIZATIONS)}")
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    from tf_emnist.signatures import graph_outputs, image_spec, make_ensemble_function, make_serving_function

    functions = [make_serving_function(unroll_lstms(model), class_names, config, split=False)
                 for model, config in models]
    serve = functions[0] if len(functions) == 1 else make_ensemble_function(functions, [1] * len(functions),
                                                                            class_names)
    logits = tf.function(lambda images: serve(images=images)["logits"], input_signature=[image_spec()])
    frozen = convert_variables_to_constants_v2(logits.get_concrete_function())

    @tf.function(input_signature=[image_spec()])
    def signature(images):
        return graph_outputs(frozen(images)[0], class_names)

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
        if create_exclusive(claim, str(os.getpid())):  # a full disk raises here, and leaves no claim
            break
        if version is None:
            continue  # another export took this number first: take the next
        raise ExportError(f"{target} is being written by another export (see {claim}); "
                          "wait for it, or choose another --version")
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


def _write_extra(folder: str, source: ModelSource, paths: list[str], format: str, quantize: str) -> None:
    """assets.extra/: config.json, labels.txt, export.json, for an ensemble ensemble.json (sources by name), and
    for one finished run its test figures (metrics.json, which `serve` shows)."""
    extra = os.path.join(folder, EXTRA)
    os.makedirs(extra, exist_ok=True)
    configs = [portable_config(config) for config in source.configs]
    write_json(os.path.join(extra, "config.json"), configs[0])
    # The model's files by size and sha256: a reader tells a truncated or damaged file from a good one.
    write_json(os.path.join(extra, EXPORT_INFO), {"format": format,
                                                   **({"quantize": quantize} if format == "tflite" else {}),
                                                   "files": file_digests(folder, skip=(EXTRA,))})
    if len(configs) > 1:
        write_json(os.path.join(extra, ENSEMBLE), {"members": configs,
                                                   "sources": [os.path.basename(os.path.normpath(p)) for p in paths]})
    with open(os.path.join(extra, "labels.txt"), "w") as f:
        f.write("\n".join(source.class_names) + "\n")
    run_metrics = os.path.join(source.run_dir or "", "metrics.json")
    if source.run_dir is not None and os.path.isfile(run_metrics):
        figures = {k: v for k, v in read_json(run_metrics).items() if isinstance(v, (int, float, str))}
        write_json(os.path.join(extra, "metrics.json"), figures)


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
                 force: bool = False, require_xla: bool = False, format: str = "savedmodel",
                 quantize: str = "none") -> str:
    """Export a run's model, or an ensemble, to output_root/<task>/<version>/ as a SavedModel; returns its path.

    `sources`: a run directory, or several run directories and tf-emnist SavedModels, whose
    models are averaged (see tf_emnist.signatures.make_ensemble_function). Signatures:
    `serving_default` (upright uint8 images) and `serve_stored` (NIST/tfds orientation). The
    class names and the training config travel in assets.extra/ (an ensemble's: the first
    model's in config.json, every model's in ensemble.json, with data folders and sources by
    name).

    The export is portable: no function in it needs XLA, so it loads wherever SavedModels
    load (TensorFlow Serving included). `require_xla=True` marks the numeric part for XLA, for
    users who serve it in-process only. See `claim_version` for how concurrent exports and
    `force` stay safe.

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
    source = load_source(paths)
    if len(paths) == 1 and source.run_dir is None:
        raise ValueError(f"{paths[0]} is already an export; export a run directory, or list several "
                         "sources to export their ensemble")
    task_dir = os.path.join(output_root, source.task.name + ("-tflite" if format == "tflite" else ""))
    # Built before a version is claimed: a source that cannot be exported claims nothing.
    if format == "tflite":
        log.info("converting to TFLite (%s quantization)", quantize)
        contents = convert_to_tflite(source.keras_models(), source.class_names, quantize)
    else:
        log.info("writing the SavedModel (%d model%s)", source.members, "s" if source.members > 1 else "")
        archive = _build_archive(source, require_xla)
    with claim_version(task_dir, version, force) as (target, tmp):
        if format == "tflite":
            with open(os.path.join(tmp, TFLITE_FILE), "wb") as f:
                f.write(contents)
        else:
            try:
                archive.write_out(tmp, verbose=False)
            except Exception as e:  # TensorFlow reports a full disk as its own error
                if disk_full(e):
                    raise OSError(errno.ENOSPC, "No space left on device", target) from None
                raise
        _write_extra(tmp, source, paths, format, quantize)
    log.info("exported %s to %s", " + ".join(paths), target)
    return target


def _build_archive(source: ModelSource, require_xla: bool):
    """A keras ExportArchive with the ENDPOINTS of the source's model (an ensemble's: their mean)."""
    import keras

    # The endpoints capture the variables they use, so only what the source names is tracked:
    # tracking a Keras model as well would store every weight twice.
    archive = keras.export.ExportArchive()
    for resource in source.resources():
        archive.track(resource)
    for name, stored in ENDPOINTS.items():
        archive.add_endpoint(name, source.serving_function(stored, require_xla))
    return archive
