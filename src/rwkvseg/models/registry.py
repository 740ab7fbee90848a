"""The model registry: every architecture by name, behind one `create_model` call.

Each model module exports FAMILY: its variants as data (name -> config values) and how to build one. Every
variant is built the same way (`Family.create`): the variant's values, updated by the caller's checked
overrides, go to the family's `make`. Modules are imported when the registry is first asked, not at package import.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

from torch import nn

FAMILY_MODULES = ("urwkv", "cmunext", "mmsegrwkv", "baselines")


@dataclass(frozen=True)
class Family:
    """One architecture: `variants` maps each registered name to its config values; `make(name, in_channels,
    num_classes, **values)` builds it; `fields(name)` names the values a caller may override."""

    variants: Mapping[str, Mapping[str, Any]]
    make: Callable[..., nn.Module]
    fields: Callable[[str], Collection[str]]

    @classmethod
    def of_config(cls, model: Callable[[Any], nn.Module], config: type, variants: Mapping[str, Mapping]) -> Family:
        """A family whose values are the fields of a frozen dataclass `config(in_channels, num_classes, ...)`."""
        fields = frozenset(f.name for f in dataclasses.fields(config)) - {"in_channels", "num_classes"}
        return cls(variants, lambda name, i, n, **values: model(config(i, n, **values)), lambda name: fields)

    def create(self, name: str, in_channels: int, num_classes: int, **overrides) -> nn.Module:
        valid = self.fields(name)
        unknown = overrides.keys() - valid
        if unknown:
            raise ValueError(f"{name}: unknown overrides {sorted(unknown)}; valid ones: {sorted(valid)}")
        # JSON sidecars give tuples back as lists; configs hold tuples
        overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
        return self.make(name, in_channels, num_classes, **{**self.variants[name], **overrides})


def _builders() -> dict[str, Callable[..., nn.Module]]:
    builders: dict[str, Callable[..., nn.Module]] = {}
    for module in FAMILY_MODULES:
        family: Family = importlib.import_module(f"{__package__}.{module}").FAMILY
        clash = builders.keys() & family.variants.keys()
        if clash:
            raise RuntimeError(f"model names {sorted(clash)} are registered twice (last in {module})")
        builders.update({name: partial(family.create, name) for name in family.variants})
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
