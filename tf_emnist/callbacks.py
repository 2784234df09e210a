"""The Keras callbacks of a training run: the step log, the best model, atomic backups, the plateau
schedule, the data's epoch.

They share the run's progress (`RunProgress`, train_state.json in memory) instead of reaching
into each other. Every process of a run runs them alike, so all take the same decisions
(when to stop, which learning rate); only the process that writes the run writes files.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time

import keras
import numpy as np

from tf_emnist.config import TrainConfig
from tf_emnist.files import atomic_path, write_csv, write_json
from tf_emnist.runs import HISTORY, MODEL, STATE, STEPS, backups, read_csv, read_state

log = logging.getLogger("tf_emnist")


class RunProgress:
    """train_state.json, kept in memory while a run trains; saved by the process that writes the run."""

    def __init__(self, run_dir: str, writes: bool = True):
        self.run_dir, self.writes = run_dir, writes
        self.path = os.path.join(run_dir, STATE)
        self.state = read_state(run_dir)

    def save(self) -> None:
        if self.writes:
            write_json(self.path, self.state)


class StepLossLogger(keras.callbacks.Callback):
    """Every `log_every` steps: print and record (steps.csv) the batch loss and the best batch loss so far.

    The losses are read only at those steps and at an epoch's end (the metrics `batch_loss`
    and `lowest_batch_loss`), so the other steps run without waiting for their results.
    """

    def __init__(self, progress: RunProgress, steps_per_epoch: int, log_every: int,
                 keep_batch_loss_columns: bool = False):
        super().__init__()
        self.progress, self.steps_per_epoch, self.log_every = progress, steps_per_epoch, log_every
        self.keep_batch_loss_columns = keep_batch_loss_columns
        self.path = os.path.join(progress.run_dir, STEPS)
        self.rows, self.best, self.epoch = None, math.inf, 0

    def on_epoch_begin(self, epoch, logs=None):
        if self.rows is None:  # this process's first epoch: drop rows an interrupted epoch left
            self.rows = [r for r in read_csv(self.path, ("step", "loss", "best_loss"))
                         if int(float(r["step"])) <= epoch * self.steps_per_epoch]
            self.best = self.progress.state.get("best_batch_loss") or math.inf
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        step = self.epoch * self.steps_per_epoch + batch + 1
        if step % self.log_every or "batch_loss" not in (logs or {}):
            return
        loss = float(logs["batch_loss"])
        self.best = min(self.best, loss, float(logs.get("lowest_batch_loss", loss)))
        self.rows.append({"step": step, "epoch": self.epoch + 1, "loss": loss, "best_loss": self.best})
        if self.progress.writes:
            print(f"\nstep {step}: batch loss {loss:.4f}, best batch loss {self.best:.4f}", flush=True)
            write_csv(self.path, self.rows)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        if "lowest_batch_loss" in logs:
            self.best = min(self.best, float(logs["lowest_batch_loss"]))
            self.progress.state["best_batch_loss"] = self.best
        # The batch losses are per-step figures (steps.csv): at an epoch's end they are only the last batch's,
        # and Keras reports val_ twins that merely repeat them. Keep them out of the epoch logs (progress bar,
        # history.csv, TensorBoard), unless a run resumed from an older tf-emnist has the columns.
        names = ["lowest_batch_loss", "val_lowest_batch_loss"]
        if not self.keep_batch_loss_columns:
            names += ["batch_loss", "val_batch_loss"]
        for name in names:
            logs.pop(name, None)


class KeepBest(keras.callbacks.Callback):
    """Save the model (`save_model(path)`, atomically) when validation accuracy improves, and every epoch
    of a run without validation images; keep the time and the best in train_state.json; stop early
    after `patience` epochs without a better validation accuracy (0: never)."""

    def __init__(self, progress: RunProgress, save_model, patience: int = 0):
        super().__init__()
        self.progress, self.save_model, self.patience = progress, save_model, patience
        self.started = time.perf_counter()

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        state = self.progress.state
        state["train_seconds"] += time.perf_counter() - self.started
        val = (logs or {}).get("val_accuracy")
        best = state["best_val_accuracy"]
        if val is None or best is None or float(val) > best:
            state.update(best_val_accuracy=None if val is None else float(val), best_epoch=epoch + 1)
            if self.progress.writes:
                self.save_model(os.path.join(self.progress.run_dir, MODEL))
        self.progress.save()
        # Early stopping is kept in train_state.json, so a resumed run counts the same epochs.
        if self.patience and epoch + 1 - state["best_epoch"] >= self.patience:
            if self.progress.writes:
                print(f"\nno better validation accuracy for {self.patience} epoch(s): stopping at epoch {epoch + 1}",
                      flush=True)
            self.model.stop_training = True


class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
    """Keras BackupAndRestore whose backups survive a kill or a full disk at any moment.

    Each epoch's weights go to a temporary file first; the previous backup is kept (as
    `*.bkp`) until the new one is complete with its metadata. A backup that cannot be read
    is set aside with a one-line warning and the run resumes from the previous one (or, if
    none is left, starts over), instead of failing on every rerun. Each backup keeps a copy of the
    run's history.csv (tf_emnist.runs.repair_history). Every process restores; only the writing
    process saves, inside `saving` (a context: see tf_emnist.backend.local_only).
    """

    def __init__(self, backup_dir: str, writes: bool = True, saving=contextlib.nullcontext):
        super().__init__(backup_dir, double_checkpoint=True)
        self.writes, self.saving = writes, saving

    def _pairs(self):
        return ((self._weights_path, self._training_metadata_path),
                (self._prev_weights_path, self._prev_training_metadata_path))

    def on_train_begin(self, logs=None):
        for weights, epoch, seed_states, damaged in backups(os.path.dirname(self.backup_dir)):
            if epoch is None:
                log.warning("the backup's %s is unreadable; resuming from an earlier backup", damaged)
                continue
            try:
                if self.model.optimizer is not None and not self.model.optimizer.built:
                    self.model.optimizer.build(self.model.trainable_variables)
                self.model.load_weights(weights)
                for state, value in zip(self._seed_states(), seed_states or []):
                    state.assign(np.asarray(value, dtype=state.dtype))
            except Exception as e:  # a truncated or corrupt file, whatever the reader raises
                log.warning("the backup %s is unreadable (%s); resuming from an earlier one", weights,
                            e.__class__.__name__)
                continue
            if damaged:
                log.warning("the backup's %s was damaged: rebuilt from its copy of history.csv (epoch %d; dropout's "
                            "random draws start afresh)", damaged, epoch)
            self.model._initial_epoch = epoch
            return
        if any(os.path.exists(path) for pair in self._pairs() for path in pair):
            log.warning("no readable backup in %s: the run starts over from its first epoch", self.backup_dir)

    def on_train_end(self, logs=None):
        if self.writes:
            super().on_train_end(logs)

    def _save_model(self):
        if not self.writes:
            return
        (latest, meta), (prev, prev_meta) = self._pairs()
        os.makedirs(self.backup_dir, exist_ok=True)
        tmp = os.path.join(self.backup_dir, f".next-{os.getpid()}.weights.h5")
        try:
            with self.saving():
                self.model.save_weights(tmp, overwrite=True)
        except BaseException:  # a full disk, a kill: no half-written weights stay behind
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
        if os.path.exists(latest) and os.path.exists(meta):  # keep the last complete backup
            os.replace(meta, prev_meta)
            os.replace(latest, prev)
        os.replace(tmp, latest)
        history = os.path.join(os.path.dirname(self.backup_dir), HISTORY)
        if os.path.exists(history):
            with open(history, "rb") as f, atomic_path(os.path.join(self.backup_dir, HISTORY)) as copy:
                with open(copy, "wb") as out:
                    out.write(f.read())
        write_json(meta, {"epoch": self._current_epoch, "batch": self._last_batch_seen,
                          "seed_states": [np.asarray(s.value).tolist() for s in self._seed_states()]})

    def _seed_states(self):
        # Dropout's random state is not among the saved weights: without it, a resumed run
        # would draw other dropout masks than the uninterrupted one.
        return [generator.state for layer in self.model._flatten_layers()
                for generator in getattr(layer, "_seed_generators", [])]


class HalveOnPlateau(keras.callbacks.Callback):
    """Halve the learning rate after each epoch whose validation accuracy is not a new best.

    Keras's ReduceLROnPlateau with patience 1 and factor 0.5, down to 1/32 of the start,
    but it replays the finished epochs of a resumed run, so the rate after a resume is the
    rate an uninterrupted run would have. Without validation, it follows `recorded`, another
    run's validation accuracy per epoch (a refit of that run).
    """

    def __init__(self, learning_rate, past_val_accuracy=(), recorded=(), announce: bool = True):
        super().__init__()
        self.start, self.rate, self.best = learning_rate, learning_rate, None
        self.recorded = [float(a) for a in recorded]
        self.announce = announce
        for accuracy in past_val_accuracy:
            self.update(float(accuracy))

    def update(self, accuracy: float) -> None:
        if self.best is None or accuracy > self.best:
            self.best = accuracy
        else:
            self.rate = max(self.rate / 2, self.start / 32)

    def on_epoch_begin(self, epoch, logs=None):
        self.model.optimizer.learning_rate = self.rate

    def on_epoch_end(self, epoch, logs=None):
        before = self.rate
        if "val_accuracy" in logs:
            self.update(float(logs["val_accuracy"]))
        elif epoch < len(self.recorded):
            self.update(self.recorded[epoch])
        if self.rate != before and self.announce:
            print(f"\nvalidation accuracy not improved: learning rate {before:.3g} -> {self.rate:.3g}", flush=True)
        logs["learning_rate"] = before


def lever_callbacks(config: TrainConfig, past_val_accuracy=(), recorded_val_accuracy=(), announce: bool = True
                    ) -> list:
    """The Keras callbacks some levers need, for `train` and the tuner alike.

    Put them before any callback that saves the model: with `ema`, SwapEMAWeights puts the
    averaged weights in the model for validation and at each epoch's end.
    `past_val_accuracy`: the finished epochs' validation accuracy, when a run resumes.
    `recorded_val_accuracy`: for a run without validation images (a refit), the validation
    accuracy per epoch of the run it refits, which the plateau schedule follows, so the refit
    gets that run's learning rates. `announce`: print the plateau's changes of rate.
    """
    from tf_emnist.model import peak_learning_rate

    callbacks = []
    if config.ema > 0:
        callbacks.append(keras.callbacks.SwapEMAWeights(swap_on_epoch=True))
    if config.lr_schedule == "plateau":
        callbacks.append(HalveOnPlateau(peak_learning_rate(config), past_val_accuracy, recorded_val_accuracy,
                                        announce))
    return callbacks


class SetEpoch(keras.callbacks.Callback):
    """Tells the training batches which epoch starts, so each epoch draws its own order (a resumed one too)."""

    def __init__(self, *batches):
        super().__init__()
        self.batches = batches

    def on_epoch_begin(self, epoch, logs=None):
        for batches in self.batches:
            batches.set_epoch(epoch)
