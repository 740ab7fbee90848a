"""3D scoring for evaluate_folders: per-region evaluation of label files (ours or any other tool's).

Files: predictions `<pred_dir>/<case>.nii.gz` (also `<case>_seg` / `<case>-seg`, any NIfTI/ITK suffix) against
reference labels (a dataset folder in the spec's layout, or a flat folder of label files). Each pair must share
shape and affine; Dice and HD95 (mm, at the reference's true voxel spacing) per region, one row per case, and
over all cases the label confusion: which label was predicted on the voxels of each reference label (BraTS: how
much of the necrotic / non-enhancing core came out as edema), which the region scores cannot tell.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..data.regions import values_to_regions
from ..data.specs import DatasetSpec, safe_name
from ..data.volumes import (
    AFFINE_ATOL,
    discover_cases,
    is_volume_file,
    labels_to_classes,
    read_volume,
    strip_suffix,
)
from .metrics import EmptyPolicy, case_scores, label_confusion, summarize

log = logging.getLogger(__name__)

CSV_METRICS = ("dice", "hd95", "iou", "precision", "recall")


def _case_key(path: Path, spec: DatasetSpec) -> str:
    stem = strip_suffix(path.name)
    for sep in (spec.separator, "_", "-"):
        if stem.endswith(f"{sep}{spec.seg_suffix}"):
            return stem[: -len(spec.seg_suffix) - 1]
    return stem


def _one_file_per_case(pairs: Sequence[tuple[str, Path]]) -> dict[str, Path]:
    """{case: file}, refusing two files for one case (c1.nii and c1.nii.gz): which one is meant is a guess."""
    out: dict[str, Path] = {}
    for case, path in pairs:
        if case in out:
            raise ValueError(f"{out[case]} and {path} are both case {case}; keep one of them (rwkvseg does not guess)")
        out[case] = path
    return out


def label_files(folder: Path | str, spec: DatasetSpec) -> dict[str, Path]:
    """{case id: label file} from a flat folder of label files (`<case>.nii.gz`, `<case>_seg.nii.gz`) or a
    dataset folder in the spec's layout (a BraTS case folder or tree, an MSD / nnU-Net root)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"label folder {folder} does not exist")
    files = [p for p in sorted(folder.iterdir()) if is_volume_file(p)]
    segs = _one_file_per_case([(_case_key(p, spec), p) for p in files if _case_key(p, spec) != strip_suffix(p.name)])
    if segs:
        return segs
    if files and not (
        spec.layout == "brats" and any(p.name.startswith(f"{folder.name}{spec.separator}") for p in files)
    ):
        return _one_file_per_case([(strip_suffix(p.name), p) for p in files])
    return {c.case_id: c.label for c in discover_cases(folder, spec, require_label=True)}


def region_scores(
    pred: np.ndarray,
    reference: np.ndarray,
    spec: DatasetSpec,
    spacing: Sequence[float] | None = None,
    policy: EmptyPolicy = EmptyPolicy.PERFECT,
    with_hd95: bool = True,
    empty_hd95: float | None = None,
) -> dict[str, dict[str, Any]]:
    """Per-region metrics of one case from label-value volumes: {region: case_scores(...)}; HD95 conventions in
    eval.metrics (MONAI's; one empty mask: the grid's diagonal, or `empty_hd95` such as BraTS's 373.13 mm)."""
    if pred.shape != reference.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference {reference.shape}")
    pred_regions = values_to_regions(pred, spec)
    ref_regions = values_to_regions(reference, spec)
    return {
        name: case_scores(pred_regions[name], ref_regions[name], spacing, policy, with_hd95, empty_hd95)
        for name in spec.region_names
    }


def confusion_summary(voxels: np.ndarray, spec: DatasetSpec) -> dict[str, Any]:
    """The summary's `label_confusion`: the counts and each reference label's share predicted as each label (rows
    summing to 1; None for a label absent from every reference)."""
    totals = voxels.sum(axis=1, keepdims=True)
    shares = np.divide(voxels, totals, out=np.zeros(voxels.shape), where=totals > 0)
    return {
        "labels": list(spec.label_values),
        "voxels": voxels.tolist(),
        "share_of_reference": [
            row.tolist() if total else None for row, total in zip(shares, totals[:, 0], strict=True)
        ],
        "definition": "rows: reference label, columns: predicted label, voxels summed over all cases",
    }


def evaluate_pair(
    pred_path: Path,
    ref_path: Path,
    spec: DatasetSpec,
    policy: EmptyPolicy = EmptyPolicy.PERFECT,
    with_hd95: bool = True,
    empty_hd95: float | None = None,
) -> tuple[dict[str, dict[str, Any]], np.ndarray]:
    """(region scores, label confusion counts) of one prediction file against its reference; errors name both
    files."""
    pred, ref = read_volume(pred_path), read_volume(ref_path)
    if pred.array.shape != ref.array.shape or not np.allclose(pred.affine, ref.affine, atol=AFFINE_ATOL):
        raise ValueError(
            f"prediction {pred_path} (shape {pred.array.shape[::-1]}) is not on the grid of reference {ref_path} "
            f"(shape {ref.array.shape[::-1]}), affines\n{pred.affine}\n{ref.affine}\npredict on the original "
            f"image (rwkvseg predict writes on the input's grid) or resample the prediction to the reference"
        )
    # class indices; raises on label values outside the spec
    pred_classes, ref_classes = (labels_to_classes(v.array, spec, v.path) for v in (pred, ref))
    scores = region_scores(pred.array, ref.array, spec, ref.spacing, policy, with_hd95, empty_hd95)
    return scores, label_confusion(pred_classes, ref_classes, spec.num_classes)


def score_volumes(
    pred_dir: Path,
    ref_dir: Path,
    spec: DatasetSpec,
    policy: EmptyPolicy = EmptyPolicy.PERFECT,
    with_hd95: bool = True,
    empty_hd95: float | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(one row per case with `<region>_<metric>` columns, summary) of every reference case.

    A reference case without a prediction is an error (listing them), never a silent skip.
    """
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
    confusion = np.zeros((spec.num_classes, spec.num_classes), dtype=np.int64)
    for case_id, ref_path in sorted(refs.items()):
        scores, counts = evaluate_pair(preds[case_id], ref_path, spec, policy, with_hd95, empty_hd95)
        confusion += counts
        row: dict[str, Any] = {"case": case_id}
        for region, values in scores.items():
            rows[region].append({"case": case_id, **values})
            for metric in CSV_METRICS:
                if metric in values:
                    row[f"{safe_name(region)}_{metric}"] = values[metric]
            row[f"{safe_name(region)}_empty_reference"] = values["empty_ground_truth"]
            row[f"{safe_name(region)}_empty_prediction"] = values["empty_prediction"]
        table.append(row)
        log.info("%s: %s", case_id, "  ".join(f"{r} {s['dice']:.4f}" for r, s in scores.items()))
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
        + (
            "; one empty: Dice 0, HD95 = image diagonal in mm (no 50 mm cap)"
            if empty_hd95 is None
            else f"; one empty: Dice 0, HD95 = {empty_hd95} mm (fixed, as BraTS does for 373.13)"
        ),
        "hd95_units": "mm, at the reference file's voxel spacing",
        "hd95_definition": "MONAI: the larger of the two directed 95th percentiles of surface distances",
        "regions": regions,
        "mean_dice": float(np.nanmean([r["dice"]["mean"] for r in regions.values() if "mean" in r["dice"]])),
        "label_confusion": confusion_summary(confusion, spec),
        "predictions": str(pred_dir),
        "references": str(ref_dir),
    }
    return table, summary
