"""A synthetic 2D lesion dataset (no downloads): textured background, one or two irregular blobs per image.

The lesions differ from the background in colour, brightness and texture, with soft, noisy borders, so a
model must learn shape and texture cues rather than a single threshold; small models reach a high Dice in a few
CPU minutes. Output is a generic `images/` + `masks/` folder of PNGs that every rwkvseg command reads.
Fully determined by the seed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

log = logging.getLogger(__name__)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a coarse random grid upsampled bicubically."""
    coarse = rng.uniform(-1, 1, size=(max(2, shape[0] // scale), max(2, shape[1] // scale))).astype(np.float32)
    img = Image.fromarray(coarse, mode="F").resize((shape[1], shape[0]), Image.BICUBIC)
    out = np.asarray(img, dtype=np.float32)
    return out / max(float(np.abs(out).max()), 1e-6)


def _blob(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """A boolean irregular blob: an ellipse whose radius wobbles with a few random harmonics."""
    h, w = shape
    cy, cx = rng.uniform(0.25, 0.75) * h, rng.uniform(0.25, 0.75) * w
    ry, rx = rng.uniform(0.08, 0.25) * h, rng.uniform(0.08, 0.25) * w
    angle = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    ca, sa = np.cos(angle), np.sin(angle)
    u, v = (dx * ca + dy * sa) / rx, (-dx * sa + dy * ca) / ry
    theta = np.arctan2(v, u)
    radius = np.ones_like(theta)
    for k in (2, 3, 5):
        radius += rng.uniform(0.0, 0.12) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return np.hypot(u, v) <= radius


def make_lesion_image(
    rng: np.random.Generator, shape: tuple[int, int] = (96, 96), channels: int = 3, empty: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 [H, W, channels], mask uint8 [H, W] with 0/255)."""
    mask = np.zeros(shape, dtype=bool)
    if not empty:
        for _ in range(rng.integers(1, 3)):
            mask |= _blob(rng, shape)
    base = rng.uniform(0.35, 0.6, size=channels).astype(np.float32)
    lesion = np.clip(base + rng.choice([-1, 1]) * rng.uniform(0.15, 0.3, size=channels), 0, 1).astype(np.float32)
    # Soft edge: blend weight from a blurred mask, then jitter it with noise so the border is not a sharp step.
    soft = (
        np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).filter(_blur(rng)), dtype=np.float32) / 255.0
    )  # [H, W] in [0, 1]
    texture = 0.08 * _smooth_noise(rng, shape, 6)[..., None]  # [H, W, 1]
    shading = 0.12 * _smooth_noise(rng, shape, 24)[..., None]
    image = (1 - soft[..., None]) * base + soft[..., None] * (lesion + texture)  # [H, W, channels]
    image = image + shading + rng.normal(0, 0.03, size=(*shape, channels)).astype(np.float32)
    image = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    return image, mask.astype(np.uint8) * 255


def _blur(rng: np.random.Generator) -> ImageFilter.GaussianBlur:
    return ImageFilter.GaussianBlur(radius=float(rng.uniform(0.8, 2.0)))


def write_synthetic_dataset(
    out: str | Path,
    n: int = 40,
    shape: Sequence[int] = (96, 96),
    channels: int = 3,
    seed: int = 0,
    empty_fraction: float = 0.0,
    overwrite: bool = False,
) -> list[Path]:
    """Write out/images/lesion_NNN.png and out/masks/lesion_NNN.png; returns the image paths."""
    out = Path(out)
    if channels not in (1, 3):
        raise ValueError(f"synthetic images have 1 or 3 channels, not {channels}")
    images, masks = out / "images", out / "masks"
    if not overwrite and (images.exists() or masks.exists()):
        raise FileExistsError(f"{out} already holds images/ or masks/; choose an empty folder or pass overwrite")
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_empty = round(empty_fraction * n)
    empty_ids = set(rng.choice(n, size=n_empty, replace=False).tolist()) if n_empty else set()
    paths = []
    for i in range(n):
        image, mask = make_lesion_image(rng, (int(shape[0]), int(shape[1])), channels, empty=i in empty_ids)
        name = f"lesion_{i:03d}.png"
        Image.fromarray(image[..., 0] if channels == 1 else image).save(images / name)
        Image.fromarray(mask).save(masks / name)
        paths.append(images / name)
    log.info("wrote %d synthetic images and masks to %s", n, out)
    return paths
