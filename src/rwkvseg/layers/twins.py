"""Swapping a model's convolutions in place for subclasses that compute them another way (layers/gemm_conv.py,
layers/padded_conv.py, layers/s2d_conv.py): the swap, the mixin that sends channels-last maps to the other way,
and the layout test it branches on."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .layouts import map_layout

PLAIN_CONVS = {2: nn.Conv2d, 3: nn.Conv3d}  # spatial dims -> the torch convolution the twins subclass


def is_channels_last(x: Tensor) -> bool:
    """x [B, C, *spatial] (4-D or 5-D) in channels-last strides and not also plain contiguous (C == 1, one voxel)."""
    return map_layout(x) is not torch.contiguous_format


class ChannelsLastTwin:
    """Mixed into a torch convolution subclass: channels-last maps take `channels_last_forward`, every other map
    the plain convolution."""

    def forward(self, x: Tensor) -> Tensor:
        if is_channels_last(x):
            return self.channels_last_forward(x)
        return super().forward(x)  # type: ignore[misc]

    def channels_last_forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError


def twin(conv: nn.Module, cls: type[nn.Module]) -> nn.Module:
    """An instance of cls (a subclass of conv's class) with conv's settings, sharing its weight and bias."""
    settings = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups)
    if isinstance(conv, nn.ConvTranspose2d | nn.ConvTranspose3d):
        settings["output_padding"] = conv.output_padding
    new = cls(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        **settings,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        device="meta",  # no allocation: the parameters are conv's
    )
    new.weight, new.bias = conv.weight, conv.bias
    new.train(conv.training)
    return new


def swap_convs(model: nn.Module, choose: Callable[[nn.Module], type[nn.Module] | None], what: str) -> nn.Module:
    """In place: every submodule m of model for which choose(m) names a class becomes twin(m, that class)."""
    if choose(model) is not None:
        raise ValueError(f"{what} rewrites a model's submodules; wrap a lone convolution in nn.Sequential")
    for name, module in list(model.named_modules()):
        cls = choose(module)
        if cls is not None:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, twin(module, cls))
    return model
