"""The task table: every fact about a task (data, labels, preset), kept once as data."""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from tf_emnist.config import TrainConfig, read_config_file
from tf_emnist.files import read_json_object

PRESETS = ("study", "best")
BYMERGE_CHARS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabdefghnqrt"
BYCLASS_CHARS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
DIGIT_CHARS = "0123456789"


@dataclasses.dataclass(frozen=True)
class Task:
    """One classification task over one EMNIST split.

    `source_chars[i]` is the character of the split's label i (the NIST mapping file).
    `class_of_source` maps a source label to the task's class id (None: identity);
    `class_names` names the task's classes. `preset` is the study's configuration;
    `best` the best one measured here (README, "Accuracy beyond the study"), if any.
    """

    name: str
    split: str  # EMNIST split: tfds config name and the NIST file prefix
    source_chars: str
    class_names: tuple[str, ...]
    preset: TrainConfig
    class_of_source: tuple[int, ...] | None = None
    best: TrainConfig | None = None

    def get_preset(self, name: str) -> TrainConfig:
        """The preset called `name` (study or best), or a one-line error."""
        if name == "study":
            return self.preset
        if name == "best" and self.best is not None:
            return self.best
        if name == "best":
            raise ValueError(f"task {self.name} has no measured best preset yet; use --preset study")
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")

    @property
    def tfds_name(self) -> str:
        return f"emnist/{self.split}"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def map_labels(self, source_labels: np.ndarray) -> np.ndarray:
        """Source split labels -> this task's class ids (int32)."""
        labels = np.asarray(source_labels, dtype=np.int32)
        if self.class_of_source is None:
            return labels
        return np.asarray(self.class_of_source, dtype=np.int32)[labels]


def _chars_task(name: str, split: str, chars: str, preset: TrainConfig) -> Task:
    return Task(name, split, chars, tuple(chars), preset)


_STUDY = TrainConfig()  # the study's merged preset: 3 x 256 LSTM, 7 epochs
_SMALL = dataclasses.replace(_STUDY, hidden_dim=128, epochs=8)  # the study's digit-letter preset
# The best measured here (README, "Accuracy beyond the study"): the levers that beat the study
# preset on the validation split (scripts/ablation.sh), trained longer with early stopping.
_BEST = dataclasses.replace(_STUDY, bidirectional=True, augment=1.0, label_smoothing=0.1, lr_schedule="plateau",
                            epochs=8, patience=2)

TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        dataclasses.replace(
            _chars_task("merged", "bymerge", BYMERGE_CHARS, dataclasses.replace(_STUDY, task="merged")),
            best=dataclasses.replace(_BEST, task="merged"),
        ),
        Task(
            "digit-letter",
            "bymerge",
            BYMERGE_CHARS,
            ("digit", "letter"),
            dataclasses.replace(_SMALL, task="digit-letter"),
            class_of_source=tuple(0 if c.isdigit() else 1 for c in BYMERGE_CHARS),
            # the merged network, answering digit or letter: the 47 labels teach it more than 2 do
            best=dataclasses.replace(_BEST, task="digit-letter", fine_labels=True),
        ),
        # Other EMNIST splits: one entry each. (emnist/letters is left out: its labels
        # start at 1 with an unused class 0, which needs more than a table row.)
        _chars_task("balanced", "balanced", BYMERGE_CHARS, dataclasses.replace(_STUDY, task="balanced")),
        _chars_task("byclass", "byclass", BYCLASS_CHARS, dataclasses.replace(_STUDY, task="byclass")),
        _chars_task("digits", "digits", DIGIT_CHARS, dataclasses.replace(_SMALL, task="digits")),
        _chars_task("mnist", "mnist", DIGIT_CHARS, dataclasses.replace(_SMALL, task="mnist")),
    ]
}


def get_task(name: str) -> Task:
    """The task called `name`, or a one-line error listing the known tasks."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; choose one of: {', '.join(TASKS)}") from None


def resolve_config(given: dict[str, Any], config_file: str | os.PathLike | None = None,
                   preset: str = "study") -> TrainConfig:
    """The task's preset, then the settings of `config_file`, then those of the run `refit` names
    (see refit_settings), then `given` (e.g. command-line flags).

    Data folders become absolute, so the run's config.json works from any directory.
    """
    from_file = read_config_file(config_file) if config_file else {}
    refit = given.get("refit") or from_file.get("refit")
    if refit:
        from_file = {**from_file, **refit_settings(refit)}
    task = get_task(given.get("task") or from_file.get("task") or "merged")
    settings = {**from_file, **given, "task": task.name}
    for name in ("data_dir", "tfds_dir", "init_from", "refit"):
        if settings.get(name):
            settings[name] = os.path.abspath(os.path.expanduser(settings[name]))
    if settings.get("teacher"):
        settings["teacher"] = ",".join(os.path.abspath(os.path.expanduser(p.strip()))
                                       for p in settings["teacher"].split(",") if p.strip())
    return task.get_preset(preset).replace(**settings)


def refit_settings(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The settings that refit a finished validation run on all train images: the run's own, with
    no validation split, its epochs up to its best one, and no early stopping. (Its learning
    rates, epoch by epoch, are replayed by training: `tf_emnist.callbacks.lever_callbacks`.)"""
    run_dir = os.path.abspath(os.path.expanduser(os.fspath(run_dir)))
    settings = read_config_file(os.path.join(run_dir, "config.json"))
    state = read_json_object(os.path.join(run_dir, "train_state.json"), "--refit run state")
    if not state.get("finished") or not state.get("best_epoch"):
        raise ValueError(f"--refit {run_dir}: the run has not finished; rerun its train command to finish it first")
    if not settings.get("validation_split", 0.1):
        raise ValueError(f"--refit {run_dir}: the run held out no validation images; refit a validation run")
    return {**settings, "validation_split": 0.0, "epochs": int(state["best_epoch"]), "patience": 0,
            "refit": run_dir}
