"""The files 2D prediction writes for each input `<stem>`, with numpy and Pillow alone (no torch), so that the
checkpoint path (infer.predict2d) and the onnxruntime path (export.runtime.predict_files) write the same files:
- `<out>/<stem>.png`: the mask (binary: 0/255; multi-class: the class index as gray value)
- `<out>/overlays/<stem>.png` (optional): the image with each class tinted and its border drawn
- `<out>/probabilities/<stem>.png` (one channel: the 8-bit probability) or `.npy` ([K, H, W] float16, several)
Each file is written atomically (rwkvseg.files.atomic_write).
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ..files import atomic_write

# Distinct tints for up to 8 foreground classes (RGB); class k uses OVERLAY_COLOURS[(k - 1) % 8].
OVERLAY_COLOURS = np.array(
    [
        [255, 64, 64],
        [64, 200, 64],
        [64, 128, 255],
        [255, 200, 0],
        [200, 64, 255],
        [0, 220, 220],
        [255, 128, 0],
        [255, 0, 160],
    ],
    dtype=np.float32,
)


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.35) -> np.ndarray:
    """uint8 RGB [H, W, 3]: the image with each class tinted and its border drawn in full colour."""
    base = image[..., :3] if image.shape[2] >= 3 else np.repeat(image[..., :1], 3, axis=2)
    base = np.clip(base * 255.0, 0, 255).astype(np.float32)
    out = base.copy()
    for k in np.unique(labels):
        if k == 0:
            continue
        colour = OVERLAY_COLOURS[(int(k) - 1) % len(OVERLAY_COLOURS)]
        region = labels == k
        out[region] = (1 - alpha) * base[region] + alpha * colour
        padded = np.pad(region, 1, mode="edge")
        inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
        out[region & ~inner] = colour
    return out.round().astype(np.uint8)


def png_bytes(array: np.ndarray, compress_level: int = 6) -> bytes:
    """array as PNG bytes (compress_level 0-9: Pillow's, 6 by default; the service takes 1, speed over size)."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def mask_image(labels: np.ndarray, multiclass: bool) -> np.ndarray:
    """The mask file's pixels for labels [H, W] uint8: 0/255 for a binary model, the class index otherwise."""
    return labels if multiclass else labels * np.uint8(255)


def write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def output_paths(inputs: Sequence[Path], out: Path, overlays: bool, probs: bool, multiclass: bool) -> list[Path]:
    """Every file written for inputs (masks first); an error when two inputs share a stem."""
    stems = [Path(p).stem for p in inputs]
    repeats = sorted(s for s, n in Counter(stems).items() if n > 1)
    if repeats:
        raise ValueError(f"several inputs share a name ({repeats[:5]}); their masks would collide, rename them")
    paths = [out / f"{s}.png" for s in stems]
    if overlays:
        paths += [out / "overlays" / f"{s}.png" for s in stems]
    if probs:
        paths += [out / "probabilities" / f"{s}{'.npy' if multiclass else '.png'}" for s in stems]
    return paths


def probability_file(probabilities: np.ndarray, multiclass: bool) -> tuple[bytes, str]:
    """The bytes of one image's probability file and its suffix: [K, H, W] float as an 8-bit PNG of the one channel
    (binary models: round(255 p)), or as float16 .npy of every channel (several classes)."""
    if multiclass:
        buf = io.BytesIO()
        np.save(buf, np.asarray(probabilities).astype(np.float16))
        return buf.getvalue(), ".npy"
    p8 = (np.asarray(probabilities[0], dtype=np.float32) * 255).round().astype(np.uint8)
    return png_bytes(p8), ".png"


def write_outputs(
    out: Path,
    stem: str,
    labels: np.ndarray,
    multiclass: bool,
    *,
    image: np.ndarray | None = None,
    probabilities: np.ndarray | None = None,
) -> Path:
    """One input's files: the mask of labels [H, W] uint8, its overlay on image (float [H, W, C] as read_image
    returns it) when given, and probabilities [K, H, W] (float) when given. Returns the mask's path."""
    write_bytes(out / f"{stem}.png", png_bytes(mask_image(labels, multiclass)))
    if image is not None:
        write_bytes(out / "overlays" / f"{stem}.png", png_bytes(overlay(image, labels)))
    if probabilities is not None:
        data, suffix = probability_file(probabilities, multiclass)
        write_bytes(out / "probabilities" / f"{stem}{suffix}", data)
    return out / f"{stem}.png"
