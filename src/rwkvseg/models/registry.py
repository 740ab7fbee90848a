"""The model registry: every architecture by name, behind one `create_model` call.

Each model module exports MODELS, a dict from name to a builder `f(in_channels, num_classes, **overrides)`.
Modules are imported when the registry is first asked, not at package import.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from torch import nn

MODEL_MODULES = ("urwkv", "baselines2d", "mmsegrwkv", "baselines3d")


def _builders() -> dict[str, Callable[..., nn.Module]]:
    builders: dict[str, Callable[..., nn.Module]] = {}
    for module in MODEL_MODULES:
        models = importlib.import_module(f"{__package__}.{module}").MODELS
        clash = builders.keys() & models.keys()
        if clash:
            raise RuntimeError(f"model names {sorted(clash)} are registered twice (last in {module})")
        builders.update(models)
    return builders


def list_models() -> list[str]:
    """Names accepted by create_model, sorted."""
    return sorted(_builders())


def create_model(name: str, in_channels: int, num_classes: int, **overrides) -> nn.Module:
    """Build a registered model: `create_model("urwkv_s", in_channels=3, num_classes=1)`.

    overrides replace fields of the variant's config (e.g. ablation switches).
    """
    builders = _builders()
    if name not in builders:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(sorted(builders))}")
    if in_channels < 1 or num_classes < 1:
        raise ValueError(f"in_channels and num_classes must be >= 1, got {in_channels} and {num_classes}")
    return builders[name](in_channels, num_classes, **overrides)
