"""Shared test fixtures (the file writers live in tests/writers.py: `from writers import save_png`)."""

import locale
from pathlib import Path

import pytest
import torch

from writers import SHARED_DATA

_LOCALE = locale.setlocale(locale.LC_ALL)


@pytest.fixture(autouse=True)
def _keep_locale():
    """Restore the process locale after each test: a library that switches it to C makes Python decode files
    (torch's Inductor templates, subprocess output) as ASCII for every later test."""
    yield
    if locale.setlocale(locale.LC_ALL) != _LOCALE:
        locale.setlocale(locale.LC_ALL, _LOCALE)


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """Restore torch's CPU thread count after each test: a script's main() called in-process sets it (as its
    --threads says) for the whole process, and a later test would run, and report, with that count."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


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
