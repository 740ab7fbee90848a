"""Random 3D training patches from the preprocessed cache, with foreground oversampling and nnU-Net-like
augmentation built from MONAI transforms.

Each item is drawn from its own generator seeded by (seed, epoch, index), so a run with the same seed sees the
same patches in any number of workers and a resumed run continues the sequence (call `set_epoch`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..records import TARGETS
from .preprocess3d import CachedCase, load_cached_case, load_plans
from .regions import classes_to_regions
from .specs import DatasetSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AugmentPreset:
    """Probabilities of the 3D training augmentation (each transform fires on its own draw).

    affine: rotation +-30 deg on every axis and scaling 0.7-1.4 together; noise: Gaussian (std 0.1); blur: Gaussian
    smoothing (sigma 0.5-1 voxel); brightness: multiply by 0.75-1.25; contrast: scale about the mean, range kept;
    low_resolution: down- and up-sample by 0.5-1; gamma: 0.7-1.5 with the mean and std kept; inverted_gamma: the same
    on the inverted image; bias_field: a smooth multiplicative MRI bias field (degree 3); shift: add +-0.1 (the
    z-scored intensities' std is 1). channel_wise draws brightness and shift for each modality on its own.
    """

    affine: float
    noise: float
    blur: float
    brightness: float
    contrast: float
    low_resolution: float
    gamma: float
    inverted_gamma: float = 0.0
    bias_field: float = 0.0
    shift: float = 0.0
    channel_wise: bool = False


AUGMENT_PRESETS: dict[str, AugmentPreset] = {
    # nnU-Net v2's default training augmentation, its probabilities, less its gamma on the inverted image (p 0.1:
    # left out so that runs train as every earlier one did); mirroring on every axis in both presets
    "nnunet": AugmentPreset(
        affine=0.2, noise=0.1, blur=0.2, brightness=0.15, contrast=0.15, low_resolution=0.25, gamma=0.3
    ),
    # more of it for a few training cases: spatial and intensity transforms fire about twice as often, gamma also
    # on the inverted image (as nnU-Net v2's default), MRI-specific bias fields and per-modality intensity changes
    "strong": AugmentPreset(
        affine=0.4,
        noise=0.15,
        blur=0.2,
        brightness=0.3,
        contrast=0.3,
        low_resolution=0.25,
        gamma=0.3,
        inverted_gamma=0.1,
        bias_field=0.3,
        shift=0.3,
        channel_wise=True,
    ),
}


@dataclass(frozen=True)
class PatchConfig:
    """patch_size in (k, j, i) voxels at the cache's spacing; samples_per_epoch patches make an epoch;
    fg_fraction: share of patches centred on a voxel of a random foreground class (nnU-Net: 1/3).
    augment turns the training augmentation on; augment_preset names its probabilities (AUGMENT_PRESETS: "nnunet",
    nnU-Net's default, or "strong"). allow_padding zero-pads cases smaller than the patch (nnU-Net does); off, such
    a case is an error that names it. The `[data.patches]` table of a 3D run config."""

    patch_size: tuple[int, int, int] = (64, 64, 64)
    samples_per_epoch: int = 250
    fg_fraction: float = 0.33
    augment: bool = True
    augment_preset: str = "nnunet"
    allow_padding: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.fg_fraction <= 1:
            raise ValueError(f"fg_fraction {self.fg_fraction} must lie in [0, 1]")
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size {self.patch_size} must be three positive sizes")
        if self.augment_preset not in AUGMENT_PRESETS:
            raise ValueError(
                f"data.patches.augment_preset = {self.augment_preset!r} is unknown; choose one of "
                f"{', '.join(AUGMENT_PRESETS)}"
            )


def patch_augmentation(patch_size: Sequence[int], preset: str = "nnunet", seed: int = 0):
    """The 3D training augmentation as MONAI dictionary transforms on keys image / mask, with the probabilities of
    AUGMENT_PRESETS[preset] ("nnunet": nnU-Net v2's default) and mirroring on every axis."""
    from monai import transforms as mt

    p = AUGMENT_PRESETS[preset]
    angle = math.radians(30)
    spatial = mt.RandAffined(
        keys=("image", "mask"),
        prob=p.affine,
        rotate_range=(angle, angle, angle),
        scale_range=(0.3, 0.3, 0.3),
        mode=("bilinear", "nearest"),
        padding_mode="zeros",
        spatial_size=tuple(patch_size),
    )
    intensity = [
        mt.RandGaussianNoised(keys="image", prob=p.noise, std=0.1),
        mt.RandGaussianSmoothd(keys="image", prob=p.blur, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0)),
    ]
    if p.bias_field:
        intensity.append(mt.RandBiasFieldd(keys="image", prob=p.bias_field, degree=3, coeff_range=(0.0, 0.1)))
    intensity += [
        mt.RandScaleIntensityd(keys="image", prob=p.brightness, factors=0.25, channel_wise=p.channel_wise),
        mt.RandScaleIntensityFixedMeand(keys="image", prob=p.contrast, factors=0.25, preserve_range=True),
    ]
    if p.shift:
        intensity.append(mt.RandShiftIntensityd(keys="image", prob=p.shift, offsets=0.1, channel_wise=p.channel_wise))
    intensity += [
        mt.RandSimulateLowResolutiond(keys="image", prob=p.low_resolution, zoom_range=(0.5, 1.0)),
        mt.RandAdjustContrastd(keys="image", prob=p.gamma, gamma=(0.7, 1.5), retain_stats=True),
    ]
    if p.inverted_gamma:
        intensity.append(
            mt.RandAdjustContrastd(
                keys="image", prob=p.inverted_gamma, gamma=(0.7, 1.5), invert_image=True, retain_stats=True
            )
        )
    flips = [mt.RandFlipd(keys=("image", "mask"), prob=0.5, spatial_axis=axis) for axis in range(3)]
    transforms = mt.Compose(
        [
            spatial,
            *intensity,
            *flips,
            # plain tensors out: a MetaTensor runs every op of the training step through MONAI's
            # __torch_function__ (on an H200 the step took 160 ms, the model's own 66 ms) and breaks torch.compile
            mt.EnsureTyped(keys=("image", "mask"), track_meta=False),
        ]
    )
    transforms.set_random_state(seed=seed)
    return transforms


def pad_to(array: np.ndarray, size: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Zero-pad the last three axes up to size (split evenly); returns the array and the offset added."""
    short = np.maximum(np.asarray(size) - np.asarray(array.shape[-3:]), 0)
    before = short // 2
    if not short.any():
        return array, before
    pad = [(0, 0)] * (array.ndim - 3) + [(int(b), int(s - b)) for b, s in zip(before, short, strict=True)]
    return np.pad(array, pad), before


def patch_origin(
    shape: Sequence[int], patch: Sequence[int], rng: np.random.Generator, centre: np.ndarray | None
) -> np.ndarray:
    """Lower corner of a patch inside shape: random, or around `centre` (clipped to stay inside)."""
    shape, patch = np.asarray(shape), np.asarray(patch)
    high = shape - patch
    if centre is None:
        return np.array([rng.integers(0, h + 1) for h in high])
    return np.clip(np.asarray(centre) - patch // 2, 0, high)


class PatchDataset(Dataset):
    """Random patches of cached cases: {"image": [M, *P] float32, "mask": [1, *P] long or [R, *P] float,
    "case": case id}. Length = samples_per_epoch; every case is held in memory (the cache is small).

    target "labels" gives class indices [1, *P] for CE+Dice, "regions" float masks [R, *P] for sigmoid losses;
    patch i of epoch e is drawn from seed (seed, e, i), whatever the worker or order.
    """

    def __init__(
        self,
        cache_dir: Path | str,
        case_ids: Sequence[str] | None,
        config: PatchConfig,
        target: str = "labels",
        seed: int = 0,
    ) -> None:
        if target not in TARGETS:
            raise ValueError(f"patch target {target!r} unknown; choose labels or regions")
        self.config, self.target, self.seed = config, target, seed
        self.plans = load_plans(cache_dir)
        self.spec = DatasetSpec.from_dict(self.plans["dataset"])
        ids = list(case_ids) if case_ids is not None else list(self.plans["cases"])
        self.cases: list[CachedCase] = [load_cached_case(cache_dir, cid, self.plans) for cid in ids]
        if not self.cases:
            raise ValueError(f"no cases selected from the cache {cache_dir}")
        small = [c for c in self.cases if any(s < p for s, p in zip(c.image.shape[1:], config.patch_size, strict=True))]
        if small and not config.allow_padding:
            listing = "; ".join(f"{c.path} {tuple(c.image.shape[1:])}" for c in small[:5])
            smallest = tuple(int(v) for v in np.min([c.image.shape[1:] for c in self.cases], axis=0))
            raise ValueError(
                f"{len(small)} case(s) are smaller than the patch {config.patch_size}: {listing}; choose a "
                f"patch_size of at most {smallest}, or set allow_padding to zero-pad them"
            )
        for case in small:
            case.image, offset = pad_to(case.image, config.patch_size)
            case.label, _ = pad_to(case.label, config.patch_size)
            case.foreground = {k: v + offset.astype(v.dtype) for k, v in case.foreground.items()}
        self.epoch = 0
        self.transform = patch_augmentation(config.patch_size, config.augment_preset, seed) if config.augment else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.config.samples_per_epoch

    def sample(self, rng: np.random.Generator) -> tuple[CachedCase, np.ndarray]:
        """A case and the lower corner of a patch in it (foreground-centred with probability fg_fraction)."""
        case = self.cases[rng.integers(len(self.cases))]
        centre = None
        if rng.random() < self.config.fg_fraction:
            present = [k for k, coords in case.foreground.items() if len(coords)]
            if present:
                coords = case.foreground[present[rng.integers(len(present))]]
                centre = coords[rng.integers(len(coords))].astype(np.int64)
        return case, patch_origin(case.image.shape[1:], self.config.patch_size, rng, centre)

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = np.random.default_rng((self.seed, self.epoch, index))
        case, lo = self.sample(rng)
        box = tuple(slice(int(l), int(l) + p) for l, p in zip(lo, self.config.patch_size, strict=True))
        item: dict[str, Any] = {
            "image": torch.from_numpy(np.ascontiguousarray(case.image[(slice(None), *box)])),  # [M, *P]
            "mask": torch.from_numpy(case.label[box].astype(np.float32))[None],  # [1, *P]
        }
        if self.transform is not None:
            self.transform.set_random_state(seed=int(rng.integers(2**31)))
            item = self.transform(item)
        image = torch.as_tensor(item["image"]).float().contiguous()
        label = torch.as_tensor(item["mask"]).round().long()
        if self.target == "regions":
            label = classes_to_regions(label[0], self.spec).float()  # [1, *P] -> [R, *P]
        return {"image": image, "mask": label.contiguous(), "case": case.case_id}
