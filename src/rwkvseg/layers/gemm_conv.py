"""Convolutions that are matrix multiplies, run as matrix multiplies (cuBLAS, or Inductor's mm once compiled).

A 1x1(x1) convolution of a channels-last map is a GEMM on a view: [B, C_in, *S] in NDHWC strides is [B, *S, C_in]
contiguous, times the weight [C_out, C_in]. A transposed convolution whose stride equals its kernel (padding 0,
groups 1) writes each input position's k^n-voxel patch without overlap: a GEMM to [B, *S, k^n * C_out] and one
copy that interleaves the patches ("pixel shuffle"). Measured with `scripts/conv_rates.py` on one H200 (bf16,
channels-last, cuDNN heuristics and cudnn.benchmark alike, session 19), cuDNN runs MMSegRWKV's full-resolution
instances of both far below the copy rate: the 32 -> 3 head 0.53 ms for 0.2 GMACs, the 4 -> 32 residual 1x1x1 0.34 ms,
dec1's 64 -> 32 4x4x4 stride-4 transposed convolution 1.12 ms (7.7 TFLOP/s), where reading and writing their maps
takes about 0.03-0.1 ms at 4.2 TB/s.

`use_gemm_convs(model)` swaps such nn.Conv{2,3}d / nn.ConvTranspose{2,3}d modules in place for the subclasses below,
which share the original parameters (same state_dict keys, same initialization) and compute the same values up to
the order of the sums. Pointwise convolutions of maps that are not channels-last keep cuDNN (a GEMM there would
first copy the map); the transposed ones always take the GEMM and return their input's layout.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from .twins import PLAIN_CONVS, ChannelsLastTwin, is_channels_last, swap_convs

_TRANSPOSED = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


def _spatial_dims(conv: nn.Module) -> int:
    return len(conv.kernel_size)


def is_gemm_pointwise(conv: nn.Module) -> bool:
    """An nn.Conv2d / nn.Conv3d that is a matrix multiply: kernel 1, stride 1, padding 0, groups 1, zeros padding."""
    return (
        type(conv) in PLAIN_CONVS.values()
        and all(k == 1 for k in conv.kernel_size)
        and all(s == 1 for s in conv.stride)
        and not isinstance(conv.padding, str)
        and all(p == 0 for p in conv.padding)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


def is_gemm_transposed(conv: nn.Module) -> bool:
    """An nn.ConvTranspose2d / 3d whose patches do not overlap: stride == kernel, padding 0, output padding 0,
    dilation 1, groups 1."""
    return (
        type(conv) in _TRANSPOSED.values()
        and tuple(conv.stride) == tuple(conv.kernel_size)
        and all(p == 0 for p in conv.padding)
        and all(p == 0 for p in conv.output_padding)
        and all(d == 1 for d in conv.dilation)
        and conv.groups == 1
    )


def pointwise_gemm(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """1x1(x1) convolution of a channels-last x [B, C_in, *S] with weight [C_out, C_in, 1, ...] as one GEMM;
    returns [B, C_out, *S] channels-last."""
    # [B, C_in, *S] -> [B, *S, C_in] (a view) -> [B, *S, C_out] -> [B, C_out, *S] (channels-last strides)
    return F.linear(x.movedim(1, -1), weight.flatten(1), bias).movedim(-1, 1)


def transposed_gemm(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Transposed convolution with stride == kernel (padding 0, groups 1) of x [B, C_in, *S] with weight
    [C_in, C_out, *k] as one GEMM and one interleaving copy; returns [B, C_out, *(S * k)] in x's layout."""
    n = x.dim() - 2
    c_out, kernel = weight.shape[1], tuple(weight.shape[2:])
    patch = math.prod(kernel)
    # weight [C_in, C_out, *k] -> [C_in, *k, C_out] -> [k^n * C_out, C_in]: channel j of patch offset p at p * C_out + j
    w = weight.movedim(1, -1).reshape(weight.shape[0], patch * c_out).t()
    b = bias.repeat(patch) if bias is not None else None
    y = F.linear(x.movedim(1, -1), w, b)  # [B, *S, C_in] -> [B, *S, k^n * C_out]
    y = y.unflatten(-1, (*kernel, c_out))  # [B, S_1..S_n, k_1..k_n, C_out]
    interleaved = [d for i in range(n) for d in (1 + i, 1 + n + i)]  # S_1, k_1, S_2, k_2, ...
    out_size = [s * k for s, k in zip(x.shape[2:], kernel, strict=True)]
    if is_channels_last(x):
        y = y.permute(0, *interleaved, 2 * n + 1).reshape(x.shape[0], *out_size, c_out)  # [B, *(S k), C_out]
        return y.movedim(-1, 1)  # [B, C_out, *(S k)] channels-last
    return y.permute(0, 2 * n + 1, *interleaved).reshape(x.shape[0], c_out, *out_size)  # contiguous


class _GemmPointwise(ChannelsLastTwin):
    """The channels-last forward of the pointwise twins (mixed into nn.Conv2d / nn.Conv3d)."""

    def channels_last_forward(self, x: Tensor) -> Tensor:
        return pointwise_gemm(x, self.weight, self.bias)


class GemmPointwiseConv2d(_GemmPointwise, nn.Conv2d):
    """nn.Conv2d (kernel 1) that runs channels-last inputs as a GEMM (pointwise_gemm)."""


class GemmPointwiseConv3d(_GemmPointwise, nn.Conv3d):
    """nn.Conv3d (kernel 1) that runs channels-last inputs as a GEMM (pointwise_gemm)."""


class _GemmTransposed:
    """The forward of the transposed twins (mixed into nn.ConvTranspose2d / 3d): every layout takes the GEMM."""

    def forward(self, x: Tensor, output_size: list[int] | None = None) -> Tensor:
        if output_size is not None:
            return super().forward(x, output_size)  # type: ignore[misc]
        return transposed_gemm(x, self.weight, self.bias)


class GemmConvTranspose2d(_GemmTransposed, nn.ConvTranspose2d):
    """nn.ConvTranspose2d with stride == kernel as a GEMM and a copy (transposed_gemm)."""


class GemmConvTranspose3d(_GemmTransposed, nn.ConvTranspose3d):
    """nn.ConvTranspose3d with stride == kernel as a GEMM and a copy (transposed_gemm)."""


_GEMM_POINTWISE = {2: GemmPointwiseConv2d, 3: GemmPointwiseConv3d}
_GEMM_TRANSPOSED = {2: GemmConvTranspose2d, 3: GemmConvTranspose3d}


def _gemm_twin(conv: nn.Module) -> type[nn.Module] | None:
    if is_gemm_pointwise(conv):
        return _GEMM_POINTWISE[_spatial_dims(conv)]
    if is_gemm_transposed(conv):
        return _GEMM_TRANSPOSED[_spatial_dims(conv)]
    return None


def use_gemm_convs(model: nn.Module) -> nn.Module:
    """In place: every plain pointwise nn.Conv{2,3}d and every stride == kernel nn.ConvTranspose{2,3}d of model
    becomes its GEMM twin above; parameters, their names and their values stay the same."""
    return swap_convs(model, _gemm_twin, "use_gemm_convs")


def count_gemm_convs(model: nn.Module) -> int:
    """How many GEMM twins model holds (what use_gemm_convs swapped in)."""
    return sum(isinstance(m, _GemmPointwise | _GemmTransposed) for m in model.modules())
