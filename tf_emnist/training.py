"""Training: one fit for `train` and `tune`, the run's callbacks, resume, several processes, train_and_evaluate."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys

import numpy as np

from tf_emnist.backend import Cluster
from tf_emnist.config import AUTOMATIC, TrainConfig, config_from_dict
from tf_emnist.files import read_json, save_figure, sha256_file, write_json
from tf_emnist.runs import (BACKUP, CONFIG, HISTORY, INIT, STATE, STEPS, RunDirError, backup_epoch,
                            check_run_dir, read_csv, read_history, read_state, record_environment, repair_history,
                            run_lock)
from tf_emnist.tasks import Task, get_task

log = logging.getLogger("tf_emnist")


def fit_model(model, config: TrainConfig, train_batches, val_batches=None, *, callbacks=(), verbose=2, **options):
    """Keras fit over tf_emnist.data.Batches, as `train` and `tune` run it: each epoch draws its own order,
    and the batches reach Keras through the backend's input pipeline (tf_emnist.feeding)."""
    from tf_emnist.callbacks import SetEpoch
    from tf_emnist.feeding import feed

    return model.fit(feed(train_batches), validation_data=feed(val_batches) if val_batches is not None else None,
                     epochs=config.epochs, verbose=verbose, shuffle=False,
                     callbacks=[SetEpoch(train_batches), *callbacks], **options)


@dataclasses.dataclass
class Devices:
    """What a model trains on: the scope it is built and fit in, its replicas, this process's share of each
    batch, and the context in which the writing process saves alone."""

    replicas: int = 1
    scope: object = contextlib.nullcontext
    shard: tuple[int, int] = (0, 1)
    multiple: int = 1  # each batch is cut to a multiple of this
    saving: object = contextlib.nullcontext


def training_devices(config: TrainConfig, cluster: Cluster) -> Devices:
    """JAX: keras.distribution.DataParallel over every device of every process (none for one device).
    TensorFlow: the tf.distribute strategy of `config.strategy` (tf_emnist.backend.tf_strategy)."""
    import tf_emnist.backend as backend

    if not backend.on_jax():
        strategy = backend.tf_strategy(config.strategy)
        return Devices(replicas=strategy.num_replicas_in_sync, scope=strategy.scope)
    distribution = backend.data_parallel()
    if distribution is None:
        return Devices()
    replicas = backend.replica_count(distribution)
    if config.batch_size % replicas:
        raise ValueError(f"--batch-size {config.batch_size} does not split evenly over {replicas} devices; "
                         f"give a multiple of {replicas}")
    return Devices(replicas=replicas, scope=distribution.scope, shard=(cluster.process_id, cluster.num_processes),
                   multiple=replicas, saving=backend.local_only)


def _callbacks(run_dir: str, config: TrainConfig, steps_per_epoch: int, save_model, writes: bool = True,
               saving=contextlib.nullcontext) -> list:
    """The run's callbacks, in order: the step log, the levers', the best model, the logs, the backup."""
    import keras

    import tf_emnist.callbacks as callbacks
    from tf_emnist.backend import on_jax
    from tf_emnist.callbacks import lever_callbacks

    progress = callbacks.RunProgress(run_dir, writes)
    keeps_batch_loss_columns = "batch_loss" in next(iter(read_csv(os.path.join(run_dir, HISTORY))), {})
    # A refit follows the validation accuracy its run recorded (the plateau schedule's learning rates).
    recorded = [float(r["val_accuracy"]) for r in read_history(config.refit)] if config.refit else None
    logs = [keras.callbacks.CSVLogger(os.path.join(run_dir, HISTORY), append=True)] if writes else []
    if writes and not on_jax():  # Keras's TensorBoard writes through TensorFlow
        logs.append(keras.callbacks.TensorBoard(os.path.join(run_dir, "logs"), update_freq="epoch"))
    return [
        callbacks.StepLossLogger(progress, steps_per_epoch, config.log_every, keeps_batch_loss_columns),
        *lever_callbacks(config, _past_val_accuracy(run_dir, recorded), recorded or (), announce=writes),
        callbacks.KeepBest(progress, save_model, config.patience),
        *logs,
        # Last, so a backup marks an epoch whose other outputs are already on disk.
        callbacks.AtomicBackupAndRestore(os.path.join(run_dir, BACKUP), writes, saving),
    ]


def _past_val_accuracy(run_dir: str, recorded: list[float] | None = None) -> list[float]:
    """Validation accuracy of the epochs a resumed run will not redo (those in its backup); for a
    refit, the `recorded` accuracy of the run it refits."""
    finished = backup_epoch(run_dir)
    if recorded is not None:
        return recorded[:finished]
    return [float(r["val_accuracy"]) for r in read_history(run_dir) if int(r["epoch"]) < finished]


def train(config: TrainConfig, run_dir: str, *, verbose: int | None = None, cluster: Cluster = Cluster()) -> dict:
    """Train config into run_dir (resuming an interrupted run there); returns train_state.json.

    The run directory is locked while training (see `run_lock`); backups are atomic (see
    `tf_emnist.callbacks.AtomicBackupAndRestore`), and a resumed run draws the same data order
    as an uninterrupted one. With several processes (`cluster`, JAX), each trains on its share
    of every batch and only process 0 writes run_dir, which all of them must see.
    """
    return _run(config, run_dir, verbose, cluster, evaluate=False)


def train_and_evaluate(config: TrainConfig, run_dir: str, *, verbose: int | None = None,
                       cluster: Cluster = Cluster()) -> dict:
    """Train (or resume), then evaluate the best model on the test split; returns metrics.json."""
    return _run(config, run_dir, verbose, cluster, evaluate=True)


# What process 0 tells the others when a run starts.
GO, FAILED, FINISHED = 0, 1, 2


def _run(config: TrainConfig, run_dir: str, verbose, cluster: Cluster, evaluate: bool) -> dict:
    import tf_emnist.backend as backend

    backend.check_backend_settings(config)
    backend.join(cluster)
    task = get_task(config.task)
    with contextlib.ExitStack() as held:
        status, failure, start = GO, None, None
        try:
            if cluster.writes:
                status, config, start, data = _start(config, task, run_dir, evaluate, held, cluster.num_processes)
            else:
                data = _training_data(config, task)
        except Exception as e:  # told to every process, then raised here
            status, failure = FAILED, e
        status = _agree(status, cluster)
        if failure is not None:
            raise failure
        if status == FAILED:
            raise RunDirError(f"process 0 could not start the run in {run_dir}; see its error")
        if status == GO:
            if not cluster.writes:
                config = _recorded_config(run_dir, cluster)
                start = initial_weights(config, _outputs(config, task)) if config.init_from else None
            verbose = (1 if sys.stdout.isatty() or "ipykernel" in sys.modules else 2) if verbose is None else verbose
            try:
                _fit(config, task, run_dir, data, verbose if cluster.writes else 0, cluster, start)
            except RuntimeError as e:
                if not cluster.distributed:
                    raise
                first = (str(e).strip().splitlines() or [""])[0][:160]
                raise RuntimeError(f"the processes of the run lost each other ({first}); rerun every process with "
                                   "the same command to resume from the last backup") from None
    result = _finish(run_dir, evaluate, cluster)
    if cluster.distributed:
        backend.barrier("tf-emnist: the run is done")
    return result if cluster.writes else _read_result(run_dir, evaluate)


def _start(config: TrainConfig, task: Task, run_dir: str, evaluate: bool, held: contextlib.ExitStack,
           processes: int = 1):
    """Process 0's checks and the run directory, before training: (status, the run's config, initial weights,
    the training data).

    Bad settings and data fail before the run directory is made, so they leave no run behind.
    The lock is held until `held` closes.
    """
    check_run_dir(run_dir, config)
    if read_state(run_dir)["finished"]:
        return FINISHED, config, None, None
    if config.fine_labels and task.class_of_source is None:
        raise ValueError(f"--fine-labels needs a task that groups a split's classes (digit-letter); "
                         f"{task.name} learns the split's classes already")
    if config.teacher:
        from tf_emnist.distill import check_teacher

        check_teacher(config, task)
    start = initial_weights(config, _outputs(config, task)) if config.init_from else None
    if evaluate and not os.path.exists(os.path.join(run_dir, "metrics.json")):
        from tf_emnist.data import load_split

        load_split(task, "test", config)  # a bad test file fails now, not after training
    data = _training_data(config, task)
    os.makedirs(run_dir, exist_ok=True)
    held.enter_context(run_lock(run_dir))
    config, resuming = _settle_config(config, run_dir)
    if resuming:
        repair_history(run_dir)
    record_environment(run_dir, processes)
    log.info("%s the run in %s", "resuming" if resuming else "starting", run_dir)
    return GO, config, start, data


def _settle_config(config: TrainConfig, run_dir: str) -> tuple[TrainConfig, bool]:
    """The config this start trains with, and whether it resumes: a new run's, every automatic choice made
    and recorded; a resumed run's recorded one, whatever this machine would choose."""
    from tf_emnist.backend import resolve_choices

    resuming = check_run_dir(run_dir, config)  # as it is now that this process holds it
    here = resolve_choices(config)
    if resuming:
        recorded = config_from_dict(read_json(os.path.join(run_dir, CONFIG)), os.path.join(run_dir, CONFIG))
        recorded = recorded.replace(backend=recorded.backend or "tensorflow")  # older runs trained on it
        changed = [f"{k}={getattr(recorded, k)} (here: {getattr(here, k)})" for k in AUTOMATIC
                   if getattr(recorded, k) is not None and getattr(recorded, k) != getattr(here, k)]
        config = recorded.replace(**{k: getattr(here, k) for k in AUTOMATIC if getattr(recorded, k) is None})
        if config.backend != here.backend:
            raise RunDirError(f"{run_dir} trains on {config.backend}; resume it with --backend {config.backend}")
        if changed:
            log.warning("resuming with the run's recorded choices %s; this machine would choose otherwise",
                        ", ".join(changed))
    else:
        config = here
        write_json(os.path.join(run_dir, CONFIG), config.to_dict())
        if config.init_from:
            path = init_model_path(config.init_from)
            write_json(os.path.join(run_dir, INIT), {"path": path, "sha256": sha256_file(path)})
    return config, resuming


def _agree(status: int, cluster: Cluster) -> int:
    """Every process's status made one: process 0's, or FAILED if any process failed."""
    if not cluster.distributed:
        return status
    from jax.experimental import multihost_utils

    statuses = np.asarray(multihost_utils.process_allgather(np.asarray([status], np.int32))).ravel()
    return FAILED if FAILED in statuses else int(statuses[0])


def _recorded_config(run_dir: str, cluster: Cluster) -> TrainConfig:
    """The config process 0 settled, read from the run directory every process must share."""
    path = os.path.join(run_dir, CONFIG)
    if not os.path.isfile(path):
        raise RunDirError(f"process {cluster.process_id} does not see {path}, which process 0 wrote: the run "
                          "directory must be on a file system every process shares")
    return config_from_dict(read_json(path), path)


def init_model_path(source: str) -> str:
    """The .keras file that --init-from names: the file itself, or a run directory's model."""
    from tf_emnist.sources import keras_file

    path = keras_file(source)
    if path is None:
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


def _outputs(config: TrainConfig, task: Task) -> int:
    """The network's outputs: the split's classes with --fine-labels, else the task's."""
    return len(task.source_chars) if config.fine_labels else task.num_classes


def _training_data(config: TrainConfig, task: Task):
    """(images, labels, train indices, validation indices) of the train split."""
    from tf_emnist.data import load_split, split_validation

    images, labels = load_split(task, "train", config, source_labels=config.fine_labels)
    return (images, labels, *split_validation(len(labels), config.validation_split, config.split_seed))


def _targets(config: TrainConfig, task: Task, run_dir: str, images, writes: bool) -> dict:
    """The distillation targets' options for Batches: a cached teacher's logits, or an online teacher."""
    if config.teacher and config.distill_online:
        from tf_emnist.distill import online_teacher

        return {"teacher": online_teacher(run_dir, config, len(images), task, writes)}
    if config.teacher:
        from tf_emnist.distill import cached_teacher_logits

        return {"soft_targets": cached_teacher_logits(run_dir, config, images, task, writes)}
    return {}


def _fit(config: TrainConfig, task: Task, run_dir: str, data, verbose: int, cluster: Cluster, start=None) -> None:
    import keras

    from tf_emnist.backend import describe_lstm_training, on_jax
    from tf_emnist.data import Batches
    from tf_emnist.model import build_model, compile_model

    images, labels, train_idx, val_idx = data
    keras.utils.set_random_seed(config.seed)
    if config.deterministic and not on_jax():  # JAX's computations are deterministic already
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    devices = training_devices(config, cluster)
    common = dict(seed=config.seed, upright=config.upright, multiple=devices.multiple, shard=devices.shard,
                  **_targets(config, task, run_dir, images, cluster.writes))
    train_batches = Batches(images, labels, config.batch_size, training=True, indices=train_idx,
                            augment=config.augment, **common)
    val_batches = Batches(images, labels, config.batch_size, indices=val_idx, **common) if len(val_idx) else None
    log.info("%s: %d train / %d validation images, %d steps an epoch, %d replica(s)%s; LSTM training: %s",
             task.name, len(train_idx), len(val_idx), len(train_batches), devices.replicas,
             f" in {cluster.num_processes} processes" if cluster.distributed else "", describe_lstm_training(config))
    with devices.scope():
        model = compile_model(build_model(config, _outputs(config, task)), config, len(train_batches),
                              track_batch_loss=True)
        if start is not None:  # a resumed run's backup replaces them
            model.set_weights(start)
        save = _model_saver(model, config, task, devices.saving)
        fit_model(model, config, train_batches, val_batches, verbose=verbose,
                  callbacks=_callbacks(run_dir, config, len(train_batches), save, cluster.writes, devices.saving))
    if cluster.writes:
        state = read_state(run_dir)
        state.update(finished=True, train_examples=int(len(train_idx)), validation_examples=int(len(val_idx)))
        write_json(os.path.join(run_dir, STATE), state)


def _model_saver(model, config: TrainConfig, task: Task, saving):
    """save(path): the model with plain Keras layers, answering the task's classes (grouped, with
    --fine-labels), written atomically."""
    from tf_emnist.files import atomic_path
    from tf_emnist.model import plain_copy, with_grouped_output

    def save(path: str) -> None:
        with saving(), atomic_path(path) as tmp:
            plain = plain_copy(model, config, _outputs(config, task))
            (with_grouped_output(plain, task.class_of_source) if config.fine_labels else plain).save(tmp)

    return save


def _finish(run_dir: str, evaluate: bool, cluster: Cluster) -> dict | None:
    """Process 0, after training: the plots (any a kill interrupted too), then the test figures, alone."""
    if not cluster.writes:
        return None
    write_training_plots(run_dir)
    if not evaluate:
        return read_state(run_dir)
    from tf_emnist.evaluate import evaluate_run

    if cluster.distributed:
        from tf_emnist.backend import local_only

        with local_only():
            return evaluate_run(run_dir)
    return evaluate_run(run_dir)


def _read_result(run_dir: str, evaluate: bool) -> dict:
    return read_json(os.path.join(run_dir, "metrics.json" if evaluate else STATE))


def write_training_plots(run_dir: str) -> None:
    from tf_emnist.plots import plot_epochs, plot_step_loss

    steps = [{k: float(r[k]) for k in ("step", "loss", "best_loss")}
             for r in read_csv(os.path.join(run_dir, STEPS), ("step", "loss", "best_loss"))]
    if steps:
        save_figure(plot_step_loss(steps), os.path.join(run_dir, "loss_steps.png"))
    history = read_history(run_dir)
    for metric in ("loss", "accuracy"):
        save_figure(plot_epochs(history, metric), os.path.join(run_dir, f"{metric}_epochs.png"))
