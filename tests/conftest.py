"""Shared test fixtures."""

import pytest
import torch


@pytest.fixture
def no_tf32():
    """Full fp32 convolutions and matmuls on CUDA (PyTorch lets cuDNN use TF32 by default), so a comparison of
    two computations measures them, not TF32 rounding amplified through a network."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
