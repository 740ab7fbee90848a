"""Serialisation of feature maps into token sequences, and back exactly.

2D: the four QuadScan orders of U-RWKV. 3D: MMSegRWKV's two views of a window and its slice-axis windows.
Maps are channels-first ([B, C, H, W] or [B, C, T, H, W]); sequences are [B, N, C].
"""

from __future__ import annotations

import torch
from torch import Tensor

QUAD_SCAN_ORDERS = ("rows", "rows_reversed", "cols", "cols_reversed")
VIEWS = ("thw", "hwt")


def _check_order(order: str) -> None:
    if order not in QUAD_SCAN_ORDERS:
        raise ValueError(f"unknown scan order {order!r}; choose from {QUAD_SCAN_ORDERS}")


def scan_2d(x: Tensor, order: str) -> Tensor:
    """[B, C, H, W] -> [B, H*W, C] in one of QUAD_SCAN_ORDERS.

    rows: each row left to right, rows top to bottom; rows_reversed: each row right to left; cols: each column
    top to bottom, columns left to right; cols_reversed: each column bottom to top.
    """
    _check_order(order)
    if order == "rows_reversed":
        x = x.flip(3)
    elif order == "cols":
        x = x.transpose(2, 3)
    elif order == "cols_reversed":
        x = x.flip(2).transpose(2, 3)
    return x.flatten(2).transpose(1, 2)  # [B, C, H', W'] -> [B, H'*W', C]


def unscan_2d(s: Tensor, order: str, size: tuple[int, int]) -> Tensor:
    """Exact inverse of scan_2d: [B, H*W, C] -> [B, C, H, W] for size = (H, W)."""
    _check_order(order)
    B, N, C = s.shape
    H, W = size
    if H * W != N:
        raise ValueError(f"unscan_2d: {N} tokens do not form a {H} x {W} grid")
    columns_first = order in ("cols", "cols_reversed")
    x = s.transpose(1, 2).reshape(B, C, W, H) if columns_first else s.transpose(1, 2).reshape(B, C, H, W)
    if order == "rows_reversed":
        return x.flip(3)
    if order == "cols":
        return x.transpose(2, 3)
    if order == "cols_reversed":
        return x.transpose(2, 3).flip(2)
    return x


def to_view(x: Tensor, view: str) -> Tensor:
    """[B, C, T, H, W] -> [B, T*H*W, C] in (t, h, w) order ("thw") or (h, w, t) order ("hwt")."""
    if view == "thw":
        return x.flatten(2).transpose(1, 2)
    if view == "hwt":
        return x.permute(0, 3, 4, 2, 1).flatten(1, 3)  # [B, C, T, H, W] -> [B, H*W*T, C]
    raise ValueError(f"unknown view {view!r}; choose from {VIEWS}")


def from_view(s: Tensor, view: str, size: tuple[int, int, int]) -> Tensor:
    """Exact inverse of to_view: [B, T*H*W, C] -> [B, C, T, H, W] for size = (T, H, W)."""
    B, N, C = s.shape
    T, H, W = size
    if T * H * W != N:
        raise ValueError(f"from_view: {N} tokens do not form a {T} x {H} x {W} volume")
    if view == "thw":
        return s.transpose(1, 2).reshape(B, C, T, H, W)
    if view == "hwt":
        return s.reshape(B, H, W, T, C).permute(0, 4, 3, 1, 2)
    raise ValueError(f"unknown view {view!r}; choose from {VIEWS}")


def split_windows(x: Tensor, size: int) -> tuple[Tensor | None, Tensor | None]:
    """Non-overlapping slice-axis windows of x [B, C, T, H, W].

    Returns (full, tail): full [B*n, C, size, H, W] holds the n = T // size whole windows batched together
    (batch-major: window j of sample b at index b*n + j), tail [B, C, T - n*size, H, W] the ragged last window;
    either is None when empty.
    """
    if size < 1:
        raise ValueError(f"split_windows: window size must be >= 1, got {size}")
    B, C, T, H, W = x.shape
    n = T // size
    full = None
    if n:
        full = x[:, :, : n * size].reshape(B, C, n, size, H, W)  # [B, C, n, s, H, W]
        full = full.transpose(1, 2).reshape(B * n, C, size, H, W)
    tail = x[:, :, n * size :] if n * size < T else None
    return full, tail


def merge_windows(full: Tensor | None, tail: Tensor | None, batch: int) -> Tensor:
    """Exact inverse of split_windows: back to [B, C, T, H, W]."""
    parts = []
    if full is not None:
        Bn, C, s, H, W = full.shape
        n = Bn // batch
        parts.append(full.reshape(batch, n, C, s, H, W).transpose(1, 2).reshape(batch, C, n * s, H, W))
    if tail is not None:
        parts.append(tail)
    if not parts:
        raise ValueError("merge_windows: both the full windows and the tail are empty")
    return torch.cat(parts, dim=2)
