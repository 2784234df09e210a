"""The run configuration: one frozen dataclass, one name per hyperparameter everywhere."""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from tf_emnist.files import read_json_object


LR_SCHEDULES = ("constant", "cosine", "plateau")
BACKENDS = ("tensorflow", "jax")


def _field(default, help: str, *, hyper: bool = False):
    return dataclasses.field(default=default, metadata={"help": help, "hyper": hyper})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run. The defaults are the study's merged preset.

    Fields marked `hyper` are the model's hyperparameters (also the keras-tuner names);
    the rest choose the data and the run's bookkeeping. The CLI flag of `hidden_dim` is
    `--hidden-dim`, and the same name is the key in config.json and best_config.json.
    """

    task: str = _field("merged", "task name (see `tf-emnist tasks`)")
    # -- the model and its optimisation (the study's values)
    hidden_dim: int = _field(256, "LSTM units per layer", hyper=True)
    num_layers: int = _field(3, "stacked LSTM layers", hyper=True)
    dropout: float = _field(0.2, "dropout rate on the last LSTM output", hyper=True)
    learning_rate: float = _field(1e-3, "Adam(W) learning rate", hyper=True)
    batch_size: int = _field(256, "batch size: images a training step reads, across every device and process",
                             hyper=True)
    epochs: int = _field(7, "training epochs", hyper=True)
    seed: int = _field(0, "seed for weights, shuffling, augmentation and dropout (and the validation "
                          "carve-out, unless --validation-seed)")
    # -- levers beyond the study; off by default, so the defaults stay the study's
    bidirectional: bool = _field(False, "wrap each LSTM in Bidirectional", hyper=True)
    augment: float = _field(0.0, "random affine augmentation strength (0 = off; 1 = +-10 deg, +-10%% shift/scale)", hyper=True)
    label_smoothing: float = _field(0.0, "label smoothing of the cross-entropy", hyper=True)
    weight_decay: float = _field(0.0, "decoupled weight decay (AdamW when > 0)", hyper=True)
    lr_schedule: str = _field(
        "constant", "learning-rate schedule: constant, cosine (1 epoch warm-up) or plateau (halve when validation stalls)",
        hyper=True)
    clipnorm: float = _field(0.0, "clip each gradient to this norm (0 = off)", hyper=True)
    ema: float = _field(0.0, "keep an exponential moving average of the weights with this momentum, e.g. 0.999, "
                             "and validate and save it (0 = off)", hyper=True)
    fine_labels: bool = _field(
        False, "for a task that groups a split's classes (digit-letter): learn the split's own classes "
               "(47 for ByMerge), and answer with each group's summed probability")
    patience: int = _field(0, "stop after this many epochs without a better validation accuracy (0 = run all epochs)")
    teacher: str | None = _field(
        None, "distillation: learn from these models' softened probabilities as well as the labels (run "
              "directories or exports, several separated by commas: their ensemble)")
    distill_temperature: float = _field(2.0, "distillation: the temperature T that softens both models' "
                                             "probabilities", hyper=True)
    distill_alpha: float = _field(0.5, "distillation: the weight of the true labels' loss; 1 - alpha goes to "
                                       "the teacher's", hyper=True)
    distill_online: bool = _field(
        False, "distillation: the teacher reads each training batch as augmented, during training (costlier), "
               "instead of the clean images once, cached")
    # -- data
    data_dir: str | None = _field(None, "offline data: a folder with the NIST EMNIST gzip files (or gzip.zip)")
    tfds_dir: str | None = _field(None, "tensorflow-datasets data dir (default: tfds's own, ~/tensorflow_datasets)")
    validation_split: float = _field(0.1, "fraction of train held out for validation (seeded, disjoint; 0: none, "
                                          "to refit chosen settings on all train images, see --refit)")
    init_from: str | None = _field(
        None, "start from another model's weights instead of random ones: a finished run directory or a .keras "
              "file of the same network (e.g. to train a finished run on at a lower --learning-rate)")
    refit: str | None = _field(None, "refit a finished validation run on all train images: its settings, its "
                                     "epochs up to the best, its learning rate epoch by epoch (validation_split 0)")
    validation_seed: int | None = _field(
        None, "seed of the validation carve-out (default: --seed); fix it to compare or ensemble runs of other seeds")
    limit_train: int | None = _field(None, "use only the first N train images (quick runs)")
    limit_test: int | None = _field(None, "evaluate on the first N test images only (quick runs)")
    upright: bool = _field(True, "transpose the stored images so the time steps are the upright rows")
    # -- execution
    backend: str | None = _field(None, "Keras backend to train on: tensorflow or jax (default: KERAS_BACKEND, else "
                                       "tensorflow; a resumed run keeps its own)")
    log_every: int = _field(1000, "print and record the batch loss every N steps")
    deterministic: bool = _field(False, "enable TensorFlow op determinism (slower; bit-exact reruns)")
    jit_compile: bool | None = _field(None, "compile the train step with XLA (default: on JAX always; on TensorFlow "
                                            "on a CPU, not on a GPU, where cuDNN is faster)")
    lstm_kernel: bool | None = _field(
        None, "train the LSTMs with tf-emnist's kernel: each half of the batch as its own LSTM, side by side, "
              "the recurrences in XLA, the large matmuls over all 28 steps through oneDNN; inference and the "
              "saved model stay Keras's float32 LSTM; --no-lstm-kernel trains Keras's LSTM, all in XLA "
              "(default: on a CPU, with XLA on and no mixed precision)")
    bf16_gradients: bool | None = _field(
        None, "train with the LSTM kernel, its large matmuls (the input projection and the backward pass's "
              "three) in bfloat16 with float32 accumulation; --no-bf16-gradients runs them in float32 (default: "
              "on a CPU whose bfloat16 matmuls measure at least 1.3x its float32 ones, timed once a process)")
    mixed_precision: bool = _field(False, "train in float16 (GPU) with float32 logits and loss")
    strategy: str = _field("default", "distribution: default or mirrored (all local GPUs)")
    scale_lr: bool = _field(
        False, "for larger batches: scale the learning rate by global batch / 256 (the linear scaling rule; "
               "pair it with --lr-schedule cosine for a warm-up)")

    def __post_init__(self):
        problems = [problem for name in RANGES if (problem := out_of_range(name, getattr(self, name)))]
        if not problems and parameter_bound(self) > MAX_PARAMETERS:
            problems.append(f"the network would have about {parameter_bound(self) / 1e6:,.0f}M parameters (hidden_dim "
                            f"{self.hidden_dim} x num_layers {self.num_layers}); at most {MAX_PARAMETERS / 1e6:.0f}M")
        if self.validation_split == 0 and self.patience:
            problems.append("patience needs validation images; without them (validation_split 0) give the epoch "
                            "count chosen on validation")
        if self.validation_split == 0 and self.lr_schedule == "plateau" and not self.refit:
            problems.append("the plateau schedule needs validation images; refit a validation run with --refit RUN "
                            "(it replays the run's learning rates), or choose another --lr-schedule")
        if self.lr_schedule not in LR_SCHEDULES:
            problems.append(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}")
        if self.distill_online and not self.teacher:
            problems.append("distill_online needs a teacher (--teacher)")
        if self.teacher and self.fine_labels:
            problems.append("teacher and fine_labels cannot be combined (the teacher answers the task's classes)")
        if self.bf16_gradients and self.lstm_kernel is False:
            problems.append("bf16_gradients needs the LSTM kernel (drop --no-lstm-kernel or --bf16-gradients)")
        if self.backend is not None and self.backend not in BACKENDS:
            problems.append(f"backend must be one of {', '.join(BACKENDS)}")
        if self.strategy not in ("default", "mirrored"):
            problems.append("strategy must be 'default' or 'mirrored'")
        if problems:
            raise ValueError("invalid config: " + "; ".join(problems))

    @property
    def split_seed(self) -> int:
        """The seed that carves the validation split out of train."""
        return self.seed if self.validation_seed is None else self.validation_seed

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


# The values a setting may take, as (lowest, highest, brackets): "[)" includes the lowest and not the
# highest. Wider values mean nothing (a 10-degree rotation at augment 1 is already a strong one) or
# cannot run (a network too large for memory), and are refused in one line, from flags and files alike.
RANGES = {
    "hidden_dim": (1, 4096, "[]"), "num_layers": (1, 16, "[]"), "batch_size": (1, 65536, "[]"),
    "epochs": (1, 10_000, "[]"), "log_every": (1, 10**9, "[]"), "patience": (0, 10_000, "[]"),
    "limit_train": (1, 10**9, "[]"), "limit_test": (1, 10**9, "[]"),
    "dropout": (0, 1, "[)"), "validation_split": (0, 1, "[)"), "label_smoothing": (0, 1, "[)"), "ema": (0, 1, "[)"),
    "learning_rate": (0, 1, "(]"), "augment": (0, 5, "[]"), "weight_decay": (0, 1, "[]"), "clipnorm": (0, 10**6, "[]"),
    "distill_temperature": (0, 100, "(]"), "distill_alpha": (0, 1, "[]"),
    "seed": (0, 2**32 - 1, "[]"), "validation_seed": (0, 2**32 - 1, "[]"),
}
MAX_PARAMETERS = 100_000_000  # 0.4 GB of float32 weights, 1.6 GB with Adam's moments and the gradients
LARGEST_TASK = 62  # classes of EMNIST ByClass: the size check holds for every task


def out_of_range(name: str, value) -> str | None:
    """What is wrong with `value` for setting `name` (see RANGES), or None."""
    if value is None:
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"{name} must be a finite number, not {value}"
    low, high, brackets = RANGES[name]
    below = value < low or (brackets[0] == "(" and value == low)
    above = value > high or (brackets[1] == ")" and value == high)
    if below or above:
        return f"{name} must be in {brackets[0]}{low}, {high}{brackets[1]}"
    return None


def lstm_parameter_count(input_dim: int, hidden_dim: int) -> int:
    """Weights of one Keras LSTM layer: 4 gates x (input + recurrent kernels + one bias)."""
    return 4 * (hidden_dim * (input_dim + hidden_dim) + hidden_dim)


def expected_parameter_count(config: "TrainConfig", num_classes: int) -> int:
    """Parameter count of tf_emnist.model.build_model(config, num_classes), from the formula."""
    directions = 2 if config.bidirectional else 1
    total, width = 0, 28  # the features of a time step: a row of the image
    for _ in range(config.num_layers):
        total += directions * lstm_parameter_count(width, config.hidden_dim)
        width = directions * config.hidden_dim
    return total + width * num_classes + num_classes


def parameter_bound(config: "TrainConfig") -> int:
    """The network's parameters for the task with the most classes."""
    return expected_parameter_count(config, LARGEST_TASK)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
# Settings left to the machine when unset (None): a run records what was chosen, and a resume keeps it.
AUTOMATIC = ("backend", "jit_compile", "lstm_kernel", "bf16_gradients")
HYPERPARAMETERS = tuple(name for name, f in FIELDS.items() if f.metadata["hyper"])


def check_keys(values: dict, source: str) -> None:
    """Raise a one-line error when `values` names something that is not a config field."""
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ValueError(
            f"{source}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(FIELDS)}"
        )


def coerce(name: str, value: Any) -> Any:
    """Convert a JSON or command-line value to the type of field `name`."""
    if value is None:
        if "None" not in FIELDS[name].type:
            raise ValueError(f"{name}: null is not allowed here; give a value or leave the setting out")
        return None
    kind = {"int": int, "float": float, "str": str, "bool": bool}[FIELDS[name].type.split(" |")[0]]
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ValueError(f"{name}: expected true or false, got {value!r}")
    if isinstance(value, (bool, list, dict)) or (kind is str and not isinstance(value, str)):
        raise ValueError(f"{name}: expected {_KIND_WORDS[kind]}, got {value!r}")  # JSON true is no number
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise ValueError(f"{name}: expected an integer, got {value!r}")
    try:
        converted = kind(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{name}: expected {kind.__name__}, got {value!r}") from None
    if kind is float and not math.isfinite(converted):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    return converted


_KIND_WORDS = {int: "an integer", float: "a number", str: "a text"}


def config_from_dict(values: dict, source: str) -> "TrainConfig":
    """A TrainConfig from a run's or an export's stored settings, or a one-line ValueError naming `source`."""
    check_keys(values, source)
    try:
        return TrainConfig(**{k: coerce(k, v) for k, v in values.items()})
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Settings from a JSON file (config.json or best_config.json), checked and typed."""
    values = read_json_object(path, "config file")
    check_keys(values, str(path))
    return {k: coerce(k, v) for k, v in values.items()}

