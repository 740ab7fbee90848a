"""A 2D training set that lives on the GPU: every image once as uint8 at the network size, batches gathered,
normalised and augmented there, so an epoch does no decoding, no host-to-device copies and no host syncs.

The augmentation repeats the semantics of transforms2d.train_transform (resize mode) with torch ops on batched
tensors, each decision drawn per sample: rot90 (prob, k in 1..3, square inputs), flips along both axes (prob
each), optionally the affine (prob * 0.6: rotation U(-0.26, 0.26) rad, scale of axis 0 by 1 + U(-0.15, 0.15) as
MONAI's single scale_range value does, shift U(-5 %, 5 %) of each side; bilinear image, nearest mask, zero
padding) and the intensity steps (prob * 0.6 gamma contrast U(0.7, 1.5) over the image's range, prob * 0.6 scale
by 1 + U(-0.15, 0.15), prob * 0.3 Gaussian noise with std U(0, 0.03)). Random numbers come from one generator on
the device per epoch, seeded from (seed, epoch): an epoch's batches are the same however often it is repeated,
so a resumed run sees exactly the images of an uninterrupted one (on the same kind of device).

Storage is uint8 after a bilinear resize of the 8-bit pixels (rounded: at most 0.5/255 away from resizing the
normalised float image, as the DataLoader path does); per-image normalisations (minmax, zscore) take their
statistics at the network size. 16-bit images and random-crop training stay on the DataLoader path.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .dataset2d import sample_seed
from .images2d import Sample2D, read_mask, read_pixels
from .transforms2d import AugmentConfig

# The resident set may take at most this share of the device's free memory (the rest is the model's).
MEMORY_FRACTION = 0.25


class NotResident(ValueError):
    """The data cannot be kept on the device as uint8 (the message says why)."""


def resident_bytes(n: int, channels: int, size: Sequence[int]) -> int:
    """Device memory of n images with their masks, uint8 at the network size."""
    return n * (channels + 1) * int(size[0]) * int(size[1])


def free_memory(device: torch.device | str) -> int | None:
    """Free bytes on a CUDA device; None elsewhere (host memory is not budgeted)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return int(torch.cuda.mem_get_info(device)[0])


def check_fits(n: int, channels: int, size: Sequence[int], device: torch.device | str) -> None:
    """NotResident when the uint8 set would take more than MEMORY_FRACTION of the device's free memory."""
    need, free = resident_bytes(n, channels, size), free_memory(device)
    if free is not None and need > MEMORY_FRACTION * free:
        raise NotResident(
            f"{n} images at {size[0]}x{size[1]} need {need / 2**20:.0f} MiB as uint8, more than "
            f"{MEMORY_FRACTION:.0%} of the {free / 2**20:.0f} MiB free on {device}; set data.gpu_resident = off"
        )


def _resized(array: torch.Tensor, size: Sequence[int], mode: str) -> torch.Tensor:
    """[C, h, w] -> [C, H, W] float32, as MONAI's Resized does it (bilinear without antialiasing, nearest)."""
    if tuple(array.shape[1:]) == tuple(size):
        return array.float()
    options = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(array[None].float(), size=tuple(size), mode=mode, **options)[0]


def read_resident(sample: Sample2D, channels: int, num_classes: int, size: Sequence[int]) -> tuple[Any, Any]:
    """(image [C, H, W] uint8, mask [1, H, W] uint8) of one sample at the network size."""
    pixels = read_pixels(sample.image, channels)  # [h, w, C]
    if pixels.dtype != np.uint8:
        raise NotResident(
            f"image {sample.image} is {pixels.dtype}, not 8-bit; only 8-bit images are kept on the GPU "
            "(set data.gpu_resident = off)"
        )
    if not sample.masks:
        raise ValueError(f"image {sample.image} has no mask; add one or leave the image out of training")
    mask = None
    for path in sample.masks:
        m = read_mask(path, num_classes)
        if m.shape != pixels.shape[:2]:
            raise ValueError(
                f"mask {path} is {m.shape[1]}x{m.shape[0]} (WxH) but image {sample.image} is "
                f"{pixels.shape[1]}x{pixels.shape[0]}; resize the mask to the image (nearest) or remove the pair"
            )
        mask = m if mask is None else np.maximum(mask, m)  # union of lesion masks
    image = _resized(torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))), size, "bilinear")
    labels = _resized(torch.from_numpy(mask)[None], size, "nearest")
    return image.round().clamp(0, 255).to(torch.uint8), labels.to(torch.uint8)


def normalize_batch(images: torch.Tensor, method: str) -> torch.Tensor:
    """uint8 [B, C, H, W] -> float32, as images2d.normalize does for 8-bit images (per image for minmax/zscore)."""
    x = images.float()
    if method in ("auto", "dtype"):
        return x / 255.0
    if method == "minmax":
        lo, hi = x.amin(dim=(1, 2, 3), keepdim=True), x.amax(dim=(1, 2, 3), keepdim=True)
        return (x - lo) / (hi - lo).clamp_min(1e-6)
    if method == "zscore":
        mean, std = x.mean(dim=(2, 3), keepdim=True), x.std(dim=(2, 3), keepdim=True, unbiased=False)
        return (x - mean) / std.clamp_min(1e-6)
    raise ValueError(f"unknown normalization {method!r}; choose one of auto, dtype, minmax, zscore")


def _chance(p: float, n: int, g: torch.Generator, device: torch.device) -> torch.Tensor:
    """[n, 1, 1, 1] bool: which samples a transform of probability p applies to."""
    return (torch.rand(n, generator=g, device=device) < p).view(n, 1, 1, 1)


def _uniform(lo: float, hi: float, n: int, g: torch.Generator, device: torch.device) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, device=device)


def _rot90(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """x [B, C, S, S] rotated by k[b] quarter turns (0..3) per sample, without a host sync."""
    out = x
    for quarter in (1, 2, 3):
        out = torch.where((k == quarter).view(-1, 1, 1, 1), torch.rot90(x, quarter, dims=(2, 3)), out)
    return out


def _affine_grid(n: int, size: Sequence[int], g: torch.Generator, device: torch.device) -> torch.Tensor:
    """[n, H, W, 2] grid_sample grids of random rotations, axis-0 scalings and shifts (MONAI RandAffine's
    parameters: input point = R (S p + t) for centred pixel coordinates p)."""
    h, w = size
    angle = _uniform(-0.26, 0.26, n, g, device)
    scale = 1 + _uniform(-0.15, 0.15, n, g, device)
    shift = torch.stack([_uniform(-0.05 * h, 0.05 * h, n, g, device), _uniform(-0.05 * w, 0.05 * w, n, g, device)], 1)
    rows = torch.arange(h, device=device, dtype=torch.float32) - (h - 1) / 2
    cols = torch.arange(w, device=device, dtype=torch.float32) - (w - 1) / 2
    p_row, p_col = torch.meshgrid(rows, cols, indexing="ij")  # [H, W] each
    s_row = scale.view(n, 1, 1) * p_row + shift[:, 0].view(n, 1, 1)  # [n, H, W]
    s_col = p_col + shift[:, 1].view(n, 1, 1)
    cos, sin = angle.cos().view(n, 1, 1), angle.sin().view(n, 1, 1)
    q_row, q_col = cos * s_row - sin * s_col, sin * s_row + cos * s_col
    return torch.stack([q_col * 2 / w, q_row * 2 / h], dim=-1)  # (x, y) normalised, align_corners=False


def augment_batch(
    images: torch.Tensor, masks: torch.Tensor, config: AugmentConfig, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random augmentation of a normalised batch: images [B, C, H, W] float, masks [B, 1, H, W] float labels."""
    n, device, p = images.shape[0], images.device, config.prob
    if config.rot90:
        if images.shape[2] != images.shape[3]:
            raise ValueError(
                f"rot90 augmentation needs square inputs, data.size is {list(images.shape[2:])}; "
                "set data.augment.rot90 = false or a square size"
            )
        do = _chance(p, n, g, device).view(n)
        k = torch.where(do, torch.randint(1, 4, (n,), generator=g, device=device), 0)
        images, masks = _rot90(images, k), _rot90(masks, k)
    if config.flip:
        for dim in (2, 3):
            do = _chance(p, n, g, device)
            images = torch.where(do, images.flip(dim), images)
            masks = torch.where(do, masks.flip(dim), masks)
    if config.affine:
        do = _chance(p * 0.6, n, g, device)
        grid = _affine_grid(n, images.shape[2:], g, device)
        warped = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        warped_masks = F.grid_sample(masks, grid, mode="nearest", padding_mode="zeros", align_corners=False)
        images, masks = torch.where(do, warped, images), torch.where(do, warped_masks, masks)
    if config.intensity:
        do, gamma = _chance(p * 0.6, n, g, device), _uniform(0.7, 1.5, n, g, device).view(n, 1, 1, 1)
        lo, hi = images.amin(dim=(1, 2, 3), keepdim=True), images.amax(dim=(1, 2, 3), keepdim=True)
        contrasted = ((images - lo) / (hi - lo + 1e-7)).clamp_min(0) ** gamma * (hi - lo) + lo
        images = torch.where(do, contrasted, images)
        do, factor = _chance(p * 0.6, n, g, device), _uniform(-0.15, 0.15, n, g, device).view(n, 1, 1, 1)
        images = torch.where(do, images * (1 + factor), images)
        do, std = _chance(p * 0.3, n, g, device), _uniform(0.0, 0.03, n, g, device).view(n, 1, 1, 1)
        noise = torch.randn(images.shape, generator=g, device=device) * std
        images = torch.where(do, images + noise, images)
    return images, masks


class ResidentDataset2D(Dataset):
    """Training images on one device, uint8 [N, C, H, W] at the network size (masks [N, 1, H, W] uint8).

    Items (index i) are unaugmented and normalised like SegDataset2D's with the eval transform: {"image": [C, H, W]
    float32, "mask": [1, H, W] float32, "case", "index"}, on the device. The training loop takes whole batches
    from device_batches(order, batch_size): gathered, normalised and augmented on the device.
    """

    def __init__(
        self,
        samples: Sequence[Sample2D],
        channels: int,
        num_classes: int,
        size: Sequence[int],
        normalization: str = "auto",
        augment: AugmentConfig | None = None,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        if not samples:
            raise ValueError("no samples to build a dataset from; check the dataset folder and the split file")
        if num_classes > 255:
            raise NotResident(f"{num_classes} classes do not fit uint8 masks; set data.gpu_resident = off")
        self.device = torch.device(device)
        check_fits(len(samples), channels, size, self.device)
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # Pillow decodes without the GIL
            pairs = list(pool.map(lambda s: read_resident(s, channels, num_classes, size), samples))
        self.cases = [s.case for s in samples]
        self.images = torch.stack([im for im, _ in pairs]).to(self.device)  # [N, C, H, W] uint8
        self.masks = torch.stack([m for _, m in pairs]).to(self.device)  # [N, 1, H, W] uint8
        self.normalization, self.augment, self.seed = normalization, augment, seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Reseed the augmentation for epoch (call before taking its batches)."""
        self.epoch = epoch
        self.generator = torch.Generator(device=self.device).manual_seed(sample_seed(self.seed, epoch, 0))

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = normalize_batch(self.images[index : index + 1], self.normalization)[0]
        return {"image": image, "mask": self.masks[index].float(), "case": self.cases[index], "index": index}

    def batch(self, indices: torch.Tensor, augment: bool = True) -> dict[str, torch.Tensor]:
        """{"image": [B, C, H, W] float32, "mask": [B, 1, H, W] float32} of the samples at indices (on the device)."""
        images = normalize_batch(self.images[indices], self.normalization)
        masks = self.masks[indices].float()
        if augment and self.augment is not None:
            images, masks = augment_batch(images, masks, self.augment, self.generator)
        return {"image": images, "mask": masks}

    def device_batches(self, order: Sequence[int], batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """Augmented batches in order: full batches only (like the DataLoader's drop_last), or one partial batch
        when there are fewer samples than batch_size."""
        indices = torch.as_tensor(list(order), dtype=torch.long).to(self.device, non_blocking=True)
        n_batches = len(order) // batch_size if len(order) >= batch_size else 1
        for b in range(n_batches):
            yield self.batch(indices[b * batch_size : (b + 1) * batch_size])

    @property
    def nbytes(self) -> int:
        return self.images.numel() + self.masks.numel()
