"""Serialisation of feature maps into token sequences, and back exactly.

2D: the four QuadScan orders of U-RWKV. 3D: MMSegRWKV's two views of a window and its slice-axis windows.
Maps are channels-first ([B, C, H, W] or [B, C, T, H, W]); sequences are [B, N, C].
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

QUAD_SCAN_ORDERS = ("rows", "rows_reversed", "cols", "cols_reversed")
VIEWS = ("thw", "hwt")


@dataclass(frozen=True)
class TokenOrder:
    """The order in which a sequence visits stored tokens: position t reads token
    start + (t // inner) * outer_step + (t % inner) * inner_step (steps may be negative).

    Two nested strides cover every QuadScan order of a row-major grid and the (h, w, t) view of a (t, h, w)
    volume, so the Triton Bi-WKV reads a scan order straight from the stored tokens instead of a permuted copy.
    """

    inner: int
    inner_step: int
    outer_step: int
    start: int = 0

    @staticmethod
    def identity(n: int) -> TokenOrder:
        return TokenOrder(n, 1, n)

    def check(self, n: int) -> None:
        """Raise ValueError unless positions 0..n-1 visit each of the n stored tokens exactly once."""
        if self.inner < 1 or n % self.inner:
            raise ValueError(f"{self}: inner = {self.inner} must be >= 1 and divide the {n} tokens")
        # a bijection onto 0..n-1 is a mixed-radix count: the smaller step is 1, the larger the smaller's count,
        # and a negative step starts from its far end
        axes = [(self.inner_step, self.inner), (self.outer_step, n // self.inner)]
        axes = sorted((abs(step), step, count) for step, count in axes if count > 1)
        unit = 1
        for size, _, count in axes:
            if size != unit:
                raise ValueError(f"{self} does not visit each of {n} tokens once; use scan_order() or view_order()")
            unit *= count
        start = sum((count - 1) * size for size, step, count in axes if step < 0)
        if self.start != start:
            raise ValueError(f"{self}: start must be {start} for these steps over {n} tokens")

    def indices(self, n: int, device: torch.device | str | None = None) -> Tensor:
        """[n] stored-token index of every position."""
        t = torch.arange(n, device=device)
        return self.start + (t // self.inner) * self.outer_step + (t % self.inner) * self.inner_step

    def _grid(self, n: int) -> tuple[int, bool, list[int]]:
        # (outer count, whether the inner axis is the stored fast axis, axes of a [outer, inner] grid to flip)
        flips = [axis for axis, step in ((-3, self.outer_step), (-2, self.inner_step)) if step < 0]
        return n // self.inner, abs(self.inner_step) == 1, flips

    def read(self, x: Tensor) -> Tensor:
        """Stored tokens [..., n, C] -> the sequence in this order [..., n, C], a strided copy (no gather)."""
        outer, inner_fast, flips = self._grid(x.shape[-2])
        if inner_fast:
            grid = x.unflatten(-2, (outer, self.inner))  # [..., outer, inner, C] as stored
        else:
            grid = x.unflatten(-2, (self.inner, outer)).transpose(-3, -2)  # stored with the outer axis fast
        return (grid.flip(flips) if flips else grid).flatten(-3, -2)

    def write(self, s: Tensor) -> Tensor:
        """Inverse of read: a sequence in this order [..., n, C] -> stored order [..., n, C]."""
        outer, inner_fast, flips = self._grid(s.shape[-2])
        grid = s.unflatten(-2, (outer, self.inner))  # [..., outer, inner, C] in sequence order
        grid = grid.flip(flips) if flips else grid
        return (grid if inner_fast else grid.transpose(-3, -2)).flatten(-3, -2)


def scan_order(order: str, size: tuple[int, int]) -> TokenOrder:
    """A QuadScan order as a TokenOrder over row-major tokens of size = (H, W): reading tokens [B, H*W, C] in it
    gives scan_2d(map, order)."""
    _check_order(order)
    H, W = size
    return {
        "rows": TokenOrder(W, 1, W),
        "rows_reversed": TokenOrder(W, -1, W, W - 1),
        "cols": TokenOrder(H, W, 1),
        "cols_reversed": TokenOrder(H, -W, 1, (H - 1) * W),
    }[order]


def view_order(view: str, size: tuple[int, int, int]) -> TokenOrder:
    """A view of a window as a TokenOrder over its (t, h, w) tokens for size = (T, H, W): reading tokens
    [B, T*H*W, C] in it gives to_view(window, view)."""
    T, H, W = size
    if view == "thw":
        return TokenOrder.identity(T * H * W)
    if view == "hwt":
        return TokenOrder(T, H * W, 1)
    raise ValueError(f"unknown view {view!r}; choose from {VIEWS}")


def _check_each(orders: tuple[TokenOrder, ...], n: int) -> None:
    for order in orders:
        order.check(n)


# the layers pass the same few orders every call; a failed check raises, so only passed ones are cached
_check_each_once = functools.lru_cache(maxsize=256)(_check_each)


def check_orders(orders: tuple[TokenOrder, ...], n: int) -> None:
    """TokenOrder.check(n) of each order. Eager calls check each distinct (orders, n) once: the checks cost
    microseconds a call. Traced calls check while tracing, without the cache (dynamo warns about lru_cache)."""
    (_check_each if torch.compiler.is_compiling() else _check_each_once)(orders, n)


def apply_in_orders(
    fn: Callable[..., Tensor], w: Tensor, u: Tensor, k: Tensor, v: Tensor, orders: tuple[TokenOrder, ...]
) -> Tensor:
    """fn(w, u, k_seq, v_seq) on copies of the sequences that orders read from k, v [n, B, N, C]; the result
    goes back to the stored tokens, [n, B, N, C]. The portable form of ordered Bi-WKV (the kernel reads in place)."""
    n, B, N, C = k.shape
    k_seq = torch.cat([o.read(k[i]) for i, o in enumerate(orders)])  # [n, B, N, C] -> [n * B, N, C] in scan order
    v_seq = torch.cat([o.read(v[i]) for i, o in enumerate(orders)])
    y_seq = fn(w, u, k_seq, v_seq).reshape(n, B, N, C)
    return torch.stack([o.write(y_seq[i]) for i, o in enumerate(orders)])  # back to the stored tokens


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
    # a view; for "rows" of a channels-last x, contiguous tokens (the layout stores them), else strided ones
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
        # a view: contiguous tokens when x is channels-last (the layout stores them), strided ones otherwise
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
        return s.transpose(1, 2).reshape(B, C, T, H, W)  # contiguous s: a view, a channels-last map
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
