"""A map's memory layout: the one the fused instance norm computes in, shared by its operators (norm.py) and its
Triton kernels (instance_norm_triton.py) without pulling MONAI or Triton into either, and the one the convolution
twins (twins.py) branch on. Torch only."""

from __future__ import annotations

import torch
from torch import Tensor

from ..memory_format import torch_layout


def map_layout(x: Tensor) -> torch.memory_format:
    """A map's own layout: channels-last for a 4-D / 5-D map in that layout that is not also plain contiguous (as
    with C == 1), else contiguous."""
    if x.dim() in (4, 5) and not x.is_contiguous():
        layout = torch_layout("channels_last", x.dim())
        if x.is_contiguous(memory_format=layout):
            return layout
    return torch.contiguous_format


def instance_norm_layout(x: Tensor) -> torch.memory_format:
    """The layout rwkvseg::instance_norm_act computes in and returns (y, and gx in the backward): x's own
    (map_layout)."""
    return map_layout(x)


def empty_in_layout(x: Tensor, layout: torch.memory_format) -> Tensor:
    """An uninitialized tensor like x in layout's standard strides (empty_like would copy x's strides)."""
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=layout)
