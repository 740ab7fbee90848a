"""2D training and evaluation transforms, built from MONAI dictionary transforms.

Samples are dicts {"image": [C, H, W] float32, "mask": [1, H, W] float32 labels}. Random transforms are reseeded
per sample from (seed, epoch, index) by the dataset, so augmentation does not depend on worker count and an
interrupted run resumes with exactly the same augmented images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from monai import transforms as mt

RESIZE_MODES = ("resize", "crop")
KEYS = ("image", "mask")


@dataclass(frozen=True)
class AugmentConfig:
    """rot90 + flips are the paper's; affine and intensity are optional extras (MONAI's random transforms)."""

    rot90: bool = True
    flip: bool = True
    affine: bool = False
    intensity: bool = False
    prob: float = 0.5


def _geometry(size: Sequence[int], resize: str, train: bool) -> list[mt.Transform]:
    if resize not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {resize!r}; choose one of {', '.join(RESIZE_MODES)}")
    if resize == "resize":
        return [mt.Resized(KEYS, spatial_size=tuple(size), mode=("bilinear", "nearest"), anti_aliasing=False)]
    if train:
        # Small images are padded up to the crop so every crop has the configured size.
        return [
            mt.SpatialPadd(KEYS, spatial_size=tuple(size), mode="constant"),
            mt.RandSpatialCropd(KEYS, roi_size=tuple(size), random_size=False),
        ]
    return []  # crop-trained models validate and predict on whole images (sliding window)


def train_transform(size: Sequence[int], resize: str = "resize", augment: AugmentConfig | None = None) -> mt.Compose:
    aug = augment or AugmentConfig()
    steps = _geometry(size, resize, train=True)
    if aug.rot90:
        steps.append(mt.RandRotate90d(KEYS, prob=aug.prob, max_k=3, spatial_axes=(0, 1)))
    if aug.flip:
        steps += [mt.RandFlipd(KEYS, prob=aug.prob, spatial_axis=0), mt.RandFlipd(KEYS, prob=aug.prob, spatial_axis=1)]
    if aug.affine:
        steps.append(
            mt.RandAffined(
                KEYS,
                prob=aug.prob * 0.6,
                rotate_range=0.26,
                scale_range=0.15,
                translate_range=[0.05 * s for s in size],
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
            )
        )
    if aug.intensity:
        steps += [
            mt.RandAdjustContrastd("image", prob=aug.prob * 0.6, gamma=(0.7, 1.5)),
            mt.RandScaleIntensityd("image", factors=0.15, prob=aug.prob * 0.6),
            mt.RandGaussianNoised("image", prob=aug.prob * 0.3, std=0.03),
        ]
    steps.append(mt.EnsureTyped(KEYS, track_meta=False))
    return mt.Compose(steps)


def eval_transform(size: Sequence[int], resize: str = "resize") -> mt.Compose:
    return mt.Compose([*_geometry(size, resize, train=False), mt.EnsureTyped(KEYS, track_meta=False)])
