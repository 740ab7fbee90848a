"""Post-processing of predicted label maps (nnU-Net style), chosen on validation: beyond the papers' recipes.

Pure functions on numpy label arrays, 2D or 3D alike, and a frozen config that `rwkvseg predict --postprocess`
spells as comma-separated options:
- `largest`: keep only the largest connected component of the foreground (every nonzero label together; full
  connectivity: 8 in 2D, 26 in 3D); each kept voxel keeps its label.
- `fill-holes`: fill the holes of the foreground (binary models only; a hole is background that the border's
  background does not reach through 4- / 6-connected steps, scipy.ndimage.binary_fill_holes).
- `et-min-voxels=N`: BraTS-style models (regions TC and ET): when the predicted enhancing tumour has fewer than N
  voxels on the grid the prediction is written on, it is relabelled as the tumour core's other label (NCR/NET in
  BraTS), as nnU-Net's BraTS entry does; a case without enhancing tumour scores ET Dice 1 instead of 0.
- `et-min-mm3=V`: the same rule with the threshold as a volume in cubic millimetres, turned into voxels per case
  with the voxel spacing of the grid the prediction is written on (800 mm3: 800 voxels at 1 mm, 100 at 2 mm). A
  voxel count chosen at one spacing means 8x the volume at twice the spacing; a volume means the same everywhere.
They run in that order on the label map, after thresholding / argmax; probabilities are never changed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from ..data.specs import DatasetSpec

SPELLINGS = "none, largest, fill-holes, et-min-voxels=N, et-min-mm3=V, or several joined by commas (largest,fill-holes)"


@dataclass(frozen=True)
class PostProcess:
    """largest: keep the largest foreground component. fill_holes: fill the foreground's holes (binary models).
    et_min_voxels: relabel an enhancing tumour of fewer voxels than this as NCR/NET (0: off). et_min_mm3: the same
    threshold as a volume in mm3, converted with each output grid's spacing (0: off); at most one of the two."""

    largest: bool = False
    fill_holes: bool = False
    et_min_voxels: int = 0
    et_min_mm3: float = 0.0

    def __post_init__(self) -> None:
        voxels = self.et_min_voxels
        if isinstance(voxels, bool) or not isinstance(voxels, int) or voxels < 0:
            raise ValueError(
                f"PostProcess et_min_voxels={voxels!r} must be a whole number of voxels >= 0, e.g. et_min_voxels=100 "
                "(et_min_mm3=V gives the threshold as a volume)"
            )
        mm3 = self.et_min_mm3
        if isinstance(mm3, bool) or not isinstance(mm3, (int, float)) or not math.isfinite(mm3) or mm3 < 0:
            raise ValueError(
                f"PostProcess et_min_mm3={mm3!r} is not a volume; give cubic millimetres >= 0, e.g. et_min_mm3=800 "
                "(100 voxels of 2 mm, 800 of 1 mm)"
            )
        if self.et_min_voxels and mm3:
            raise ValueError(
                f"--postprocess et-min-voxels={self.et_min_voxels} and et-min-mm3={mm3:g} set the same threshold "
                "twice; give one (et-min-mm3 means the same volume at any voxel spacing)"
            )

    @classmethod
    def parse(cls, text: str | None) -> PostProcess:
        """'largest,fill-holes', 'et-min-voxels=100', 'et-min-mm3=800', 'none' or '' (nothing) -> the config;
        option names in any case. ValueError naming --postprocess, as the user wrote it, and the accepted spellings
        otherwise."""
        options: dict[str, bool | int | float] = {}
        for part in (p.strip() for p in (text or "").split(",")):
            if part.lower() in ("", "none"):
                continue
            name, _, value = part.partition("=")
            name = name.lower()
            if name in ("largest", "fill-holes") and not value:
                options[name.replace("-", "_")] = True
            elif name == "et-min-voxels":
                options["et_min_voxels"] = _voxels(value, text)
            elif name == "et-min-mm3":
                options["et_min_mm3"] = _volume(value, text)
            else:
                raise ValueError(f"--postprocess {text!r}: {part!r} is not an option; give {SPELLINGS}")
        return cls(**options)  # type: ignore[arg-type]

    @property
    def active(self) -> bool:
        return self.largest or self.fill_holes or self.small_et is not None

    @property
    def small_et(self) -> str | None:
        """The option that sets the small-ET rule ('et-min-voxels' or 'et-min-mm3'), None when it is off."""
        if self.et_min_voxels:
            return "et-min-voxels"
        return "et-min-mm3" if self.et_min_mm3 else None

    def spelling(self) -> str:
        """The --postprocess text for this config ('none' when it does nothing)."""
        parts = ["largest"] * self.largest + ["fill-holes"] * self.fill_holes
        parts += [f"et-min-voxels={self.et_min_voxels}"] if self.et_min_voxels else []
        parts += [f"et-min-mm3={self.et_min_mm3:.12g}"] if self.et_min_mm3 else []
        return ",".join(parts) or "none"


def _voxels(value: str, text: str) -> int:
    """et-min-voxels' value: a whole number >= 0 (100), or the one-line error naming --postprocess."""
    digits = value.strip()
    if not (digits.isascii() and digits.isdigit()):  # ASCII: str.isdigit also takes digits int() refuses ('²')
        raise ValueError(
            f"--postprocess {text!r}: et-min-voxels={digits} must be a whole number of voxels >= 0, e.g. "
            "et-min-voxels=100 (et-min-mm3=V gives the threshold as a volume)"
        )
    return int(digits)


def _volume(value: str, text: str) -> float:
    """et-min-mm3's value: a finite number >= 0 (800, 62.5, 1e3), or the one-line error naming --postprocess."""
    try:
        volume = float(value)
    except ValueError:
        volume = math.nan
    if not math.isfinite(volume) or volume < 0:
        raise ValueError(
            f"--postprocess {text!r}: et-min-mm3={value.strip()} is not a volume; give cubic millimetres >= 0, "
            "e.g. et-min-mm3=800 (100 voxels of 2 mm, 800 of 1 mm)"
        )
    return volume


def et_min_voxels_at(config: PostProcess, spacing: Sequence[float] | None) -> float:
    """The small-ET rule's threshold in voxels of a grid of this spacing (mm per axis, any order): et-min-voxels
    as it is, et-min-mm3 divided by the voxel's volume (a fraction where the volume is not a whole number of
    voxels: an ET of n voxels is relabelled when n * voxel volume < V); 0 when the rule is off."""
    if config.et_min_voxels:
        return config.et_min_voxels
    if not config.et_min_mm3:
        return 0
    sizes = [float(s) for s in spacing or ()]
    if len(sizes) != 3 or not all(math.isfinite(s) and s > 0 for s in sizes):
        raise ValueError(
            f"et-min-mm3 needs the voxel spacing (3 positive values in mm) of the grid it counts on, got {spacing}"
        )
    return config.et_min_mm3 / math.prod(sizes)


NO_POSTPROCESS = PostProcess()


def chosen_postprocess(
    given: PostProcess | None, inference: Mapping[str, Any] | None, source: str = "the checkpoint"
) -> PostProcess:
    """What prediction applies: the given post-processing (--postprocess), else the one the checkpoint records as
    its default (`postprocess` in its sidecar's preprocessing.inference, a --postprocess spelling chosen on
    validation at release); none when neither says."""
    if given is not None:
        return given
    text = (inference or {}).get("postprocess")
    if text is None:
        return NO_POSTPROCESS
    try:
        return PostProcess.parse(str(text))
    except ValueError as err:
        raise ValueError(
            f"{source} records inference.postprocess {text!r}, which is not valid ({err}); fix its sidecar or pass "
            "--postprocess explicitly"
        ) from None


def largest_component(mask: np.ndarray) -> np.ndarray:
    """bool mask [*S] -> its largest connected component (full connectivity: 8 in 2D, 26 in 3D). Equal sizes: the
    component met first in C order is kept. An empty mask stays empty."""
    mask = np.asarray(mask, dtype=bool)
    components, count = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, dtype=bool))
    if count <= 1:
        return mask
    sizes = np.bincount(components.ravel())[1:]  # voxels per component 1..count
    return components == 1 + int(np.argmax(sizes))  # argmax: the first of equal sizes


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """bool mask [*S] with its holes filled (background not connected to the border through face neighbours)."""
    return ndimage.binary_fill_holes(np.asarray(mask, dtype=bool))


def keep_largest_foreground(labels: np.ndarray) -> np.ndarray:
    """Label map [*S] -> the same labels inside the largest component of the foreground (labels > 0), 0 elsewhere."""
    return np.where(largest_component(labels > 0), labels, 0).astype(labels.dtype)


def relabel_small_region(labels: np.ndarray, values: tuple[int, ...], to: int, min_voxels: float) -> np.ndarray:
    """Label map [*S] -> with the voxels of `values` set to `to` when there are fewer than min_voxels of them."""
    region = np.isin(labels, values)
    if 0 < region.sum() < min_voxels:
        labels = labels.copy()
        labels[region] = to
    return labels


def enhancing_and_core(spec: DatasetSpec, option: str = "et-min-voxels") -> tuple[tuple[int, ...], int]:
    """(ET label values, the label that replaces them: the tumour core's one label outside ET) of a BraTS-style
    spec; ValueError naming the option (et-min-voxels or et-min-mm3) for specs without TC and ET regions."""
    regions = dict(spec.regions)
    if "ET" not in regions or "TC" not in regions:
        raise ValueError(
            f"--postprocess {option} needs a model whose dataset has TC and ET regions (BraTS); this one "
            f"({spec.name}) has regions {list(regions) or 'none'}: drop {option}"
        )
    core = sorted(set(regions["TC"]) - set(regions["ET"]))
    if len(core) != 1:
        raise ValueError(
            f"--postprocess {option}: the TC region {regions['TC']} of {spec.name} must hold exactly one "
            f"label beside ET {regions['ET']} to relabel small ET as; drop {option}"
        )
    return tuple(regions["ET"]), core[0]


def check_postprocess(config: PostProcess, foreground_labels: int, spec: DatasetSpec | None = None) -> None:
    """ValueError, before anything is predicted, when an option does not fit the model: fill-holes needs one
    foreground label, et-min-voxels / et-min-mm3 a BraTS-style spec (spec: the 3D model's dataset, None for 2D
    models)."""
    if config.fill_holes and foreground_labels > 1:
        raise ValueError(
            f"--postprocess fill-holes fills binary masks, and this model predicts {foreground_labels} foreground "
            "labels (a filled hole would need a label); use largest, or no post-processing"
        )
    option = config.small_et
    if option:
        if spec is None:
            raise ValueError(
                f"--postprocess {option} applies to 3D BraTS-style models (TC and ET regions), not to 2D masks; "
                "use largest or fill-holes"
            )
        enhancing_and_core(spec, option)


def postprocess(
    labels: np.ndarray,
    config: PostProcess,
    spec: DatasetSpec | None = None,
    spacing: Sequence[float] | None = None,
) -> np.ndarray:
    """Label map [*S] (label values as written: 0/1 binary, class indices, or BraTS 0/1/2/4) -> post-processed, the
    same shape and dtype: largest, then fill-holes (foreground value: the mask's one nonzero label, 1 when
    empty), then et-min-voxels / et-min-mm3 (spec: the dataset whose TC / ET regions name the labels; spacing:
    the label map's voxel spacing in mm, which et-min-mm3 needs)."""
    if config.largest:
        labels = keep_largest_foreground(labels)
    if config.fill_holes:
        present = np.unique(labels[labels > 0])
        if len(present) > 1:
            raise ValueError(f"fill-holes fills binary masks; this one holds labels {present.tolist()}")
        value = present[0] if len(present) else 1
        labels = np.where(fill_holes(labels > 0), value, 0).astype(labels.dtype)
    option = config.small_et
    if option:
        if spec is None:
            raise ValueError(f"{option} needs the dataset spec that names the ET and TC labels")
        enhancing, core = enhancing_and_core(spec, option)
        labels = relabel_small_region(labels, enhancing, core, et_min_voxels_at(config, spacing))
    return labels
