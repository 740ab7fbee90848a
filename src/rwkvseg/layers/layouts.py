"""A map's memory layout: the one the fused instance norm computes in, shared by its operators (norm.py) and its
Triton kernels (instance_norm_triton.py) without pulling MONAI or Triton into either, and the one the convolution
twins (twins.py) branch on (`map_layout`, defined with the memory_format setting). Torch only."""

from __future__ import annotations

import torch
from torch import Tensor

from ..memory_format import map_layout

__all__ = ["empty_in_layout", "instance_norm_layout", "map_layout"]


def instance_norm_layout(x: Tensor) -> torch.memory_format:
    """The layout rwkvseg::instance_norm_act computes in and returns (y, and gx in the backward): x's own
    (map_layout)."""
    return map_layout(x)


def empty_in_layout(x: Tensor, layout: torch.memory_format) -> Tensor:
    """An uninitialized tensor like x in layout's standard strides (empty_like would copy x's strides)."""
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=layout)
