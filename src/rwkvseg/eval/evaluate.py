"""Predictions folder vs ground truth, 2D or 3D: `per_case.csv` (one row per case) and `summary.json`.

2D (PNG masks, eval.images): ground truth is a folder of masks or a dataset folder in any layout discovery knows;
predictions are matched by name. 3D (label volumes, eval.volumes): per-region Dice and HD95 in mm for the regions
of a dataset spec. Both state the empty-mask policy (metrics.EmptyPolicy) in the summary; both files are written
atomically, and an existing evaluation is replaced only with overwrite, in a folder rwkvseg made; the output folder
may not be, contain or sit inside the predictions or the ground truth.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..data.specs import DatasetSpec
from ..files import atomic_write_text, output_folder, refuse_existing, write_json
from .metrics import EmptyPolicy

PER_CASE_FILE = "per_case.csv"
SUMMARY_FILE = "summary.json"


def evaluate_folders(
    pred: str | Path,
    gt: str | Path,
    out: str | Path | None = None,
    *,
    spec: DatasetSpec | None = None,
    num_classes: int = 1,
    spacing: Sequence[float] | None = None,
    policy: EmptyPolicy = EmptyPolicy.PERFECT,
    missing_as_empty: bool = False,
    overwrite: bool = False,
    skip_non_images: bool = False,
    with_hd95: bool = True,
    empty_hd95: float | None = None,
) -> dict[str, Any]:
    """Score every ground-truth case and return the summary; with out, write per_case.csv and summary.json.

    spec given: 3D label volumes scored per region of the spec (num_classes, spacing, missing_as_empty and
    skip_non_images are 2D options: volumes carry their spacing, and a missing prediction is an error).
    HD95 is MONAI's (the larger of the two directed 95th percentiles over surface voxels, not medpy's pooled
    percentile); with exactly one empty mask it is the diagonal of the grid, or `empty_hd95` (3D) when given:
    eval.metrics.BRATS_EMPTY_HD95 = 373.13 mm gives BraTS-comparable numbers.
    """
    pred, gt = Path(pred), Path(gt)
    folder = contextlib.nullcontext()
    if out is not None:
        out = Path(out)
        if not overwrite:
            refuse_existing(out, [p for p in (out / PER_CASE_FILE, out / SUMMARY_FILE) if p.exists()])
        folder = output_folder(out, [pred, gt], overwrite, "evaluate")
    with folder:
        rows, summary = _score(
            pred, gt, spec, num_classes, spacing, policy, missing_as_empty, skip_non_images, with_hd95, empty_hd95
        )
        if out is not None:
            write_csv(out / PER_CASE_FILE, rows)
            write_json(out / SUMMARY_FILE, summary)
    return summary


def read_summary(folder: str | Path) -> dict[str, Any]:
    """The summary.json that evaluate_folders wrote into folder; FileNotFoundError saying how to write it."""
    path = Path(folder) / SUMMARY_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: score predictions with `rwkvseg evaluate PRED GT --out {folder}`")
    return json.loads(path.read_text(encoding="utf-8"))


def summary_means(summary: dict[str, Any]) -> dict[str, float]:
    """Each metric's mean over cases: `dice`, `iou`, `hd95`, ... of a 2D summary; of a 3D one `<metric>_<region>`
    (`dice_WT`, `hd95_WT`, ..., the names of final_val.json) and `dice`, the mean over regions. A metric undefined
    in every case has no mean and is left out."""

    def means(stats: dict[str, Any], suffix: str = "") -> dict[str, float]:
        return {k + suffix: v["mean"] for k, v in stats.items() if isinstance(v, dict) and "mean" in v}

    if "regions" in summary:
        regions = summary["regions"]
        return {k: v for r in regions for k, v in means(regions[r], f"_{r}").items()} | {"dice": summary["mean_dice"]}
    return means(summary)


def _score(
    pred: Path,
    gt: Path,
    spec: DatasetSpec | None,
    num_classes: int,
    spacing: Sequence[float] | None,
    policy: EmptyPolicy,
    missing_as_empty: bool,
    skip_non_images: bool,
    with_hd95: bool,
    empty_hd95: float | None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    if spec is not None:
        from .volumes import score_volumes

        return score_volumes(pred, gt, spec, policy, with_hd95, empty_hd95)
    from .images import score_images

    if empty_hd95 is not None:
        raise ValueError("a fixed HD95 for empty masks (--hd95-empty, --brats-hd95) applies to 3D volumes only")
    return score_images(
        pred,
        gt,
        num_classes=num_classes,
        spacing=spacing,
        policy=policy,
        missing_as_empty=missing_as_empty,
        skip_non_images=skip_non_images,
        with_hd95=with_hd95,
    )


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """rows as CSV (the first row's keys are the columns), written atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())
