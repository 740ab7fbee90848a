"""2D training: a TrainConfig in, a run folder out (checkpoints, split, resolved config, metrics)."""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ..checkpoint import CheckpointMeta, atomic_write_text, build_model
from ..data.dataset2d import SegDataset2D
from ..data.images2d import check_pairs, discover_pairs
from ..data.splits import make_split, read_split, write_split
from ..data.transforms2d import eval_transform, train_transform
from ..eval.metrics import confusion_counts, overlap_scores
from ..infer.predict2d import Preprocessing2D, forward_logits, probabilities, to_labels
from .config import TrainConfig, to_dict
from .loop import Progress, fit, resolve_device
from .losses import SegmentationLoss
from .run import CONFIG_FILE, log_done, open_run_dir, training_setup

log = logging.getLogger(__name__)

SPLIT_FILE = "split.json"


def validator_2d(
    val_set: SegDataset2D,
    pre: Preprocessing2D,
    num_classes: int,
    device: torch.device,
    threshold: float = 0.5,
    batch_size: int = 8,
    num_workers: int = 0,
) -> Callable[[nn.Module], dict[str, float]]:
    """validate(model) -> mean per-image Dice, IoU, precision, recall, specificity (foreground classes averaged).

    Scored at the network input size for resize-trained models (as in the paper), on whole images for
    crop-trained ones; empty-vs-empty images count as perfect (metrics.EmptyPolicy.PERFECT).
    """
    # Whole images differ in size: one at a time in crop mode. Validation data never changes between epochs,
    # so its workers are kept alive instead of being restarted for every validation.
    loader = DataLoader(
        val_set,
        batch_size=batch_size if pre.resize == "resize" else 1,
        shuffle=False,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )

    def validate(model: nn.Module) -> dict[str, float]:
        per_class: list[dict[str, np.ndarray]] = []
        for batch in loader:
            labels = to_labels(probabilities(forward_logits(model, batch["image"].to(device), pre)), threshold)
            target = batch["mask"][:, 0].to(labels.device).long()  # [B, 1, H, W] -> [B, H, W]
            classes = [1] if num_classes == 1 else range(1, num_classes)
            scores = [overlap_scores(confusion_counts(labels == k, target == k, batch_dims=1)) for k in classes]
            per_class.append({m: np.mean([s[m] for s in scores], axis=0) for m in scores[0]})
        return {m: float(np.concatenate([np.atleast_1d(b[m]) for b in per_class]).mean()) for m in per_class[0]}

    return validate


def prepare_split(config: TrainConfig, run_dir: Path, cases: list[str], labels: list[Any]) -> Path:
    """The split file this run uses, copied into the run folder (made from the seed if none was given)."""
    target = run_dir / SPLIT_FILE
    if config.data.split:
        source = Path(config.data.split)
        if source.resolve() != target.resolve():
            read_split(source, config.data.fold, cases)  # check before copying
            shutil.copyfile(source, target)
        return target
    if not target.exists():
        stratify = labels if any(label is not None for label in labels) else None
        write_split(target, make_split(cases, stratify, config.data.val_fraction, config.seed))
    return target


def train_2d(
    config: TrainConfig,
    resume: bool = False,
    progress_bar: bool = False,
    stop: Callable[[Progress], bool] | None = None,
) -> Progress:
    """Train a registered 2D model as the config says; returns the progress (best metric, history)."""
    if not config.data.root:
        raise ValueError("data.root is empty; set it in the config or with --set data.root=PATH")
    run_dir = open_run_dir(config, resume)

    d = config.data
    samples = discover_pairs(d.root, d.skip_non_images)
    by_case = {s.case: s for s in samples}
    split_path = prepare_split(config, run_dir, list(by_case), [s.label for s in samples])
    split = read_split(split_path, d.fold, list(by_case))
    check_pairs([by_case[c] for c in (*split.train, *split.val)])
    atomic_write_text(run_dir / CONFIG_FILE, json.dumps(to_dict(config), indent=2) + "\n")
    log.info(
        "%s: %d training and %d validation images (split %s, fold %d)",
        d.root,
        len(split.train),
        len(split.val),
        split_path,
        d.fold,
    )

    train_set = SegDataset2D(
        [by_case[c] for c in split.train],
        d.channels,
        d.num_classes,
        train_transform(d.size, d.resize, d.augment),
        d.normalization,
        config.seed,
    )
    val_set = SegDataset2D(
        [by_case[c] for c in split.val],
        d.channels,
        d.num_classes,
        eval_transform(d.size, d.resize),
        d.normalization,
        config.seed,
    )
    device = resolve_device(config.device)
    pre = Preprocessing2D(d.channels, d.size, d.resize, d.normalization)
    meta = CheckpointMeta(
        model=config.model.name,
        in_channels=d.channels,
        num_classes=d.num_classes,
        model_overrides=dict(config.model.overrides),
        preprocessing=pre.to_dict(),
        class_names=d.class_names,
        training={
            "dataset": str(d.root),
            "split": split_path.name,
            "fold": d.fold,
            "config": to_dict(config),
            "threshold": config.threshold,
        },
    )
    model = build_model(meta).to(device)
    optimizer, scheduler, loop = training_setup(model, config, len(train_set), device, progress_bar)
    validate = validator_2d(val_set, pre, d.num_classes, device, config.threshold, d.val_batch_size, d.num_workers)
    start = time.perf_counter()
    if config.max_minutes > 0:
        budget_stop = stop

        def stop(p: Progress) -> bool:
            over = time.perf_counter() - start > 60 * config.max_minutes
            return over or (budget_stop is not None and budget_stop(p))

    progress = fit(
        model,
        train_set,
        SegmentationLoss(d.num_classes, config.loss),
        optimizer,
        scheduler,
        validate,
        run_dir,
        loop,
        meta,
        device=device,
        resume=resume,
        stop=stop,
    )
    log_done(progress, config.select_metric, start, run_dir)
    return progress
