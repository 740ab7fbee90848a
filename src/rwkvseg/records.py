"""What a checkpoint records about preprocessing: the contract between training (writes it into the sidecar's
`preprocessing`) and inference (reads it back). A leaf: imports nothing of rwkvseg, so neither side owns it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

RESIZE_MODES = ("resize", "crop")  # 2D network input: the whole image resized, or crops of it
MAX_SIDE = 8192  # largest network input side a sidecar may claim (larger: a damaged or hostile file)
TARGETS = ("labels", "regions")  # 3D: softmax over label classes, or sigmoid per (overlapping) region
# The orientation assumed for 3D checkpoints that do not record one (the released BraTS model among them): BraTS
# 2017-2021 files have the affine diag(-1, -1, 1), nibabel axis codes LPS (i -> left, j -> posterior, k -> superior).
DEFAULT_ORIENTATION = "LPS"


@dataclass(frozen=True)
class Preprocessing2D:
    """What turns an image file into a network input; stored in the checkpoint sidecar."""

    channels: int
    size: tuple[int, int] = (256, 256)
    resize: str = "resize"
    normalization: str = "auto"

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"preprocessing resize {self.resize!r} is not one of {', '.join(RESIZE_MODES)}")
        if self.channels < 1 or len(self.size) != 2 or not all(8 <= s <= MAX_SIDE for s in self.size):
            raise ValueError(
                f"preprocessing channels {self.channels} / size {list(self.size)} out of range "
                f"(channels >= 1, [height, width] each in [8, {MAX_SIDE}])"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "channels": self.channels,
            "size": list(self.size),
            "resize": self.resize,
            "normalization": self.normalization,
        }

    @classmethod
    def from_meta(cls, meta: Any) -> Preprocessing2D:
        """From a checkpoint.CheckpointMeta (its preprocessing, in_channels and model name)."""
        p = meta.preprocessing
        if "size" not in p:
            raise ValueError(f"checkpoint of model {meta.model!r} has no 2D preprocessing (size) in its sidecar")
        try:
            return cls(
                int(p.get("channels", meta.in_channels)),
                tuple(int(s) for s in p["size"]),
                p.get("resize", "resize"),
                p.get("normalization", "auto"),
            )
        except (TypeError, ValueError) as err:
            raise ValueError(f"checkpoint sidecar of model {meta.model!r}: {err}; restore the sidecar") from None


def inference_metadata(plans: dict[str, Any], patch_size: Sequence[int], target: str = "labels") -> dict[str, Any]:
    """What a 3D checkpoint's sidecar keeps under `preprocessing` so prediction needs nothing else.

    plans: the cache's plans.json (per-case entries are dropped); target: "labels" (softmax over label classes)
    or "regions" (sigmoid per region). `orientation` is the training images' orientation (`training_orientation`):
    prediction turns inputs to it and back.
    """
    if target not in TARGETS:
        raise ValueError(f"target {target!r} unknown; choose one of {TARGETS}")
    return {
        "orientation": training_orientation(plans),
        "dims": 3,
        "dataset": plans["dataset"],
        "target_spacing": list(plans["target_spacing"]),
        "preprocess": plans["preprocess"],
        "normalisation": plans["normalisation"],
        "patch_size": [int(p) for p in patch_size],
        "target": target,
    }


def training_orientation(plans: dict[str, Any]) -> str:
    """The orientation the cases of a cache were in, as nibabel axis codes of voxel axes (i, j, k), e.g. 'LPS'.

    Read from each case's original affine in plans.json; where cases differ, the most common one (the model saw
    mostly that). Plans without per-case affines give DEFAULT_ORIENTATION.
    """
    import nibabel as nib
    import numpy as np

    counts: dict[str, int] = {}
    for props in plans.get("cases", {}).values():
        if "original_affine" in props:
            codes = "".join(nib.aff2axcodes(np.asarray(props["original_affine"], dtype=np.float64)))
            counts[codes] = counts.get(codes, 0) + 1
    if not counts:
        return DEFAULT_ORIENTATION
    return max(sorted(counts), key=counts.__getitem__)


def recorded_threshold(value: Any, where: str, fix: str = "pass --threshold") -> float:
    """A binary mask's cut as a checkpoint (sidecar training.threshold) or an export records it: 0.5 where none is
    recorded; ValueError naming where and the fix for anything but a number in [0, 1]."""
    if value is None:
        return 0.5
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"{where} holds threshold {value!r}, not a number in [0, 1]; {fix}")
    return float(value)


def regions_in_channel_order(preprocessing: dict[str, Any], class_names: Sequence[str]) -> dict[str, Any]:
    """preprocessing (a 3D record's) with its dataset spec's regions in the order of class_names (the output
    channels) where the two name the same regions in another order: ONNX files exported before 2026-12-05 (session
    26) wrote their record with sorted keys, which put BraTS's WT, TC, ET as ET, TC, WT, so that each channel was read
    as another region (and painting failed). Anything else is returned as it is."""
    regions = preprocessing.get("dataset", {}).get("regions")
    if preprocessing.get("target") != "regions" or not regions or list(regions) == list(class_names):
        return preprocessing
    if set(regions) != set(class_names):
        return preprocessing
    dataset = {**preprocessing["dataset"], "regions": {name: regions[name] for name in class_names}}
    return {**preprocessing, "dataset": dataset}
