"""Test-split evaluation: exact accuracy, per-class accuracy, confusions, metrics.json."""
from __future__ import annotations

import os

import numpy as np

from tf_emnist.files import read_json, save_figure, write_json
from tf_emnist.tasks import Task


def predict_logits(model, images: np.ndarray, upright: bool = True, batch_size: int = 1024) -> np.ndarray:
    """Logits [N, classes] for uint8 images as stored, through the same input transform as training."""
    from tf_emnist.data import make_dataset

    ds = make_dataset(images, np.zeros(len(images), np.int32), batch_size, training=False, upright=upright)
    return np.asarray(model.predict(ds.map(lambda x, y: x), verbose=0), dtype=np.float64)


def compute_metrics(task: Task, logits: np.ndarray, labels: np.ndarray) -> dict:
    """Every figure of metrics.json, from logits [N, classes] and the true class ids [N]."""
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
        "test_examples": int(n),
        "test_accuracy": float(np.trace(confusion) / n),
        "test_loss": float(-log_probs[np.arange(n), labels].mean()),
        "test_errors": errors,
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
    return metrics


def evaluate_run(run_dir: str | os.PathLike, *, limit_test: int | None = None, data_dir: str | None = None) -> dict:
    """Evaluate a run directory's model.keras on the full test split; write metrics.json and confusion.png.

    `limit_test` and `data_dir` override the run's config (e.g. to evaluate elsewhere).
    """
    from tf_emnist.data import load_split
    from tf_emnist.plots import plot_confusion
    from tf_emnist.training import STATE, load_run

    run_dir = os.fspath(run_dir)
    model, config, task = load_run(run_dir)
    overrides = {k: v for k, v in (("limit_test", limit_test), ("data_dir", data_dir)) if v is not None}
    config = config.replace(**overrides)
    images, labels = load_split(task, "test", config)
    metrics = compute_metrics(task, predict_logits(model, images, config.upright), labels)
    state_path = os.path.join(run_dir, STATE)
    if os.path.exists(state_path):
        metrics.update({k: v for k, v in read_json(state_path).items() if k != "finished"})
    write_json(os.path.join(run_dir, "metrics.json"), metrics)
    title = f"{task.name}: test accuracy {metrics['test_accuracy']:.2%} on {metrics['test_examples']} images"
    save_figure(plot_confusion(metrics["confusion_matrix"], task.class_names, title), os.path.join(run_dir, "confusion.png"))
    return metrics
