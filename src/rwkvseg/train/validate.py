"""Validation during training: `validate(model) -> {metric: value}` callables that the loop calls every
val_every epochs. 2D scores images at the network input (or whole images through the crop-mode window); 3D
predicts whole cached volumes with the same sliding window as prediction and scores Dice per region."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ..data.dataset2d import SegDataset2D
from ..data.gpu2d import MEMORY_FRACTION, free_memory
from ..data.preprocess3d import load_cached_case, load_plans
from ..data.regions import classes_to_regions, values_to_regions
from ..data.specs import DatasetSpec
from ..eval.metrics import confusion_counts, overlap_scores
from ..infer.postprocess import NO_POSTPROCESS, PostProcess, check_postprocess
from ..infer.postprocess import postprocess as apply_postprocess
from ..infer.predict2d import forward_logits, probabilities, to_labels
from ..infer.predict3d import probabilities_to_values
from ..infer.sliding_window import SlidingWindowConfig, activate, predict_logits
from ..memory_format import check_memory_format, fed_in
from ..records import Preprocessing2D
from .workers import start_workers, worker_context

# Resized validation sets are kept as tensors after their first pass when they take at most this many bytes on the
# host, or on a GPU the share of its free memory a resident training set may take (the images never change).
KEEP_HOST_BYTES = 2**30


def keeps_batches(n: int, pre: Preprocessing2D, device: torch.device) -> bool:
    """Whether n validation images at the network size (float32, with uint8 masks) are kept after the first pass."""
    if pre.resize != "resize":
        return False  # whole images of different sizes, one at a time
    need = n * (4 * pre.channels + 1) * int(pre.size[0]) * int(pre.size[1])
    free = free_memory(device)
    return need <= (KEEP_HOST_BYTES if free is None else MEMORY_FRACTION * free)


def validator_2d(
    val_set: SegDataset2D,
    pre: Preprocessing2D,
    num_classes: int,
    device: torch.device,
    threshold: float = 0.5,
    batch_size: int = 8,
    num_workers: int = 0,
    worker_start: str = "auto",
    memory_format: str = "contiguous",
) -> Callable[[nn.Module], dict[str, float]]:
    """validate(model) -> mean per-image Dice, IoU, precision, recall, specificity (foreground classes averaged).

    Scored at the network input size for resize-trained models (as in the paper), on whole images for
    crop-trained ones; empty-vs-empty images count as perfect (metrics.EmptyPolicy.PERFECT). Resized sets that fit
    (keeps_batches) are read once: later validations reuse the batches, already on the device. num_workers loader
    processes, started as worker_start says (data.worker_start, rwkvseg.train.workers). memory_format: the layout
    each batch (or crop-mode window) takes just before the model (rwkvseg.memory_format).
    """
    check_memory_format(memory_format)
    keep = keeps_batches(len(val_set), pre, device)
    loader = DataLoader(
        val_set,
        batch_size=batch_size if pre.resize == "resize" else 1,
        shuffle=False,
        num_workers=num_workers,
        multiprocessing_context=worker_context(worker_start, num_workers, [type(val_set).__module__]),
        persistent_workers=num_workers > 0 and not keep,
        generator=torch.Generator(),  # its own: reading the set draws no number from the training's global RNG
    )
    kept: list[tuple[torch.Tensor, torch.Tensor]] = []  # (images [B, C, H, W], masks [B, H, W]) on the device
    mask_dtype = torch.uint8 if num_classes <= 256 else torch.long  # class indices

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if kept:
            yield from kept
            return
        read = []
        for batch in start_workers(loader):
            images = batch["image"].to(device)
            masks = batch["mask"][:, 0].to(device, mask_dtype)  # [B, 1, H, W] -> [B, H, W]
            if keep:
                read.append((images, masks))
            yield images, masks
        kept.extend(read)  # only a complete pass is kept

    def validate(model: nn.Module) -> dict[str, float]:
        per_class: list[dict[str, np.ndarray]] = []
        for images, target in batches():
            labels = to_labels(probabilities(forward_logits(fed_in(model, memory_format), images, pre)), threshold)
            target = target.to(labels.device)
            classes = [1] if num_classes == 1 else range(1, num_classes)
            scores = [overlap_scores(confusion_counts(labels == k, target == k, batch_dims=1)) for k in classes]
            per_class.append({m: np.mean([s[m] for s in scores], axis=0) for m in scores[0]})
        return {m: float(np.concatenate([np.atleast_1d(b[m]) for b in per_class]).mean()) for m in per_class[0]}

    return validate


@dataclass
class SlidingWindowValidator:
    """Whole-volume validation for the training loop: `validator(model) -> {"dice": mean, "dice_WT": ...}`.

    Runs on cached cases (training spacing, cropped grid) with the same sliding window as prediction; Dice
    per region with the PERFECT empty policy, averaged over cases, then over regions for "dice". memory_format:
    the layout each window batch takes just before the model (a channels-last run's: rwkvseg.memory_format).
    postprocess (infer.val_postprocess): when active, each case is scored as prediction writes it: the label map
    (regions painted as rwkvseg.infer.predict3d does), post-processed on the cache's grid (spacing: its voxel size
    in mm, for et-min-mm3), then read back as regions; off, the thresholded regions are scored directly.
    """

    cases: Sequence[Any]  # CachedCase
    spec: DatasetSpec
    window: SlidingWindowConfig
    target: str = "labels"
    device: str | torch.device = "cpu"
    memory_format: str = "contiguous"
    threshold: float = 0.5  # regions: the cut of each sigmoid (labels: argmax)
    postprocess: PostProcess = NO_POSTPROCESS
    spacing: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        check_memory_format(self.memory_format)
        check_postprocess(self.postprocess, self.spec.num_classes - 1, self.spec)

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
        memory_format: str = "contiguous",
        threshold: float = 0.5,
        postprocess: PostProcess = NO_POSTPROCESS,
    ) -> SlidingWindowValidator:
        """A validator over cached cases (no mirror TTA by default: validation only ranks checkpoints)."""
        plans = load_plans(cache_dir)
        window = SlidingWindowConfig(
            patch_size=tuple(patch_size),
            overlap=overlap,
            mirror_axes=mirror_axes,
            activation="softmax" if target == "labels" else "sigmoid",
        )
        cases = [load_cached_case(cache_dir, cid, plans) for cid in case_ids]
        spec, spacing = DatasetSpec.from_dict(plans["dataset"]), tuple(float(s) for s in plans["target_spacing"])
        return cls(cases, spec, window, target, device, memory_format, threshold, postprocess, spacing)

    @torch.no_grad()
    def per_case(self, model: nn.Module) -> dict[str, dict[str, float]]:
        """{case id: {"dice_WT": ..., one per region}}: each case's Dice per region."""
        was_training = model.training
        model.eval()
        scores: dict[str, dict[str, float]] = {}
        try:
            for case in self.cases:
                image = torch.from_numpy(case.image)[None]  # [1, M, *S]
                logits = predict_logits(fed_in(model, self.memory_format), image, self.window, self.device)
                probs = activate(logits, self.window.activation)[0]  # [K, *S]
                if self.postprocess.active:  # as written: label values [*S], post-processed, back to [R, *S]
                    values = probabilities_to_values(probs, self.spec, self.target, self.threshold)
                    values = apply_postprocess(values, self.postprocess, self.spec, self.spacing)
                    masks = values_to_regions(values, self.spec)
                    pred = torch.from_numpy(np.stack([masks[n] for n in self.spec.region_names])).to(probs.device)
                elif self.target == "labels":
                    pred = classes_to_regions(probs.argmax(0), self.spec)  # [R, *S]
                else:
                    pred = probs > self.threshold
                truth = classes_to_regions(torch.from_numpy(case.label), self.spec)
                dice = overlap_scores(confusion_counts(pred, truth, batch_dims=1))["dice"]
                names = self.spec.region_names
                scores[case.case_id] = {f"dice_{n}": float(v) for n, v in zip(names, dice, strict=True)}
        finally:
            model.train(was_training)
        return scores

    def __call__(self, model: nn.Module) -> dict[str, float]:
        return mean_scores(self.per_case(model), self.spec.region_names)


def mean_scores(per_case: dict[str, dict[str, float]], region_names: Sequence[str]) -> dict[str, float]:
    """Per region the mean over cases ("dice_WT", ...), then "dice": the mean over regions."""
    out = {f"dice_{n}": float(np.mean([case[f"dice_{n}"] for case in per_case.values()])) for n in region_names}
    out["dice"] = float(np.mean(list(out.values()))) if out else math.nan
    return out
