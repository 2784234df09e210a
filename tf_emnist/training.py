"""Training: Keras callbacks, atomic backups, resume, and train_and_evaluate."""
from __future__ import annotations

import logging
import os
import sys
import time

import numpy as np

from tf_emnist.config import TrainConfig, config_from_dict
from tf_emnist.files import atomic_path, read_json, save_figure, sha256_file, write_csv, write_json
from tf_emnist.model import AUTOMATIC, resolve_choices
from tf_emnist.runs import (BACKUP, CONFIG, HISTORY, INIT, MODEL, STATE, STEPS, _NEW_STATE, _read_csv,
                            _record_environment, check_run_dir, read_history, run_lock)
from tf_emnist.tasks import get_task

log = logging.getLogger("tf_emnist")


def _callbacks(run_dir: str, config: TrainConfig, steps_per_epoch: int, model_to_save, replicas: int = 1,
               clock=None):
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
            self.state = read_json(self.path) if os.path.exists(self.path) else dict(_NEW_STATE)

        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.state["train_seconds"] += time.perf_counter() - self.started
            self.state["best_batch_loss"] = step_logger.best
            val = logs.get("val_accuracy")  # none without validation images (a refit): keep every epoch
            best = self.state["best_val_accuracy"]
            if val is None or best is None or float(val) > best:
                self.state.update(best_val_accuracy=None if val is None else float(val), best_epoch=epoch + 1)
                with atomic_path(os.path.join(run_dir, MODEL)) as tmp:
                    model_to_save().save(tmp)
            write_json(self.path, self.state)
            # Early stopping kept in train_state.json, so a resumed run counts the same epochs.
            if config.patience and epoch + 1 - self.state["best_epoch"] >= config.patience:
                print(f"\nno better validation accuracy for {config.patience} epoch(s): stopping at epoch {epoch + 1}",
                      flush=True)
                self.model.stop_training = True

    keeps_batch_loss_columns = "batch_loss" in next(iter(_read_csv(os.path.join(run_dir, HISTORY))), {})
    # A refit follows the validation accuracy its run recorded (the plateau schedule's learning rates).
    recorded = [float(r["val_accuracy"]) for r in read_history(config.refit)] if config.refit else None
    keep_best = KeepBest()
    step_logger = StepLossLogger()
    return [
        step_logger,
        *lever_callbacks(config, _past_val_accuracy(run_dir, recorded), replicas, recorded or ()),
        keep_best,
        keras.callbacks.CSVLogger(os.path.join(run_dir, HISTORY), append=True),
        keras.callbacks.TensorBoard(os.path.join(run_dir, "logs"), update_freq="epoch"),
        *([SetEpochClock(clock)] if clock is not None else []),
        # Last, so a backup marks an epoch whose other outputs are already on disk.
        atomic_backup_class()(os.path.join(run_dir, BACKUP)),
    ]


def SetEpochClock(clock):
    """A callback that tells the training dataset's EpochClock which epoch starts."""
    import keras

    class SetClock(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            clock.epoch = epoch

    return SetClock()


def atomic_backup_class():
    """Keras BackupAndRestore whose backups survive a kill or a full disk at any moment.

    Each epoch's weights go to a temporary file first; the previous backup is kept (as
    `*.bkp`) until the new one is complete with its metadata. A backup that cannot be read
    is set aside with a one-line warning and the run resumes from the previous one (or, if
    none is left, starts over), instead of failing on every rerun.
    """
    import keras

    class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
        def __init__(self, backup_dir):
            super().__init__(backup_dir, double_checkpoint=True)

        def _pairs(self):
            return ((self._weights_path, self._training_metadata_path),
                    (self._prev_weights_path, self._prev_training_metadata_path))

        def on_train_begin(self, logs=None):
            (latest, meta), (prev, prev_meta) = self._pairs()
            for weights, metadata in self._pairs():
                if not os.path.exists(weights) or not os.path.exists(metadata):
                    continue  # half a backup: its metadata was never written
                try:
                    saved = read_json(metadata)
                    epoch = int(saved["epoch"])
                    if self.model.optimizer is not None and not self.model.optimizer.built:
                        self.model.optimizer.build(self.model.trainable_variables)
                    self.model.load_weights(weights)
                    for state, value in zip(self._seed_states(), saved.get("seed_states", [])):
                        state.assign(np.asarray(value, dtype=state.dtype))
                except Exception as e:  # a truncated or corrupt file, whatever the reader raises
                    log.warning("the backup %s is unreadable (%s); resuming from an earlier one", weights,
                                e.__class__.__name__)
                    continue
                self.model._initial_epoch = epoch
                return
            if any(os.path.exists(path) for pair in self._pairs() for path in pair):
                log.warning("no readable backup in %s: the run starts over from its first epoch", self.backup_dir)

        def _save_model(self):
            (latest, meta), (prev, prev_meta) = self._pairs()
            os.makedirs(self.backup_dir, exist_ok=True)
            tmp = os.path.join(self.backup_dir, f".next-{os.getpid()}.weights.h5")
            self.model.save_weights(tmp, overwrite=True)
            if os.path.exists(latest) and os.path.exists(meta):  # keep the last complete backup
                os.replace(meta, prev_meta)
                os.replace(latest, prev)
            os.replace(tmp, latest)
            write_json(meta, {"epoch": self._current_epoch, "batch": self._last_batch_seen,
                              "seed_states": [np.asarray(s.value).tolist() for s in self._seed_states()]})

        def _seed_states(self):
            # Dropout's random state is not among the saved weights: without it, a resumed run
            # would draw other dropout masks than the uninterrupted one.
            return [generator.state for layer in self.model._flatten_layers()
                    for generator in getattr(layer, "_seed_generators", [])]

    return AtomicBackupAndRestore


def _past_val_accuracy(run_dir: str, recorded: list[float] | None = None) -> list[float]:
    """Validation accuracy of the epochs a resumed run will not redo (those in its backup); for a
    refit, the `recorded` accuracy of the run it refits."""
    metadata = os.path.join(run_dir, BACKUP, "training_metadata.json")
    finished = read_json(metadata).get("epoch", 0) if os.path.exists(metadata) else 0
    if recorded is not None:
        return recorded[:finished]
    return [float(r["val_accuracy"]) for r in read_history(run_dir) if int(r["epoch"]) < finished]


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
    """Train config into run_dir (resuming an interrupted run there); returns train_state.json.

    The run directory is locked while training (see `run_lock`); backups are atomic (see
    `atomic_backup_class`), and a resumed run draws the same data order as an uninterrupted one.
    """
    from tf_emnist.data import load_split, split_validation

    task = get_task(config.task)
    resuming = check_run_dir(run_dir, config)
    state_path = os.path.join(run_dir, STATE)
    if os.path.exists(state_path) and read_json(state_path).get("finished"):
        write_training_plots(run_dir)  # any a kill interrupted
        return read_json(state_path)
    if config.fine_labels and task.class_of_source is None:
        raise ValueError(f"--fine-labels needs a task that groups a split's classes (digit-letter); "
                         f"{task.name} learns the split's classes already")
    if config.teacher:
        from tf_emnist.distill import check_teacher

        check_teacher(config, task)
    outputs = len(task.source_chars) if config.fine_labels else task.num_classes
    start = initial_weights(config, outputs) if config.init_from else None
    # The data is checked before the run directory is made: bad data leaves no run behind.
    images, labels = load_split(task, "train", config, source_labels=config.fine_labels)
    train_idx, val_idx = split_validation(len(labels), config.validation_split, config.split_seed)
    os.makedirs(run_dir, exist_ok=True)
    with run_lock(run_dir):
        resuming = check_run_dir(run_dir, config)  # as it is now that this process holds it
        here = resolve_choices(config)
        if resuming:  # the recorded choices, whatever this machine would choose
            recorded = config_from_dict(read_json(os.path.join(run_dir, CONFIG)), os.path.join(run_dir, CONFIG))
            changed = [f"{k}={getattr(recorded, k)} (here: {getattr(here, k)})" for k in AUTOMATIC
                       if getattr(recorded, k) is not None and getattr(recorded, k) != getattr(here, k)]
            if changed:
                log.warning("resuming with the run's recorded choices %s; this machine would choose otherwise",
                            ", ".join(changed))
            config = recorded.replace(**{k: getattr(here, k) for k in AUTOMATIC if getattr(recorded, k) is None})
        else:
            config = here
            write_json(os.path.join(run_dir, CONFIG), config.to_dict())
            if config.init_from:
                path = init_model_path(config.init_from)
                write_json(os.path.join(run_dir, INIT), {"path": path, "sha256": sha256_file(path)})
        _record_environment(run_dir)
        log.info("%s the run in %s", "resuming" if resuming else "starting", run_dir)
        return _fit(config, task, run_dir, images, labels, train_idx, val_idx, verbose, start)


def init_model_path(source: str) -> str:
    """The .keras file that --init-from names: the file itself, or a run directory's model."""
    path = os.path.join(source, MODEL) if os.path.isdir(source) else source
    if not (os.path.isfile(path) and path.endswith(".keras")):
        raise ValueError(f"--init-from {source}: no Keras model there; give a finished run directory or a .keras file")
    return path


def initial_weights(config: TrainConfig, outputs: int) -> list:
    """The weights --init-from names, checked against this run's network (a one-line ValueError)."""
    import keras

    from tf_emnist.model import build_model, custom_objects

    path = init_model_path(config.init_from)
    try:
        weights = keras.saving.load_model(path, custom_objects=custom_objects(), compile=False).get_weights()
    except Exception as e:  # a truncated or foreign file, whatever the reader raises
        raise ValueError(f"--init-from {path}: unreadable as a Keras model ({e.__class__.__name__}); "
                         "give a finished run directory or a .keras file") from None
    plain = config.replace(lstm_kernel=False, bf16_gradients=None, mixed_precision=False)
    wanted = [w.shape for w in build_model(plain, outputs).get_weights()]
    if [w.shape for w in weights] != wanted:
        raise ValueError(f"--init-from {path}: its network differs from this run's; give the same task, "
                         "--hidden-dim, --num-layers and --bidirectional as the model it starts from")
    return weights


def _fit(config, task, run_dir, images, labels, train_idx, val_idx, verbose, start=None) -> dict:
    import keras
    import tensorflow as tf

    from tf_emnist.data import EpochClock, make_dataset
    from tf_emnist.model import (build_model, compile_model, describe_lstm_training, keras_lstm_copy,
                                 with_grouped_output)
    from tf_emnist.model import steps_per_epoch as count_steps

    state_path = os.path.join(run_dir, STATE)
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()

    strategy = distribution_strategy(config.strategy)
    global_batch = config.batch_size * strategy.num_replicas_in_sync
    clock = EpochClock()
    soft = teacher = None
    if config.teacher and config.distill_online:
        from tf_emnist.distill import online_teacher

        teacher = online_teacher(run_dir, config, len(images), task)
    elif config.teacher:
        from tf_emnist.distill import cached_teacher_logits

        soft = cached_teacher_logits(run_dir, config, images, task)
    train_ds = make_dataset(images, labels, global_batch, training=True, indices=train_idx, seed=config.seed,
                            upright=config.upright, augment=config.augment, clock=clock, soft_targets=soft,
                            teacher=teacher)
    val_ds = make_dataset(images, labels, global_batch, training=False, indices=val_idx, upright=config.upright,
                          soft_targets=soft, teacher=teacher) if len(val_idx) else None
    steps = count_steps(len(train_idx), global_batch)
    log.info("%s: %d train / %d validation images, %d steps an epoch, %d replica(s); LSTM training: %s",
             task.name, len(train_idx), len(val_idx), steps, strategy.num_replicas_in_sync,
             describe_lstm_training(config))

    outputs = len(task.source_chars) if config.fine_labels else task.num_classes
    with strategy.scope():
        model = compile_model(build_model(config, outputs), config, steps, track_batch_loss=True,
                              replicas=strategy.num_replicas_in_sync)
        if start is not None:  # a resumed run's backup replaces them
            model.set_weights(start)
    if verbose is None:  # a progress bar in terminals and notebooks, one line an epoch in logs
        verbose = 1 if sys.stdout.isatty() or "ipykernel" in sys.modules else 2

    def model_to_save():
        """The model with plain Keras layers, answering the task's classes (grouped, with --fine-labels)."""
        plain = keras_lstm_copy(model, config, outputs)
        return with_grouped_output(plain, task.class_of_source) if config.fine_labels else plain

    model.fit(train_ds, validation_data=val_ds, epochs=config.epochs, verbose=verbose, shuffle=False,
              callbacks=_callbacks(run_dir, config, steps, model_to_save, strategy.num_replicas_in_sync, clock))

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
    from tf_emnist.data import load_split
    from tf_emnist.evaluate import evaluate_run

    if not os.path.exists(os.path.join(run_dir, "metrics.json")):
        load_split(get_task(config.task), "test", config)  # a bad test file fails now, not after training
    train(config, run_dir, verbose=verbose)
    return evaluate_run(run_dir)
