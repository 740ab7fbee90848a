"""Dataset specs: what a 3D dataset's files hold (modalities, label values, evaluation regions) and how the model
sees them; presets for BraTS / MSD, nnU-Net dataset.json, and the one resolver that configs and commands share."""

from __future__ import annotations

import json
import re
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

    def output_names(self, target: str) -> tuple[str, ...]:
        """The names of a model's output channels, in order: the regions (target "regions") or the label values."""
        return self.region_names if target == "regions" else tuple(str(v) for v in self.label_values)

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

    Without `regions`, each foreground label is its own region, named as dataset.json names the label (v1
    `"1": "edema"`, v2 `"edema": 1`); nnU-Net v2 region labels (lists of values in dataset.json) are taken as
    regions. Names become safe column names (`safe_name`: `whole tumor` -> `whole_tumor`).
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
    label_names: dict[int, str] = {}
    for key, value in raw_labels.items():
        if key.isdigit():  # v1 / MSD: "1": "edema"
            values.add(int(key))
            label_names[int(key)] = str(value)
            continue
        members = tuple(int(v) for v in value) if isinstance(value, list) else (int(value),)  # v2: "edema": 1
        values.update(members)
        if region_based and members != (0,):
            json_regions[key] = members
        elif len(members) == 1:
            label_names[members[0]] = key
    label_values = (0, *sorted(values - {0}))
    if regions is None:
        # plain labels: each foreground label is a region named as dataset.json names it
        regions = json_regions or {label_names.get(v, str(v)): (v,) for v in label_values[1:]}
    regions = {safe_name(name): vals for name, vals in regions.items()}
    return DatasetSpec(
        name=str(meta.get("name", path.parent.name)),
        layout="nnunet",
        modalities=modalities,
        label_values=label_values,
        regions=tuple((name, tuple(vals)) for name, vals in regions.items()),
    )


def safe_name(name: str) -> str:
    """A name fit for a CSV column or a file name: runs of characters other than letters, digits, `-` and `_`
    become one `_` (`whole tumor` -> `whole_tumor`)."""
    safe = re.sub(r"[^0-9A-Za-z_-]+", "_", str(name).strip()).strip("_")
    if not safe:
        raise ValueError(f"name {name!r} has no letters or digits; give regions and labels readable names")
    return safe


def modality_of(text: str) -> str | None:
    """The MRI modality a series description, file suffix or channel name names: t1, t1ce, t2, flair, or None.

    Works on scanner descriptions (`AX T1 POST GD`, `t2_tse_tra`, `T2 FLAIR`) and on dataset channel names
    (`t1n`, `t1c`, `t1gd`, `t2w`, `t2f`, `FLAIR`), so a model's modality list and an input's channels map to the
    same names.
    """
    text = text.lower()
    if "flair" in text or re.search(r"(^|[^a-z0-9])t2f($|[^a-z0-9])", text):
        return "flair"
    has_t1, has_t2 = re.search(r"t1(?!\d)", text), re.search(r"t2(?!\d)", text)
    if has_t1 and not has_t2:
        contrast = re.search(
            r"t1(ce|c|gd)(?![a-z0-9])|gd|gad|contrast|post|\+ ?c|c ?\+|(^|[^a-z0-9])ce($|[^a-z0-9])", text
        )
        native = re.search(r"(^|[^a-z])(pre|native|without|non[- _]?contrast)|w/o", text)
        return "t1ce" if contrast and not native else "t1"
    if has_t2 and not has_t1:
        return "t2"
    return None


def channel_order(names: Sequence[str], modalities: Sequence[str], where: str) -> tuple[int, ...]:
    """For each model modality, the index of the input channel that holds it, matched by name.

    names: the input's channel names in its own order (dataset.json, file suffixes, DICOM series, --modalities);
    a name matches a modality when both are equal ignoring case, or name the same MRI modality (`modality_of`:
    MSD `T1gd` is BraTS `t1ce`, `FLAIR` is `flair`, BraTS 2023 `t2f` is `flair`). Raises ValueError saying how to
    name the channels when a modality has no channel or two.
    """
    names = [str(n) for n in names]
    hint = (
        f"name the input's channels in their order with --modalities (e.g. --modalities "
        f"{','.join(reversed([str(m) for m in modalities]))} for a file holding {', '.join(reversed(modalities))})"
    )
    if len(names) != len(modalities):
        raise ValueError(
            f"{where} has {len(names)} channel(s) {names}, the model takes {len(modalities)} "
            f"({', '.join(modalities)}); {hint}"
        )
    order = []
    for modality in modalities:
        exact = [i for i, n in enumerate(names) if n.lower() == str(modality).lower()]
        wanted = modality_of(str(modality))
        similar = [i for i, n in enumerate(names) if wanted is not None and modality_of(n) == wanted]
        found = exact or similar
        if len(found) != 1:
            raise ValueError(
                f"{where}: {'no' if not found else 'more than one'} channel of {names} is the model's modality "
                f"{modality!r} (model order: {', '.join(modalities)}); {hint}"
            )
        order.append(found[0])
    if len(set(order)) != len(order):
        raise ValueError(f"{where}: one channel of {names} matched several modalities of {list(modalities)}; {hint}")
    return tuple(order)


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
    region_pairs = tuple((safe_name(name), tuple(int(v) for v in values)) for name, values in pairs)
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
