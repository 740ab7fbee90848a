"""Token shifts: Vision-RWKV's Q-Shift on a 2D grid, the fixed token permutation U-RWKV's released code uses in
its place, and MMSegRWKV's Bi-Shift along a sequence."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from .bi_wkv.library import tracing

# the neighbour a channel quarter takes: "left" = column j - 1, "right" = j + 1, "up" = row i - 1, "down" = i + 1
Q_SHIFT_DIRECTIONS = ("left", "right", "up", "down")
# Q-Shift on the grid of a scanned sequence, written on the map it came from: scanning turns the grid, so the
# quarters take the map's neighbours in these directions (q_shift(scan_2d(m, o)) == scan_2d(q_shift on m with
# SCAN_SHIFT_DIRECTIONS[o]))
SCAN_SHIFT_DIRECTIONS = {
    "rows": ("left", "right", "up", "down"),
    "rows_reversed": ("right", "left", "up", "down"),
    "cols": ("up", "down", "left", "right"),
    "cols_reversed": ("down", "up", "left", "right"),
}


def _neighbour(grid: Tensor, direction: str) -> Tensor:
    """[B, H, W, c] -> each cell's neighbour in direction, zero past the border."""
    if direction == "left":
        return F.pad(grid[:, :, :-1], (0, 0, 1, 0))
    if direction == "right":
        return F.pad(grid[:, :, 1:], (0, 0, 0, 1))
    if direction == "up":
        return F.pad(grid[:, :-1], (0, 0, 0, 0, 1, 0))
    if direction == "down":
        return F.pad(grid[:, 1:], (0, 0, 0, 0, 0, 1))
    raise ValueError(f"q_shift: unknown direction {direction!r}; choose from {Q_SHIFT_DIRECTIONS}")


def q_shift(x: Tensor, size: tuple[int, int], directions: tuple[str, ...] = Q_SHIFT_DIRECTIONS) -> Tensor:
    """Q-Shift of tokens x [B, H*W, C] (row-major over size = (H, W)); returns [B, H*W, C].

    Channel quarters take the neighbour in the four directions (by default the left, right, upper and lower
    one; zero at the borders). When C is not a multiple of 4 the last group takes the remainder, so every
    channel is shifted.
    """
    B, N, C = x.shape
    H, W = size
    if H * W != N:
        raise ValueError(f"q_shift: {N} tokens do not form a {H} x {W} grid")
    if len(directions) != 4:
        raise ValueError(f"q_shift: give one direction per channel quarter, got {directions}")
    grid = x.reshape(B, H, W, C)  # [B, H*W, C] -> [B, H, W, C]
    q = C // 4
    quarters = torch.split(grid, [q, q, q, C - 3 * q], dim=3)
    shifted = torch.cat([_neighbour(g, d) for g, d in zip(quarters, directions, strict=True)], dim=3)
    return shifted.reshape(B, N, C)


def flip_permutation(size: tuple[int, int], device: torch.device | str | None = None) -> Tensor:
    """[H*W] indices: position n of the permuted grid holds token flip_permutation(size)[n] (row-major over size
    = (H, W)). The grid's lower half (rows H // 2 ..) is turned upside down below the upper half, and the result is
    read column by column: on 4 x 4, 0, 4, 12, 8, 1, 5, 13, 9, ... U-RWKV's released code mixes every token with
    this partner in place of Q-Shift (its `q_shift` returns `in_vertical_scan` of the grid, every channel)."""
    H, W = size
    top = torch.arange(H // 2, device=device)
    bottom = torch.arange(H - 1, H // 2 - 1, -1, device=device)  # rows H - 1 .. H // 2, upside down
    rows = torch.cat([top, bottom])  # row h of the stacked grid is stored row rows[h]
    stacked = rows[:, None] * W + torch.arange(W, device=device)  # [H, W] stored token of every cell
    return stacked.t().reshape(-1)  # read column by column: position w * H + h


def permutation_shift(x: Tensor, size: tuple[int, int]) -> Tensor:
    """The released code's token shift of tokens x [B, H*W, C] (row-major over size): token n takes token
    flip_permutation(size)[n], every channel; returns [B, H*W, C]."""
    if size[0] * size[1] != x.shape[1]:
        raise ValueError(f"permutation_shift: {x.shape[1]} tokens do not form a {size[0]} x {size[1]} grid")
    return x[:, permutation_index(size, x.device)]


@functools.lru_cache(maxsize=32)
def _kept_flip_permutation(size: tuple[int, int], device: torch.device) -> Tensor:
    # a normal tensor even when first built under inference_mode: x[:, index] saves its index for backward, which an
    # inference tensor refuses, and a later training step would reuse this one
    with torch.inference_mode(False):
        return flip_permutation(size, device)


def permutation_index(size: tuple[int, int], device: torch.device) -> Tensor:
    """flip_permutation(size, device), built once per (size, device) in eager calls and shared by every caller
    (several kernels a build): read it, never write it in place. Traced calls (torch.compile, export) build it in
    the graph, without the cache (dynamo warns about lru_cache)."""
    if tracing():
        return flip_permutation(size, device)
    return _kept_flip_permutation((int(size[0]), int(size[1])), torch.device(device))


def bi_shift(x: Tensor) -> Tensor:
    """Bi-Shift of a sequence x [B, T, C]: the first C // 4 channels take the preceding token, the rest the
    succeeding one, zero at the ends; returns [B, T, C]."""
    q = x.shape[2] // 4
    before = F.pad(x[:, :-1, :q], (0, 0, 1, 0))
    after = F.pad(x[:, 1:, q:], (0, 0, 0, 1))
    return torch.cat([before, after], dim=2)


def bi_shift_hwt(x: Tensor, size: tuple[int, int, int]) -> Tensor:
    """Bi-Shift along the (h, w, t) view of tokens stored in (t, h, w) order, x [B, T*H*W, C] for
    size = (T, H, W); returns [B, T*H*W, C] in the stored order. Equals to_view(bi_shift(to_view(., "hwt")),
    "thw") without the two permuted copies: along the view a token's neighbours are the same (h, w) in the
    next slices, and the view runs on from the last slice of one (h, w) to the first slice of the next."""
    B, N, C = x.shape
    T, H, W = size
    if T * H * W != N:
        raise ValueError(f"bi_shift_hwt: {N} tokens do not form a {T} x {H} x {W} window")
    grid = x.reshape(B, T, H * W, C)  # [B, T*H*W, C] -> [B, T, H*W, C]
    q = C // 4
    # before: slice s - 1 of the same (h, w); slice 0 takes the last slice of the previous (h, w)
    before = torch.cat([F.pad(grid[:, -1:, :-1, :q], (0, 0, 1, 0)), grid[:, :-1, :, :q]], dim=1)
    # after: slice s + 1; the last slice takes slice 0 of the next (h, w)
    after = torch.cat([grid[:, 1:, :, q:], F.pad(grid[:, :1, 1:, q:], (0, 0, 0, 1))], dim=1)
    return torch.cat([before, after], dim=3).view(B, N, C)
