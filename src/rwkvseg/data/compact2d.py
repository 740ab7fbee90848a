"""A compact, resized copy of a 2D dataset, for shipping real data to a remote GPU (a few tens of MB).

The copy keeps the dataset's groups and image names in the generic images/ + masks/ layout, so
`discover_pairs` finds the same cases in it (and a split file written for the original applies unchanged).
Images are resized with Pillow (bicubic, antialiased) and stored as JPEG; masks are merged (the union of an
image's mask files), resized as a fraction map (bilinear) and thresholded at 0.5, then stored as 0/255 PNG.
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..files import MARKER, check_apart, check_replaceable, file_mode
from .images2d import Sample2D, discover_pairs, read_mask

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompactSummary:
    cases: int
    groups: tuple[str, ...]
    bytes: int
    destination: Path


def _resized_image(path: Path, size: int) -> Image.Image:
    with Image.open(path) as img:
        img.load()
        if img.mode not in ("L", "RGB"):
            # 16-bit and palette images to 8-bit; alpha dropped (not an intensity)
            img = img.convert("RGB") if img.mode in ("RGBA", "P", "CMYK", "YCbCr", "LA") else img.convert("L")
        return img.resize((size, size), Image.Resampling.BICUBIC)


def _resized_mask(sample: Sample2D, size: int) -> Image.Image:
    mask = np.zeros((1, 1), dtype=np.float32)
    for i, path in enumerate(sample.masks):
        m = (read_mask(path) > 0).astype(np.float32)
        mask = m if i == 0 else np.maximum(mask, m)
    fraction = Image.fromarray(mask, mode="F").resize((size, size), Image.Resampling.BILINEAR)
    return Image.fromarray(((np.asarray(fraction) >= 0.5) * 255).astype(np.uint8), mode="L")


def export_compact(
    source: str | Path, destination: str | Path, size: int = 256, quality: int = 95, overwrite: bool = False
) -> CompactSummary:
    """Write the resized copy of the dataset below `source` into `destination` (built aside, then renamed)."""
    destination = Path(destination)
    if size < 16:
        raise ValueError(f"size {size} is too small; use at least 16 (the models downsample by 16)")
    check_apart(destination, [source], "destination")
    if destination.exists():
        check_replaceable(destination)  # only a copy this command wrote is ever replaced
        if not overwrite:
            raise FileExistsError(f"{destination} exists; pass --overwrite to replace it or choose another folder")
    samples = discover_pairs(source)
    unlabelled = [s.image for s in samples if not s.masks]
    if unlabelled:
        raise ValueError(f"{len(unlabelled)} images below {source} have no mask, e.g. {unlabelled[0]}; add the masks")
    destination.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=destination.parent, prefix=f".{destination.name}."))
    try:
        labels: dict[str, dict[str, str]] = {}
        for s in samples:
            folder = work / s.group if s.group else work
            (folder / "images").mkdir(parents=True, exist_ok=True)
            (folder / "masks").mkdir(parents=True, exist_ok=True)
            stem = s.image.stem
            _resized_image(s.image, size).save(folder / "images" / f"{stem}.jpg", quality=quality)
            _resized_mask(s, size).save(folder / "masks" / f"{stem}.png")
            if s.label is not None and s.label != s.group:
                labels.setdefault(s.group, {})[stem] = s.label
        for group, table in labels.items():
            with (work / group / "labels.csv").open("w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                writer.writerow(["image", "label"])
                writer.writerows(sorted(table.items()))
        (work / MARKER).write_text("written by rwkvseg compact2d; --overwrite may replace this folder\n")
        os.chmod(work, file_mode(folder=True))  # mkdtemp makes 0700
        if destination.exists():
            shutil.rmtree(destination)
        os.replace(work, destination)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    total = sum(p.stat().st_size for p in destination.rglob("*") if p.is_file())
    groups = tuple(sorted({s.group for s in samples}))
    log.info("wrote %d cases (%s) to %s: %.1f MB", len(samples), groups, destination, total / 1e6)
    return CompactSummary(len(samples), groups, total, destination)
