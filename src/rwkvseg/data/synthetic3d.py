"""Synthetic multimodal brain-tumour phantoms (no downloads) written as BraTS-style case folders.

Each case is a wobbly ellipsoid "brain" with a tumour made of nested irregular blobs: edema (label 2) around a
core of enhancing tumour (4) that rings a necrotic centre (1). The four modalities see the compartments with
BraTS-like contrasts (edema bright on T2/FLAIR, the ring bright on T1ce, necrosis dark on T1/T1ce), under a
smooth bias field, texture and noise, so a model must combine modalities to separate WT / TC / ET. Files are
`<root>/<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz` (int16 images, uint8 labels), readable by every 3D command
with the `brats` preset. Fully determined by the seed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..files import check_replaceable, mark_owned

log = logging.getLogger(__name__)

MODALITIES = ("t1", "t1ce", "t2", "flair")
# Mean intensity per modality of (brain, edema, enhancing, necrosis), on a 0..1 scale.
CONTRASTS: dict[str, tuple[float, float, float, float]] = {
    "t1": (0.60, 0.48, 0.55, 0.30),
    "t1ce": (0.58, 0.50, 1.00, 0.28),
    "t2": (0.45, 0.90, 0.70, 1.00),
    "flair": (0.40, 0.95, 0.72, 0.55),
}


def _smooth_noise(rng: np.random.Generator, shape: Sequence[int], cells: int) -> np.ndarray:
    """Low-frequency noise in about [-1, 1]: a coarse random grid (cells per axis) upsampled with cubic splines."""
    from scipy.ndimage import zoom

    coarse = rng.uniform(-1, 1, size=(cells,) * len(shape))
    factors = [n / cells for n in shape]
    out = zoom(coarse, factors, order=3, mode="reflect", grid_mode=True)[tuple(slice(0, n) for n in shape)]
    return (out / max(float(np.abs(out).max()), 1e-6)).astype(np.float32)


def _blob(grid: np.ndarray, centre: np.ndarray, radii: np.ndarray, wobble: np.ndarray, amount: float) -> np.ndarray:
    """Voxels inside an ellipsoid whose radius is modulated by a smooth noise field (grid [3, *S])."""
    distance = np.sqrt(sum(((grid[a] - centre[a]) / radii[a]) ** 2 for a in range(3)))  # [*S]
    return distance <= 1 + amount * wobble


def make_phantom(
    rng: np.random.Generator, shape: Sequence[int] = (44, 52, 40), necrosis: bool = True
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """({modality: float32 [*shape] in 0..1}, label values uint8 [*shape] with 0, 1, 2, 4), axes (i, j, k)."""
    from scipy.ndimage import gaussian_filter

    shape = tuple(int(n) for n in shape)
    size = np.asarray(shape, dtype=np.float32)
    grid = np.indices(shape, dtype=np.float32)  # [3, *S]
    brain = _blob(
        grid, size / 2 + rng.uniform(-1, 1, 3), size * rng.uniform(0.36, 0.44, 3), _smooth_noise(rng, shape, 4), 0.08
    )

    # the tumour sits well inside the brain; radii in voxels scale with the smallest axis
    r_edema = float(size.min()) * rng.uniform(0.2, 0.28)
    centre = size / 2 + rng.uniform(-1, 1, 3) * (size * 0.36 - r_edema * 1.2).clip(0)
    edema = _blob(grid, centre, r_edema * rng.uniform(0.8, 1.2, 3), _smooth_noise(rng, shape, 5), 0.25) & brain
    core_centre = centre + rng.uniform(-0.15, 0.15, 3) * r_edema
    core = _blob(grid, core_centre, r_edema * rng.uniform(0.62, 0.78, 3), _smooth_noise(rng, shape, 5), 0.2) & edema
    centre_mask = _blob(grid, core_centre, r_edema * rng.uniform(0.4, 0.5, 3), _smooth_noise(rng, shape, 5), 0.2)
    necrotic = centre_mask & core if necrosis else np.zeros(shape, dtype=bool)
    label = np.zeros(shape, dtype=np.uint8)
    label[edema] = 2
    label[core] = 4
    label[necrotic] = 1

    bias = 1 + 0.12 * _smooth_noise(rng, shape, 3)  # one coil field, shared by the co-registered modalities
    compartments = (brain, edema, core, necrotic)
    images = {}
    for modality in MODALITIES:
        contrast = CONTRASTS[modality]
        tissue = np.zeros(shape, dtype=np.float32)
        for mask, value in zip(compartments, contrast, strict=True):
            tissue[mask] = value * rng.uniform(0.95, 1.05)  # later (inner) compartments overwrite outer ones
        tissue = gaussian_filter(tissue, sigma=0.5)  # partial-volume edges
        texture = 0.05 * _smooth_noise(rng, shape, 8)
        image = (tissue + texture * (tissue > 0.05)) * bias + rng.normal(0, 0.02, shape).astype(np.float32)
        images[modality] = np.where(brain, np.clip(image, 0.01, None), 0).astype(
            np.float32
        )  # skull-stripped: 0 outside
    return images, label


def write_synthetic_volumes(
    out: str | Path,
    n: int = 8,
    shape: Sequence[int] = (44, 52, 40),
    spacing: float = 2.0,
    seed: int = 0,
    overwrite: bool = False,
) -> list[Path]:
    """Write n phantom cases `out/Phantom_NNN/Phantom_NNN_<modality>.nii.gz` (+ `_seg`); returns the case folders.

    shape: voxels along the file axes (i, j, k); spacing: isotropic voxel size in mm (the BraTS 2 mm copy is
    about 70 x 86 x 69). Every fourth case has no necrosis, as real cases sometimes lack a label.
    """
    import nibabel as nib

    out = Path(out)
    if n < 1 or len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"need n >= 1 cases and a shape of three sizes >= 8, got n={n}, shape={list(shape)}")
    if out.exists() and any(out.iterdir()):
        check_replaceable(out)  # --overwrite writes only into a folder rwkvseg made
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; choose an empty folder or pass overwrite (--overwrite)")
    mark_owned(out, "synthetic3d")
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = -np.asarray(shape) * spacing / 2  # centred on the world origin, like MNI-registered scans
    rng = np.random.default_rng(seed)
    folders = []
    for index in range(n):
        case = f"Phantom_{index:03d}"
        folder = out / case
        folder.mkdir(parents=True, exist_ok=True)
        images, label = make_phantom(rng, shape, necrosis=index % 4 != 3)
        for modality, image in images.items():
            data = np.round(image * 1000).astype(np.int16)
            nib.save(nib.Nifti1Image(data, affine), folder / f"{case}_{modality}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), folder / f"{case}_seg.nii.gz")
        folders.append(folder)
    log.info(
        "wrote %d synthetic BraTS-style cases (%s voxels, %g mm) to %s", n, "x".join(map(str, shape)), spacing, out
    )
    return folders
