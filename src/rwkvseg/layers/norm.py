"""Norm layers: LayerNorm over the channels of a channels-first map, and instance norms for CUDA that spread each
(sample, channel) reduction over many thread blocks: InstanceNormFast (plain var_mean, fp32 temporaries) and
FusedInstanceNormAct (Triton, fused with the following activation, no temporaries of the map's size).

FusedInstanceNormAct reaches its kernels through torch.library custom ops (`rwkvseg::instance_norm_act` and its
backward) with fake implementations and a registered autograd formula: torch.compile(fullgraph=True) and CUDA graphs
then see two opaque ops instead of tracing into Triton launchers (Inductor would fuse plain torch ops, but back into
the two-pass fp32 temporaries this replaces). On the CPU the module runs the plain ops F.instance_norm and
F.leaky_relu, which compile and fuse as usual; the ops themselves run the same computation in torch ops off CUDA,
so that they can be checked (torch.library.opcheck) on any machine.

The ops keep a channels-last layout: a 4-D `torch.channels_last` or 5-D `torch.channels_last_3d` map (one that is
not also plain contiguous, as with C == 1) is read in that layout by the channels-last kernels, with no copy to
channels-first, and y and gx come back channels-last (gy is converted to x's layout), so the convolution after a
norm in a channels-last network need not transpose again. Any other input is made contiguous and y and gx come back
contiguous, as before. `layouts.instance_norm_layout` is the rule (shared with the kernels); the real
implementations (Triton on CUDA, torch ops elsewhere) and the fake ones follow it and return its standard strides.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.blocks.dynunet_block import UnetResBlock
from torch import Tensor, nn

from .layouts import empty_in_layout, instance_norm_layout


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


def _stats_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _per_row(t: Tensor | None, x: Tensor) -> Tensor | None:
    """A per-row value [B * C] (or per-channel [C]) as [B, C, 1, ...] against x."""
    if t is None:
        return None
    return t.to(_stats_dtype(x)).view(
        -1 if t.numel() == x.shape[0] * x.shape[1] else 1, x.shape[1], *[1] * (x.dim() - 2)
    )


def _reference_forward(x: Tensor, weight, bias, eps: float, slope: float) -> tuple[Tensor, Tensor, Tensor]:
    """The kernels' computation in plain torch ops (fp32 statistics): the op's implementation off CUDA."""
    xf = x.to(_stats_dtype(x))
    var, mean = torch.var_mean(xf, dim=tuple(range(2, x.dim())), correction=0)
    rstd = torch.rsqrt(var + eps)
    z = (xf - _per_row(mean, x)) * _per_row(rstd, x)
    if weight is not None:
        z = z * _per_row(weight, x) + _per_row(bias, x)
    return torch.where(z > 0, z, z * slope).to(x.dtype), mean.flatten(), rstd.flatten()


def _reference_backward(gy: Tensor, x: Tensor, weight, bias, mean, rstd, slope: float):
    dims = tuple(range(2, x.dim()))
    xhat = (x.to(_stats_dtype(x)) - _per_row(mean, x)) * _per_row(rstd, x)
    w = _per_row(weight, x) if weight is not None else 1.0
    z = xhat * w + _per_row(bias, x) if weight is not None else xhat
    gy = gy.to(xhat.dtype)
    g = torch.where(z > 0, gy, gy * slope)
    s1, s2 = g.sum(dims, keepdim=True), (g * xhat).sum(dims, keepdim=True)
    n = xhat[0, 0].numel()
    gx = (_per_row(rstd, x) * w * (g - s1 / n - xhat * s2 / n)).to(x.dtype)
    if weight is None:
        return gx, None, None
    return gx, s2.flatten(1).sum(0).to(weight.dtype), s1.flatten(1).sum(0).to(bias.dtype)


@torch.library.custom_op("rwkvseg::instance_norm_act", mutates_args=())
def _instance_norm_act(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, slope: float
) -> tuple[Tensor, Tensor, Tensor]:
    # y comes in instance_norm_layout(x)'s standard strides whatever x's: the fake below promises exactly that
    layout = instance_norm_layout(x)
    x = x.contiguous(memory_format=layout)
    if not x.is_cuda:
        y, mean, rstd = _reference_forward(x, weight, bias, eps, slope)
        return empty_in_layout(y, layout).copy_(y), mean, rstd
    from . import instance_norm_triton

    return instance_norm_triton.forward(x, weight, bias, eps, slope)


@_instance_norm_act.register_fake
def _(x, weight, bias, eps, slope):
    rows = x.shape[0] * x.shape[1]
    stats = _stats_dtype(x)
    return empty_in_layout(x, instance_norm_layout(x)), x.new_empty(rows, dtype=stats), x.new_empty(rows, dtype=stats)


@torch.library.custom_op("rwkvseg::instance_norm_act_backward", mutates_args=())
def _instance_norm_act_backward(
    gy: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, rstd: Tensor, slope: float
) -> tuple[Tensor, Tensor, Tensor]:
    layout = instance_norm_layout(x)  # gx in x's layout, as y was
    x = x.contiguous(memory_format=layout)
    if not x.is_cuda:
        gx, gw, gb = _reference_backward(gy, x, weight, bias, mean, rstd, slope)
        gx = empty_in_layout(gx, layout).copy_(gx)
    else:
        from . import instance_norm_triton

        gx, gw, gb = instance_norm_triton.backward(gy, x, weight, bias, mean, rstd, slope)
    if gw is None:  # custom ops return tensors (never aliases of each other): empty ones stand for "no affine"
        return gx, x.new_empty(0), x.new_empty(0)
    return gx, gw, gb


@_instance_norm_act_backward.register_fake
def _(gy, x, weight, bias, mean, rstd, slope):
    gx = empty_in_layout(x, instance_norm_layout(x))
    if weight is None:
        return gx, x.new_empty(0), x.new_empty(0)
    return gx, torch.empty_like(weight), torch.empty_like(bias)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, _, slope = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)  # x, not x_hat: the backward recomputes it
    ctx.slope = slope
    ctx.affine = weight is not None


def _backward(ctx, gy, _gmean, _grstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    gx, gw, gb = torch.ops.rwkvseg.instance_norm_act_backward(gy, x, weight, bias, mean, rstd, ctx.slope)
    return gx, (gw if ctx.affine else None), (gb if ctx.affine else None), None, None


_instance_norm_act.register_autograd(_backward, setup_context=_setup_context)


def instance_norm_act(
    x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5, slope: float = 1.0
) -> Tensor:
    """act(instance_norm(x, weight, bias)) of x [B, C, *spatial], act(z) = z if z > 0 else slope * z (slope 1: no
    activation, 0: ReLU, 0.01: MONAI's LeakyReLU), returned in instance_norm_layout(x) on every device
    (channels-last stays channels-last, where F.instance_norm returns a contiguous map). fp32 statistics; on CUDA
    one fused Triton pass per direction; elsewhere the plain ops, which torch.compile fuses as usual (the layout
    then only sets the strides Inductor writes, as the CUDA op's do: the convolutions after it read the same
    layout on either device)."""
    if x.is_cuda:
        return torch.ops.rwkvseg.instance_norm_act(x, weight, bias, eps, slope)[0]
    y = F.instance_norm(x, weight=weight, bias=bias, eps=eps)
    y = y if slope == 1.0 else F.leaky_relu(y, slope)
    return y.contiguous(memory_format=instance_norm_layout(x))


class FusedInstanceNormAct(nn.Module):
    """nn.InstanceNorm{1,2,3}d without running stats, optionally followed by a (leaky) ReLU, as one fused op on
    CUDA; the same parameters (weight, bias when affine) and so the same state_dict keys."""

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = False, slope: float = 1.0) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.slope = slope
        self.weight = nn.Parameter(torch.ones(num_features)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_features)) if affine else None

    @classmethod
    def replacing(cls, norm: nn.Module, slope: float = 1.0) -> FusedInstanceNormAct:
        """The fused twin of an nn.InstanceNorm{1,2,3}d (sharing its affine parameters)."""
        if not _plain_instance_norm(norm):
            raise ValueError(f"only instance norms without running statistics can be fused, got {norm}")
        fused = cls(norm.num_features, norm.eps, affine=False, slope=slope)
        if norm.affine:
            fused.weight, fused.bias = norm.weight, norm.bias
        return fused

    def forward(self, x: Tensor) -> Tensor:
        return instance_norm_act(x, self.weight, self.bias, self.eps, self.slope)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.weight is not None}, slope={self.slope}"


def _plain_instance_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)) and not (
        module.track_running_stats
    )


def _slope(act: nn.Module) -> float | None:
    if isinstance(act, nn.LeakyReLU):
        return act.negative_slope
    return 0.0 if isinstance(act, nn.ReLU) else None


class FusedUnetResBlock(nn.Module):
    """MONAI's UnetResBlock with fused instance norms: norm1 carries the activation that follows it. Built from a
    UnetResBlock's own submodules under the same names, so the state_dict keys stay the same."""

    def __init__(self, block: UnetResBlock) -> None:
        super().__init__()
        slope = _slope(block.lrelu)
        if slope is None:
            raise ValueError(f"FusedUnetResBlock fuses ReLU or LeakyReLU, got {block.lrelu}")
        self.conv1, self.conv2, self.lrelu = block.conv1, block.conv2, block.lrelu
        self.norm1 = FusedInstanceNormAct.replacing(block.norm1, slope)
        self.norm2 = FusedInstanceNormAct.replacing(block.norm2)
        self.downsample = block.downsample
        self.conv3 = getattr(block, "conv3", None)
        self.norm3 = FusedInstanceNormAct.replacing(block.norm3) if hasattr(block, "norm3") else None

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv2(self.norm1(self.conv1(x)))  # norm1 applies the activation
        residual = x if self.conv3 is None else self.norm3(self.conv3(x))
        return self.lrelu(self.norm2(out) + residual)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def use_fused_instance_norm(model: nn.Module) -> nn.Module:
    """In place: every MONAI UnetResBlock with instance norms and a (leaky) ReLU becomes a FusedUnetResBlock, then
    every other nn.InstanceNorm{1,2,3}d without running stats a FusedInstanceNormAct. Parameters and state_dict keys
    stay the same."""
    for name, module in list(model.named_modules()):
        norms = [getattr(module, n, None) for n in ("norm1", "norm2", "norm3")]
        if name and isinstance(module, UnetResBlock) and _slope(module.lrelu) is not None:
            if all(_plain_instance_norm(n) for n in norms if n is not None):
                _replace(model, name, FusedUnetResBlock(module))
    for name, module in list(model.named_modules()):  # afresh: the blocks above hold fused norms now
        if name and _plain_instance_norm(module):
            _replace(model, name, FusedInstanceNormAct.replacing(module))
    return model
