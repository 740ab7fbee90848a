"""A torch Dataset over discovered 2D samples: read, convert, transform."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .images2d import Sample2D, read_sample


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 32-bit seed that depends only on (seed, epoch, index): augmentation independent of workers and resume."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class SegDataset2D(Dataset):
    """Items: {"image": [C, H, W] float32, "mask": [1, H, W] float32 class labels, "case": id, "index": i}.

    transform is a MONAI Compose (or any callable on the dict); when it has set_random_state it is reseeded per
    item from (seed, epoch, index). Call set_epoch before each epoch (DataLoader workers must not be persistent,
    so they receive the new epoch).
    """

    def __init__(
        self,
        samples: Sequence[Sample2D],
        channels: int,
        num_classes: int = 1,
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        normalization: str = "auto",
        seed: int = 0,
    ) -> None:
        if not samples:
            raise ValueError("no samples to build a dataset from; check the dataset folder and the split file")
        self.samples = list(samples)
        self.channels = channels
        self.num_classes = num_classes
        self.transform = transform
        self.normalization = normalization
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        image, mask = read_sample(sample, self.channels, self.num_classes, self.normalization)
        item = {
            "image": np.ascontiguousarray(image.transpose(2, 0, 1)),  # [H, W, C] -> [C, H, W]
            "mask": mask[None].astype(np.float32),  # [H, W] -> [1, H, W]
        }
        if self.transform is not None:
            if hasattr(self.transform, "set_random_state"):
                self.transform.set_random_state(seed=sample_seed(self.seed, self.epoch, index))
            item = self.transform(item)
        return {
            "image": torch.as_tensor(item["image"], dtype=torch.float32),
            "mask": torch.as_tensor(item["mask"], dtype=torch.float32),
            "case": sample.case,
            "index": index,
        }
