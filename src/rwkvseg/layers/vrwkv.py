"""Vision-RWKV mixers (SpatialMix with LayerNorm on the WKV output, ChannelMix with squared ReLU) and the
QuadScan RWKV block of U-RWKV.

Tokens are [B, N, C] in row-major order over a grid `size` = (H, W); maps are [B, C, H, W].
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor, nn

from rwkvseg.ops import (
    QUAD_SCAN_ORDERS,
    SCAN_SHIFT_DIRECTIONS,
    TokenOrder,
    bi_wkv,
    bi_wkv_ordered,
    flip_permutation,
    permutation_shift,
    q_shift,
    scan_2d,
    scan_order,
    tracing,
    unscan_2d,
)

# q_shift: Q-Shift on each scanned sequence read as a grid (rows orders: H x W, column orders: W x H), as the
# spec applies SpatialMix to the scanned sequence; the quarters' directions then turn with the scan order.
# q_shift_map: Q-Shift on the feature map itself, the same for every order ("left" is always the image's left).
# permutation: U-RWKV's released code, which mixes every token with a fixed far partner instead (every channel;
# ops.flip_permutation), on each scanned sequence's grid in the spatial mix and on the map in the channel mix.
TOKEN_SHIFTS = ("q_shift", "q_shift_map", "permutation", "none")
GRID_SHIFTS = ("q_shift", "permutation", "none")  # what one mixer applies on the grid of the tokens it is given
_ROW_ORDERS = ("rows", "rows_reversed")
# scanning X^T in one order visits tokens exactly as scanning X in the other, on the same (W, H) grid
TRANSPOSED_ORDER = {"rows": "cols", "cols": "rows", "rows_reversed": "cols_reversed", "cols_reversed": "rows_reversed"}


def fancy_init(dim: int) -> dict[str, Tensor]:
    """Vision-RWKV's "fancy" initial values for layer 0: decay, bonus and the token-shift mixes, each [C]."""
    c = torch.arange(dim, dtype=torch.float64)
    ratio = c / dim
    zigzag = (c + 1) % 3 - 1
    return {
        "decay": (-5 + 8 * (c / max(dim - 1, 1)) ** 0.7).float(),
        "bonus": (math.log(0.3) + 0.5 * zigzag).float(),
        "mix_k": ratio.float(),
        "mix_v": ratio.float(),
        "mix_r": (ratio**0.5).float(),
    }


def _shift_mix(x: Tensor, shifted: Tensor, mu: Tensor) -> Tensor:
    return x * mu + shifted * (1 - mu)


def grid_shift(x: Tensor, size: tuple[int, int], kind: str) -> Tensor:
    """Tokens x [B, H*W, C] (row-major over size) shifted as kind says ("q_shift" or "permutation"); [B, H*W, C]."""
    return permutation_shift(x, size) if kind == "permutation" else q_shift(x, size)


def _check_grid_shift(owner: str, kind: str) -> None:
    if kind not in GRID_SHIFTS:
        raise ValueError(f"{owner}: unknown token_shift {kind!r}; choose one of {GRID_SHIFTS}")


class SpatialMix(nn.Module):
    """Vision-RWKV spatial mixing: out = W_o(sigmoid(r) * LayerNorm(BiWKV(decay / T, bonus / T, k, v))).

    token_shift: interpolate k, v, r inputs with a shifted copy (mix_k, mix_v, mix_r per channel): "q_shift",
    "permutation" (the released U-RWKV code's, `grid_shift`) or "none".
    """

    def __init__(self, dim: int, token_shift: str = "q_shift"):
        super().__init__()
        _check_grid_shift("SpatialMix", token_shift)
        init = fancy_init(dim)
        self.decay = nn.Parameter(init["decay"])
        self.bonus = nn.Parameter(init["bonus"])
        self.shift = token_shift
        self.token_shift = token_shift != "none"
        if self.token_shift:
            self.mix_k = nn.Parameter(init["mix_k"])
            self.mix_v = nn.Parameter(init["mix_v"])
            self.mix_r = nn.Parameter(init["mix_r"])
        self.key = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(dim, dim, bias=False)
        self.receptance = nn.Linear(dim, dim, bias=False)
        self.output = nn.Linear(dim, dim, bias=False)
        self.norm = nn.LayerNorm(dim)

    def project(self, x: Tensor, shifted: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """k, v, sigmoid(r) from tokens x [B, N, C] and their Q-shifted copy (ignored without token shift)."""
        if self.token_shift:
            if shifted is None:
                raise ValueError("SpatialMix.project: token_shift is on, pass the shifted tokens")
            xk, xv, xr = (_shift_mix(x, shifted, mu) for mu in (self.mix_k, self.mix_v, self.mix_r))
        else:
            xk = xv = xr = x
        return self.key(xk), self.value(xv), torch.sigmoid(self.receptance(xr))

    def wkv(self, k: Tensor, v: Tensor, orders: tuple[TokenOrder, ...] | None = None) -> Tensor:
        """LayerNorm(BiWKV(k, v)) for sequences [B, T, C], with decay and bonus divided by T; with orders,
        k, v are stored tokens [n, B, N, C] that sequence i reads in orders[i] (`bi_wkv_ordered`)."""
        T = k.shape[-2]
        w, u = self.decay / T, self.bonus / T
        return self.norm(bi_wkv(w, u, k, v) if orders is None else bi_wkv_ordered(w, u, k, v, orders))

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        """x [B, N, C], a row-major sequence over the grid size = (H, W) -> [B, N, C]."""
        shifted = grid_shift(x, size, self.shift) if self.token_shift else None
        k, v, sr = self.project(x, shifted)
        return self.output(sr * self.wkv(k, v))


class ChannelMix(nn.Module):
    """Vision-RWKV channel mixing: out = sigmoid(W_r xr) * W_v LayerNorm(relu(W_k xk)^2), hidden = ratio * C;
    token_shift as for SpatialMix."""

    def __init__(self, dim: int, hidden_ratio: int = 4, token_shift: str = "q_shift"):
        super().__init__()
        _check_grid_shift("ChannelMix", token_shift)
        hidden = hidden_ratio * dim
        self.shift = token_shift
        self.token_shift = token_shift != "none"
        if self.token_shift:
            # Vision-RWKV's layer-0 values for the channel mixer: both mixes c / C
            self.mix_k = nn.Parameter(fancy_init(dim)["mix_k"])
            self.mix_r = nn.Parameter(fancy_init(dim)["mix_k"])
        self.key = nn.Linear(dim, hidden, bias=False)
        self.receptance = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(hidden, dim, bias=False)
        self.norm = nn.LayerNorm(hidden)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        """x [B, N, C] row-major over size = (H, W) -> [B, N, C]."""
        if self.token_shift:
            shifted = grid_shift(x, size, self.shift)
            xk, xr = _shift_mix(x, shifted, self.mix_k), _shift_mix(x, shifted, self.mix_r)
        else:
            xk = xr = x
        k = torch.relu(self.key(xk)).square()  # [B, N, C] -> [B, N, hidden]
        return torch.sigmoid(self.receptance(xr)) * self.value(self.norm(k))


def _grid(order: str, size: tuple[int, int]) -> tuple[int, int]:
    """The grid of the sequence that order scans from a map of size = (H, W): (H, W) by rows, (W, H) by columns."""
    return size if order in _ROW_ORDERS else (size[1], size[0])


def _partners(order: str, size: tuple[int, int], device: torch.device) -> Tensor:
    read = scan_order(order, size).indices(size[0] * size[1], device)  # scan position i reads stored token read[i]
    partners = torch.empty_like(read)  # stored token read[i] takes the token at position permutation[i]
    partners[read] = read[flip_permutation(_grid(order, size), device)]
    return partners


@functools.lru_cache(maxsize=64)
def _kept_partners(order: str, size: tuple[int, int], device: torch.device) -> Tensor:
    # a normal tensor even when first built under inference_mode: tokens[:, partners] saves it for backward
    with torch.inference_mode(False):
        return _partners(order, size, device)


def permutation_partners(order: str, size: tuple[int, int], device: torch.device) -> Tensor:
    """[H*W] for a map of size = (H, W): row-major token n takes token partners[n] under the released code's
    permutation shift on the grid that order scans (flip_permutation), written at the stored tokens. Eager calls
    build it once per (order, size, device), a dozen small kernels, and share it: read it, never write it in
    place. Traced calls (torch.compile, export) build it in the graph, without the cache."""
    if tracing():
        return _partners(order, size, device)
    return _kept_partners(order, (int(size[0]), int(size[1])), torch.device(device))


def _to_tokens(x: Tensor) -> Tensor:
    # a view: contiguous tokens when x is channels-last (the layout stores them), strided ones otherwise
    return x.flatten(2).transpose(1, 2)  # [B, C, H, W] -> [B, H*W, C]


def _to_map(t: Tensor, size: tuple[int, int]) -> Tensor:
    # contiguous t: a view, a channels-last map
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], *size)  # [B, H*W, C] -> [B, C, H, W]


class QuadScanBlock(nn.Module):
    """U-RWKV's RWKV block over a 2D map: for each scan order d, s = scan_d(X); s = s + g1 * SpatialMix(LN1(s));
    map back; average over the orders; then X = X + g2 * ChannelMix(LN2(X)). The orders share all weights.

    With orders=("rows",) this is the plain Vision-RWKV block. The forward never re-serialises the map: each
    order's Q-shift is written on the map (its quarters' directions turned, SCAN_SHIFT_DIRECTIONS), all orders go
    through one projection and one WKV call that reads every order from the row-major tokens in place
    (`bi_wkv_ordered`), and W_o runs once on the mean over the orders (it is per token, so it commutes with
    mapping back and averaging); with an order-independent token shift ("q_shift_map", "none") the k, v, r
    projections run once and the WKV reads that one k, v in every order. per_order=True evaluates the orders
    one at a time, literally as the spec reads (the reference the tests compare against).
    """

    def __init__(
        self,
        dim: int,
        orders: tuple[str, ...] = QUAD_SCAN_ORDERS,
        token_shift: str = "q_shift",
        hidden_ratio: int = 4,
    ):
        super().__init__()
        if not orders or any(o not in QUAD_SCAN_ORDERS for o in orders) or len(set(orders)) < len(orders):
            raise ValueError(
                f"QuadScanBlock: orders {orders!r} must be distinct and a non-empty subset of {QUAD_SCAN_ORDERS}"
            )
        if token_shift not in TOKEN_SHIFTS:
            raise ValueError(f"QuadScanBlock: unknown token_shift {token_shift!r}; choose one of {TOKEN_SHIFTS}")
        self.orders = tuple(orders)
        self.token_shift = token_shift
        shift = "q_shift" if token_shift == "q_shift_map" else token_shift  # the shift each mixer applies
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.spatial = SpatialMix(dim, token_shift=shift)
        self.channel = ChannelMix(dim, hidden_ratio, token_shift=shift)
        self.gamma1 = nn.Parameter(torch.ones(dim))
        self.gamma2 = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor, per_order: bool = False) -> Tensor:
        """x [B, C, H, W] -> [B, C, H, W]."""
        return self.mix_channel(self.mix_spatial(x, per_order))

    def mix_spatial(self, x: Tensor, per_order: bool = False) -> Tensor:
        """X + g1 * mean over the orders of SpatialMix(LN1(scan_d(X))), mapped back; [B, C, H, W]."""
        size = (x.shape[2], x.shape[3])
        # LN1 is per token, so normalising the map once equals normalising every scanned sequence
        t = _to_map(self.norm1(_to_tokens(x)), size)
        mixed = self._spatial_per_order(t) if per_order else self._spatial_batched(t)
        return x + self.gamma1[:, None, None] * mixed

    def mix_channel(self, x: Tensor) -> Tensor:
        """X + g2 * ChannelMix(LN2(X)) with the token shift on X's own grid; [B, C, H, W]."""
        size = (x.shape[2], x.shape[3])
        tokens = _to_tokens(x)
        tokens = tokens + self.gamma2 * self.channel(self.norm2(tokens), size)
        return _to_map(tokens, size)

    @property
    def spatial_transpose_equivariant(self) -> bool:
        """True when mix_spatial(X^T) == mix_spatial(X)^T exactly: the orders are closed under transposition
        (rows <-> cols, rows_reversed <-> cols_reversed) and the token shift follows the scan (a shift on each
        scanned sequence's own grid, "q_shift" or "permutation") or is off."""
        closed = {TRANSPOSED_ORDER[o] for o in self.orders} == set(self.orders)
        return closed and self.token_shift != "q_shift_map"

    def _spatial_batched(self, t: Tensor) -> Tensor:
        """Mean over the orders of SpatialMix, from the normalised map t [B, C, H, W]; returns [B, C, H, W].
        Every order is read from the row-major tokens in place (`bi_wkv_ordered`), so nothing is re-serialised."""
        size = (t.shape[2], t.shape[3])
        orders = tuple(scan_order(o, size) for o in self.orders)
        tokens = _to_tokens(t)  # [B, C, H, W] -> [B, H*W, C], row-major
        if self.token_shift in ("q_shift", "permutation"):
            shifted = self._shifts_per_order(tokens, size)  # [n, B, H*W, C] at the row-major tokens
            k, v, sr = self.spatial.project(tokens, shifted)  # [n, B, H*W, C] each, at the row-major tokens
            mean = (sr * self.spatial.wkv(k, v, orders)).mean(0)  # [n, B, H*W, C] -> [B, H*W, C]
            return _to_map(self.spatial.output(mean), size)  # W_o is per token: once, on the mean
        shifted = q_shift(tokens, size) if self.spatial.token_shift else None
        k, v, sr = self.spatial.project(tokens, shifted)  # [B, H*W, C]; per token, so order-free
        n = len(orders)
        mean = self.spatial.wkv(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1), orders).mean(0)  # one k, n orders
        return _to_map(self.spatial.output(sr * mean), size)

    def _shifts_per_order(self, tokens: Tensor, size: tuple[int, int]) -> Tensor:
        """Each order's token shift on its scanned grid, written at the stored tokens: [B, H*W, C] row-major
        tokens -> [n orders, B, H*W, C]."""
        if self.token_shift == "q_shift":  # the quarters' directions turn with the scan
            return torch.stack([q_shift(tokens, size, SCAN_SHIFT_DIRECTIONS[o]) for o in self.orders])
        return torch.stack([tokens[:, permutation_partners(o, size, tokens.device)] for o in self.orders])

    def _spatial_per_order(self, t: Tensor) -> Tensor:
        """Mean over the orders of SpatialMix on each scanned sequence, one order at a time."""
        size = (t.shape[2], t.shape[3])
        if self.token_shift == "q_shift_map":
            shifted_map = _to_map(q_shift(_to_tokens(t), size), size)
        out = 0
        for order in self.orders:
            s = scan_2d(t, order)
            if self.token_shift in ("q_shift", "permutation"):
                shifted = grid_shift(s, _grid(order, size), self.token_shift)
            elif self.token_shift == "q_shift_map":
                shifted = scan_2d(shifted_map, order)
            else:
                shifted = None
            k, v, sr = self.spatial.project(s, shifted)
            out = out + unscan_2d(self.spatial.output(sr * self.spatial.wkv(k, v)), order, size)
        return out / len(self.orders)
