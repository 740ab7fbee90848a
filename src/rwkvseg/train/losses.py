"""Segmentation losses: BCE + Dice for one output channel, CE + Dice for several classes (MONAI's DiceCELoss),
BCE + Dice per region for overlapping regions (RegionLoss).

Targets are label maps [B, 1, *spatial] (float or int); logits are [B, K, *spatial]. Works for 2D and 3D.
"""

from __future__ import annotations

import torch
from monai import losses as monai_losses
from monai.losses import DiceCELoss, DiceLoss
from torch import nn

from ..data.specs import DatasetSpec
from .config import LossConfig


class SegmentationLoss(nn.Module):
    """ce_weight * (BCE or CE) + dice_weight * soft Dice, chosen by the number of output channels."""

    def __init__(self, num_classes: int, config: LossConfig | None = None) -> None:
        super().__init__()
        config = config or LossConfig()
        if config.region_weights:
            raise ValueError(
                f"loss.region_weights {list(config.region_weights)}: for 3D region targets (data.target = "
                '"regions"); drop it for a model of labels or a 2D model'
            )
        name = config.name
        if name == "auto":
            name = "bce_dice" if num_classes == 1 else "ce_dice"
        if name.startswith("bce") and num_classes != 1:
            raise ValueError(f"loss {name} needs one output channel (binary); this model has {num_classes}")
        if name.startswith("ce") and num_classes == 1:
            raise ValueError(f"loss {name} needs >= 2 output classes; use bce_dice for a one-channel model")
        self.binary = num_classes == 1
        self.name = name
        ce_w = config.ce_weight if name != "dice" else 0.0
        dice_w = config.dice_weight if name not in ("bce", "ce") else 0.0
        if dice_w == 0.0:
            self.loss: nn.Module = nn.BCEWithLogitsLoss() if self.binary else nn.CrossEntropyLoss()
            self.scale = ce_w
        elif ce_w == 0.0:
            self.loss = DiceLoss(
                sigmoid=self.binary, softmax=not self.binary, to_onehot_y=not self.binary, batch=config.batch_dice
            )
            self.scale = dice_w
        else:
            self.loss = DiceCELoss(
                sigmoid=self.binary,
                softmax=not self.binary,
                to_onehot_y=not self.binary,
                lambda_ce=ce_w,
                lambda_dice=dice_w,
                batch=config.batch_dice,
            )
            self.scale = 1.0
        self.plain_ce = dice_w == 0.0

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()  # losses in fp32 also under autocast
        if self.binary:
            return self.scale * self.loss(logits, target.float())
        if self.plain_ce:
            return self.scale * self.loss(logits, target[:, 0].long())  # [B, 1, ...] -> [B, ...]
        return self.scale * self.loss(logits, target.long())


class RegionLoss(nn.Module):
    """ce_weight * BCE + dice_weight * soft Dice on sigmoid outputs, one channel per (overlapping) region.

    MONAI's DiceCELoss applies softmax cross-entropy to any multi-channel input, which is wrong for nested
    regions, so the two terms are combined here. Targets are float masks [B, R, *P]. The Dice is per sample and
    region, or per region over the batch with config.batch_dice. With config.region_weights each region's BCE and
    Dice are averaged over the regions in those proportions instead of alike.
    """

    def __init__(self, config: LossConfig) -> None:
        super().__init__()
        name = "bce_dice" if config.name == "auto" else config.name
        self.ce_weight = config.ce_weight if name in ("bce_dice", "bce") else 0.0
        self.dice_weight = config.dice_weight if name in ("bce_dice", "dice") else 0.0
        # a constant on whatever device the logits are. Not MONAI's DiceLoss(weight=...): it checks the weights'
        # values on every call (a tensor compared in Python), one more break in the compiled step's graph
        # (torch._dynamo.explain, MONAI 1.6.1: 2 breaks against the plain DiceLoss's 1)
        self.region_weights = tuple(config.region_weights)
        # without weights the plain means, as before region_weights existed (the same arithmetic, bit for bit)
        reduction = "none" if self.region_weights else "mean"
        self.bce = nn.BCEWithLogitsLoss(reduction=reduction)
        self.dice = DiceLoss(sigmoid=True, batch=config.batch_dice, reduction=reduction)

    def _over_regions(self, per_region: torch.Tensor) -> torch.Tensor:
        """[R] -> the mean over the regions weighted by region_weights."""
        if len(self.region_weights) != per_region.numel():
            raise ValueError(
                f"loss.region_weights has {len(self.region_weights)} values for {per_region.numel()} regions: "
                "give one per region"
            )
        weights = per_region.new_tensor(self.region_weights)
        return (per_region * weights).sum() / weights.sum()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits, target = logits.float(), target.float()  # fp32 also under autocast
        loss = logits.new_zeros(())
        channels = logits.shape[1]
        if self.ce_weight:
            bce = self.bce(logits, target)
            if self.region_weights:  # [B, R, *P] -> [R] -> weighted mean
                bce = self._over_regions(bce.transpose(0, 1).reshape(channels, -1).mean(1))
            loss = loss + self.ce_weight * bce
        if self.dice_weight:
            dice = self.dice(logits, target)
            if self.region_weights:  # [B, R, 1...] (or [R, 1...] with batch Dice) -> [R] -> weighted mean
                dice = self._over_regions(dice.reshape(-1, channels).mean(0))
            loss = loss + self.dice_weight * dice
        return loss


class DeepSupervisionLoss(monai_losses.DeepSupervisionLoss):
    """MONAI's wrapper over the outputs of a model with deep supervision (main, aux1, aux2, ...: weights 1, 1/2,
    1/4, nnU-Net's halving per level; one tensor passes straight to the loss), the weights divided by their sum so
    that the loss keeps the scale of one output's."""

    def get_weights(self, levels: int = 1) -> list[float]:
        weights = super().get_weights(levels)
        return [w / sum(weights) for w in weights]


def build_loss(config: LossConfig, spec: DatasetSpec, target: str) -> nn.Module:
    """The loss of a 3D run: RegionLoss for target "regions", else SegmentationLoss over the label classes; over
    every output of a model with deep supervision (DeepSupervisionLoss)."""
    if target == "regions":
        if config.region_weights and len(config.region_weights) != len(spec.region_names):
            raise ValueError(
                f"loss.region_weights {list(config.region_weights)}: give one weight per region "
                f"({', '.join(spec.region_names)})"
            )
        return DeepSupervisionLoss(RegionLoss(config))
    return DeepSupervisionLoss(SegmentationLoss(spec.num_classes, config))
