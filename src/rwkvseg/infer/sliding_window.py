"""Whole-volume prediction from patch models: MONAI's Gaussian-weighted sliding window plus mirror TTA.

Windows are blended as logits (nnU-Net does the same) and turned into probabilities once, at the end; mirror
TTA is applied inside each window so memory stays that of one window batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from monai.inferers import sliding_window_inference
from torch import nn


@dataclass(frozen=True)
class SlidingWindowConfig:
    """patch_size: the model's training patch (spatial axes); mirror_axes: spatial axes flipped for TTA,
    () for none (every subset of the axes is averaged, 8 passes for three axes)."""

    patch_size: tuple[int, ...]
    overlap: float = 0.5
    mode: str = "gaussian"
    sigma_scale: float = 0.125
    sw_batch_size: int = 1
    mirror_axes: tuple[int, ...] = (0, 1, 2)
    activation: str = "softmax"  # "softmax" (labels) | "sigmoid" (regions)

    def __post_init__(self) -> None:
        if not 0 <= self.overlap < 1:
            raise ValueError(f"overlap {self.overlap} must be in [0, 1)")
        if self.activation not in ("softmax", "sigmoid"):
            raise ValueError(f"activation {self.activation!r} unknown; choose softmax or sigmoid")
        if any(a >= len(self.patch_size) or a < 0 for a in self.mirror_axes):
            raise ValueError(f"mirror_axes {self.mirror_axes} must index the {len(self.patch_size)} spatial axes")


def mirror_subsets(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every subset of the axes, the empty one (no flip) first."""
    subsets: list[tuple[int, ...]] = [()]
    for axis in axes:
        subsets += [(*s, axis) for s in subsets]
    return subsets


def mirrored(model: nn.Module, axes: Sequence[int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """A predictor averaging model logits over every flip of the given spatial axes."""
    subsets = mirror_subsets(axes)
    if len(subsets) == 1:
        return model

    def predict(x: torch.Tensor) -> torch.Tensor:  # x [B, M, *spatial]
        total = None
        for subset in subsets:
            dims = [2 + a for a in subset]
            out = model(x.flip(dims) if dims else x)
            out = out.flip(dims) if dims else out
            total = out.float() if total is None else total + out.float()
        return total / len(subsets)

    return predict


@torch.no_grad()
def predict_logits(
    model: nn.Module, image: torch.Tensor, config: SlidingWindowConfig, device: torch.device | str | None = None
) -> torch.Tensor:
    """image [B, M, *spatial] -> blended logits [B, K, *spatial] (float32) on image's device.

    Volumes smaller than the patch are padded by MONAI and the result cropped back, so any size works.
    device: where windows run (the model's device); the stitched output stays with the input.
    """
    if image.ndim != len(config.patch_size) + 2:
        raise ValueError(
            f"image of shape {tuple(image.shape)} does not match a {len(config.patch_size)}-D patch "
            f"{config.patch_size}; expected [B, M, *spatial]"
        )
    logits = sliding_window_inference(
        image,
        roi_size=config.patch_size,
        sw_batch_size=config.sw_batch_size,
        predictor=mirrored(model, config.mirror_axes),
        overlap=config.overlap,
        mode=config.mode,
        sigma_scale=config.sigma_scale,
        sw_device=device,
        device=image.device,
    )
    return torch.as_tensor(logits).float()


def activate(logits: torch.Tensor, activation: str) -> torch.Tensor:
    """Logits [B, K, ...] -> probabilities over classes (softmax) or per region (sigmoid)."""
    return logits.softmax(1) if activation == "softmax" else logits.sigmoid()
