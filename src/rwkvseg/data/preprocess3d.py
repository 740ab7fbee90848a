"""nnU-Net-style 3D preprocessing into a compact on-disk cache, and the same steps for a single case at predict time.

Per case: bring a positive constant background (an offset) to 0, crop to the nonzero region of all modalities,
z-score statistics per modality inside that mask, resample to the target spacing (images linear, labels through a
linearly resampled one-hot), foreground voxel locations per class for oversampling, and the properties that map a
prediction back to the original grid.

The cache stores intensities in the source's dtype (uint8 BraTS-compact stays uint8, int16 originals stay int16,
float sources become float16) and applies the z-score when a case is loaded: z-scoring is an affine map, so this
is the same as storing normalised floats at a fraction of the bytes. Layout of a cache folder:

    plans.json          dataset spec, target spacing, normalisation, per-case properties
    <case>.npz          image [M, K, J, I], label [K, J, I] (class indices, uint8), fg_<class> [n, 3] int16
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..files import atomic_write, write_json
from .volumes import CaseVolumes, DatasetSpec, discover_cases, load_case, read_spacing

log = logging.getLogger(__name__)

CACHE_VERSION = 1
PLANS_FILE = "plans.json"


@dataclass(frozen=True)
class PreprocessConfig:
    """target_spacing in (k, j, i) order, mm; None takes the median spacing of the dataset (nnU-Net's default)."""

    target_spacing: tuple[float, float, float] | None = None
    crop_nonzero: bool = True
    fg_samples_per_class: int = 10000
    seed: int = 0


BACKGROUND_FRACTION = 0.1  # a positive minimum held by this share of a modality's voxels is its background


def subtract_background(image: np.ndarray, case_id: str = "") -> np.ndarray:
    """image [M, K, J, I] with each modality's background brought to 0, as the nonzero-mask crop and z-score
    expect: a modality whose minimum is positive and held by at least BACKGROUND_FRACTION of its voxels (a scanner
    or export offset, e.g. +100 everywhere) has that minimum subtracted, so it is cropped and normalised as the
    same scan with a zero background. Zero-background scans (and negative floors such as CT air) are returned
    unchanged, the same object: their preprocessing is bit-identical to rwkvseg's before this rule."""
    shifted = None
    for m, channel in enumerate(image):
        floor = channel.min()
        if floor <= 0 or np.count_nonzero(channel == floor) < BACKGROUND_FRACTION * channel.size:
            continue
        if shifted is None:
            shifted = image.copy()
        shifted[m] -= floor
        log.info("case %s: modality %d has a background of %g (its minimum); treated as 0", case_id, m, floor)
    return image if shifted is None else shifted


def nonzero_box(image: np.ndarray) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Bounding box (lo inclusive, hi exclusive) of voxels nonzero in any modality of image [M, K, J, I]."""
    mask = np.any(image != 0, axis=0)
    if not mask.any():
        return (0, 0, 0), tuple(mask.shape)
    lo, hi = [], []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        lo.append(int(hits[0]))
        hi.append(int(hits[-1]) + 1)
    return tuple(lo), tuple(hi)


def zscore_stats(image: np.ndarray) -> tuple[list[float], list[float]]:
    """Mean and std per modality of image [M, K, J, I] inside the nonzero mask of all modalities."""
    mask = np.any(image != 0, axis=0)
    if not mask.any():
        mask = np.ones_like(mask)
    means, stds = [], []
    for channel in image:
        values = channel[mask].astype(np.float64)
        means.append(float(values.mean()))
        stds.append(float(max(values.std(), 1e-8)))
    return means, stds


def normalise(raw: np.ndarray, means: Sequence[float], stds: Sequence[float]) -> np.ndarray:
    """z-score raw [M, K, J, I] with stored statistics; voxels outside the nonzero mask stay 0 (nnU-Net)."""
    raw = raw.astype(np.float32, copy=False)
    mask = np.any(raw != 0, axis=0)
    mean = np.asarray(means, dtype=np.float32)[:, None, None, None]
    std = np.asarray(stds, dtype=np.float32)[:, None, None, None]
    return np.where(mask, (raw - mean) / std, np.float32(0)).astype(np.float32)


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], target_spacing: Sequence[float]) -> tuple[int, ...]:
    return tuple(max(1, round(n * s / t)) for n, s, t in zip(shape, spacing, target_spacing, strict=True))


def resample(array: np.ndarray | torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Linear resampling of [C, K, J, I] channels onto `shape` (voxel centres aligned, as nnU-Net's grids)."""
    tensor = torch.as_tensor(array, dtype=torch.float32)
    if tuple(tensor.shape[1:]) == tuple(shape):
        return tensor
    return F.interpolate(tensor[None], size=tuple(shape), mode="trilinear", align_corners=False)[0]


def resample_labels(classes: np.ndarray, shape: Sequence[int], num_classes: int) -> np.ndarray:
    """Class indices [K, J, I] onto `shape`: one-hot resampled linearly then argmax (smoother than nearest)."""
    if tuple(classes.shape) == tuple(shape):
        return classes
    onehot = F.one_hot(torch.as_tensor(classes, dtype=torch.long), num_classes)  # [K, J, I, C]
    onehot = onehot.permute(3, 0, 1, 2).float()  # [K, J, I, C] -> [C, K, J, I]
    return resample(onehot, shape).argmax(0).numpy().astype(np.uint8)


def storage_dtype(source: np.dtype, array: np.ndarray) -> np.dtype:
    """Integer sources keep their dtype; float sources go to float16 unless their range overflows it."""
    if np.issubdtype(source, np.integer):
        return np.dtype(source)
    return np.dtype(np.float16 if np.abs(array).max(initial=0) < 6e4 else np.float32)


def preprocess_case(
    case: CaseVolumes, target_spacing: Sequence[float], config: PreprocessConfig
) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """One loaded case -> (raw image at target spacing in its storage dtype, class labels or None, properties)."""
    image = subtract_background(case.image, case.case_id)  # [M, K, J, I] float32
    shape = tuple(int(n) for n in image.shape[1:])
    lo, hi = nonzero_box(image) if config.crop_nonzero else ((0, 0, 0), shape)
    if any(h <= l for l, h in zip(lo, hi, strict=True)):
        raise ValueError(f"case {case.case_id} ({case.reference.path}) is empty: every voxel of every modality is 0")
    box = tuple(slice(l, h) for l, h in zip(lo, hi, strict=True))
    image = image[(slice(None), *box)]
    label = None if case.label is None else case.label[box]
    means, stds = zscore_stats(image)
    new_shape = resampled_shape(image.shape[1:], case.spacing, target_spacing)
    image = resample(image, new_shape).numpy()
    dtype = storage_dtype(case.source_dtype, image)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        image = np.clip(np.rint(image), info.min, info.max)
    image = image.astype(dtype)
    if label is not None:
        label = resample_labels(label, new_shape, int(label.max(initial=0)) + 1)
    properties = {
        "case_id": case.case_id,
        "source": str(case.reference.path),
        "original_shape": list(shape),
        "original_spacing": list(case.spacing),
        "original_affine": np.asarray(case.affine).tolist(),
        "crop_lo": list(lo),
        "crop_hi": list(hi),
        "resampled_shape": list(new_shape),
        "zscore_mean": means,
        "zscore_std": stds,
        "storage_dtype": dtype.name,
    }
    return image, label, properties


def foreground_locations(label: np.ndarray, num_classes: int, samples: int, seed: int) -> dict[str, np.ndarray]:
    """Up to `samples` random voxel coordinates [n, 3] (int16) per foreground class, for oversampling."""
    rng = np.random.default_rng(seed)
    locations = {}
    for cls in range(1, num_classes):
        coords = np.argwhere(label == cls)
        if len(coords) > samples:
            coords = coords[rng.choice(len(coords), samples, replace=False)]
        locations[f"fg_{cls}"] = coords.astype(np.int16)
    return locations


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, **arrays)

    atomic_write(path, write)


def preprocess_dataset(
    root: Path | str, spec: DatasetSpec, out_dir: Path | str, config: PreprocessConfig = PreprocessConfig()
) -> dict[str, Any]:
    """Preprocess every case under root into out_dir; returns the plans written to out_dir/plans.json.

    Each case file is written atomically and plans.json only after all cases succeeded, so a failure on a bad
    case (named in the error) leaves earlier cache contents readable and nothing half-written.
    """
    out_dir = Path(out_dir)
    cases = discover_cases(root, spec, require_label=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = config.target_spacing
    if target is None:
        spacings = [read_spacing(c.images[0].path) for c in cases] if len(cases) > 1 else None
        target = tuple(float(s) for s in np.median(spacings, axis=0)) if spacings else None
    properties: dict[str, dict[str, Any]] = {}
    for index, files in enumerate(cases):
        case = load_case(files, spec)
        spacing = target if target is not None else case.spacing
        image, label, props = preprocess_case(case, spacing, config)
        arrays = {"image": image, "label": label}
        arrays.update(foreground_locations(label, spec.num_classes, config.fg_samples_per_class, config.seed + index))
        _save_npz(out_dir / f"{files.case_id}.npz", arrays)
        props["class_voxels"] = np.bincount(label.ravel(), minlength=spec.num_classes).tolist()
        props["cache_bytes"] = (out_dir / f"{files.case_id}.npz").stat().st_size
        properties[files.case_id] = props
        log.info(
            "%s: %s -> %s, %.2f MiB",
            files.case_id,
            props["original_shape"],
            props["resampled_shape"],
            props["cache_bytes"] / 2**20,
        )
        target = spacing
    plans = {
        "version": CACHE_VERSION,
        "dataset": spec.to_dict(),
        "target_spacing": list(target),
        "preprocess": {**asdict(config), "target_spacing": list(target)},
        "normalisation": "zscore per modality inside the nonzero mask of all modalities, applied on load",
        "axis_order": "k, j, i (arrays and spacings; affines map voxel i, j, k to world RAS mm)",
        "cases": properties,
        "cache_bytes": sum(p["cache_bytes"] for p in properties.values()),
    }
    write_json(out_dir / PLANS_FILE, plans, indent=1)
    return plans


def load_plans(cache_dir: Path | str) -> dict[str, Any]:
    path = Path(cache_dir) / PLANS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run `rwkvseg preprocess` to build the cache first")
    plans = json.loads(path.read_text())
    if plans.get("version") != CACHE_VERSION:
        raise ValueError(
            f"{path} is cache version {plans.get('version')}, this code reads {CACHE_VERSION}; preprocess again"
        )
    return plans


@dataclass
class CachedCase:
    """A preprocessed case: image [M, K, J, I] z-scored float32, label [K, J, I] uint8, fg coords per class."""

    case_id: str
    image: np.ndarray
    label: np.ndarray
    foreground: dict[int, np.ndarray]
    properties: dict[str, Any]
    path: Path


def load_cached_case(cache_dir: Path | str, case_id: str, plans: dict[str, Any] | None = None) -> CachedCase:
    plans = plans if plans is not None else load_plans(cache_dir)
    if case_id not in plans["cases"]:
        raise ValueError(f"case {case_id!r} is not in the cache {cache_dir}; cached: {', '.join(plans['cases'])}")
    props = plans["cases"][case_id]
    path = Path(cache_dir) / f"{case_id}.npz"
    try:
        with np.load(path, allow_pickle=False) as data:  # never unpickle: a cache file is data, not code
            image = normalise(data["image"], props["zscore_mean"], props["zscore_std"])
            label = data["label"]
            fg = {int(k[3:]): data[k] for k in data.files if k.startswith("fg_")}
    except (OSError, ValueError, KeyError, EOFError) as err:
        raise ValueError(
            f"cache file {path} is damaged or not written by `rwkvseg preprocess` ({err}); "
            "run `rwkvseg preprocess` again into a new cache folder"
        ) from None
    return CachedCase(case_id, image, label, fg, props, path)


def prepare_for_model(case: CaseVolumes, plans: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
    """Predict-time preprocessing with the training plans: image [M, K, J, I] z-scored at the training spacing."""
    config = PreprocessConfig(**{**plans["preprocess"], "target_spacing": tuple(plans["target_spacing"])})
    raw, _, props = preprocess_case(case, config.target_spacing, config)
    return normalise(raw, props["zscore_mean"], props["zscore_std"]), props
