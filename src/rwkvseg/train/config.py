"""Training configuration: frozen dataclasses read from TOML or YAML, with `--set key=value` overrides.

Unknown keys are rejected with the list of valid ones, values are converted to the field's type, and the
resolved configuration is written into the run folder, so a run can always be repeated from its own files.
`from_dict` works for any dataclass tree (the 3D pipeline reuses it).
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..data.images2d import NORMALIZATIONS
from ..data.transforms2d import RESIZE_MODES, AugmentConfig

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("poly", "cosine", "constant")
LOSSES = ("auto", "bce_dice", "ce_dice", "bce", "ce", "dice")
AMP_MODES = ("auto", "bf16", "fp16", "off")
LOGGERS = ("csv", "tensorboard")


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} = {value!r} is not valid; choose one of {', '.join(choices)}")


@dataclass(frozen=True)
class ModelConfig:
    name: str = "urwkv"
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DataConfig:
    """root: dataset folder (any layout discovery knows); split: JSON file (empty: a seeded split is made and
    saved in the run folder); size and resize: network input (resize the whole image, or random crops)."""

    root: str = ""
    split: str = ""
    fold: int = 0
    val_fraction: float = 0.2
    channels: int = 3
    num_classes: int = 1
    class_names: tuple[str, ...] = ()
    size: tuple[int, int] = (256, 256)
    resize: str = "resize"
    normalization: str = "auto"
    batch_size: int = 4
    val_batch_size: int = 8
    num_workers: int = 2
    skip_non_images: bool = False
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        _check_choice("data.resize", self.resize, RESIZE_MODES)
        _check_choice("data.normalization", self.normalization, NORMALIZATIONS)
        if self.channels < 1 or self.num_classes < 1 or self.batch_size < 1:
            raise ValueError("data.channels, data.num_classes and data.batch_size must be >= 1")
        if len(self.size) != 2 or min(self.size) < 8:
            raise ValueError(f"data.size must be [height, width] >= 8, got {list(self.size)}")
        expected = 1 if self.num_classes == 1 else self.num_classes
        if self.class_names and len(self.class_names) != expected:
            raise ValueError(
                f"data.class_names {list(self.class_names)} must name the {self.num_classes} output class(es) "
                "(one foreground name for a binary model)"
            )


@dataclass(frozen=True)
class OptimConfig:
    """sgd + poly per iteration from 0.01 is the paper's; adamw + cosine (with warmup) is the common alternative."""

    name: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: str = "poly"
    power: float = 0.9
    warmup_steps: int = 0
    min_lr: float = 0.0
    grad_clip: float = 0.0

    def __post_init__(self) -> None:
        _check_choice("optim.name", self.name, OPTIMIZERS)
        _check_choice("optim.schedule", self.schedule, SCHEDULES)
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")


@dataclass(frozen=True)
class LossConfig:
    """auto: BCE + Dice for one output channel (binary), CE + Dice for several classes."""

    name: str = "auto"
    ce_weight: float = 1.0
    dice_weight: float = 1.0

    def __post_init__(self) -> None:
        _check_choice("loss.name", self.name, LOSSES)


@dataclass(frozen=True)
class TrainConfig:
    """out: run folder (checkpoints, logs, resolved config, split). max_steps_per_epoch 0: whole epochs.

    max_minutes > 0: stop after the first epoch that ends past this wall-clock budget (a demo on a slow CPU);
    the LR schedule still spans `epochs`, so a stopped run has not annealed fully.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    epochs: int = 280
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    val_every: int = 1
    threshold: float = 0.5
    select_metric: str = "dice"
    max_steps_per_epoch: int = 0
    max_minutes: float = 0.0
    logger: str = "csv"
    out: str = "runs/run"

    def __post_init__(self) -> None:
        _check_choice("amp", self.amp, AMP_MODES)
        _check_choice("logger", self.logger, LOGGERS)
        if self.epochs < 1 or self.val_every < 1:
            raise ValueError("epochs and val_every must be >= 1")


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _convert(value: Any, kind: Any, key: str) -> Any:
    """value (from TOML/YAML/--set) as the annotated type kind; errors name the key."""
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, Mapping):
            raise ValueError(f"{key} must be a table of settings, got {value!r}")
        return from_dict(kind, value, prefix=f"{key}.")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], key)
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            value = [value]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise ValueError(f"{key} needs {len(args)} values, got {list(value)}")
        return tuple(_convert(v, a, key) for v, a in zip(value, args, strict=True))
    if origin is dict or kind is dict:
        if not isinstance(value, Mapping):
            raise ValueError(f"{key} must be a table, got {value!r}")
        return dict(value)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ValueError(f"{key} must be true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"{key} must be an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key} must be an integer, got {value!r}") from None
    if kind is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key} must be a number, got {value!r}") from None
    if kind is str:
        if isinstance(value, (dict, list)):
            raise ValueError(f"{key} must be a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    """Build dataclass cls from a nested mapping; unknown keys are an error that lists the valid ones."""
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        raise ValueError(
            f"unknown setting(s) {', '.join(prefix + k for k in unknown)}; valid keys here: "
            f"{', '.join(prefix + k for k in types_)}"
        )
    return cls(**{k: _convert(v, types_[k], prefix + k) for k, v in data.items()})


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON/TOML-ready nested dict (tuples as lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A TOML (.toml) or YAML (.yaml/.yml) file as a dict; JSON (.json) too, as written into run folders."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise ValueError(f"config file {path} must end in .toml, .yaml, .yml or .json")
    except (tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError) as err:
        raise ValueError(f"config file {path} cannot be parsed: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a table of settings at the top level")
    return data


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` strings (value parsed as YAML: 0.01, true, [256, 256], sgd) to a nested dict."""
    data = json.loads(json.dumps(data))  # deep copy
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r} must look like key=value, e.g. optim.lr=0.001")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {item!r}: {part} is a value, not a table of settings")
        node[parts[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """TrainConfig from a file (or defaults) plus --set overrides."""
    data = read_config_file(path) if path else {}
    return from_dict(TrainConfig, apply_overrides(data, overrides))
