"""keras-tuner search over the one model builder: HyperModel, tuners, results, distributed mode.

Imports Keras and keras-tuner: the command line imports this module only to tune.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import socket
import threading
import time

import keras
import keras_tuner as kt
import numpy as np

from tf_emnist.backend import on_jax, tf_strategy
from tf_emnist.config import HYPERPARAMETERS, TrainConfig
from tf_emnist.files import save_figure, write_csv, write_json
from tf_emnist.tasks import get_task
from tf_emnist.tuning.space import define

log = logging.getLogger("tf_emnist")

TUNERS = ("random", "bayesian", "hyperband")
OBJECTIVE = "val_accuracy"
# Set by Ctrl-C during a search. keras-tuner records a trial that raised an exception as failed and
# goes on; an interrupt must stop the search instead, and leave its trial to run again on resume.
INTERRUPTED = threading.Event()


@contextlib.contextmanager
def interrupts_stop_the_search():
    """Inside, Ctrl-C (SIGINT) sets INTERRUPTED before Python raises KeyboardInterrupt, wherever it lands."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)

    def interrupted(number, frame):
        INTERRUPTED.set()
        if callable(previous):
            previous(number, frame)
        raise KeyboardInterrupt

    INTERRUPTED.clear()
    signal.signal(signal.SIGINT, interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class FailOnNaN(keras.callbacks.Callback):
    """Fail the trial (keras-tuner records it and goes on) once its loss is not a number."""

    def on_train_batch_end(self, batch, logs=None):
        if not math.isfinite(float(logs["loss"])):
            raise kt.errors.FailedTrialError(f"loss became {logs['loss']} at batch {batch}")


class EmnistHyperModel(kt.HyperModel):
    """build() is tf_emnist's build_model + compile_model; fit() is tf_emnist.training.fit_model, on the
    images and the train and validation indices the search passes."""

    def __init__(self, base: TrainConfig, space: dict, num_classes: int, num_train: int, patience: int = 2):
        super().__init__(name=f"{base.task}_lstm")
        self.base, self.space, self.num_classes, self.num_train, self.patience = (
            base, space, num_classes, num_train, patience)

    def config_for(self, hp) -> TrainConfig:
        return self.base.replace(**{name: define(hp, name, spec) for name, spec in self.space.items()})

    def build(self, hp):
        from tf_emnist.model import build_model, compile_model, steps_per_epoch

        config = self.config_for(hp)
        return compile_model(build_model(config, self.num_classes), config,
                             steps_per_epoch(self.num_train, config.batch_size))

    def fit(self, hp, model, train, validation, epochs=1, callbacks=(), verbose=2, **kwargs):
        from tf_emnist.callbacks import lever_callbacks
        from tf_emnist.data import Batches
        from tf_emnist.training import fit_model

        config = self.config_for(hp).replace(epochs=epochs)  # batch_size reaches the data here, as intended
        (images, labels, train_idx), (_, _, val_idx) = train, validation
        train_batches = Batches(images, labels, config.batch_size, training=True, indices=train_idx,
                                seed=config.seed, upright=config.upright, augment=config.augment)
        val_batches = Batches(images, labels, config.batch_size, indices=val_idx, upright=config.upright)
        stop = ([keras.callbacks.EarlyStopping(monitor=OBJECTIVE, mode="max", patience=self.patience)]
                if self.patience else [])
        start = time.perf_counter()
        try:
            history = fit_model(model, config, train_batches, val_batches, verbose=verbose,
                                callbacks=[*lever_callbacks(config), *callbacks, *stop, FailOnNaN()], **kwargs).history
        except Exception:
            if INTERRUPTED.is_set():  # Ctrl-C, arrived wrapped in another error: the trial is not a failure
                raise KeyboardInterrupt from None
            raise
        scores = history[OBJECTIVE]
        best = int(np.argmax(scores))
        return {OBJECTIVE: float(scores[best]), "val_loss": float(history["val_loss"][best]),
                "best_epoch": float(kwargs.get("initial_epoch", 0) + best + 1),
                "trial_seconds": time.perf_counter() - start}


def make_hypermodel(base: TrainConfig, space: dict, num_classes: int, num_train: int, patience: int = 2):
    """The search's keras_tuner.HyperModel (EmnistHyperModel)."""
    return EmnistHyperModel(base, space, num_classes, num_train, patience)


def make_tuner(kind: str, hypermodel, *, output: str, project: str, max_trials: int, max_epochs: int,
               seed: int, overwrite: bool):
    common = dict(objective=kt.Objective(OBJECTIVE, direction="max"), directory=output, project_name=project,
                  overwrite=overwrite, seed=seed, max_consecutive_failed_trials=max(3, max_trials))
    if not on_jax():
        import tensorflow as tf

        strategy = tf_strategy("default")
        if isinstance(strategy, tf.distribute.OneDeviceStrategy):
            # One GPU: trials run under its OneDeviceStrategy, which copies batches to it, as training does.
            common["distribution_strategy"] = strategy
    if kind == "random":
        return kt.RandomSearch(hypermodel, max_trials=max_trials, **common)
    if kind == "bayesian":
        return kt.BayesianOptimization(hypermodel, max_trials=max_trials, **common)
    if kind == "hyperband":
        return kt.Hyperband(hypermodel, max_epochs=max_epochs, factor=3, **common)
    raise ValueError(f"unknown tuner {kind!r}; choose one of: {', '.join(TUNERS)}")


def set_distributed_env(role: str | None, host: str, port: int, worker_id: int, connect_timeout: float) -> None:
    """Point keras-tuner at a chief oracle over gRPC (its KERASTUNER_* variables).

    A worker first waits up to connect_timeout seconds for the chief's port, so a chief
    that never answers gives an error instead of a worker blocked for ever.
    """
    if role is None:
        return
    if role not in ("chief", "worker"):
        raise ValueError(f"--distributed must be chief or worker, got {role!r}")
    os.environ["KERASTUNER_ORACLE_IP"] = host
    os.environ["KERASTUNER_ORACLE_PORT"] = str(port)
    os.environ["KERASTUNER_TUNER_ID"] = "chief" if role == "chief" else f"tuner{worker_id}"
    if role == "worker":
        deadline = time.monotonic() + connect_timeout
        while True:
            try:
                socket.create_connection((host, port), timeout=2).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise ConnectionError(
                        f"no chief oracle answers at {host}:{port} after {connect_timeout:.0f} s; "
                        "start `tf-emnist tune --distributed chief` there first, or fix --oracle-host/--oracle-port"
                    ) from None
                time.sleep(0.5)


def trial_rows(tuner) -> list[dict]:
    """One row per trial, best score first: id, status, score, seconds, best epoch, hyperparameters."""
    rows = []
    for trial in tuner.oracle.trials.values():
        metrics = trial.metrics
        get = lambda name: metrics.get_last_value(name) if metrics.exists(name) else None  # noqa: E731
        values = {k: v for k, v in trial.hyperparameters.values.items() if k in HYPERPARAMETERS}
        rows.append({"trial": trial.trial_id, "status": str(trial.status), OBJECTIVE: trial.score,
                     "seconds": get("trial_seconds"), "best_epoch": get("best_epoch"), **values})
    rows.sort(key=lambda r: (r[OBJECTIVE] is None, -(r[OBJECTIVE] or 0.0)))
    return rows


def format_results(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))

    def cell(value):
        if isinstance(value, float):
            return f"{value:.4g}"
        return "-" if value is None else str(value)

    table = [columns] + [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(columns))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in table)


def plot_trials(rows: list[dict]):
    """Score per trial, and against the main hyperparameters."""
    from matplotlib.figure import Figure

    done = [r for r in rows if r[OBJECTIVE] is not None]
    names = [n for n in ("hidden_dim", "num_layers", "dropout", "learning_rate", "batch_size")
             if any(n in r for r in done)]
    fig = Figure(figsize=(4 * (1 + len(names)), 3.5))
    axes = fig.subplots(1, 1 + len(names), squeeze=False)[0]
    order = sorted(done, key=lambda r: int(r["trial"]) if str(r["trial"]).isdigit() else 0)
    axes[0].plot(range(1, len(order) + 1), [r[OBJECTIVE] for r in order], "o-")
    axes[0].set(xlabel="trial", ylabel=OBJECTIVE, title="score per trial")
    for ax, name in zip(axes[1:], names):
        ax.scatter([r.get(name) for r in done], [r[OBJECTIVE] for r in done])
        ax.set(xlabel=name, title=f"{OBJECTIVE} vs {name}")
        if name == "learning_rate":
            ax.set_xscale("log")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def best_config(tuner, base: TrainConfig) -> dict:
    """The best trial's settings as a train --config file: the task, every hyperparameter, epochs."""
    trials = [t for t in tuner.oracle.get_best_trials(len(tuner.oracle.trials)) if t.status == "COMPLETED"][:1]
    if not trials:
        raise RuntimeError("no trial finished; see the trials' messages above, fix the cause and rerun to resume")
    trial = trials[0]
    values = {k: v for k, v in trial.hyperparameters.values.items() if k in HYPERPARAMETERS}
    config = base.replace(**values)
    if trial.metrics.exists("best_epoch"):
        config = config.replace(epochs=int(trial.metrics.get_last_value("best_epoch")))
    return {"task": config.task, **{name: getattr(config, name) for name in HYPERPARAMETERS}}


def run_search(base: TrainConfig, space: dict, *, tuner_kind: str = "random", max_trials: int = 10,
               max_epochs: int = 3, output: str, overwrite: bool = False, patience: int = 2,
               verbose: int = 2) -> dict | None:
    """Search on the validation split carved from train; write the results into output.

    Returns best_config (None on a worker, which only runs trials).
    """
    from tf_emnist.data import load_split, split_validation

    if tuner_kind not in TUNERS:
        raise ValueError(f"unknown tuner {tuner_kind!r}; choose one of: {', '.join(TUNERS)}")
    if max_trials < 1 or max_epochs < 1:  # keras-tuner reads 0 trials as "no limit"
        raise ValueError(f"max_trials and max_epochs must be at least 1; got {max_trials} and {max_epochs}")
    task = get_task(base.task)
    if base.fine_labels:
        raise ValueError("tune searches the task's own classes; drop --fine-labels (it is a train option)")
    if base.teacher:
        raise ValueError("tune does not distill; drop --teacher, and search a student's settings with train runs")
    if base.init_from:
        raise ValueError("tune starts every trial from random weights; drop --init-from (it is a train option)")
    if not base.validation_split:
        raise ValueError("tune chooses on validation images; give --validation-split above 0")
    images, labels = load_split(task, "train", base)  # the test split is never read here
    train_idx, val_idx = split_validation(len(labels), base.validation_split, base.split_seed)
    hypermodel = make_hypermodel(base, space, task.num_classes, len(train_idx), patience)
    tuner = make_tuner(tuner_kind, hypermodel, output=output, project=f"{task.name}-{tuner_kind}",
                       max_trials=max_trials, max_epochs=max_epochs, seed=base.seed, overwrite=overwrite)
    role = os.environ.get("KERASTUNER_TUNER_ID", "")
    # keras-tuner adds HParams to TensorBoard's logs, which TensorFlow writes (none on JAX)
    logs = [] if on_jax() else [keras.callbacks.TensorBoard(os.path.join(output, "tensorboard"))]
    with interrupts_stop_the_search():
        tuner.search((images, labels, train_idx), (images, labels, val_idx), epochs=max_epochs, verbose=verbose,
                     callbacks=logs)
    if role.startswith("tuner"):  # a worker: the chief writes the results
        return None
    rows = trial_rows(tuner)
    write_csv(os.path.join(output, "results.csv"), rows)
    print(format_results(rows))
    if any(r[OBJECTIVE] is not None for r in rows):
        save_figure(plot_trials(rows), os.path.join(output, "trials.png"))
    best = best_config(tuner, base)
    write_json(os.path.join(output, "best_config.json"), best)
    return best
