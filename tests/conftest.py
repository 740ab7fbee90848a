"""Shared test fixtures (the file writers live in tests/writers.py: `from writers import save_png`), and how the
suite shares the CPU when `make test` runs it in pytest-xdist workers (`-n 2 --dist loadfile`)."""

import locale
import os
from pathlib import Path

import pytest
import torch

from writers import SHARED_DATA

_LOCALE = locale.setlocale(locale.LC_ALL)

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one torch thread per worker, and in the processes it starts (a script's `rwkvseg train`, torchrun, Ray's
    # actors): two workers on the 2-core CI machine would otherwise run 2 x 2 threads, and a test that compares a
    # run in a subprocess with one in-process (tests/scripts/test_device_continue.py) needs both on one count
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


# Test files whose tests must not run at the same time as each other's (the federations start a Ray instance each),
# by the unit `make test` hands to one worker; every other file is a unit of its own.
SHARED_WORKER = {
    "tests/federated/test_federate.py": "ray",
    "tests/federated/test_privacy.py": "ray",
}


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: without the plugin (-p no:xdist) there is nothing to do
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile` (make test): a file's tests run on one worker, so its module-scoped fixtures (a training
    run, a federation, an export) are built once, and the files of SHARED_WORKER are one unit. (--dist loadgroup's
    xdist_group marks would say this per file, but pytest-xdist 3.8 cannot group under pytest 9.2's node ids.)"""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class Scheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)
            return SHARED_WORKER.get(scope, scope)

    return Scheduling(config, log)


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
