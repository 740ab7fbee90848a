"""MMSegRWKV's token mixers: Dual-View Bi-WKV SpatialMix, Bi-Shift ChannelMix, the pre-norm block, and a stage
that runs the blocks on short non-overlapping slice-axis windows.

Tokens are [B, L, C] in (t, h, w) order (view A); view B is the same window in (h, w, t) order, so the same voxel
in neighbouring slices is adjacent. Both views share every projection and the decay/bonus.
"""

from __future__ import annotations

import math

import torch
from monai.networks.layers import DropPath
from torch import Tensor, nn

from rwkvseg.ops import (
    bi_shift,
    bi_shift_hwt,
    bi_wkv_ordered,
    from_view,
    merge_windows,
    split_windows,
    to_view,
    view_order,
)


def _ratios(layer: int, n_layer: int) -> tuple[float, float]:
    """(ratio_0_to_1, ratio_1_to_almost0) of RWKV's "fancy" init; a single layer counts as the first one."""
    if not 0 <= layer < n_layer:
        raise ValueError(f"layer index {layer} is outside 0..{n_layer - 1}; pass layer < n_layer")
    return (layer / (n_layer - 1) if n_layer > 1 else 0.0), 1.0 - layer / n_layer


def _channel_ramp(dim: int) -> Tensor:
    return torch.arange(dim, dtype=torch.float32) / dim  # i / C, the base of every mu init


class DualViewSpatialMix(nn.Module):
    """y = W_o(alpha * y_A + (1 - alpha) * y_B), y_view = sigmoid(r) * Bi-WKV(decay / L, bonus / L, k, v).

    Each view is Bi-Shifted along its own order (view A along W, view B along the slice axis) before the
    k, v, r projections; L is the window's token count.
    """

    def __init__(self, dim: int, layer: int, n_layer: int) -> None:
        super().__init__()
        ratio_0_to_1, ratio_1_to_0 = _ratios(layer, n_layer)
        h = torch.arange(dim, dtype=torch.float32)
        exponent = 0.7 + 1.3 * ratio_0_to_1
        self.decay = nn.Parameter(-5 + 8 * (h / max(dim - 1, 1)) ** exponent)
        zigzag = ((h + 1) % 3 - 1) * 0.5
        self.bonus = nn.Parameter(math.log(0.3) + zigzag)
        ramp = _channel_ramp(dim)
        self.mix_k = nn.Parameter(ramp**ratio_1_to_0)
        self.mix_v = nn.Parameter(ramp**ratio_1_to_0 + 0.3 * ratio_0_to_1)
        self.mix_r = nn.Parameter(ramp ** (0.5 * ratio_1_to_0))
        self.alpha = nn.Parameter(torch.full((dim,), 0.5))
        self.key = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(dim, dim, bias=False)
        self.receptance = nn.Linear(dim, dim, bias=False)
        self.output = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor, size: tuple[int, int, int]) -> Tensor:
        """x [B, L, C] in (t, h, w) order over the window size = (T, H, W) -> [B, L, C]."""
        L = x.shape[1]
        # each view's Bi-Shift, both at the stored (t, h, w) tokens: no permuted copy of either view
        xx = torch.stack([bi_shift(x), bi_shift_hwt(x, size)])  # [B, L, C] -> [2, B, L, C]
        dt = x.dtype  # lerp needs one dtype; under autocast the tokens may be bf16 while parameters stay fp32
        k = self.key(torch.lerp(xx, x, self.mix_k.to(dt)))
        v = self.value(torch.lerp(xx, x, self.mix_v.to(dt)))
        r = self.receptance(torch.lerp(xx, x, self.mix_r.to(dt)))
        orders = (view_order("thw", size), view_order("hwt", size))
        # one WKV call reads view A in place and view B in (h, w, t) order; y comes back at the stored tokens
        y = torch.sigmoid(r) * bi_wkv_ordered(self.decay / L, self.bonus / L, k, v, orders)  # [2, B, L, C]
        y = torch.lerp(y[1], y[0], self.alpha.to(y.dtype))  # alpha * y_A + (1 - alpha) * y_B
        return self.output(y)


class BiShiftChannelMix(nn.Module):
    """out = sigmoid(W_r x_r) * W_v relu(W_k x_k)^2 with Bi-Shift token mixing along the (t, h, w) order."""

    def __init__(self, dim: int, layer: int, n_layer: int, hidden_ratio: int = 4) -> None:
        super().__init__()
        _, ratio_1_to_0 = _ratios(layer, n_layer)
        ramp = _channel_ramp(dim)
        self.mix_k = nn.Parameter(ramp**ratio_1_to_0)
        self.mix_r = nn.Parameter(ramp**ratio_1_to_0)
        self.key = nn.Linear(dim, hidden_ratio * dim, bias=False)
        self.value = nn.Linear(hidden_ratio * dim, dim, bias=False)
        self.receptance = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        xx = bi_shift(x)
        k = torch.relu(self.key(torch.lerp(xx, x, self.mix_k.to(x.dtype)))).square()  # [B, L, C] -> [B, L, 4C]
        return torch.sigmoid(self.receptance(torch.lerp(xx, x, self.mix_r.to(x.dtype)))) * self.value(k)


class DualViewBlock(nn.Module):
    """Pre-norm RWKV block: x = x + SpatialMix(LN1(x)); x = x + ChannelMix(LN2(x)), on tokens [B, L, C].

    drop_path > 0: stochastic depth in training (MONAI's DropPath): each branch is dropped for a whole sample of the
    batch with that probability and the kept ones are scaled by 1 / (1 - drop_path); in eval it is the identity. In
    a windowed stage a sample is one slice-axis window. No parameters, so weights load with or without it."""

    def __init__(self, dim: int, layer: int, n_layer: int, hidden_ratio: int = 4, drop_path: float = 0.0) -> None:
        super().__init__()
        if not 0 <= drop_path < 1:
            raise ValueError(f"drop_path = {drop_path!r} must be in [0, 1): the probability a branch is dropped")
        self.ln1 = nn.LayerNorm(dim)
        self.spatial = DualViewSpatialMix(dim, layer, n_layer)
        self.ln2 = nn.LayerNorm(dim)
        self.channel = BiShiftChannelMix(dim, layer, n_layer, hidden_ratio)
        self.drop = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, size: tuple[int, int, int]) -> Tensor:
        x = x + self.drop(self.spatial(self.ln1(x), size))
        return x + self.drop(self.channel(self.ln2(x)))


class WindowedDualViewStage(nn.Module):
    """x + LN_out(blocks(LN_in(window))) on non-overlapping slice-axis windows of x [B, C, T, H, W].

    Windows of `window` slices are mixed independently; when T is not a multiple of `window` the last, shorter
    window is mixed on its own (its WKV scale uses its own token count). Returns [B, C, T, H, W].
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        window: int,
        first_layer: int,
        n_layer: int,
        hidden_ratio: int = 4,
        drop_paths: tuple[float, ...] = (),
    ):
        super().__init__()
        if window < 1:
            raise ValueError(f"slice window must be >= 1, got {window}")
        drop_paths = drop_paths or (0.0,) * depth  # each block's stochastic depth (DualViewBlock)
        if len(drop_paths) != depth:
            raise ValueError(f"drop_paths {drop_paths} needs one rate per block ({depth})")
        self.window = window
        self.norm_in = nn.LayerNorm(dim)
        self.blocks = nn.ModuleList(
            DualViewBlock(dim, first_layer + i, n_layer, hidden_ratio, drop_paths[i]) for i in range(depth)
        )
        self.norm_out = nn.LayerNorm(dim)

    def _mix(self, part: Tensor) -> Tensor:
        size = tuple(part.shape[2:])
        tokens = self.norm_in(to_view(part, "thw"))  # [b, C, t, H, W] -> [b, t*H*W, C]
        for block in self.blocks:
            tokens = block(tokens, size)
        return from_view(self.norm_out(tokens), "thw", size)  # -> [b, C, t, H, W]

    def forward(self, x: Tensor) -> Tensor:
        full, tail = split_windows(x, self.window)
        full = None if full is None else self._mix(full)
        tail = None if tail is None else self._mix(tail)
        return x + merge_windows(full, tail, x.shape[0])
