"""Shared test fixtures: file writers for the formats rwkvseg reads, the shared data folder and the BraTS spec.

The writers are plain functions (`from conftest import save_png`, tests/ is on the pytest path), so module-level
helpers of a test file can call them too; the fixtures hand out the shared data and the BraTS spec.
"""

from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from rwkvseg.data.specs import DatasetSpec, dataset_spec

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def save_png(path: Path, array: np.ndarray, mode: str | None = None, **save_kw) -> Path:
    """An image or mask file (any format Pillow writes), folders made as needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path, **save_kw)
    return path


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    """A NIfTI file (identity affine unless given), folders made as needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


def write_brats_case(
    root: Path,
    case: str,
    images: Sequence[np.ndarray],
    seg: np.ndarray,
    spec: DatasetSpec | None = None,
    affine: np.ndarray | None = None,
) -> Path:
    """<root>/<case>/<case>_<modality>.nii.gz for each image (in the spec's modality order) and <case>_seg."""
    spec = spec or dataset_spec("brats")
    folder = root / case
    for modality, data in zip(spec.modalities, images, strict=True):
        save_nifti(folder / f"{case}{spec.separator}{modality}.nii.gz", data, affine)
    save_nifti(folder / f"{case}{spec.separator}{spec.seg_suffix}.nii.gz", seg, affine)
    return folder


@pytest.fixture(scope="session")
def brats_2mm() -> Path:
    """The compact BraTS 2018 copy in the shared data folder; tests that need it skip where it is absent."""
    path = SHARED_DATA / "brats2018_4mod_2mm"
    if not path.is_dir():
        pytest.skip("shared BraTS 2018 compact data not present")
    return path


@pytest.fixture
def no_tf32():
    """Full fp32 convolutions and matmuls on CUDA (PyTorch lets cuDNN use TF32 by default), so a comparison of
    two computations measures them, not TF32 rounding amplified through a network."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
