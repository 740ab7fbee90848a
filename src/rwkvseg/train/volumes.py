"""The 3D part of a run (dims = 3): cached volumes, random patches, whole-volume validation, a final TTA score.

The data root is either a preprocessed cache (a folder with plans.json, from `rwkvseg preprocess`) or a raw
dataset folder (BraTS case folders, MSD, nnU-Net raw), which is preprocessed once into `<out>/cache` and reused
by later runs and resumes into the same folder. Training draws random patches with foreground oversampling and
nnU-Net augmentation (data.patches3d); validation predicts whole cached volumes with the sliding window every
`val_every` epochs and scores Dice per region (mean over regions selects the best checkpoint). The checkpoint
sidecar carries the plans (spacing, modality order, normalisation, labels and regions, patch size, activation),
so `rwkvseg predict` needs nothing else. When training ends (all epochs, or stopped early by max_minutes or a
stop callback), the best checkpoint is scored once more on the validation cases with mirror TTA
(`final_val.json`). With train_all the validation cases train too, nothing is validated and the last epoch is
kept (no final evaluation).
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import CheckpointMeta, load_checkpoint
from ..data.patches3d import PatchDataset
from ..data.preprocess3d import PLANS_FILE, PreprocessConfig, load_plans, preprocess_dataset
from ..data.specs import DatasetSpec, resolve_spec
from ..data.splits import prepare_split, read_split
from ..data.volumes import discover_cases
from ..files import write_json
from ..memory_format import module_to
from ..records import inference_metadata
from .config import TrainConfig, VolumeDataConfig, to_dict
from .loop import Progress, resolve_amp
from .losses import build_loss
from .run import RunData, fold_cases, save_config, train_all_record
from .validate import SlidingWindowValidator, mean_scores

log = logging.getLogger(__name__)

CACHE_DIR = "cache"
FINAL_FILE = "final_val.json"


def dataset_spec_for(data: VolumeDataConfig) -> DatasetSpec:
    """The DatasetSpec of a raw dataset folder as the config describes it."""
    return resolve_spec(data.dataset, data.modalities, data.label_values, data.regions, data.root)


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


def setup_volumes(config: TrainConfig, run_dir: Path, device: torch.device) -> RunData:
    """Cache, split, patch dataset, sliding-window validator, loss and checkpoint record of a 3D run."""
    d = config.data
    cache = prepare_cache(d, run_dir)
    plans = load_plans(cache)
    spec = DatasetSpec.from_dict(plans["dataset"])
    cases = list(plans["cases"])
    split_path = prepare_split(
        run_dir,
        cases,
        [None] * len(cases),
        split_file=d.split,
        fold=d.fold,
        val_fraction=d.val_fraction,
        seed=config.seed,
    )
    split = read_split(split_path, d.fold, cases)
    save_config(config, run_dir)
    train_cases, val_cases = fold_cases(split.train, split.val, config.train_all)
    log.info(
        "%s: %d training and %d validation cases (split %s, fold %d%s), %s target, patch %s",
        cache,
        len(train_cases),
        len(val_cases),
        split_path,
        d.fold,
        ", train_all" if config.train_all else "",
        d.target,
        "x".join(map(str, d.patches.patch_size)),
    )
    train_set = PatchDataset(cache, train_cases, d.patches, d.target, config.seed)
    validator = window_validator(config, cache, val_cases, config.infer.val_mirror_axes, device) if val_cases else None
    names = spec.output_names(d.target)
    preprocessing = {
        **inference_metadata(plans, d.patches.patch_size, d.target),
        "inference": {"overlap": config.infer.overlap, "mirror_axes": list(config.infer.mirror_axes)},
    }
    if config.threshold != 0.5:  # a region run's cut (TrainConfig refuses another for labels): prediction takes it
        preprocessing["inference"]["threshold"] = config.threshold
    postprocess = config.infer.postprocess()
    if postprocess.active:  # what validation chose the checkpoint on: prediction's default too
        preprocessing["inference"]["postprocess"] = postprocess.spelling()
    meta = CheckpointMeta(
        model=config.model.name,
        in_channels=len(spec.modalities),
        num_classes=spec.num_classes if d.target == "labels" else len(spec.regions),
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
            **train_all_record(config.train_all, train_cases),
        },
    )

    def finish(progress: Progress) -> None:
        if config.train_all:
            log.info("no final evaluation: train_all trained on the validation cases")
        elif config.infer.final_eval and progress.best_epoch is not None:
            final = final_evaluation(config, run_dir, cache, split.val, device)
            regions = "  ".join(f"{k} {v:.4f}" for k, v in final.items() if k.startswith("dice"))
            log.info("best checkpoint with mirror TTA on %d validation cases: %s", len(split.val), regions)

    return RunData(train_set, validator, build_loss(config.loss, spec, d.target), meta, finish)


def window_validator(
    config: TrainConfig, cache: Path, cases: tuple[str, ...], mirror_axes: tuple[int, ...], device: torch.device
) -> SlidingWindowValidator:
    """The sliding-window scorer of cached cases as the run validates them (its patch size, overlap, batch of
    windows, layout, cut and post-processing), with mirror_axes as its TTA."""
    validator = SlidingWindowValidator.from_cache(
        cache,
        cases,
        config.data.patches.patch_size,
        config.data.target,
        config.infer.overlap,
        mirror_axes,
        device,
        memory_format=config.memory_format,
        threshold=config.threshold,
        postprocess=config.infer.postprocess(),
    )
    validator.window = replace(validator.window, sw_batch_size=config.infer.sw_batch_size)
    return validator


def final_evaluation(
    config: TrainConfig, run_dir: Path, cache: Path, val_cases: tuple[str, ...], device: torch.device
) -> dict[str, Any]:
    """Score the best checkpoint on the validation cases with mirror TTA; written to <run_dir>/final_val.json
    (the means, and each case's Dice per region under "per_case")."""
    model, meta = load_checkpoint(run_dir / "best", device=device)
    module_to(model, config.memory_format, 3)  # scored in the layout the run validated in
    validator = window_validator(config, cache, val_cases, config.infer.mirror_axes, device)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolve_amp(config.amp, device))
    start = time.perf_counter()
    with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        per_case = validator.per_case(model)
    scores = mean_scores(per_case, validator.spec.region_names)
    result = {
        "checkpoint": "best",
        "epoch": meta.training.get("best", {}).get("epoch"),
        "cases": list(val_cases),
        "mirror_axes": list(config.infer.mirror_axes),
        "overlap": config.infer.overlap,
        "postprocess": validator.postprocess.spelling(),
        "grid": "preprocessed (cropped, at the training spacing); score originals with rwkvseg predict + evaluate",
        "empty_policy": "perfect (Dice 1 when prediction and reference are both empty)",
        **scores,
        "per_case": per_case,
        "seconds": round(time.perf_counter() - start, 3),
    }
    write_json(run_dir / FINAL_FILE, result)
    return result
