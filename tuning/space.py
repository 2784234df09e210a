"""The search space, kept once as data, and how command-line or file overrides narrow it."""
from __future__ import annotations

import os

from tf_emnist.config import FIELDS, HYPERPARAMETERS, RANGES, coerce, out_of_range
from tf_emnist.files import read_json_object

# Names are TrainConfig's (and the CLI flags'): one name per hyperparameter everywhere.
SEARCH_SPACE: dict[str, dict] = {
    "hidden_dim": {"type": "int", "min": 64, "max": 512, "step": 64},
    "num_layers": {"type": "int", "min": 1, "max": 4},
    "dropout": {"type": "float", "min": 0.0, "max": 0.5, "step": 0.05},
    "learning_rate": {"type": "float", "min": 1e-4, "max": 1e-2, "sampling": "log"},
    "batch_size": {"type": "choice", "values": [128, 256, 512]},
    "bidirectional": {"type": "boolean"},
}


def parse_override(text: str) -> tuple[str, dict]:
    """'name=value' (fixed), 'name=min:max' (range) or 'name=a,b,c' (choice) -> (name, spec)."""
    name, sep, value = text.partition("=")
    name = name.strip().replace("-", "_")
    if not sep:
        raise ValueError(f"--space {text!r}: expected name=value, name=min:max or name=a,b,c")
    if not value.strip():
        raise ValueError(f"--space {text!r}: empty value for {name}; give a value, a min:max range or a list")
    if ":" in value:
        low, _, high = value.partition(":")
        return name, {"min": low, "max": high}
    if "," in value:
        return name, {"type": "choice", "values": [v for v in value.split(",") if v.strip()]}
    return name, {"type": "fixed", "value": value}


def read_space_file(path: str | os.PathLike) -> dict[str, dict]:
    """A JSON object: name -> a fixed value, [choices], or {"min": .., "max": .., ...}."""
    raw = read_json_object(path, "search space file")
    specs = {}
    for name, value in raw.items():
        if isinstance(value, dict):
            specs[name] = value
        elif isinstance(value, list):
            specs[name] = {"type": "choice", "values": value}
        else:
            specs[name] = {"type": "fixed", "value": value}
    return specs


def resolve_space(overrides: dict[str, dict], fixed: dict | None = None) -> dict[str, dict]:
    """SEARCH_SPACE narrowed by overrides (merged into the default spec), with `fixed` values pinned.

    Raises a one-line ValueError for unknown names, empty or contradictory specs.
    """
    space = {name: dict(spec) for name, spec in SEARCH_SPACE.items()}
    for name, spec in overrides.items():
        name = name.replace("-", "_")
        if name not in HYPERPARAMETERS:
            raise ValueError(f"search space: unknown hyperparameter {name!r}; known: {', '.join(HYPERPARAMETERS)}")
        base = space.get(name, {})
        if spec.get("type") in ("fixed", "choice") or "type" not in base:
            base = {}
        space[name] = {**base, **spec}
        if "type" not in space[name]:
            space[name]["type"] = "float" if FIELDS[name].type.startswith("float") else "int"
    for name, value in (fixed or {}).items():
        space[name] = {"type": "fixed", "value": value}
    for name, spec in space.items():
        space[name] = _check(name, spec)
    return space


def _value(name: str, value):
    """A value of the space, typed and checked as a train setting is (tf_emnist.config)."""
    value = coerce(name, value)
    problem = out_of_range(name, value) if name in RANGES else None
    if problem:
        raise ValueError(f"search space: {problem}")
    return value


def _check(name: str, spec: dict) -> dict:
    kind = spec["type"]
    if kind == "fixed":
        return {"type": "fixed", "value": _value(name, spec["value"])}
    if kind == "boolean":
        return spec
    if kind == "choice":
        values = [_value(name, v) for v in spec.get("values", [])]
        if not values:
            raise ValueError(f"search space: {name} has an empty list of choices")
        return {"type": "choice", "values": sorted(set(values), key=values.index)}
    if kind not in ("int", "float"):
        raise ValueError(f"search space: {name} has unknown type {kind!r} (int, float, choice, boolean, fixed)")
    if "min" not in spec or "max" not in spec:
        raise ValueError(f"search space: {name} needs a min and a max (or a list of choices, or one value)")
    low, high = _value(name, spec["min"]), _value(name, spec["max"])
    if low > high:
        raise ValueError(f"search space: {name} range {low}:{high} is empty (min > max)")
    if spec.get("sampling") == "log" and low <= 0:
        raise ValueError(f"search space: {name} uses log sampling, so its min must be > 0 (got {low})")
    checked = {**spec, "min": low, "max": high}
    if "step" in spec:
        checked["step"] = coerce(name, spec["step"])
    if checked.get("step") and checked["step"] > high - low and low != high:
        checked.pop("step")  # a step wider than the range would leave only min
    return checked


def define(hp, name: str, spec: dict):
    """Declare one hyperparameter on a keras_tuner HyperParameters and return its value."""
    kind = spec["type"]
    if kind == "fixed":
        return hp.Fixed(name, spec["value"])
    if kind == "boolean":
        return hp.Boolean(name)
    if kind == "choice":
        return hp.Choice(name, spec["values"])
    if spec["min"] == spec["max"]:
        return hp.Fixed(name, spec["min"])
    options = {k: spec[k] for k in ("step", "sampling") if k in spec}
    maker = hp.Int if kind == "int" else hp.Float
    return maker(name, spec["min"], spec["max"], **options)
