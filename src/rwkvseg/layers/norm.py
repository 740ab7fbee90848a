"""Norm layers: LayerNorm over the channels of a channels-first map, and an instance norm for CUDA that spreads
each (sample, channel) reduction over many thread blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LayerNormChannelsFirst(nn.LayerNorm):
    """LayerNorm over the channel axis of a channels-first map [B, C, *spatial]."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)


class _InstanceNormFunction(torch.autograd.Function):
    """Affine-free instance norm with at least fp32 statistics; saves only the input and per-(sample, channel) stats."""

    @staticmethod
    def forward(ctx, x: Tensor, eps: float) -> Tensor:
        dims = tuple(range(2, x.dim()))
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        var, mean = torch.var_mean(xf, dim=dims, keepdim=True, correction=0)
        rstd = torch.rsqrt(var + eps)
        ctx.save_for_backward(x, mean, rstd)
        return ((xf - mean) * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, gy: Tensor) -> tuple[Tensor, None]:
        x, mean, rstd = ctx.saved_tensors
        dims = tuple(range(2, x.dim()))
        xhat = (x.to(mean.dtype) - mean) * rstd
        g = gy.to(mean.dtype)
        gx = rstd * (g - g.mean(dims, keepdim=True) - xhat * (g * xhat).mean(dims, keepdim=True))
        return gx.to(x.dtype), None


class InstanceNormFast(nn.Module):
    """Drop-in for nn.InstanceNorm{2,3}d without running stats, same numbers, faster on CUDA.

    PyTorch's CUDA instance norm reduces each (sample, channel) with one thread block, so a 32-channel 128^3 map
    keeps most of the GPU idle (measured on one H100: 68 % of MMSegRWKV's bf16 inference kernel time went to its
    instance norms). A plain var_mean spreads each long reduction over many blocks, at the price of fp32
    temporaries of the map's size. On the CPU the native op is used.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = False) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_features)) if affine else None

    def forward(self, x: Tensor) -> Tensor:
        if not x.is_cuda:
            return F.instance_norm(x, weight=self.weight, bias=self.bias, eps=self.eps)
        y = _InstanceNormFunction.apply(x, self.eps)
        if self.weight is not None:
            shape = (1, -1) + (1,) * (x.dim() - 2)
            y = y * self.weight.view(shape).to(y.dtype) + self.bias.view(shape).to(y.dtype)
        return y


def use_fast_instance_norm(model: nn.Module) -> nn.Module:
    """Replace every nn.InstanceNorm{2,3}d without running stats in model by InstanceNormFast (in place)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, (nn.InstanceNorm2d, nn.InstanceNorm3d)) and not module.track_running_stats:
            fast = InstanceNormFast(module.num_features, module.eps, module.affine)
            if module.affine:
                fast.load_state_dict(module.state_dict())
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, fast)
    return model
