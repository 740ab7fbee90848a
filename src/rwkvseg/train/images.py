"""The 2D part of a run (dims = 2): image / mask pairs, resized or cropped, scored at the network input."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..checkpoint import CheckpointMeta
from ..data.dataset2d import SegDataset2D
from ..data.gpu2d import NotResident, ResidentDataset2D
from ..data.images2d import Sample2D, check_pairs, discover_pairs
from ..data.splits import prepare_split, read_split
from ..data.transforms2d import eval_transform, train_transform
from ..files import file_sha256
from ..records import Preprocessing2D
from .config import DataConfig, TrainConfig, to_dict
from .losses import SegmentationLoss
from .run import RunData, fold_cases, save_config, train_all_record
from .validate import validator_2d

log = logging.getLogger(__name__)


def setup_images(config: TrainConfig, run_dir: Path, device: torch.device) -> RunData:
    """Split, datasets, validator, loss and checkpoint record of a 2D run."""
    d = config.data
    samples = discover_pairs(d.root, d.skip_non_images)
    by_case = {s.case: s for s in samples}
    split_path = prepare_split(
        run_dir,
        list(by_case),
        [s.label for s in samples],
        split_file=d.split,
        fold=d.fold,
        val_fraction=d.val_fraction,
        seed=config.seed,
    )
    split = read_split(split_path, d.fold, list(by_case))
    check_pairs([by_case[c] for c in (*split.train, *split.val)])
    save_config(config, run_dir)
    train_cases, val_cases = fold_cases(split.train, split.val, config.train_all)
    log.info(
        "%s: %d training and %d validation images (split %s, fold %d%s)",
        d.root,
        len(train_cases),
        len(val_cases),
        split_path,
        d.fold,
        ", train_all" if config.train_all else "",
    )
    val_samples = [by_case[c] for c in val_cases]
    extra = extra_training_samples(d, val_samples)
    if extra:
        log.info("%d more training images from data.extra_train %s", len(extra), ", ".join(d.extra_train))
    train_set = training_set(config, [*(by_case[c] for c in train_cases), *extra], device)
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
            **train_all_record(config.train_all, train_cases),
        },
    )
    validate = None
    if val_samples:
        val_set = SegDataset2D(
            val_samples,
            d.channels,
            d.num_classes,
            eval_transform(d.size, d.resize),
            d.normalization,
            config.seed,
        )
        validate = validator_2d(
            val_set,
            pre,
            d.num_classes,
            device,
            config.threshold,
            d.val_batch_size,
            d.num_workers,
            d.worker_start,
            memory_format=config.memory_format,
        )
    return RunData(train_set, validate, SegmentationLoss(d.num_classes, config.loss), meta)


def extra_training_samples(d: DataConfig, validation: Sequence[Sample2D]) -> list[Sample2D]:
    """Every image / mask pair below the data.extra_train folders, for training only (case ids prefixed with the
    folder's name). Refused, before any training, where validation images could reach training: a folder that is
    data.root or lies inside or around it, or an image byte-identical to a validation image (a copy re-encoded
    elsewhere is not recognised)."""
    root = Path(d.root).resolve()
    samples: list[Sample2D] = []
    for folder in d.extra_train:
        path = Path(folder).resolve()
        if path == root or path.is_relative_to(root) or root.is_relative_to(path):
            raise ValueError(
                f"data.extra_train {folder} overlaps data.root {d.root}, so it holds validation images; "
                "give the folder of another dataset"
            )
        try:
            found = discover_pairs(path, d.skip_non_images)  # refuses images without a mask
        except (FileNotFoundError, ValueError) as err:
            raise type(err)(f"data.extra_train {folder}: {err}") from None
        samples += [replace(s, case=f"{path.name}/{s.case}") for s in found]
    if not samples:
        return []
    check_pairs(samples)
    validation_digests = {file_sha256(s.image): s.image for s in validation}
    copies = [(s.image, validation_digests[h]) for s in samples if (h := file_sha256(s.image)) in validation_digests]
    if copies:
        raise ValueError(
            f"data.extra_train image {copies[0][0]} is the validation image {copies[0][1]} byte for byte "
            f"({len(copies)} such image(s)); remove them from the extra folder"
        )
    return samples


def training_set(config: TrainConfig, samples: list[Sample2D], device: torch.device) -> Dataset:
    """The training images as data.gpu_resident says: on the device as uint8 (auto: on CUDA when they fit,
    resized not cropped, 8-bit), else read and augmented per item through a DataLoader."""
    d, mode = config.data, config.data.gpu_resident
    wanted = mode == "on" or (mode == "auto" and device.type == "cuda")
    if wanted and d.resize != "resize":
        if mode == "on":
            raise ValueError("data.gpu_resident = on needs data.resize = resize (random crops read whole images)")
        wanted = False
    if wanted:
        try:
            resident = ResidentDataset2D(
                samples, d.channels, d.num_classes, d.size, d.normalization, d.augment, config.seed, device
            )
        except NotResident as err:
            if mode == "on":
                raise
            log.info("training images are read per batch: %s", err)
        else:
            log.info("%d training images on %s (%.0f MiB uint8)", len(resident), device, resident.nbytes / 2**20)
            return resident
    transform = train_transform(d.size, d.resize, d.augment)
    return SegDataset2D(samples, d.channels, d.num_classes, transform, d.normalization, config.seed)
