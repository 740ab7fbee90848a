"""3D training: a TrainConfig3D in, a run folder out, on the same loop, checkpoints and resume as 2D.

The data root is either a preprocessed cache (a folder with plans.json, from `rwkvseg preprocess`) or a raw
dataset folder (BraTS case folders, MSD, nnU-Net raw), which is preprocessed once into `<out>/cache` and reused
by later runs and resumes into the same folder. Training draws random patches with foreground oversampling and
nnU-Net augmentation (data.patches3d); validation predicts whole cached volumes with the sliding window every
`val_every` epochs and scores Dice per region (mean over regions selects the best checkpoint). The checkpoint
sidecar carries the plans (spacing, modality order, normalisation, labels and regions, patch size, activation),
so `rwkvseg predict` needs nothing else. When training ends (all epochs, or stopped early by max_minutes or a
stop callback), the best checkpoint is scored once more on the validation cases with mirror TTA
(`final_val.json`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.losses import DiceLoss
from torch import nn

from ..checkpoint import CheckpointMeta, atomic_write_text, build_model, load_checkpoint
from ..data.patches3d import PatchConfig, PatchDataset
from ..data.preprocess3d import PLANS_FILE, PreprocessConfig, load_plans, preprocess_dataset
from ..data.splits import read_split
from ..data.volumes import DatasetSpec, dataset_spec, discover_cases, spec_from_dataset_json
from ..eval.evaluate3d import SlidingWindowValidator
from ..infer.predict3d import TARGETS, inference_metadata
from .config import (
    AMP_MODES,
    LOGGERS,
    LossConfig,
    ModelConfig,
    OptimConfig,
    _check_choice,
    apply_overrides,
    from_dict,
    read_config_file,
    to_dict,
)
from .loop import Progress, fit, resolve_amp, resolve_device
from .losses import SegmentationLoss
from .run import CONFIG_FILE, log_done, open_run_dir, training_setup
from .train2d import prepare_split

log = logging.getLogger(__name__)

CACHE_DIR = "cache"
FINAL_FILE = "final_val.json"
DATASETS = ("brats", "brats2023", "msd_task01", "nnunet")
REGION_LOSSES = ("auto", "bce_dice", "bce", "dice")


@dataclass(frozen=True)
class VolumeDataConfig:
    """root: a cache folder (with plans.json) or a raw dataset folder, preprocessed into <out>/cache first.

    dataset, modalities, label_values, regions describe a raw dataset (a preset, or `nnunet` to read its
    dataset.json; regions as a table {WT = [1, 2, 4], ...}); a cache carries its own. target_spacing: (x, y, z)
    mm in file axis order like `rwkvseg preprocess --spacing`, empty for the dataset median. target: "labels"
    (softmax over label classes, CE + Dice) or "regions" (sigmoid per region, BCE + Dice). samples_per_epoch
    patches make an epoch; fg_fraction of them are centred on foreground.
    """

    root: str = ""
    dataset: str = "brats"
    modalities: tuple[str, ...] = ()
    label_values: tuple[int, ...] = ()
    regions: dict[str, Any] = field(default_factory=dict)
    target_spacing: tuple[float, ...] = ()
    crop_nonzero: bool = True
    split: str = ""
    fold: int = 0
    val_fraction: float = 0.2
    patch_size: tuple[int, int, int] = (64, 64, 64)
    samples_per_epoch: int = 250
    fg_fraction: float = 0.33
    target: str = "labels"
    augment: bool = True
    allow_padding: bool = True
    batch_size: int = 2
    num_workers: int = 2

    def __post_init__(self) -> None:
        _check_choice("data.dataset", self.dataset, DATASETS)
        _check_choice("data.target", self.target, TARGETS)
        if len(self.target_spacing) not in (0, 1, 3) or any(s <= 0 for s in self.target_spacing):
            raise ValueError(f"data.target_spacing {list(self.target_spacing)} needs one or three sizes > 0 (mm)")
        if self.batch_size < 1 or self.samples_per_epoch < self.batch_size:
            raise ValueError(
                f"data.batch_size ({self.batch_size}) must be >= 1 and at most data.samples_per_epoch "
                f"({self.samples_per_epoch})"
            )
        PatchConfig(self.patch_size, self.samples_per_epoch, self.fg_fraction, self.target)  # checks the rest


@dataclass(frozen=True)
class InferConfig:
    """Sliding window for validation (every val_every epochs) and the final TTA evaluation of the best
    checkpoint; the same overlap and mirror axes are stored as prediction defaults in the checkpoint."""

    overlap: float = 0.5
    sw_batch_size: int = 2
    val_mirror_axes: tuple[int, ...] = ()
    mirror_axes: tuple[int, ...] = (0, 1, 2)
    final_eval: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.overlap < 1:
            raise ValueError(f"infer.overlap {self.overlap} must be in [0, 1)")
        if any(a not in (0, 1, 2) for a in (*self.val_mirror_axes, *self.mirror_axes)):
            raise ValueError("infer.mirror_axes and infer.val_mirror_axes index the spatial axes 0, 1, 2")


@dataclass(frozen=True)
class TrainConfig3D:
    """A 3D run (dims = 3 tells `rwkvseg train` to come here). max_steps_per_epoch 0: whole epochs.

    max_minutes > 0: a wall-clock budget. Unlike 2D (validation every epoch), the run stops only after a validated
    epoch, the last one whose next validation would end past the budget, so it always leaves a best checkpoint.
    The LR schedule still spans `epochs`, so a stopped run has not annealed fully.
    """

    dims: int = 3
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name="mmsegrwkv"))
    data: VolumeDataConfig = field(default_factory=VolumeDataConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    epochs: int = 300
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    val_every: int = 10
    select_metric: str = "dice"
    max_steps_per_epoch: int = 0
    max_minutes: float = 0.0
    logger: str = "csv"
    out: str = "runs/run3d"

    def __post_init__(self) -> None:
        if self.dims != 3:
            raise ValueError(f"dims = {self.dims}: this is the 3D configuration; 2D configs leave dims out")
        _check_choice("amp", self.amp, AMP_MODES)
        _check_choice("logger", self.logger, LOGGERS)
        if self.epochs < 1 or self.val_every < 1:
            raise ValueError("epochs and val_every must be >= 1")
        if self.data.target == "regions" and self.loss.name not in REGION_LOSSES:
            raise ValueError(
                f"loss.name = {self.loss.name!r} does not fit data.target = regions (sigmoid per region); "
                f"choose one of {', '.join(REGION_LOSSES)}, or set data.target = labels for CE over labels"
            )


def config_dims(data: dict[str, Any]) -> int:
    """2 or 3: which pipeline a raw config dict (after --set overrides) is for."""
    dims = data.get("dims", 2)
    if dims not in (2, 3):
        raise ValueError(f"dims = {dims!r} is not valid; 3 for volumes, 2 (or leave it out) for images")
    return int(dims)


def load_config_3d(path: str | Path | None = None, overrides: tuple[str, ...] | list[str] = ()) -> TrainConfig3D:
    """TrainConfig3D from a file (or defaults) plus --set overrides."""
    data = read_config_file(path) if path else {}
    return from_dict(TrainConfig3D, apply_overrides(data, overrides))


class RegionLoss(nn.Module):
    """ce_weight * BCE + dice_weight * soft Dice on sigmoid outputs, one channel per (overlapping) region.

    MONAI's DiceCELoss applies softmax cross-entropy to any multi-channel input, which is wrong for nested
    regions, so the two terms are combined here. Targets are float masks [B, R, *P].
    """

    def __init__(self, config: LossConfig) -> None:
        super().__init__()
        name = "bce_dice" if config.name == "auto" else config.name
        self.ce_weight = config.ce_weight if name in ("bce_dice", "bce") else 0.0
        self.dice_weight = config.dice_weight if name in ("bce_dice", "dice") else 0.0
        self.bce = nn.BCEWithLogitsLoss()
        self.dice = DiceLoss(sigmoid=True)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits, target = logits.float(), target.float()  # fp32 also under autocast
        loss = logits.new_zeros(())
        if self.ce_weight:
            loss = loss + self.ce_weight * self.bce(logits, target)
        if self.dice_weight:
            loss = loss + self.dice_weight * self.dice(logits, target)
        return loss


def dataset_spec_for(data: VolumeDataConfig) -> DatasetSpec:
    """The DatasetSpec of a raw dataset folder as the config describes it."""
    overrides: dict[str, Any] = {}
    if data.modalities:
        overrides["modalities"] = tuple(data.modalities)
    if data.label_values:
        overrides["label_values"] = tuple(data.label_values)
    regions = tuple((str(name), tuple(int(v) for v in values)) for name, values in data.regions.items())
    if data.dataset == "nnunet":
        spec = spec_from_dataset_json(Path(data.root) / "dataset.json", dict(regions) or None)
        return replace(spec, **overrides)
    if regions:
        overrides["regions"] = regions
    return dataset_spec(data.dataset, **overrides)


def _spacing_kji(data: VolumeDataConfig) -> tuple[float, float, float] | None:
    if not data.target_spacing:
        return None
    xyz = data.target_spacing * 3 if len(data.target_spacing) == 1 else data.target_spacing
    return tuple(float(s) for s in xyz[::-1])  # x, y, z -> k, j, i


def prepare_cache(data: VolumeDataConfig, run_dir: Path) -> Path:
    """The cache this run reads: data.root itself when it is one, else <run_dir>/cache (made once, then reused)."""
    root = Path(data.root)
    if not root.is_dir():
        raise FileNotFoundError(f"data.root {root} is not a folder; give a dataset folder or a preprocessed cache")
    spacing = _spacing_kji(data)
    if (root / PLANS_FILE).is_file():
        plans = load_plans(root)
        if spacing is not None and not np.allclose(plans["target_spacing"], spacing):
            raise ValueError(
                f"data.target_spacing {list(data.target_spacing)} (x, y, z) differs from the cache {root} "
                f"({plans['target_spacing'][::-1]}); preprocess again with --spacing, or leave target_spacing empty"
            )
        if data.modalities or data.label_values or data.regions:
            cached, asked = plans["dataset"], dataset_spec_for(data).to_dict()
            keys = [k for k in ("modalities", "label_values", "regions") if cached[k] != asked[k]]
            if keys:
                raise ValueError(
                    f"data.{'/'.join(keys)} differ from the cache {root} ({', '.join(str(cached[k]) for k in keys)}); "
                    "a cache keeps the dataset description it was made with: leave them out or preprocess again"
                )
        return root
    spec = dataset_spec_for(data)
    cache = run_dir / CACHE_DIR
    if (cache / PLANS_FILE).is_file():
        plans = load_plans(cache)
        cases = {c.case_id for c in discover_cases(root, spec, require_label=True)}
        same = plans["dataset"] == spec.to_dict() and set(plans["cases"]) == cases
        same = same and plans["preprocess"]["crop_nonzero"] == data.crop_nonzero
        if spacing is not None:
            same = same and np.allclose(plans["target_spacing"], spacing)
        if not same:
            raise ValueError(
                f"{cache} was preprocessed from other data or settings than {root} with this config; "
                "delete it to preprocess again, or choose another output folder"
            )
        log.info("reusing the preprocessed cache %s", cache)
        return cache
    start = time.perf_counter()
    config = PreprocessConfig(target_spacing=spacing, crop_nonzero=data.crop_nonzero)
    plans = preprocess_dataset(root, spec, cache, config)
    log.info(
        "preprocessed %d cases from %s into %s (%.1f MiB) in %.1f s",
        len(plans["cases"]),
        root,
        cache,
        plans["cache_bytes"] / 2**20,
        time.perf_counter() - start,
    )
    return cache


def output_channels(spec: DatasetSpec, target: str) -> int:
    return spec.num_classes if target == "labels" else len(spec.regions)


def build_loss(config: TrainConfig3D, spec: DatasetSpec) -> nn.Module:
    if config.data.target == "regions":
        return RegionLoss(config.loss)
    return SegmentationLoss(spec.num_classes, config.loss)


def final_evaluation(
    config: TrainConfig3D, run_dir: Path, cache: Path, val_cases: tuple[str, ...], device: torch.device
) -> dict[str, Any]:
    """Score the best checkpoint on the validation cases with mirror TTA; written to <run_dir>/final_val.json."""
    model, meta = load_checkpoint(run_dir / "best", device=device)
    validator = SlidingWindowValidator.from_cache(
        cache,
        val_cases,
        config.data.patch_size,
        config.data.target,
        config.infer.overlap,
        config.infer.mirror_axes,
        device,
    )
    validator.window = replace(validator.window, sw_batch_size=config.infer.sw_batch_size)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolve_amp(config.amp, device))
    start = time.perf_counter()
    with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        scores = validator(model)
    result = {
        "checkpoint": "best",
        "epoch": meta.training.get("best", {}).get("epoch"),
        "cases": list(val_cases),
        "mirror_axes": list(config.infer.mirror_axes),
        "overlap": config.infer.overlap,
        "grid": "preprocessed (cropped, at the training spacing); score originals with rwkvseg predict + evaluate",
        "empty_policy": "perfect (Dice 1 when prediction and reference are both empty)",
        **scores,
        "seconds": round(time.perf_counter() - start, 3),
    }
    atomic_write_text(run_dir / FINAL_FILE, json.dumps(result, indent=2) + "\n")
    return result


def train_3d(
    config: TrainConfig3D,
    resume: bool = False,
    progress_bar: bool = False,
    stop: Callable[[Progress], bool] | None = None,
) -> Progress:
    """Train a registered 3D model as the config says; returns the progress (best metric, history)."""
    d = config.data
    if not d.root:
        raise ValueError("data.root is empty; set it in the config or pass --data (a dataset folder or a cache)")
    run_dir = open_run_dir(config, resume)

    cache = prepare_cache(d, run_dir)
    plans = load_plans(cache)
    spec = DatasetSpec.from_dict(plans["dataset"])
    cases = list(plans["cases"])
    split_path = prepare_split(config, run_dir, cases, [None] * len(cases))
    split = read_split(split_path, d.fold, cases)
    atomic_write_text(run_dir / CONFIG_FILE, json.dumps(to_dict(config), indent=2) + "\n")
    log.info(
        "%s: %d training and %d validation cases (split %s, fold %d), %s target, patch %s",
        cache,
        len(split.train),
        len(split.val),
        split_path,
        d.fold,
        d.target,
        "x".join(map(str, d.patch_size)),
    )

    patches = PatchConfig(
        patch_size=tuple(d.patch_size),
        samples_per_epoch=d.samples_per_epoch,
        fg_fraction=d.fg_fraction,
        target=d.target,
        augment=d.augment,
        allow_padding=d.allow_padding,
        seed=config.seed,
    )
    train_set = PatchDataset(cache, split.train, patches)
    device = resolve_device(config.device)
    validator = SlidingWindowValidator.from_cache(
        cache, split.val, d.patch_size, d.target, config.infer.overlap, config.infer.val_mirror_axes, device
    )
    validator.window = replace(validator.window, sw_batch_size=config.infer.sw_batch_size)
    names = spec.region_names if d.target == "regions" else tuple(str(v) for v in spec.label_values)
    preprocessing = {
        **inference_metadata(plans, d.patch_size, d.target),
        "inference": {"overlap": config.infer.overlap, "mirror_axes": list(config.infer.mirror_axes)},
    }
    meta = CheckpointMeta(
        model=config.model.name,
        in_channels=len(spec.modalities),
        num_classes=output_channels(spec, d.target),
        model_overrides=dict(config.model.overrides),
        preprocessing=preprocessing,
        class_names=names,
        spacing=tuple(float(s) for s in plans["target_spacing"]),
        training={
            "dataset": str(d.root),
            "cache": str(cache),
            "split": split_path.name,
            "fold": d.fold,
            "config": to_dict(config),
        },
    )
    model = build_model(meta).to(device)
    optimizer, scheduler, loop = training_setup(model, config, len(train_set), device, progress_bar)
    start = time.perf_counter()
    if config.max_minutes > 0:
        outer_stop, epochs_run = stop, 0

        def stop(p: Progress) -> bool:
            nonlocal epochs_run
            epochs_run += 1
            elapsed = time.perf_counter() - start
            validated = f"val_{config.select_metric}" in p.history[-1]
            over = validated and elapsed * (1 + config.val_every / epochs_run) > 60 * config.max_minutes
            return over or (outer_stop is not None and outer_stop(p))

    progress = fit(
        model,
        train_set,
        build_loss(config, spec),
        optimizer,
        scheduler,
        validator,
        run_dir,
        loop,
        meta,
        device=device,
        resume=resume,
        stop=stop,
    )
    log_done(progress, config.select_metric, start, run_dir)
    if config.infer.final_eval and progress.best_epoch is not None:
        final = final_evaluation(config, run_dir, cache, split.val, device)
        regions = "  ".join(f"{k} {v:.4f}" for k, v in final.items() if k.startswith("dice"))
        log.info("best checkpoint with mirror TTA on %d validation cases: %s", len(split.val), regions)
    return progress
