"""Per-region evaluation of 3D label files (ours or any other tool's) and whole-volume validation in training.

Files: predictions `<pred_dir>/<case>.nii.gz` (also `<case>_seg` / `<case>-seg`, any NIfTI/ITK suffix) against
reference labels (a dataset folder in the spec's layout, or a flat folder of label files). Each pair must share
shape and affine; Dice and HD95 (mm, at the reference's true voxel spacing) per region go to a per-case CSV and a
summary JSON that states the empty-mask policy.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data.volumes import (
    AFFINE_ATOL,
    DatasetSpec,
    discover_cases,
    is_volume_file,
    labels_to_classes,
    read_volume,
    strip_suffix,
)
from ..infer.sliding_window import SlidingWindowConfig, activate, predict_logits
from .metrics import EmptyPolicy, confusion_counts, overlap_scores, summarize
from .regions import classes_to_regions, region_scores

log = logging.getLogger(__name__)

CSV_METRICS = ("dice", "hd95", "iou", "precision", "recall")


def _case_key(path: Path, spec: DatasetSpec) -> str:
    stem = strip_suffix(path.name)
    for sep in (spec.separator, "_", "-"):
        if stem.endswith(f"{sep}{spec.seg_suffix}"):
            return stem[: -len(spec.seg_suffix) - 1]
    return stem


def label_files(folder: Path | str, spec: DatasetSpec) -> dict[str, Path]:
    """{case id: label file} from a flat folder of label files (`<case>.nii.gz`, `<case>_seg.nii.gz`) or a
    dataset folder in the spec's layout (a BraTS case folder or tree, an MSD / nnU-Net root)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"label folder {folder} does not exist")
    files = [p for p in sorted(folder.iterdir()) if is_volume_file(p)]
    segs = {_case_key(p, spec): p for p in files if _case_key(p, spec) != strip_suffix(p.name)}
    if segs:
        return segs
    if files and not (
        spec.layout == "brats" and any(p.name.startswith(f"{folder.name}{spec.separator}") for p in files)
    ):
        return {strip_suffix(p.name): p for p in files}
    return {c.case_id: c.label for c in discover_cases(folder, spec, require_label=True)}


def evaluate_pair(
    pred_path: Path,
    ref_path: Path,
    spec: DatasetSpec,
    policy: EmptyPolicy = EmptyPolicy.PERFECT,
    with_hd95: bool = True,
) -> dict[str, dict[str, Any]]:
    """Region scores of one prediction file against its reference; errors name both files."""
    pred, ref = read_volume(pred_path), read_volume(ref_path)
    if pred.array.shape != ref.array.shape or not np.allclose(pred.affine, ref.affine, atol=AFFINE_ATOL):
        raise ValueError(
            f"prediction {pred_path} (shape {pred.array.shape[::-1]}) is not on the grid of reference {ref_path} "
            f"(shape {ref.array.shape[::-1]}), affines\n{pred.affine}\n{ref.affine}\npredict on the original "
            f"image (rwkvseg predict writes on the input's grid) or resample the prediction to the reference"
        )
    for volume in (pred, ref):
        labels_to_classes(volume.array, spec, volume.path)  # raises on label values outside the spec
    return region_scores(pred.array, ref.array, spec, ref.spacing, policy, with_hd95)


def evaluate_folders(
    pred_dir: Path | str,
    ref_dir: Path | str,
    spec: DatasetSpec,
    out_dir: Path | str,
    policy: EmptyPolicy = EmptyPolicy.PERFECT,
    with_hd95: bool = True,
) -> dict[str, Any]:
    """Score every reference case; write `<out_dir>/per_case.csv` and `<out_dir>/summary.json`.

    A reference case without a prediction is an error (listing them), never a silent skip.
    """
    from ..data.preprocess3d import write_json

    refs = label_files(ref_dir, spec)
    preds = label_files(pred_dir, spec)
    missing = sorted(set(refs) - set(preds))
    if missing:
        raise ValueError(
            f"{len(missing)} reference case(s) have no prediction in {pred_dir}: {', '.join(missing[:10])}; "
            f"predict them (files named <case>.nii.gz) or evaluate against a reference folder without them"
        )
    extra = sorted(set(preds) - set(refs))
    if extra:
        log.warning("%d prediction(s) without a reference are ignored: %s", len(extra), ", ".join(extra[:10]))
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in spec.region_names}
    table = []
    for case_id, ref_path in sorted(refs.items()):
        scores = evaluate_pair(preds[case_id], ref_path, spec, policy, with_hd95)
        row: dict[str, Any] = {"case": case_id}
        for region, values in scores.items():
            rows[region].append({"case": case_id, **values})
            for metric in CSV_METRICS:
                if metric in values:
                    row[f"{region}_{metric}"] = values[metric]
            row[f"{region}_empty_reference"] = values["empty_ground_truth"]
            row[f"{region}_empty_prediction"] = values["empty_prediction"]
        table.append(row)
        log.info("%s: %s", case_id, "  ".join(f"{r} {s['dice']:.4f}" for r, s in scores.items()))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "per_case.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    metrics = ("dice", "hd95") if with_hd95 else ("dice",)
    regions = {name: summarize(region_rows, metrics) for name, region_rows in rows.items()}
    summary = {
        "cases": len(table),
        "empty_policy": EmptyPolicy(policy).value,
        "empty_policy_text": (
            "both empty: Dice 1, HD95 0"
            if EmptyPolicy(policy) is EmptyPolicy.PERFECT
            else "both empty: Dice and HD95 undefined (NaN), excluded from means and counted"
        )
        + "; one empty: Dice 0, HD95 = image diagonal in mm (no 50 mm cap)",
        "hd95_units": "mm, at the reference file's voxel spacing",
        "regions": regions,
        "mean_dice": float(np.nanmean([r["dice"]["mean"] for r in regions.values() if "mean" in r["dice"]])),
        "predictions": str(pred_dir),
        "references": str(ref_dir),
    }
    write_json(out_dir / "summary.json", summary)
    return summary


@dataclass
class SlidingWindowValidator:
    """Whole-volume validation for the training loop: `validator(model) -> {"dice": mean, "dice_WT": ...}`.

    Runs on cached cases (training spacing, cropped grid) with the same sliding window as prediction; Dice
    per region with the PERFECT empty policy, averaged over cases, then over regions for "dice".
    """

    cases: Sequence[Any]  # CachedCase
    spec: DatasetSpec
    window: SlidingWindowConfig
    target: str = "labels"
    device: str | torch.device = "cpu"

    @classmethod
    def from_cache(
        cls,
        cache_dir: Path | str,
        case_ids: Sequence[str],
        patch_size: Sequence[int],
        target: str = "labels",
        overlap: float = 0.5,
        mirror_axes: tuple[int, ...] = (),
        device: str | torch.device = "cpu",
    ) -> SlidingWindowValidator:
        """A validator over cached cases (no mirror TTA by default: validation only ranks checkpoints)."""
        from ..data.preprocess3d import load_cached_case, load_plans

        plans = load_plans(cache_dir)
        window = SlidingWindowConfig(
            patch_size=tuple(patch_size),
            overlap=overlap,
            mirror_axes=mirror_axes,
            activation="softmax" if target == "labels" else "sigmoid",
        )
        cases = [load_cached_case(cache_dir, cid, plans) for cid in case_ids]
        return cls(cases, DatasetSpec.from_dict(plans["dataset"]), window, target, device)

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> dict[str, float]:
        was_training = model.training
        model.eval()
        per_region: dict[str, list[float]] = {name: [] for name in self.spec.region_names}
        try:
            for case in self.cases:
                image = torch.from_numpy(case.image)[None]  # [1, M, *S]
                logits = predict_logits(model, image, self.window, self.device)
                probs = activate(logits, self.window.activation)[0]  # [K, *S]
                if self.target == "labels":
                    pred = classes_to_regions(probs.argmax(0), self.spec)  # [R, *S]
                else:
                    pred = probs > 0.5
                truth = classes_to_regions(torch.from_numpy(case.label), self.spec)
                dice = overlap_scores(confusion_counts(pred, truth, batch_dims=1))["dice"]
                for name, value in zip(self.spec.region_names, dice, strict=True):
                    per_region[name].append(float(value))
        finally:
            model.train(was_training)
        out = {f"dice_{name}": float(np.mean(values)) for name, values in per_region.items()}
        out["dice"] = float(np.mean(list(out.values()))) if out else math.nan
        return out
