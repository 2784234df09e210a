"""Training: run directories, Keras callbacks, resume, and train_and_evaluate."""
from __future__ import annotations

import csv
import datetime
import glob
import json
import logging
import os
import sys
import time


from tf_emnist.config import TrainConfig
from tf_emnist.files import atomic_path, read_json, save_figure, write_csv, write_json
from tf_emnist.tasks import get_task

log = logging.getLogger("tf_emnist")

CONFIG, STATE, STEPS, HISTORY, MODEL = "config.json", "train_state.json", "steps.csv", "history.csv", "model.keras"


class RunDirError(ValueError):
    """The run directory cannot be used for this run (message: one line)."""


def default_run_dir(config: TrainConfig, runs_root: str = "runs") -> str:
    """The newest unfinished run of this exact config under runs_root (to resume), else a new one."""
    for path in sorted(glob.glob(os.path.join(runs_root, f"{config.task}-*")), reverse=True):
        if _same_config(path, config) and not os.path.exists(os.path.join(path, "metrics.json")):
            return path
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join(runs_root, f"{config.task}-{stamp}")


def _same_config(run_dir: str, config: TrainConfig) -> bool:
    # Through TrainConfig: a field added since the run was written takes its default, which
    # is what that run did (new fields default to the old behaviour).
    try:
        return TrainConfig(**read_json(os.path.join(run_dir, CONFIG))).to_dict() == config.to_dict()
    except (OSError, json.JSONDecodeError, TypeError, ValueError):
        return False


def check_run_dir(run_dir: str, config: TrainConfig) -> bool:
    """Check that run_dir is new, empty, or holds the same unfinished run; writes nothing.

    Returns True when resuming. Never deletes or overwrites anything of another run.
    """
    config_path = os.path.join(run_dir, CONFIG)
    if os.path.exists(config_path):
        if not _same_config(run_dir, config):
            raise RunDirError(
                f"{run_dir} holds another run (its config.json differs); pass a new --output, or rerun with that run's settings to resume it"
            )
        if os.path.exists(os.path.join(run_dir, "metrics.json")):
            raise RunDirError(
                f"{run_dir} already holds this finished run; see its metrics.json, or pass a new --output to train again"
            )
        return True
    if os.path.isdir(run_dir) and os.listdir(run_dir):
        raise RunDirError(f"{run_dir} is not empty and holds no tf-emnist run; pass a new or empty --output")
    return False


def _callbacks(run_dir: str, config: TrainConfig, steps_per_epoch: int, model_to_save, replicas: int = 1):
    import keras

    from tf_emnist.model import lever_callbacks

    class StepLossLogger(keras.callbacks.Callback):
        """Every `every` steps: print and record the batch loss and the best batch loss so far."""

        def __init__(self):
            super().__init__()
            self.path = os.path.join(run_dir, STEPS)
            self.rows = []
            self.best = float("inf")
            self.epoch = None

        def on_epoch_begin(self, epoch, logs=None):
            if self.epoch is None:  # first epoch of this process: drop rows an interrupted epoch left
                self.rows = [r for r in _read_csv(self.path) if int(r["step"]) <= epoch * steps_per_epoch]
                self.best = keep_best.state.get("best_batch_loss") or float("inf")
            self.epoch = epoch

        def on_train_batch_end(self, batch, logs=None):
            loss = float(logs["batch_loss"])
            self.best = min(self.best, loss)
            step = self.epoch * steps_per_epoch + batch + 1
            if step % config.log_every == 0:
                self.rows.append({"step": step, "epoch": self.epoch + 1, "loss": loss, "best_loss": self.best})
                print(f"\nstep {step}: batch loss {loss:.4f}, best batch loss {self.best:.4f}", flush=True)
                write_csv(self.path, self.rows)

        def on_epoch_end(self, epoch, logs=None):
            # batch_loss is a per-step figure (steps.csv): at an epoch's end it is only the last batch's, and
            # Keras reports a val_batch_loss that merely repeats it. Keep both out of the epoch logs (progress
            # bar, history.csv, TensorBoard), unless a run resumed from an older tf-emnist has the columns.
            if logs is not None and not keeps_batch_loss_columns:
                logs.pop("batch_loss", None)
                logs.pop("val_batch_loss", None)

    class KeepBest(keras.callbacks.Callback):
        """Save model_to_save() as model.keras (atomically) when validation accuracy improves; keep time and
        best in train_state.json.
        """

        def __init__(self):
            super().__init__()
            self.path = os.path.join(run_dir, STATE)
            self.state = read_json(self.path) if os.path.exists(self.path) else {
                "best_val_accuracy": None, "best_epoch": None, "best_batch_loss": None,
                "train_seconds": 0.0, "finished": False,
            }

        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.state["train_seconds"] += time.perf_counter() - self.started
            self.state["best_batch_loss"] = step_logger.best
            val = float(logs["val_accuracy"])
            best = self.state["best_val_accuracy"]
            if best is None or val > best:
                self.state.update(best_val_accuracy=val, best_epoch=epoch + 1)
                with atomic_path(os.path.join(run_dir, MODEL)) as tmp:
                    model_to_save().save(tmp)
            write_json(self.path, self.state)
            # Early stopping kept in train_state.json, so a resumed run counts the same epochs.
            if config.patience and epoch + 1 - self.state["best_epoch"] >= config.patience:
                print(f"\nno better validation accuracy for {config.patience} epoch(s): stopping at epoch {epoch + 1}",
                      flush=True)
                self.model.stop_training = True

    keeps_batch_loss_columns = "batch_loss" in next(iter(_read_csv(os.path.join(run_dir, HISTORY))), {})
    keep_best = KeepBest()
    step_logger = StepLossLogger()
    return [
        step_logger,
        *lever_callbacks(config, _past_val_accuracy(run_dir), replicas),
        keep_best,
        keras.callbacks.CSVLogger(os.path.join(run_dir, HISTORY), append=True),
        keras.callbacks.TensorBoard(os.path.join(run_dir, "logs"), update_freq="epoch"),
        # Last, so a backup marks an epoch whose other outputs are already on disk.
        keras.callbacks.BackupAndRestore(os.path.join(run_dir, "backup"), double_checkpoint=True),
    ]


def _past_val_accuracy(run_dir: str) -> list[float]:
    """Validation accuracy of the epochs a resumed run will not redo (those in its backup)."""
    metadata = os.path.join(run_dir, "backup", "training_metadata.json")
    finished = read_json(metadata).get("epoch", 0) if os.path.exists(metadata) else 0
    return [float(r["val_accuracy"]) for r in read_history(run_dir) if int(r["epoch"]) < finished]


def _read_csv(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_history(run_dir: str) -> list[dict]:
    """history.csv, one row per epoch (a row repeated by a resume keeps its last copy)."""
    by_epoch = {int(r["epoch"]): r for r in _read_csv(os.path.join(run_dir, HISTORY))}
    return [by_epoch[e] for e in sorted(by_epoch)]


def load_run(run_dir: str):
    """(keras model, TrainConfig, Task) of a run directory that holds a model."""
    import keras

    from tf_emnist.model import custom_objects

    config_path, model_path = os.path.join(run_dir, CONFIG), os.path.join(run_dir, MODEL)
    if not (os.path.isfile(config_path) and os.path.isfile(model_path)):
        raise FileNotFoundError(
            f"{run_dir} is not a tf-emnist run with a model (needs {CONFIG} and {MODEL}); train one with `tf-emnist train`"
        )
    config = TrainConfig(**read_json(config_path))
    return keras.saving.load_model(model_path, compile=False, custom_objects=custom_objects()), config, get_task(config.task)


def distribution_strategy(name: str, gpus=None):
    """The tf.distribute strategy to train under.

    "default": OneDeviceStrategy on the GPU when there is exactly one, else TensorFlow's
    default strategy. "mirrored": MirroredStrategy over the local GPUs (else the CPUs).
    `gpus` (logical devices; default: the GPUs TensorFlow sees) lets a test stand a CPU in.

    A GPU strategy's distributed dataset copies batches to its devices ahead of the step.
    For one GPU this replaces tf.data's prefetch_to_device, which hides the dataset's
    length from Keras: its first epoch ran as "Unknown" steps and ended with the warning
    "Your input ran out of data; interrupting training".
    """
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU") if gpus is None else gpus
    if name == "default":
        return tf.distribute.OneDeviceStrategy(gpus[0].name) if len(gpus) == 1 else tf.distribute.get_strategy()
    devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
    return tf.distribute.MirroredStrategy(devices=devices)


def train(config: TrainConfig, run_dir: str, *, verbose: int | None = None) -> dict:
    """Train config into run_dir (resuming an interrupted run there); returns train_state.json."""
    import keras
    import tensorflow as tf

    from tf_emnist.data import load_split, make_dataset, split_validation
    from tf_emnist.model import (build_model, compile_model, describe_lstm_training, keras_lstm_copy,
                                 with_grouped_output)
    from tf_emnist.model import steps_per_epoch as count_steps

    task = get_task(config.task)
    resuming = check_run_dir(run_dir, config)
    state_path = os.path.join(run_dir, STATE)
    if os.path.exists(state_path) and read_json(state_path).get("finished"):
        return read_json(state_path)
    if config.fine_labels and task.class_of_source is None:
        raise ValueError(f"--fine-labels needs a task that groups a split's classes (digit-letter); "
                         f"{task.name} learns the split's classes already")
    # The data is checked before the run directory is made: bad data leaves no run behind.
    images, labels = load_split(task, "train", config, source_labels=config.fine_labels)
    if not resuming:
        os.makedirs(run_dir, exist_ok=True)
        write_json(os.path.join(run_dir, CONFIG), config.to_dict())
    log.info("%s the run in %s", "resuming" if resuming else "starting", run_dir)
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()

    train_idx, val_idx = split_validation(len(labels), config.validation_split, config.split_seed)
    strategy = distribution_strategy(config.strategy)
    global_batch = config.batch_size * strategy.num_replicas_in_sync
    train_ds = make_dataset(images, labels, global_batch, training=True, indices=train_idx, seed=config.seed,
                            upright=config.upright, augment=config.augment)
    val_ds = make_dataset(images, labels, global_batch, training=False, indices=val_idx, upright=config.upright)
    steps = count_steps(len(train_idx), global_batch)
    log.info("%s: %d train / %d validation images, %d steps an epoch, %d replica(s); LSTM training: %s",
             task.name, len(train_idx), len(val_idx), steps, strategy.num_replicas_in_sync,
             describe_lstm_training(config))

    outputs = len(task.source_chars) if config.fine_labels else task.num_classes
    with strategy.scope():
        model = compile_model(build_model(config, outputs), config, steps, track_batch_loss=True,
                              replicas=strategy.num_replicas_in_sync)
    if verbose is None:
        verbose = 1 if sys.stdout.isatty() else 2

    def model_to_save():
        """The model with plain Keras layers, answering the task's classes (grouped, with --fine-labels)."""
        plain = keras_lstm_copy(model, config, outputs)
        return with_grouped_output(plain, task.class_of_source) if config.fine_labels else plain

    model.fit(train_ds, validation_data=val_ds, epochs=config.epochs, verbose=verbose, shuffle=False,
              callbacks=_callbacks(run_dir, config, steps, model_to_save, strategy.num_replicas_in_sync))

    state = read_json(state_path)
    state.update(finished=True, train_examples=int(len(train_idx)), validation_examples=int(len(val_idx)))
    write_json(state_path, state)
    write_training_plots(run_dir)
    return state


def write_training_plots(run_dir: str) -> None:
    from tf_emnist.plots import plot_epochs, plot_step_loss

    steps = [{k: float(v) for k, v in r.items()} for r in _read_csv(os.path.join(run_dir, STEPS))]
    if steps:
        save_figure(plot_step_loss(steps), os.path.join(run_dir, "loss_steps.png"))
    history = read_history(run_dir)
    for metric in ("loss", "accuracy"):
        save_figure(plot_epochs(history, metric), os.path.join(run_dir, f"{metric}_epochs.png"))


def train_and_evaluate(config: TrainConfig, run_dir: str, *, verbose: int | None = None) -> dict:
    """Train (or resume), then evaluate the best model on the test split; returns metrics.json."""
    from tf_emnist.evaluate import evaluate_run

    train(config, run_dir, verbose=verbose)
    return evaluate_run(run_dir)
