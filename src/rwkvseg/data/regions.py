"""Regions as unions of labels (BraTS WT/TC/ET): label <-> region conversions for masks, training targets and
write-back (per-region scores: eval.evaluate3d.region_scores).

A dataset's `regions` pair names with label values. Class indices (position in `label_values`) are what the
cache and the models use; label values are what files hold.
"""

from __future__ import annotations

import numpy as np
import torch

from .specs import DatasetSpec


def region_class_table(spec: DatasetSpec) -> np.ndarray:
    """bool [R, K]: which classes (index into label_values) belong to each region."""
    table = np.zeros((len(spec.regions), spec.num_classes), dtype=bool)
    for r, (_, values) in enumerate(spec.regions):
        table[r, [spec.label_values.index(v) for v in values]] = True
    return table


def classes_to_regions(classes: np.ndarray | torch.Tensor, spec: DatasetSpec) -> np.ndarray | torch.Tensor:
    """Class indices [*S] -> region masks [R, *S] (bool), numpy or torch alike (torch stays on its device)."""
    table = region_class_table(spec)
    if isinstance(classes, torch.Tensor):
        return torch.as_tensor(table, device=classes.device)[:, classes.long()]
    return table[:, np.asarray(classes, dtype=np.int64)]


def values_to_regions(values: np.ndarray, spec: DatasetSpec) -> dict[str, np.ndarray]:
    """Label values as in files [*S] -> {region name: bool mask}."""
    return {name: np.isin(values, labels) for name, labels in spec.regions}


def regions_to_values(masks: np.ndarray | torch.Tensor, spec: DatasetSpec) -> np.ndarray:
    """Region masks [R, *S] -> label values [*S] (uint8), painted largest region first (nnU-Net regions)."""
    masks = masks.cpu().numpy() if isinstance(masks, torch.Tensor) else np.asarray(masks)
    out = np.zeros(masks.shape[1:], dtype=np.uint8)
    for mask, value in zip(masks, spec.paint_values(), strict=True):
        out[mask.astype(bool)] = value
    return out


def classes_to_values(classes: np.ndarray | torch.Tensor, spec: DatasetSpec) -> np.ndarray:
    """Class indices -> the label values files use (BraTS: 3 -> 4)."""
    classes = classes.cpu().numpy() if isinstance(classes, torch.Tensor) else np.asarray(classes)
    return np.asarray(spec.label_values, dtype=np.uint8)[classes.astype(np.int64)]
