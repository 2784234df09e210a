"""Run directories: their layout, the settings a run recorded, its lock, history and model."""
from __future__ import annotations

import contextlib
import csv
import datetime
import glob
import json
import logging
import os

from tf_emnist.config import AUTOMATIC, TrainConfig, config_from_dict
from tf_emnist.files import create_exclusive, pid_alive, read_json, read_json_object, write_csv, write_json
from tf_emnist.tasks import get_task

CONFIG, STATE, STEPS, HISTORY, MODEL = "config.json", "train_state.json", "steps.csv", "history.csv", "model.keras"
BACKUP, LOCK = "backup", "run.lock"
# The backup's files (Keras's BackupAndRestore, double_checkpoint), newest first: (weights, metadata).
BACKUP_FILES = (("latest.weights.h5", "training_metadata.json"),
                ("latest.weights.h5.bkp", "training_metadata.json.bkp"))
INIT = "init.json"  # the model a run started from (--init-from): its path and sha256
NEW_STATE = {"best_val_accuracy": None, "best_epoch": None, "best_batch_loss": None, "train_seconds": 0.0,
              "finished": False}


log = logging.getLogger("tf_emnist")


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
    # is what that run did (new fields default to the old behaviour). A choice left to the
    # machine (None here) matches whatever the run recorded.
    try:
        recorded = TrainConfig(**read_json(os.path.join(run_dir, CONFIG))).to_dict()
    except (OSError, json.JSONDecodeError, TypeError, ValueError):
        return False
    recorded["backend"] = recorded["backend"] or "tensorflow"  # a run that predates the choice trained on it
    wanted = config.to_dict()
    return all(recorded[k] == v for k, v in wanted.items() if not (k in AUTOMATIC and v is None))


def check_run_dir(run_dir: str, config: TrainConfig) -> bool:
    """Check that run_dir is new, empty, or holds the same unfinished run; writes nothing.

    Returns True when resuming. Never deletes or overwrites anything of another run. A lock
    alone is no content: `run_lock` tells whether its holder still runs.
    """
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise RunDirError(f"{run_dir} is a file, not a run directory; pass a new --output")
    config_path = os.path.join(run_dir, CONFIG)
    if os.path.exists(config_path):
        read_json_object(config_path, "the run's settings")  # damaged: one line naming the file
        if not _same_config(run_dir, config):
            raise RunDirError(
                f"{run_dir} holds another run (its config.json differs); pass a new --output, or rerun with that run's settings to resume it"
            )
        if os.path.exists(os.path.join(run_dir, "metrics.json")):
            raise RunDirError(
                f"{run_dir} already holds this finished run; see its metrics.json, or pass a new --output to train again"
            )
        return True
    # A lock, or the temporaries of a start that was killed (hidden names), is no content.
    if os.path.isdir(run_dir) and [name for name in os.listdir(run_dir) if name != LOCK and not name.startswith(".")]:
        raise RunDirError(f"{run_dir} is not empty and holds no tf-emnist run; pass a new or empty --output")
    return False


@contextlib.contextmanager
def run_lock(run_dir: str):
    """Hold run_dir/run.lock while training; a second trainer is refused.

    The lock names its owner: host, boot, pid and the process's start time, written whole
    before the lock appears (a temporary file linked into place), so no reader sees half of
    one and a start that fails leaves none. A lock whose owner is gone (killed, or the machine
    rebooted, whoever holds its pid now) is stale and taken over. The lock goes on every exit.
    """
    path, me = os.path.join(run_dir, LOCK), lock_owner()
    for _ in range(2):
        if create_exclusive(path, json.dumps(me)):
            break
        holder = _read_lock(path)
        if holder is not None and _owner_runs(holder, me):
            where = "" if holder.get("host") == me["host"] else f" on {holder.get('host')}"
            raise RunDirError(f"{run_dir} is being trained by another process (pid {holder.get('pid')}{where}); "
                              f"wait for it, or pass another --output (remove {path} if no tf-emnist runs there)")
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
    else:
        raise RunDirError(f"{run_dir}: cannot take its lock {path}; remove it if no tf-emnist runs there")
    try:
        yield
    finally:
        if _read_lock(path) == me:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


def lock_owner(pid: int | None = None) -> dict:
    """What tells a process apart, beyond its pid: its host, the host's boot, the process's start time."""
    import socket

    pid = os.getpid() if pid is None else pid
    return {"pid": pid, "host": socket.gethostname(), "boot": _read_text("/proc/sys/kernel/random/boot_id"),
            "started": _process_start(pid)}


def _owner_runs(holder: dict, me: dict) -> bool:
    """Whether the lock's owner still runs. Another host's cannot be told, so it counts as running."""
    if holder.get("host") != me["host"]:
        return True
    if holder.get("boot") and me["boot"] and holder["boot"] != me["boot"]:
        return False  # the machine rebooted since
    pid = holder.get("pid")
    if not isinstance(pid, int) or not pid_alive(pid):
        return False
    return not holder.get("started") or holder["started"] == _process_start(pid)  # not a reused pid


def _read_lock(path: str) -> dict | None:
    """The owner a lock names (a lock of older tf-emnist holds its pid alone), or None if it names none."""
    try:
        text = open(path).read().strip()
    except OSError:
        return None
    try:
        holder = json.loads(text)
    except ValueError:
        return None
    return {"pid": holder, "host": lock_owner()["host"]} if isinstance(holder, int) else (
        holder if isinstance(holder, dict) else None)


def _process_start(pid: int) -> int | None:
    """When the process started, in clock ticks since boot (Linux /proc), or None where unknown."""
    stat = _read_text(f"/proc/{pid}/stat")
    try:
        return int(stat.rsplit(")", 1)[1].split()[19]) if stat else None
    except (IndexError, ValueError):
        return None


def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def read_csv(path: str, numeric: tuple[str, ...] = ()) -> list[dict]:
    """A CSV file's rows; rows a kill or a full disk cut short (fields missing, `numeric` columns that do not
    parse) are left out, with one warning that names the file."""
    rows, damaged = _csv_rows(path, numeric)
    if damaged:
        log.warning("%s: %d damaged row(s) left out (a write was cut short)", path, damaged)
    return rows


def _csv_rows(path: str, numeric: tuple[str, ...] = ()) -> tuple[list[dict], int]:
    if not os.path.exists(path):
        return [], 0
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    good = [row for row in rows if None not in row and None not in row.values()
            and all(_number(row.get(name)) is not None for name in numeric)]
    return good, len(rows) - len(good)


def _number(text):
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def read_history(run_dir: str) -> list[dict]:
    """history.csv, one row per epoch (a row repeated by a resume keeps its last copy). Keras's CSVLogger
    writes NA where an epoch has no figure (the validation columns of a refit); those are left out."""
    by_epoch = {int(float(r["epoch"])): {k: v for k, v in r.items() if v != "NA"}
                for r in read_csv(os.path.join(run_dir, HISTORY), ("epoch",))}
    return [by_epoch[e] for e in sorted(by_epoch)]


def backups(run_dir: str):
    """The run's backups a resume can start from, newest first: (weights file, epochs done, dropout's random
    state or None, the damaged metadata file or None). A damaged metadata file of the newest backup is
    rebuilt from the backup's copy of history.csv (one row an epoch); the random state is then lost."""
    folder = os.path.join(run_dir, BACKUP)
    for weights, metadata in BACKUP_FILES:
        weights, metadata = os.path.join(folder, weights), os.path.join(folder, metadata)
        if not os.path.exists(weights):
            continue
        try:
            saved = read_json(metadata)
            yield weights, int(saved["epoch"]), saved.get("seed_states"), None
            continue
        except FileNotFoundError:
            pass  # half a backup: its metadata was never written
        except (OSError, ValueError, KeyError, TypeError):
            copy, damaged = _csv_rows(os.path.join(folder, HISTORY), ("epoch",))
            if metadata.endswith(BACKUP_FILES[0][1]) and copy and not damaged:
                yield weights, len(copy), None, metadata
                continue
        if os.path.exists(metadata):
            yield weights, None, None, metadata  # unreadable and not rebuilt: skipped by its reader


def backup_epoch(run_dir: str) -> int:
    """The epochs a resume of run_dir will not redo (its first usable backup's, see `backups`); 0 for none."""
    return next((epoch for _, epoch, _, _ in backups(run_dir) if epoch is not None), 0)


def read_state(run_dir: str) -> dict:
    """train_state.json. A damaged one is rebuilt from what the run still holds (history.csv, its model,
    its backup), with one warning that names it; a run without one starts afresh."""
    path = os.path.join(run_dir, STATE)
    if not os.path.exists(path):
        return dict(NEW_STATE)
    try:
        state = read_json(path)
        if isinstance(state, dict):
            return {**NEW_STATE, **state}
    except (OSError, ValueError):
        pass
    history = read_history(run_dir)
    accuracies = [float(r["val_accuracy"]) for r in history if "val_accuracy" in r]
    best = max(range(len(accuracies)), key=accuracies.__getitem__) if accuracies else None
    # A finished run has its model and no backup any more (training deletes it at the end).
    finished = bool(history) and os.path.exists(os.path.join(run_dir, MODEL)) and not backup_epoch(run_dir)
    log.warning("%s is damaged: rebuilt from history.csv (best epoch %s; the training time restarts at 0)", path,
                None if best is None else best + 1)
    return {**NEW_STATE, "finished": finished, "best_epoch": None if best is None else best + 1,
            "best_val_accuracy": None if best is None else accuracies[best]}


def repair_history(run_dir: str) -> None:
    """A resumed run's history.csv made whole before training appends to it: rows cut short are dropped,
    and epochs a damaged or deleted file lost come back from the backup's copy; one warning names the file."""
    path, done = os.path.join(run_dir, HISTORY), backup_epoch(run_dir)
    rows, damaged = _csv_rows(path, ("epoch",))
    rows = [r for r in rows if int(float(r["epoch"])) < done]
    if len({r["epoch"] for r in rows}) < done:
        copy = [r for r in _csv_rows(os.path.join(run_dir, BACKUP, HISTORY), ("epoch",))[0]
                if int(float(r["epoch"])) < done]
        if len(copy) < done:
            log.warning("%s lacks some of epochs 1-%d, and the backup holds no copy of them: they are gone from the "
                        "history and the plots", path, done)
        else:
            log.warning("%s lacked some of epochs 1-%d: restored from the backup's copy", path, done)
            rows = copy
    elif damaged:
        log.warning("%s: %d damaged row(s) left out (a write was cut short)", path, damaged)
    else:
        return
    if rows:
        write_csv(path, rows)
    else:
        os.remove(path)


def load_run(run_dir: str):
    """(keras model, TrainConfig, Task) of a run directory that holds a model."""
    import keras

    from tf_emnist.model import custom_objects

    config_path, model_path = os.path.join(run_dir, CONFIG), os.path.join(run_dir, MODEL)
    if not (os.path.isfile(config_path) and os.path.isfile(model_path)):
        raise FileNotFoundError(
            f"{run_dir} is not a tf-emnist run with a model (needs {CONFIG} and {MODEL}); train one with `tf-emnist train`"
        )
    config = config_from_dict(read_json_object(config_path, "the run's settings"), config_path)
    try:
        model = keras.saving.load_model(model_path, compile=False, custom_objects=custom_objects())
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{model_path} cannot be read ({e.__class__.__name__}): the file is damaged; "
                         "retrain, or resume the run if it is unfinished") from None
    return model, config, get_task(config.task)


def environment(processes: int = 1) -> dict:
    """What ran: versions, the backend, the machine, the devices, the processes."""
    import platform

    from tf_emnist.backend import framework_versions, gpu_names
    from tf_emnist.version import __version__

    return {"tf_emnist": __version__, **framework_versions(), "python": platform.python_version(),
            "platform": platform.platform(), "cpu": cpu_name(), "gpus": gpu_names(), "processes": processes}


def record_environment(run_dir: str, processes: int = 1) -> None:
    """train_state.json's `environments`: one entry per start of the run (a resume adds one)."""
    path = os.path.join(run_dir, STATE)
    state = read_state(run_dir)
    state["environments"] = [*state.get("environments", []), environment(processes)]
    write_json(path, state)


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo, else the platform's word for it)."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
