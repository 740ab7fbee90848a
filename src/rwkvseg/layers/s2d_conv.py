"""Strided convolutions with a kernel wider than their stride, run as stride-1 convolutions on a space-to-depth map.

MMSegRWKV's stem reads its 8 ModalResFM channels with a 7x7x7 kernel at stride 2; measured with
`scripts/conv_rates.py` on one H200 (bf16, channels-last, session 19) cuDNN ran it at 46 TFLOP/s (1.00 ms at
128^3, 4.57 ms forward and backward in training) where its wider convolutions reach 200-280. Folding each s x s x s
block of the input into channels (space to depth: 8 channels at 134^3, the padded input, become 64 at 67^3) turns
it into a stride-1 convolution with a 4x4x4 kernel over 64 channels: 1.5x the multiply-adds (the 7-tap kernel
padded to 8 with zeros), at the width cuDNN's fast kernels read.

For one axis with stride s, kernel k and padding p: output o reads the zero-padded input x' at s o + t, t < k.
With the kernel padded to K = ceil(k / s) s taps (zeros beyond k) and t = s j + r, that is x'[s (o + j) + r]: tap j
of a stride-1 convolution over the map whose position q holds x'[s q + r] for every r as channels. x' is cut or
zero-extended to s (N - 1 + K / s) positions, N the output length, so that the new convolution makes exactly N
outputs; positions it drops are read by no output.

`use_s2d_convs(model)` swaps every such nn.Conv{2,3}d (groups 1, dilation 1, zeros padding, numeric padding) for a
subclass that does this on channels-last maps (channels-first ones keep the plain convolution), sharing its
parameters: the same values up to the order of the sums.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from .twins import PLAIN_CONVS, ChannelsLastTwin, is_channels_last, swap_convs


def is_s2d(conv: nn.Module) -> bool:
    """A plain nn.Conv2d / nn.Conv3d with a stride above 1 and a kernel wider than it on some axis, groups 1,
    dilation 1, numeric zero padding."""
    return (
        type(conv) in PLAIN_CONVS.values()
        and any(s > 1 for s in conv.stride)
        and any(k > s for k, s in zip(conv.kernel_size, conv.stride, strict=True))
        and conv.groups == 1
        and all(d == 1 for d in conv.dilation)
        and not isinstance(conv.padding, str)
        and conv.padding_mode == "zeros"
    )


def _taps(k: int, s: int) -> int:
    """Taps of the stride-1 kernel per axis: ceil(k / s)."""
    return -(-k // s)


def s2d_weight(weight: Tensor, stride: tuple[int, ...]) -> Tensor:
    """[C_out, C_in, *k] -> [C_out, C_in * prod(s), *ceil(k / s)]: the kernel padded with zeros to a multiple of the
    stride per axis, tap s j + r at channel (c, r_1, .., r_n) of tap j."""
    c_out, c_in, *kernel = weight.shape
    n = len(kernel)
    pad = [e for k, s in zip(reversed(kernel), reversed(stride), strict=True) for e in (0, _taps(k, s) * s - k)]
    w = F.pad(weight, pad)  # [C_out, C_in, *K], zeros beyond k
    split = [d for k, s in zip(kernel, stride, strict=True) for d in (_taps(k, s), s)]
    w = w.reshape(c_out, c_in, *split)  # [C_out, C_in, J_1, s_1, .., J_n, s_n]
    # -> [C_out, C_in, s_1..s_n, J_1..J_n]
    w = w.permute(0, 1, *[3 + 2 * i for i in range(n)], *[2 + 2 * i for i in range(n)])
    return w.reshape(c_out, c_in * math.prod(stride), *[_taps(k, s) for k, s in zip(kernel, stride, strict=True)])


def space_to_depth(x: Tensor, stride: tuple[int, ...], channels_last: bool) -> Tensor:
    """[B, C, *(Q s)] -> [B, C * prod(s), *Q]: channel (c, r_1, .., r_n) at q holds x at s q + r; channels-last
    strides or contiguous."""
    b, c, *size = x.shape
    n = len(size)
    q = [d // s for d, s in zip(size, stride, strict=True)]
    split = [d for qi, s in zip(q, stride, strict=True) for d in (qi, s)]
    y = x.reshape(b, c, *split)  # [B, C, Q_1, s_1, .., Q_n, s_n] (a view)
    order = [0, 1, *[3 + 2 * i for i in range(n)], *[2 + 2 * i for i in range(n)]]  # [B, C, s.., Q..]
    if channels_last:
        # [B, Q.., C, s..] contiguous, then viewed as [B, C s.., Q..] with channels-last strides
        y = y.permute(0, *order[2 + n :], 1, *order[2 : 2 + n]).contiguous()
        return y.view(b, *q, c * math.prod(stride)).movedim(-1, 1)
    return y.permute(*order).reshape(b, c * math.prod(stride), *q)


def s2d_conv(
    x: Tensor, weight: Tensor, bias: Tensor | None, stride: tuple[int, ...], padding: tuple[int, ...]
) -> Tensor:
    """The convolution of x [B, C_in, *L] (stride, padding, groups 1) as a stride-1 convolution over its space-to-depth
    map: [B, C_out, *N], in x's layout."""
    kernel = weight.shape[2:]
    out = [(n + 2 * p - k) // s + 1 for n, p, k, s in zip(x.shape[2:], padding, kernel, stride, strict=True)]
    need = [s * (o - 1 + _taps(k, s)) for o, k, s in zip(out, kernel, stride, strict=True)]
    # zero padding p before each axis; after it, up to `need` positions in all (negative: cut what no output reads)
    pad = [
        e
        for n, p, m in zip(reversed(x.shape[2:]), reversed(padding), reversed(need), strict=True)
        for e in (p, m - n - p)
    ]
    channels_last = is_channels_last(x)
    x = F.pad(x, pad)  # [B, C_in, *need]
    y = space_to_depth(x, stride, channels_last)  # [B, C_in * prod(s), *(need / s)]
    conv = F.conv2d if y.dim() == 4 else F.conv3d
    return conv(y, s2d_weight(weight, stride), bias)  # [B, C_out, *N]


class _S2DConv(ChannelsLastTwin):
    """The channels-last forward of the space-to-depth twins (mixed into nn.Conv2d / nn.Conv3d)."""

    def channels_last_forward(self, x: Tensor) -> Tensor:
        return s2d_conv(x, self.weight, self.bias, self.stride, self.padding)


class S2DConv2d(_S2DConv, nn.Conv2d):
    """nn.Conv2d (stride below its kernel) as a stride-1 convolution over a space-to-depth map (s2d_conv)."""


class S2DConv3d(_S2DConv, nn.Conv3d):
    """nn.Conv3d (stride below its kernel) as a stride-1 convolution over a space-to-depth map (s2d_conv)."""


_S2D = {2: S2DConv2d, 3: S2DConv3d}


def use_s2d_convs(model: nn.Module) -> nn.Module:
    """In place: every convolution of model that is_s2d becomes its space-to-depth twin, sharing its parameters."""
    return swap_convs(model, lambda m: _S2D[len(m.kernel_size)] if is_s2d(m) else None, "use_s2d_convs")


def count_s2d_convs(model: nn.Module) -> int:
    """How many space-to-depth twins model holds."""
    return sum(isinstance(m, _S2DConv) for m in model.modules())
