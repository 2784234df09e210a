"""Training curves and the confusion matrix as matplotlib Figures (no pyplot state)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from matplotlib.figure import Figure


def plot_step_loss(steps: Sequence[dict]) -> Figure:
    """Batch loss at every logged step, and the best batch loss so far (the study's curve)."""
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    x = [r["step"] for r in steps]
    ax.plot(x, [r["loss"] for r in steps], marker=".", label="batch loss")
    ax.plot(x, [r["best_loss"] for r in steps], linestyle="--", label="best batch loss")
    ax.set(xlabel="training step", ylabel="cross-entropy", title="Loss per logged step")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def plot_epochs(history: Sequence[dict], metric: str) -> Figure:
    """`metric` ('loss' or 'accuracy') per epoch, train and validation."""
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    epochs = [int(r["epoch"]) + 1 for r in history]
    for key, label in ((metric, "train"), (f"val_{metric}", "validation")):
        if history and key in history[0]:
            ax.plot(epochs, [float(r[key]) for r in history], marker="o", label=label)
    ax.set(xlabel="epoch", ylabel=metric, title=f"{metric.capitalize()} per epoch")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def plot_confusion(matrix: np.ndarray, labels: Sequence[str], title: str) -> Figure:
    """Row-normalised confusion matrix heatmap with the characters on both axes."""
    matrix = np.asarray(matrix, dtype=float)
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = max(4.0, 0.22 * len(labels) + 2)
    fig = Figure(figsize=(size + 1, size))
    ax = fig.add_subplot()
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ticks = np.arange(len(labels))
    ax.set_xticks(ticks, labels, fontsize=7)
    ax.set_yticks(ticks, labels, fontsize=7)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    return fig
