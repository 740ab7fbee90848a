"""The `memory_format` setting of training, prediction and the benchmarks: "contiguous" (NCHW / NCDHW, torch's
default) or "channels_last" (NHWC / NDHWC: torch.channels_last for 4-D tensors, torch.channels_last_3d for 5-D
ones), the layout cuDNN's bf16 convolutions run in; with NCHW maps each convolution transposes its input and output.

Only strides change, never values. A model is converted once, after it is built and before torch.compile (which
specializes on strides), DDP or an optimizer sees its parameters; its inputs are converted per batch (or per
sliding window) on the device. Torch only: the benchmarks, training and prediction share it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

MEMORY_FORMATS = ("contiguous", "channels_last")


def check_memory_format(memory_format: str, name: str = "memory_format") -> None:
    """A clear error for a setting that is not one of MEMORY_FORMATS."""
    if memory_format not in MEMORY_FORMATS:
        raise ValueError(f"{name} = {memory_format!r} is not valid; choose one of {', '.join(MEMORY_FORMATS)}")


def torch_layout(memory_format: str, ndim: int) -> torch.memory_format:
    """torch's layout of a tensor with ndim dimensions [B, C, *spatial] in memory_format: contiguous_format, or
    channels_last (ndim 4) / channels_last_3d (ndim 5)."""
    check_memory_format(memory_format)
    if memory_format == "contiguous":
        return torch.contiguous_format
    if ndim not in (4, 5):
        raise ValueError(f"channels_last needs a 4D or 5D input [B, C, *spatial], got a {ndim}D tensor")
    return torch.channels_last if ndim == 4 else torch.channels_last_3d


def map_layout(x: torch.Tensor) -> torch.memory_format:
    """A map's own layout: channels-last for a 4-D / 5-D map in that layout that is not also plain contiguous (as
    with C == 1), else contiguous."""
    if x.dim() in (4, 5) and not x.is_contiguous():
        layout = torch_layout("channels_last", x.dim())
        if x.is_contiguous(memory_format=layout):
            return layout
    return torch.contiguous_format


def tensor_to(x: torch.Tensor, memory_format: str) -> torch.Tensor:
    """x [B, C, *spatial] in memory_format (x itself when it already is)."""
    return x.contiguous(memory_format=torch_layout(memory_format, x.dim()))


def module_to(model: nn.Module, memory_format: str, spatial_dims: int) -> nn.Module:
    """model with its 4-D (spatial_dims 2) or 5-D (3) parameters and buffers in memory_format, converted in place.
    The Parameter objects stay the same, so an optimizer built earlier still updates them, but state it already
    holds (momentum) keeps the old layout: convert before building it."""
    return model.to(memory_format=torch_layout(memory_format, spatial_dims + 2))


def to_memory_format(model: nn.Module, x: torch.Tensor, memory_format: str) -> torch.Tensor:
    """Converts model in place (its parameters and buffers of x's rank) and returns x [B, C, *spatial] in
    memory_format."""
    module_to(model, memory_format, x.dim() - 2)
    return tensor_to(x, memory_format)


def fed_in(model: Callable[[torch.Tensor], torch.Tensor], memory_format: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """model, called with its input [B, C, *spatial] in memory_format: for a channels-last model under a caller
    that makes its own batches (the sliding window's windows, mirror flips). model itself when contiguous."""
    check_memory_format(memory_format)
    if memory_format == "contiguous":
        return model
    return lambda x: model(tensor_to(x, memory_format))
