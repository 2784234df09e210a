"""Test-split evaluation: exact accuracy, per-class accuracy, confusions, metrics.json."""
from __future__ import annotations

import logging
import os

import numpy as np

from tf_emnist.files import read_json, save_figure, write_json
from tf_emnist.tasks import Task

log = logging.getLogger("tf_emnist")

TTA_STRENGTH = 0.5  # test-time augmentation's copies: half the training augmentation's transforms


def predict_logits(model, images: np.ndarray, upright: bool = True, batch_size: int = 1024, *,
                   tta: int = 1, tta_strength: float = TTA_STRENGTH) -> np.ndarray:
    """Logits [N, classes] for uint8 images as stored, through the same input transform as training.

    tta > 1 (test-time augmentation): the log of the mean probability over the images and
    tta - 1 randomly transformed copies (random_affine at `tta_strength`). The copies are
    seeded per view and batch, so a rerun sees the same views.
    """
    import tensorflow as tf

    from tf_emnist.data import make_dataset, random_affine

    if tta < 1:
        raise ValueError(f"tta must be >= 1 (the number of views, the image itself included), got {tta}")
    ds = make_dataset(images, np.zeros(len(images), np.int32), batch_size, training=False, upright=upright)
    ds = ds.map(lambda x, y: x)
    logits = np.asarray(model.predict(ds, verbose=0), dtype=np.float64)
    if tta == 1:
        return logits
    probabilities = softmax(logits)
    for view in range(1, tta):
        def transform(batch_index, x, view=view):
            seed = tf.stack([tf.constant(view, tf.int64), batch_index])
            return random_affine(x, tta_strength, stateless_seed=seed)

        views = ds.enumerate().map(transform, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        probabilities += softmax(np.asarray(model.predict(views, verbose=0), dtype=np.float64))
    return np.log(probabilities / tta)


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

    Each of `run_dirs` is a run directory or a SavedModel written by `tf-emnist export`; an
    exported ensemble of k models weighs k, so every model counts once. split "test": the
    official test split, metrics.json. split "validation": the validation images carved
    from train, as the runs' training held them out, validation_metrics.json: this is where
    an ensemble and the test-time augmentation (`tta` views at `tta_strength`, see
    predict_logits; run directories only) are chosen, before the one test evaluation. The
    files go to the run directory for one plain run, to `output` (required) otherwise, so
    the run's own metrics.json stays the plain model's. `cache`, a dict the caller keeps,
    holds each member's logits for later calls with the same split and options (choosing
    among ensembles that share members). A run whose training has not finished is refused
    (its model.keras is only its best epoch so far) unless `allow_unfinished`; its metrics
    then go to `output`, never into the run, so the run stays resumable.
    """
    from tf_emnist.data import load_split, split_validation
    from tf_emnist.export import is_export, load_source
    from tf_emnist.plots import plot_confusion
    from tf_emnist.runs import STATE

    run_dirs = [os.fspath(r) for r in run_dirs]
    if split not in ("test", "validation"):
        raise ValueError(f"unknown split {split!r}; choose test or validation")
    plain_run = len(run_dirs) == 1 and tta == 1 and not is_export(run_dirs[0])
    if output is None and not plain_run:
        raise ValueError("an ensemble, an export or --tta needs --output DIR for its metrics, "
                         "so that a run's own metrics stay its plain model's")
    if tta < 1 or not tta_strength >= 0:
        raise ValueError(f"--tta must be >= 1 and --tta-strength >= 0; got {tta} and {tta_strength}")
    for run_dir in run_dirs:
        state = os.path.join(run_dir, STATE)
        if not is_export(run_dir) and os.path.isdir(run_dir) and not (
                os.path.exists(state) and read_json(state).get("finished")):
            if not allow_unfinished:
                raise ValueError(f"{run_dir} has not finished training; resume it with the same `tf-emnist train` "
                                 "command, or pass --allow-unfinished (with --output) to evaluate its best epoch so far")
            if output is None:
                raise ValueError("--allow-unfinished needs --output DIR, so that the unfinished run stays resumable")
    sources = [load_source(r) for r in run_dirs]
    if tta > 1 and any(s.model is None for s in sources):
        raise ValueError("--tta needs run directories (Keras models), not exports; drop --tta or pass the runs")
    task, config = sources[0].task, sources[0].config
    data_keys = ("data_dir", "tfds_dir", "validation_split", "split_seed", "limit_train", "upright")
    for source in sources:
        if source.task.name != task.name:
            raise ValueError(f"{source.path} is a {source.task.name} model and {run_dirs[0]} a {task.name} model; "
                             "an ensemble needs one task")
        differ = sorted({k for other in source.configs for k in data_keys
                         if _data_identity(getattr(other, k)) != _data_identity(getattr(config, k))})
        if split == "validation" and differ:
            raise ValueError(f"{source.path} held out a different validation split ({', '.join(differ)} differ from "
                             f"{run_dirs[0]}); compare them on the test split only")
    if data_dir is None:  # exports name their data folder only; a run directory knows where it is
        data_dir = next((c.data_dir for s in sources for c in s.configs if c.data_dir and os.path.exists(c.data_dir)),
                        None)
    overrides = {k: v for k, v in (("limit_test", limit_test), ("data_dir", data_dir)) if v is not None}
    config = config.replace(**overrides)
    if split == "test":
        images, labels = load_split(task, "test", config)
    else:
        if not config.validation_split:
            raise ValueError(f"{sources[0].path} held out no validation images (a refit); evaluate it on the test split")
        images, labels = load_split(task, "train", config)
        _, val_idx = split_validation(len(labels), config.validation_split, config.split_seed)
        images, labels = images[val_idx], labels[val_idx]
    cache = {} if cache is None else cache
    log.info("evaluating %d model%s on %d %s images%s", len(sources), "s" if len(sources) > 1 else "", len(labels),
             split, f" x {tta} views" if tta > 1 else "")
    logits = []
    for source in sources:
        key = (os.path.abspath(source.path), split, limit_test, data_dir, tta, tta_strength)
        if key not in cache:
            if source.model is None:
                cache[key] = serve_logits(source.serving_function(stored_orientation=True), images)
            else:
                cache[key] = predict_logits(source.model, images, source.config.upright, tta=tta,
                                            tta_strength=tta_strength)
        logits.append(cache[key])
    logits = [ensemble_logits(logits, [len(s.configs) for s in sources])]
    metrics = compute_metrics(task, logits[0], labels, split)
    out_dir = os.fspath(output) if output is not None else run_dirs[0]
    if plain_run and os.path.exists(os.path.join(run_dirs[0], STATE)):
        metrics.update({k: v for k, v in read_json(os.path.join(run_dirs[0], STATE)).items() if k != "finished"})
    if len(run_dirs) > 1:
        metrics["ensemble"] = [os.path.abspath(r) for r in run_dirs]
    if tta > 1:
        metrics.update(tta=tta, tta_strength=tta_strength)
    os.makedirs(out_dir, exist_ok=True)
    name = "metrics.json" if split == "test" else "validation_metrics.json"
    write_json(os.path.join(out_dir, name), metrics)
    if split == "test":
        title = f"{task.name}: test accuracy {metrics['test_accuracy']:.2%} on {metrics['test_examples']} images"
        save_figure(plot_confusion(metrics["confusion_matrix"], task.class_names, title),
                    os.path.join(out_dir, "confusion.png"))
    return metrics


def _data_identity(value):
    """A data folder by name (exports record no machine's paths); other settings as they are."""
    return os.path.basename(os.path.normpath(value)) if isinstance(value, str) and os.sep in value else value


def serve_logits(serve, images: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Logits [N, classes] of a serving signature (uint8 images -> a dict with "logits"), batch by batch."""
    return np.concatenate([np.asarray(serve(images=images[i:i + batch_size])["logits"])
                           for i in range(0, len(images), batch_size)]).astype(np.float64)


def ensemble_logits(members: list[np.ndarray], weights: list[int]) -> np.ndarray:
    """Several models' logits -> the log of their weighted mean probability (softmax gives it back).

    A member that is itself an ensemble of k models weighs k, so every model counts once.
    `make_ensemble_function` computes the same inside an exported graph.
    """
    if len(members) == 1:
        return members[0]
    weights = np.asarray(weights, np.float64)
    return np.log(np.tensordot(weights / weights.sum(), [softmax(member) for member in members], axes=1))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities [N, classes] from logits, in numpy."""
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)
