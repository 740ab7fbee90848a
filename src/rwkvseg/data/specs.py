"""Dataset specs: what a 3D dataset's files hold (modalities, label values, evaluation regions) and how the model
sees them; presets for BraTS / MSD, nnU-Net dataset.json, and the one resolver that configs and commands share."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

DATASETS = ("brats", "brats2023", "msd_task01", "nnunet")  # presets, or nnunet: read the dataset.json


@dataclass(frozen=True)
class DatasetSpec:
    """What a dataset's files hold and how the model sees them.

    modalities: model channel order. For BraTS layouts these are the file suffixes (`flair` in `<case>_flair`);
        for MSD and nnU-Net they are channel names from dataset.json (matched case-insensitively) or indices.
    label_values: the label values found in files, background first; class index = position in this tuple.
    regions: (name, label values) pairs, evaluated as unions of labels (WT/TC/ET for BraTS), ordered from the
        largest region to the smallest nested one: in region mode a prediction is written back by painting
        region after region with `region_paint`.
    """

    name: str
    layout: str  # "brats" | "msd" | "nnunet"
    modalities: tuple[str, ...]
    label_values: tuple[int, ...]
    regions: tuple[tuple[str, tuple[int, ...]], ...]
    separator: str = "_"
    seg_suffix: str = "seg"
    region_paint: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.layout not in ("brats", "msd", "nnunet"):
            raise ValueError(f"dataset layout {self.layout!r} unknown; choose brats, msd or nnunet")
        if not self.modalities:
            raise ValueError(f"dataset spec {self.name!r} names no modalities")
        if len(set(self.label_values)) != len(self.label_values) or self.label_values[:1] != (0,):
            raise ValueError(f"label_values {self.label_values} must be distinct and start with background 0")
        for region, values in self.regions:
            unknown = set(values) - set(self.label_values[1:])
            if unknown or not values:
                raise ValueError(
                    f"region {region!r} uses labels {sorted(unknown) or values} that are not foreground "
                    f"labels of {self.label_values}"
                )
        if self.region_paint is not None and len(self.region_paint) != len(self.regions):
            raise ValueError(f"region_paint {self.region_paint} needs one label per region {self.region_names}")

    @property
    def num_classes(self) -> int:
        return len(self.label_values)

    @property
    def region_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.regions)

    def paint_values(self) -> tuple[int, ...]:
        """Label written where each region is predicted (painting in region order, later regions on top).

        Derived for nested regions as the one label of a region that no later region contains
        (BraTS: WT -> 2 edema, TC -> 1 necrosis, ET -> 4); give `region_paint` when that is ambiguous.
        """
        if self.region_paint is not None:
            return self.region_paint
        paint = []
        for index, (region, values) in enumerate(self.regions):
            later = {v for _, vs in self.regions[index + 1 :] for v in vs}
            own = sorted(set(values) - later)
            if len(own) != 1:
                raise ValueError(
                    f"cannot tell which label to write for region {region!r} (candidates {own}); "
                    f"set region_paint in the dataset spec"
                )
            paint.append(own[0])
        return tuple(paint)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "layout": self.layout,
            "modalities": list(self.modalities),
            "label_values": list(self.label_values),
            "regions": {name: list(values) for name, values in self.regions},
            "separator": self.separator,
            "seg_suffix": self.seg_suffix,
            "region_paint": None if self.region_paint is None else list(self.region_paint),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DatasetSpec:
        return cls(
            name=data["name"],
            layout=data["layout"],
            modalities=tuple(data["modalities"]),
            label_values=tuple(int(v) for v in data["label_values"]),
            regions=tuple((name, tuple(int(v) for v in values)) for name, values in data["regions"].items()),
            separator=data.get("separator", "_"),
            seg_suffix=data.get("seg_suffix", "seg"),
            region_paint=None if data.get("region_paint") is None else tuple(data["region_paint"]),
        )


PRESETS: dict[str, dict[str, Any]] = {
    # BraTS 2017-2021: 1 NCR/NET, 2 edema, 4 enhancing tumour.
    "brats": dict(
        layout="brats",
        modalities=("t1", "t1ce", "t2", "flair"),
        label_values=(0, 1, 2, 4),
        regions=(("WT", (1, 2, 4)), ("TC", (1, 4)), ("ET", (4,))),
    ),
    # BraTS 2023+: new suffixes, "-" separator, enhancing tumour is 3.
    "brats2023": dict(
        layout="brats",
        modalities=("t1n", "t1c", "t2w", "t2f"),
        label_values=(0, 1, 2, 3),
        regions=(("WT", (1, 2, 3)), ("TC", (1, 3)), ("ET", (3,))),
        separator="-",
    ),
    # MSD Task01_BrainTumour: 1 edema, 2 non-enhancing tumour, 3 enhancing tumour; dataset.json channel names.
    "msd_task01": dict(
        layout="msd",
        modalities=("t1w", "t1gd", "t2w", "flair"),
        label_values=(0, 1, 2, 3),
        regions=(("WT", (1, 2, 3)), ("TC", (2, 3)), ("ET", (3,))),
    ),
}


def dataset_spec(name: str, **overrides: Any) -> DatasetSpec:
    """A preset by name (`brats`, `brats2023`, `msd_task01`) with fields replaced by overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown dataset preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return DatasetSpec(name=name, **{**PRESETS[name], **overrides})


def spec_from_dataset_json(path: Path, regions: dict[str, Sequence[int]] | None = None) -> DatasetSpec:
    """A spec for an nnU-Net raw dataset (v1 `modality` or v2 `channel_names` + `labels`).

    Without `regions`, each foreground label is its own region; nnU-Net v2 region labels (lists of values in
    dataset.json) are taken as regions.
    """
    meta = read_json(path)
    channels = meta.get("channel_names") or meta.get("modality")
    if not channels:
        raise ValueError(f"{path} has neither 'channel_names' nor 'modality'; is it an nnU-Net dataset.json?")
    modalities = tuple(str(channels[key]) for key in sorted(channels, key=int))
    raw_labels = meta.get("labels", {})
    # v2 region-based training: once one entry is a list, every foreground entry is a region
    region_based = any(isinstance(v, list) for v in raw_labels.values())
    values: set[int] = set()
    json_regions: dict[str, tuple[int, ...]] = {}
    for key, value in raw_labels.items():
        if key.isdigit():  # v1 / MSD: "1": "edema"
            values.add(int(key))
            continue
        members = tuple(int(v) for v in value) if isinstance(value, list) else (int(value),)  # v2: "edema": 1
        values.update(members)
        if region_based and members != (0,):
            json_regions[key] = members
    label_values = (0, *sorted(values - {0}))
    if regions is None:
        regions = json_regions or {str(v): (v,) for v in label_values[1:]}
    return DatasetSpec(
        name=str(meta.get("name", path.parent.name)),
        layout="nnunet",
        modalities=modalities,
        label_values=label_values,
        regions=tuple((name, tuple(vals)) for name, vals in regions.items()),
    )


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found; MSD and nnU-Net datasets need their dataset.json") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); fix or regenerate the file") from None


def resolve_spec(
    dataset: str,
    modalities: Sequence[str] = (),
    label_values: Sequence[int] = (),
    regions: Mapping[str, Sequence[int]] | Sequence[tuple[str, Sequence[int]]] = (),
    root: Path | str | None = None,
) -> DatasetSpec:
    """The spec a config or command line asks for: a preset (or `nnunet`: root/dataset.json) with the given
    modalities, label values and regions ({name: values} or (name, values) pairs) in place of its own."""
    if dataset not in DATASETS:
        raise ValueError(f"dataset {dataset!r} is not valid; choose one of {', '.join(DATASETS)}")
    pairs = regions.items() if isinstance(regions, Mapping) else regions
    region_pairs = tuple((str(name), tuple(int(v) for v in values)) for name, values in pairs)
    overrides: dict[str, Any] = {}
    if modalities:
        overrides["modalities"] = tuple(modalities)
    if label_values:
        overrides["label_values"] = tuple(int(v) for v in label_values)
    if dataset == "nnunet":
        if root is None:
            raise ValueError("dataset nnunet needs the dataset folder with its dataset.json")
        spec = spec_from_dataset_json(Path(root) / "dataset.json", dict(region_pairs) or None)
        return replace(spec, **overrides)
    if region_pairs:
        overrides["regions"] = region_pairs
    return dataset_spec(dataset, **overrides)
