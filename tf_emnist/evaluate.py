"""Test-split evaluation: exact accuracy, per-class accuracy, confusions, metrics.json."""
from __future__ import annotations

import logging
import os

import numpy as np

from tf_emnist.data import TTA_STRENGTH
from tf_emnist.files import read_json_object, save_figure, write_json
from tf_emnist.runs import CONFIG, STATE, read_state
from tf_emnist.sources import ensemble_logits, predict_logits, softmax
from tf_emnist.tasks import Task

log = logging.getLogger("tf_emnist")

__all__ = ["TTA_STRENGTH", "compute_metrics", "ensemble_logits", "evaluate_run", "evaluate_runs", "predict_logits",
           "softmax"]


def compute_metrics(task: Task, logits: np.ndarray, labels: np.ndarray, split: str = "test") -> dict:
    """Every figure of metrics.json, from logits [N, classes] and the true class ids [N].

    The figures of the split are named after it: test_accuracy, or validation_accuracy.
    """
    labels = np.asarray(labels, np.int64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    predicted = logits.argmax(axis=1)
    n, k = len(labels), task.num_classes
    confusion = np.bincount(labels * k + predicted, minlength=k * k).reshape(k, k)
    names = task.class_names
    totals = confusion.sum(axis=1)
    off_diagonal = [(int(confusion[t, p]), t, p) for t in range(k) for p in range(k) if t != p and confusion[t, p]]
    off_diagonal.sort(key=lambda c: (-c[0], c[1], c[2]))
    errors = n - int(np.trace(confusion))
    metrics = {
        "task": task.name,
        f"{split}_examples": int(n),
        f"{split}_accuracy": float(np.trace(confusion) / n),
        f"{split}_loss": float(-log_probs[np.arange(n), labels].mean()),
        f"{split}_errors": errors,
        "per_class_accuracy": {
            names[c]: (float(confusion[c, c] / totals[c]) if totals[c] else None) for c in range(k)
        },
        "top_confusions": [[names[t], names[p], count] for count, t, p in off_diagonal[:10]],
        "confusion_labels": list(names),
        "confusion_matrix": confusion.tolist(),
    }
    if task.class_of_source is None and any(c.isalpha() for c in names):
        # Character predictions collapsed to digit (0) / letter (1), to set beside the
        # dedicated digit-letter model.
        to_kind = np.array([0 if c.isdigit() else 1 for c in names])
        metrics["digit_letter_accuracy"] = float(np.mean(to_kind[predicted] == to_kind[labels]))
        # What --fine-labels answers: the kind with the larger summed probability.
        probabilities = np.exp(log_probs)
        letter_probability = probabilities[:, to_kind == 1].sum(axis=1)
        grouped = (letter_probability > probabilities[:, to_kind == 0].sum(axis=1)).astype(int)
        metrics["digit_letter_accuracy_grouped"] = float(np.mean(grouped == to_kind[labels]))
    return metrics


def evaluate_run(run_dir: str | os.PathLike, *, limit_test: int | None = None, data_dir: str | None = None) -> dict:
    """Evaluate a run directory's model.keras on the full test split; write metrics.json and confusion.png.

    `limit_test` and `data_dir` override the run's config (e.g. to evaluate elsewhere).
    """
    return evaluate_runs([run_dir], limit_test=limit_test, data_dir=data_dir)


def evaluate_runs(run_dirs, *, split: str = "test", output: str | os.PathLike | None = None,
                  limit_test: int | None = None, data_dir: str | None = None,
                  tta: int = 1, tta_strength: float = TTA_STRENGTH, cache: dict | None = None,
                  allow_unfinished: bool = False) -> dict:
    """Evaluate one model, or the ensemble of several (their probabilities averaged), on a split.

    Each of `run_dirs` is a run directory or an export (tf_emnist.sources); an exported
    ensemble of k models weighs k, so every model counts once. split "test": the official
    test split, metrics.json. split "validation": the validation images carved from train,
    as the runs' training held them out, validation_metrics.json: this is where an
    ensemble and the test-time augmentation (`tta` views at `tta_strength`, see
    predict_logits; run directories only) are chosen, before the one test evaluation. The
    files go to the run directory for one plain run, to `output` (required) otherwise, so
    the run's own metrics.json stays the plain model's. `cache`, a dict the caller keeps,
    holds each member's logits for later calls with the same split and options (choosing
    among ensembles that share members). A run whose training has not finished is refused
    (its model.keras is only its best epoch so far) unless `allow_unfinished`; its metrics
    then go to `output`, never into the run, so the run stays resumable.
    """
    from tf_emnist.sources import load_source

    if split not in ("test", "validation"):
        raise ValueError(f"unknown split {split!r}; choose test or validation")
    if tta < 1 or not tta_strength >= 0:
        raise ValueError(f"--tta must be >= 1 and --tta-strength >= 0; got {tta} and {tta_strength}")
    sources = [load_source(os.fspath(r)) for r in run_dirs]
    plain_run = len(sources) == 1 and tta == 1 and sources[0].run_dir is not None
    _check_outputs(sources, output, plain_run, allow_unfinished)
    _check_output_folder(output, sources, plain_run, split)
    for source in sources:
        source.check_tta(tta)
    images, labels = _split_images(sources, split, limit_test, data_dir)
    log.info("evaluating %d model%s on %d %s images%s", len(sources), "s" if len(sources) > 1 else "", len(labels),
             split, f" x {tta} views" if tta > 1 else "")
    cache = {} if cache is None else cache
    logits = []
    for source in sources:
        key = (source.identity, split, limit_test, data_dir, tta, tta_strength)
        if key not in cache:
            cache[key] = source.logits(images, stored_orientation=True, tta=tta, tta_strength=tta_strength)
        logits.append(cache[key])
    metrics = compute_metrics(sources[0].task, ensemble_logits(logits, [s.members for s in sources]), labels, split)
    if plain_run and os.path.exists(os.path.join(sources[0].run_dir, STATE)):
        metrics.update({k: v for k, v in read_state(sources[0].run_dir).items() if k != "finished"})
    metrics["models"] = [source.identity for source in sources]
    if len(sources) > 1:
        metrics["ensemble"] = [os.path.abspath(r) for r in run_dirs]
    if tta > 1:
        metrics.update(tta=tta, tta_strength=tta_strength)
    _write_metrics(metrics, os.fspath(output) if output is not None else sources[0].run_dir, split)
    return metrics


def _check_outputs(sources, output, plain_run: bool, allow_unfinished: bool) -> None:
    """Refuse, in one line, an evaluation whose figures would land where they do not belong."""
    if output is None and not plain_run:
        raise ValueError("an ensemble, an export or --tta needs --output DIR for its metrics, "
                         "so that a run's own metrics stay its plain model's")
    for source in sources:
        if source.finished:
            continue
        if not allow_unfinished:
            raise ValueError(f"{source.path} has not finished training; resume it with the same `tf-emnist train` "
                             "command, or pass --allow-unfinished (with --output) to evaluate its best epoch so far")
        if output is None:
            raise ValueError("--allow-unfinished needs --output DIR, so that the unfinished run stays resumable")


def _check_output_folder(output, sources, plain_run: bool, split: str) -> None:
    """Refuse, in one line, an --output that holds another run, a model, or the figures of other models:
    they would be replaced."""
    from tf_emnist.sources import is_model

    if output is None:
        return
    output = os.path.abspath(os.fspath(output))
    if plain_run and output == os.path.abspath(sources[0].run_dir):
        return
    if os.path.exists(os.path.join(output, CONFIG)) or is_model(output):
        raise ValueError(f"--output {output} holds a run or a model, whose own figures would be replaced; "
                         "pass a new folder")
    figures = os.path.join(output, "metrics.json" if split == "test" else "validation_metrics.json")
    if os.path.exists(figures):
        recorded = read_json_object(figures, "the folder's figures").get("models")
        if recorded != [source.identity for source in sources]:
            raise ValueError(f"--output {output} holds the figures of other models ({os.path.basename(figures)}); "
                             "pass a new folder, or the models they are of")


DATA_KEYS = ("data_dir", "tfds_dir", "validation_split", "split_seed", "limit_train", "upright")


def _split_images(sources, split: str, limit_test: int | None, data_dir: str | None):
    """(uint8 images as stored, labels) of the split the sources are evaluated on."""
    from tf_emnist.data import load_split

    first = sources[0]
    for source in sources[1:]:
        if source.task.name != first.task.name:
            raise ValueError(f"{source.path} is a {source.task.name} model and {first.path} a {first.task.name} "
                             "model; an ensemble needs one task")
        differ = sorted({k for other in source.configs for k in DATA_KEYS
                         if _data_identity(getattr(other, k)) != _data_identity(getattr(first.config, k))})
        if split == "validation" and differ:
            raise ValueError(f"{source.path} held out a different validation split ({', '.join(differ)} differ from "
                             f"{first.path}); compare them on the test split only")
    if data_dir is None:  # exports name their data folder only; a run directory knows where it is
        data_dir = next((c.data_dir for s in sources for c in s.configs if c.data_dir and os.path.exists(c.data_dir)),
                        None)
    overrides = {k: v for k, v in (("limit_test", limit_test), ("data_dir", data_dir)) if v is not None}
    config = first.config.replace(**overrides)
    if split == "test":
        return load_split(first.task, "test", config)
    images, labels = load_split(first.task, "train", config)
    return first.validation_images(images, labels)


def _write_metrics(metrics: dict, out_dir: str, split: str) -> None:
    from tf_emnist.plots import plot_confusion

    os.makedirs(out_dir, exist_ok=True)
    name = "metrics.json" if split == "test" else "validation_metrics.json"
    write_json(os.path.join(out_dir, name), metrics)
    if split == "test":
        title = (f"{metrics['task']}: test accuracy {metrics['test_accuracy']:.2%} on {metrics['test_examples']} "
                 "images")
        save_figure(plot_confusion(metrics["confusion_matrix"], metrics["confusion_labels"], title),
                    os.path.join(out_dir, "confusion.png"))


def _data_identity(value):
    """A data folder by name (exports record no machine's paths); other settings as they are."""
    return os.path.basename(os.path.normpath(value)) if isinstance(value, str) and os.sep in value else value
