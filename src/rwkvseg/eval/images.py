"""2D scoring for evaluate_folders: a folder of predicted masks against ground-truth masks, one row per image.

Ground truth is a folder of masks, or a dataset folder in any layout that discovery knows (then each image's
mask files are merged as for training). Predictions are matched by name: `<stem>.png` for ground truth
`<stem>` or `<stem>_segmentation` (and the other mask suffixes). Every ground-truth case needs a prediction:
a missing one is an error, or, with missing_as_empty, an explicit empty prediction that is counted in the
summary. The empty-mask policy is metrics.EmptyPolicy, named in the summary.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..data.images2d import Sample2D, discover_pairs, image_files, is_image_file, read_mask, strip_mask_suffix
from .metrics import METRICS, EmptyPolicy, MetricAccumulator, summarize

log = logging.getLogger(__name__)


def ground_truth_cases(gt: Path, skip_non_images: bool = False) -> dict[str, tuple[Path, ...]]:
    """Case stem -> its mask files: a plain mask folder, or the masks of a dataset folder."""
    if not gt.is_dir():
        raise FileNotFoundError(f"ground-truth folder {gt} does not exist")
    if any(is_image_file(p) for p in gt.iterdir() if p.is_file()):
        masks = image_files(gt, skip_non_images)
        stems = {m.stem for m in masks}
        cases: dict[str, list[Path]] = {}
        for m in masks:
            # <x>_segmentation belongs to case <x>, unless <x> is itself a mask of this folder.
            stem = strip_mask_suffix(m.stem)
            cases.setdefault(stem if stem and stem not in stems else m.stem, []).append(m)
        return {k: tuple(sorted(v)) for k, v in sorted(cases.items())}
    samples: list[Sample2D] = discover_pairs(gt, skip_non_images)
    out: dict[str, tuple[Path, ...]] = {}
    for s in samples:
        if s.image.stem in out:
            raise ValueError(f"image name {s.image.stem} repeats in {gt}; predictions could not be matched")
        out[s.image.stem] = s.masks
    return out


def score_images(
    pred: Path,
    gt: Path,
    *,
    num_classes: int = 1,
    spacing: Sequence[float] | None = None,
    policy: EmptyPolicy = EmptyPolicy.PERFECT,
    missing_as_empty: bool = False,
    skip_non_images: bool = False,
    with_hd95: bool = True,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(one row per image and class, summary) of every ground-truth case."""
    truth = ground_truth_cases(gt, skip_non_images)
    predictions = None
    if pred.is_dir():
        predictions = {}
        for p in image_files(pred, skip_non_images):
            if p.stem in predictions:  # a.png and a.jpg: which one is the prediction is a guess
                raise ValueError(f"{predictions[p.stem]} and {p} are both predictions of {p.stem}; keep one of them")
            predictions[p.stem] = p
    if predictions is None:
        raise FileNotFoundError(f"prediction folder {pred} does not exist")
    missing = sorted(set(truth) - set(predictions))
    if missing and not missing_as_empty:
        raise ValueError(
            f"{len(missing)} ground-truth case(s) have no prediction in {pred} ({missing[:5]}); predict them, "
            "or pass --missing-as-empty to score them as empty predictions"
        )
    extra = sorted(set(predictions) - set(truth))
    if extra:
        log.warning("%d predictions have no ground truth and are not scored: %s", len(extra), extra[:5])
    classes = [1] if num_classes <= 2 else list(range(1, num_classes))
    accs = {k: MetricAccumulator(policy, with_hd95, spacing) for k in classes}
    for case, mask_paths in truth.items():
        target = None
        for path in mask_paths:
            m = read_mask(path, num_classes)
            target = m if target is None else np.maximum(target, m)
        if case in predictions:
            p = read_mask(predictions[case], num_classes)
            if p.shape != target.shape:
                raise ValueError(
                    f"prediction {predictions[case]} is {p.shape[1]}x{p.shape[0]} but ground truth {mask_paths[0]} "
                    f"is {target.shape[1]}x{target.shape[0]}; predict at the original size (rwkvseg predict does)"
                )
        else:
            p = np.zeros_like(target)
        for k, acc in accs.items():
            acc.update(
                p == k,
                target == k,
                case=case,
                **({"class": k} if len(classes) > 1 else {}),
                missing_prediction=case not in predictions,
            )
    rows = [row for acc in accs.values() for row in acc.rows]
    metrics = METRICS if with_hd95 else METRICS[:-1]
    summary: dict[str, Any] = {
        "prediction": str(pred),
        "ground_truth": str(gt),
        "empty_policy": EmptyPolicy(policy).value,
        "hd95_units": "spacing units" if spacing else "pixels",
        "spacing": list(spacing) if spacing else None,
        "missing_predictions": len(missing),
        "unmatched_predictions": len(extra),
    }
    if len(classes) == 1:
        summary.update(summarize(rows, metrics))
    else:
        summary["per_class"] = {str(k): summarize(acc.rows, metrics) for k, acc in accs.items()}
        summary["mean_over_classes"] = {
            m: float(np.nanmean([summary["per_class"][str(k)][m].get("mean", np.nan) for k in classes]))
            for m in metrics
        }
    return rows, summary
