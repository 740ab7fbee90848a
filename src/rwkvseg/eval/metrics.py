"""Segmentation metrics for binary masks of any dimension: a functional core and a small accumulating class.

Everything is computed from boolean masks (one foreground class at a time; multi-class evaluation calls these
per class). Counts come first and every overlap score is derived from them, so Dice, IoU, precision, recall
and specificity of one case can never disagree with each other.

HD95 is MONAI's (`compute_hausdorff_distance(percentile=95)`): the 95th percentile of the distances from the
prediction's surface voxels to the reference's surface, and of those the other way round, and the larger of these
two directed values. It is not medpy's `hd95`, which takes one 95th percentile of both directions' distances pooled
together; the two differ by up to 25 mm on BraTS cases. Distances are in the spacing's units (mm for volumes).

Empty masks: the policy is explicit (EmptyPolicy) and every summary counts the empty cases, so no case is
ever dropped silently.

- Both prediction and ground truth empty (a correct "no lesion"):
  PERFECT (default): Dice = IoU = precision = recall = specificity = 1, HD95 = 0.
  UNDEFINED: Dice, IoU, precision, recall and HD95 are NaN; summaries exclude them from means and report
  how many were excluded (`undefined` in each metric's summary).
- Exactly one of them empty: Dice = IoU = 0; precision = 0 when nothing was predicted (the lesion was
  missed), recall = 0 when the ground truth is empty (everything predicted is a false positive);
  HD95 = the diagonal of the image grid given (in the spacing's units): the largest distance the image allows,
  a finite worst case instead of inf/NaN. BraTS challenge numbers use a fixed 373.13 mm instead (the diagonal of
  its 240 x 240 x 155 1 mm grid): pass `empty_hd95=BRATS_EMPTY_HD95` (`rwkvseg evaluate --brats-hd95`).
- Specificity with no negatives in the ground truth (all foreground) is 1 (no false positive was possible).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np
import torch

OVERLAP_METRICS = ("dice", "iou", "precision", "recall", "specificity")
# HD95 of a case with exactly one empty mask in the BraTS challenge's evaluation (mm), for comparable numbers.
BRATS_EMPTY_HD95 = 373.13
METRICS = (*OVERLAP_METRICS, "hd95")


class EmptyPolicy(StrEnum):
    """How a case whose prediction and ground truth are both empty is scored (see the module docstring)."""

    PERFECT = "perfect"
    UNDEFINED = "undefined"


def _as_bool(mask: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    if mask.dtype != np.bool_:
        mask = mask != 0
    return mask


@dataclass(frozen=True)
class ConfusionCounts:
    """Pixel/voxel counts of one case, or arrays of counts for a batch (same shape each)."""

    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    tn: np.ndarray


def confusion_counts(
    pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor, batch_dims: int = 0
) -> ConfusionCounts:
    """Counts over every axis after the first batch_dims (0: the whole array is one case).

    Torch tensors stay on their device for the reduction (cheap in a GPU validation loop).
    """
    if tuple(pred.shape) != tuple(target.shape):
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from ground truth {tuple(target.shape)}")
    if isinstance(pred, torch.Tensor) and isinstance(target, torch.Tensor):
        p, t = pred.bool(), target.bool()
        dims = tuple(range(batch_dims, p.ndim))

        def reduce(x: torch.Tensor) -> np.ndarray:
            return x.sum(dim=dims, dtype=torch.int64).cpu().numpy() if dims else x.long().cpu().numpy()

        return ConfusionCounts(reduce(p & t), reduce(p & ~t), reduce(~p & t), reduce(~p & ~t))
    p, t = _as_bool(pred), _as_bool(target)
    axes = tuple(range(batch_dims, p.ndim))
    return ConfusionCounts(
        np.sum(p & t, axis=axes, dtype=np.int64),
        np.sum(p & ~t, axis=axes, dtype=np.int64),
        np.sum(~p & t, axis=axes, dtype=np.int64),
        np.sum(~p & ~t, axis=axes, dtype=np.int64),
    )


def label_confusion(pred: np.ndarray, target: np.ndarray, count: int) -> np.ndarray:
    """Class-index arrays [*S] (0 .. count-1) -> counts [count, count] over every element: row = target (reference)
    class, column = predicted class. The multi-class table whose one-class view confusion_counts gives."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth {target.shape}")
    pairs = target.astype(np.int64).ravel() * count + pred.ravel()
    return np.bincount(pairs, minlength=count * count).reshape(count, count)


def _ratio(num: np.ndarray, den: np.ndarray, when_zero: np.ndarray) -> np.ndarray:
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    out = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
    return np.where(den > 0, out, when_zero)


def overlap_scores(counts: ConfusionCounts, policy: EmptyPolicy = EmptyPolicy.PERFECT) -> dict[str, np.ndarray]:
    """Dice, IoU, precision, recall, specificity from counts (element-wise for batched counts)."""
    tp, fp, fn, tn = (np.asarray(c, dtype=np.float64) for c in (counts.tp, counts.fp, counts.fn, counts.tn))
    both_empty = (tp + fp + fn) == 0
    agree = np.where(both_empty, 1.0 if EmptyPolicy(policy) is EmptyPolicy.PERFECT else np.nan, 0.0)
    return {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn, agree),
        "iou": _ratio(tp, tp + fp + fn, agree),
        "precision": _ratio(tp, tp + fp, agree),
        "recall": _ratio(tp, tp + fn, agree),
        "specificity": _ratio(tn, tn + fp, np.ones_like(tn)),
    }


def image_diagonal(shape: Sequence[int], spacing: Sequence[float] | None = None) -> float:
    """Largest distance between two pixel centres of an array of this shape (in the spacing's units)."""
    spacing = [1.0] * len(shape) if spacing is None else list(spacing)
    return math.sqrt(sum(((n - 1) * s) ** 2 for n, s in zip(shape, spacing, strict=True)))


def hd95(
    pred: np.ndarray | torch.Tensor,
    target: np.ndarray | torch.Tensor,
    spacing: Sequence[float] | None = None,
    policy: EmptyPolicy = EmptyPolicy.PERFECT,
    empty_hd95: float | None = None,
) -> float:
    """95th-percentile Hausdorff distance of one case (pixels, or the spacing's units, e.g. mm), MONAI's: the
    larger of the two directed 95th percentiles over surface voxels. With exactly one mask empty: `empty_hd95`
    when given (BRATS_EMPTY_HD95 for BraTS-comparable numbers), else the diagonal of this grid."""
    p, t = _as_bool(pred), _as_bool(target)
    if p.shape != t.shape:
        raise ValueError(f"prediction shape {p.shape} differs from ground truth {t.shape}")
    if spacing is not None and len(spacing) != p.ndim:
        raise ValueError(f"spacing {tuple(spacing)} has {len(spacing)} values for a {p.ndim}-D mask")
    p_any, t_any = bool(p.any()), bool(t.any())
    if not p_any and not t_any:
        return 0.0 if EmptyPolicy(policy) is EmptyPolicy.PERFECT else math.nan
    if p_any != t_any:
        return image_diagonal(p.shape, spacing) if empty_hd95 is None else float(empty_hd95)
    from monai.metrics import compute_hausdorff_distance

    # MONAI wants one-hot [B, C, *spatial]; one channel that is our foreground.
    with warnings.catch_warnings():
        # MONAI 1.5+ warns about an argument it passes to itself internally; nothing for us to change.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        value = compute_hausdorff_distance(
            torch.from_numpy(p)[None, None],
            torch.from_numpy(t)[None, None],
            include_background=True,
            percentile=95,
            spacing=None if spacing is None else [float(s) for s in spacing],
        )
    return float(value.item())


def case_scores(
    pred: np.ndarray | torch.Tensor,
    target: np.ndarray | torch.Tensor,
    spacing: Sequence[float] | None = None,
    policy: EmptyPolicy = EmptyPolicy.PERFECT,
    with_hd95: bool = True,
    empty_hd95: float | None = None,
) -> dict[str, float]:
    """All metrics of one binary case, plus its counts (tp, fp, fn, tn) and empty flags."""
    counts = confusion_counts(pred, target)
    scores: dict[str, Any] = {k: float(v) for k, v in overlap_scores(counts, policy).items()}
    if with_hd95:
        scores["hd95"] = hd95(pred, target, spacing, policy, empty_hd95)
    scores.update(
        tp=int(counts.tp),
        fp=int(counts.fp),
        fn=int(counts.fn),
        tn=int(counts.tn),
        empty_prediction=bool(counts.tp + counts.fp == 0),
        empty_ground_truth=bool(counts.tp + counts.fn == 0),
    )
    return scores


def summarize(rows: Iterable[dict[str, Any]], metrics: Sequence[str] = METRICS) -> dict[str, Any]:
    """Mean, std, median, min, max per metric over cases; NaN cases are counted in `<metric>_undefined`.

    Also counts the empty cases, so a reader sees how the empty-mask policy shaped the means.
    """
    rows = list(rows)
    out: dict[str, Any] = {"cases": len(rows)}
    for name in metrics:
        values = np.array([r[name] for r in rows if name in r], dtype=np.float64)
        if values.size == 0:
            continue
        defined = values[~np.isnan(values)]
        stats = {"undefined": int(values.size - defined.size)}
        if defined.size:
            stats.update(
                mean=float(defined.mean()),
                std=float(defined.std()),
                median=float(np.median(defined)),
                min=float(defined.min()),
                max=float(defined.max()),
            )
        out[name] = stats
    out["empty_ground_truth"] = sum(bool(r.get("empty_ground_truth")) for r in rows)
    out["empty_prediction"] = sum(bool(r.get("empty_prediction")) for r in rows)
    out["both_empty"] = sum(bool(r.get("empty_ground_truth") and r.get("empty_prediction")) for r in rows)
    return out


class MetricAccumulator:
    """Collects per-case scores (one row per case) and summarises them; the thin shell over case_scores."""

    def __init__(
        self,
        policy: EmptyPolicy = EmptyPolicy.PERFECT,
        with_hd95: bool = True,
        spacing: Sequence[float] | None = None,
    ) -> None:
        self.policy = EmptyPolicy(policy)
        self.with_hd95 = with_hd95
        self.spacing = spacing
        self.rows: list[dict[str, Any]] = []

    def update(
        self,
        pred: np.ndarray | torch.Tensor,
        target: np.ndarray | torch.Tensor,
        case: str | None = None,
        spacing: Sequence[float] | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """Score one case; extra fields (e.g. class name) go into its row."""
        scores = case_scores(pred, target, spacing or self.spacing, self.policy, self.with_hd95)
        row = {"case": case if case is not None else str(len(self.rows)), **extra, **scores}
        self.rows.append(row)
        return row

    def update_batch(self, pred: torch.Tensor, target: torch.Tensor, cases: Sequence[str] | None = None) -> None:
        """Score each item of a batch [N, *spatial] of binary masks."""
        for i in range(pred.shape[0]):
            self.update(pred[i], target[i], None if cases is None else cases[i])

    def summary(self) -> dict[str, Any]:
        metrics = METRICS if self.with_hd95 else OVERLAP_METRICS
        return {"empty_policy": self.policy.value, **summarize(self.rows, metrics)}

    def mean(self, metric: str = "dice") -> float:
        """Mean over cases with a defined value (NaN when none)."""
        values = np.array([r[metric] for r in self.rows], dtype=np.float64)
        values = values[~np.isnan(values)]
        return float(values.mean()) if values.size else math.nan

    def reset(self) -> None:
        self.rows.clear()
