"""Check an exported ONNX file against the PyTorch model it came from: the largest absolute difference of the
probabilities (sigmoid / softmax as the record says) and the Dice of the two label maps, on random inputs at
conforming sizes and on real data (a Kvasir-SEG image in 2D, a BraTS patch in 3D) when the data folder exists.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.images2d import normalize, read_pixels
from .onnx import LoadedSource, load_source
from .runtime import OnnxPredictor, activate, resize_bilinear, to_labels

DATA_ROOT = Path("/work/shared/data")
KVASIR_IMAGES = Path("kvasir_seg/Kvasir-SEG/images")
BRATS_DIR = Path("brats2018_4mod_2mm")
BRATS_MODALITIES = ("t1", "t1ce", "t2", "flair")
TOLERANCE = 1e-4  # fp32 target on the probabilities


@dataclass(frozen=True)
class CheckRow:
    """One comparison: input kind ("random" or the real file's name), its shape, the largest absolute
    probability difference, and the Dice of the label maps (1.0 when both are empty)."""

    model: str
    input: str
    shape: tuple[int, ...]
    max_abs_diff: float
    dice: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= TOLERANCE and self.dice >= 1 - 1e-3


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Mean Dice over the foreground labels present in a or b; 1.0 when neither has foreground."""
    scores = []
    for label in np.union1d(np.unique(a), np.unique(b)):
        if label == 0:
            continue
        x, y = a == label, b == label
        scores.append(2.0 * np.logical_and(x, y).sum() / (x.sum() + y.sum()))
    return float(np.mean(scores)) if scores else 1.0


def conforming_shapes(axes, batch: int = 2) -> list[tuple[int, ...]]:
    """Two input sizes per export: the smallest allowed, and a larger non-square one (one multiple more on the
    last dynamic axis)."""
    small = [a if isinstance(a, int) else a["min"] for a in axes]
    large = list(small)
    for i in reversed(range(len(axes))):
        if not isinstance(axes[i], int):
            large[i] += axes[i]["multiple"]
            break
    return [(batch, *small), (1, *large)]


def kvasir_input(predictor: OnnxPredictor, root: Path = DATA_ROOT) -> tuple[str, np.ndarray] | None:
    """(name, network input [1, C, h, w]) from the first Kvasir-SEG image, by the record's protocol; None when
    the data folder is absent."""
    folder = root / KVASIR_IMAGES
    files = sorted(folder.glob("*.jpg")) if folder.is_dir() else []
    if not files:
        return None
    channels = predictor.record["in_channels"]
    pixels = read_pixels(files[0], 3)
    if channels == 1:
        pixels = pixels.mean(axis=2, keepdims=True).round().astype(np.uint8)
    elif channels != 3:
        return None
    if "size" in predictor.preprocessing:
        x = predictor.preprocess(pixels)
    else:  # randomly initialised: 8-bit scaling, resized to the smallest conforming size above 256
        size = [max(a["min"], 256 // a["multiple"] * a["multiple"]) for a in predictor.record["axes"]]
        x = resize_bilinear(normalize(pixels).transpose(2, 0, 1), size)
    return files[0].name, x[None]


def brats_input(predictor: OnnxPredictor, root: Path = DATA_ROOT) -> tuple[str, np.ndarray] | None:
    """(name, [1, 4, D, H, W]) patch at the brain's centre of the first BraTS case (z-scored per modality inside
    the brain, slice axis first) at the export's smallest size; None when the data folder is absent."""
    folder = root / BRATS_DIR
    cases = sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    if not cases or predictor.record["in_channels"] != len(BRATS_MODALITIES):
        return None
    import nibabel as nib

    case = cases[0]
    vol = np.stack(
        [np.asarray(nib.load(case / f"{case.name}_{m}.nii.gz").dataobj, dtype=np.float32) for m in BRATS_MODALITIES]
    ).transpose(0, 3, 2, 1)  # [M, x, y, z] -> [M, z, y, x]: slice axis first
    brain = (vol != 0).any(0)
    for m in range(vol.shape[0]):
        values = vol[m][brain]
        vol[m] = np.where(brain, (vol[m] - values.mean()) / max(values.std(), 1e-6), 0)
    size = [a if isinstance(a, int) else a["min"] for a in predictor.record["axes"]]
    centre = [int(np.mean(ix)) for ix in np.nonzero(brain)]
    patch = np.zeros((vol.shape[0], *size), np.float32)
    src, dst = [], []
    for c, s, n in zip(centre, size, vol.shape[1:], strict=True):
        lo = min(max(c - s // 2, 0), max(n - s, 0))
        src.append(slice(lo, min(lo + s, n)))
        dst.append(slice(0, min(s, n - lo)))
    patch[(slice(None), *dst)] = vol[(slice(None), *src)]
    return case.name, patch[None]


def compare(loaded: LoadedSource, predictor: OnnxPredictor, x: np.ndarray, label: str) -> CheckRow:
    """Probabilities of the PyTorch model and onnxruntime on the same network-ready x."""
    with torch.no_grad():
        reference = activate(loaded.model(torch.from_numpy(x)).numpy(), predictor.activation)
    probs = predictor.predict_batch(x)
    diff = float(np.abs(probs - reference).max())
    scores = [
        dice(to_labels(p, predictor.activation), to_labels(r, predictor.activation))
        for p, r in zip(probs, reference, strict=True)
    ]
    source = predictor.record["source"]
    name = source["name"] if source.get("kind") == "released" else predictor.record["model"]
    return CheckRow(name, label, tuple(x.shape), diff, float(np.mean(scores)))


def source_of(predictor: OnnxPredictor) -> LoadedSource:
    """Rebuild the PyTorch model an export came from, from its record (a registered model with its seed,
    channels and overrides)."""
    src = predictor.record["source"]
    if src["kind"] == "registered":
        return load_source(
            src["name"],
            seed=src["seed"],
            in_channels=src["in_channels"],
            num_classes=src["num_classes"],
            overrides=predictor.record.get("model_overrides"),
        )
    return load_source(src["name"] if src["kind"] == "released" else src["path"])


def verify_onnx(
    onnx_path: str | os.PathLike,
    source: LoadedSource | str | None = None,
    *,
    real: bool = True,
    data_root: str | os.PathLike = DATA_ROOT,
    seed: int = 0,
    threads: int | None = None,
) -> list[CheckRow]:
    """Compare an exported file with its PyTorch model (rebuilt from the record unless given) on random inputs
    at two conforming sizes and, with real=True, on one real input when the data folder holds one. A source
    given as the name of the registered model the record came from is rebuilt as the record says (its seed,
    channels and overrides), not with the defaults."""
    predictor = OnnxPredictor(onnx_path, threads=threads)
    src = predictor.record["source"]
    if isinstance(source, LoadedSource):
        loaded = source
    elif source is None or (src["kind"] == "registered" and str(source) == src["name"]):
        loaded = source_of(predictor)
    else:
        loaded = load_source(source)
    rng = np.random.default_rng(seed)
    rows = []
    for shape in conforming_shapes(predictor.record["axes"]):
        x = rng.standard_normal((shape[0], predictor.record["in_channels"], *shape[1:]), dtype=np.float32)
        rows.append(compare(loaded, predictor, x, "random"))
    if real:
        sample = (kvasir_input if predictor.dims == 2 else brats_input)(predictor, Path(data_root))
        if sample is not None:
            rows.append(compare(loaded, predictor, sample[1], sample[0]))
    return rows


def format_table(rows: list[CheckRow]) -> str:
    """Markdown table of check rows."""
    lines = ["| model | input | shape | max abs diff | Dice |", "|---|---|---|---|---|"]
    for r in rows:
        shape = "x".join(map(str, r.shape))
        lines.append(f"| {r.model} | {r.input} | {shape} | {r.max_abs_diff:.2e} | {r.dice:.4f} |")
    return "\n".join(lines)
