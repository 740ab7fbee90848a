"""Bi-WKV as plain tensor operators for export: exact, O(T), and traceable with a symbolic sequence length.

`bi_wkv_decomposed` computes exactly the formula of docs/bi_wkv.md with operators that torch.export traces for a
symbolic T without guards and that the ONNX exporter and onnxruntime handle for a dynamic T (Exp, Mul, CumSum,
Pad, Slice, Flip as Slice, Gather): no reshape into chunks, whose padding the symbolic-shape engine cannot prove.

Per channel, the one-sided sum P_t = sum_{i < t} exp(-(t - i - 1) w) x_i factors as
exp(-(t - 1 - c) w) * sum_{i < t} exp((i - c) w) x_i, one exclusive prefix sum, computed in float64 and centred at
c = (T - 1) / 2 so that both factors stay below exp(|w| T / 2 + |w|): finite for |w| T up to ~1400 (the layers
pass w = decay / T, so |w| T = |decay|, about 5 in the released weights). A common factor does not change the
relative rounding of a prefix sum, so this is as accurate as a float64 sequential scan (float32 results within
~1e-7 of the float64 brute force). The reverse direction is a real reverse scan of the flipped sequence, never
"total minus prefix", and k is shifted by its per-sequence maximum. Time and memory are O(B T C): no T x T matrix.

`bi_wkv_ordered_decomposed` reads each sequence of [n, B, N, C] stored tokens in its TokenOrder through a Gather
of computed indices (the order fields may be symbolic sizes), and writes y back through the inverse permutation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

ORDER_FIELDS = 4  # inner, inner_step, outer_step, start (rwkvseg.ops.scan.TokenOrder)


def decayed_prefix(x: Tensor, w: Tensor) -> Tensor:
    """P[c, m, t] = sum_{i < t} exp(-(t - i - 1) w_c) x[c, m, i] for x [C, M, T] (T may be symbolic); [C, M, T]
    float64, computed as exp(-(t - 1 - c) w) * exclusive_cumsum_i(exp((i - c) w) x_i), c = (T - 1) / 2.
    """
    pos = torch.arange(x.shape[2], dtype=torch.float64, device=x.device)  # [T]
    centred = pos - pos.mean()  # i - (T - 1) / 2: both factors below exp(|w| T / 2 + |w|)
    wd = w.double()[:, None]  # [C, 1]
    grow = torch.exp(centred * wd)[:, None, :]  # [C, 1, T]
    shrink = torch.exp(-(centred - 1) * wd)[:, None, :]
    terms = F.pad(x.double() * grow, (1, 0))[:, :, :-1]  # term i moved to slot i + 1: the sum stops before t
    return torch.cumsum(terms, dim=2) * shrink


def bi_wkv_decomposed(w: Tensor, u: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Bi-WKV y [B, T, C] for k, v [B, T, C] and w, u [C] (already divided by T), in plain exportable operators.

    The prefix sums and the ratio run in float64 (numerator and denominator may pass float32's range for
    w < 0 and large |w| T), the inputs' exp and product in float32; returns v's dtype.
    """
    dtype = torch.float64 if v.dtype == torch.float64 else torch.float32
    B = k.shape[0]
    wf, uf = w.to(dtype), u.to(dtype)
    kf = k.to(dtype).permute(2, 0, 1)  # [B, T, C] -> [C, B, T]
    vf = v.to(dtype).permute(2, 0, 1)
    ek = torch.exp(kf - kf.amax(dim=2, keepdim=True))  # the ratio is invariant to a per-sequence shift of k
    x = torch.cat([ek * vf, ek], dim=1)  # [C, 2B, T]: numerator and denominator terms
    prefix = decayed_prefix(torch.cat([x, x.flip(2)], dim=1), wf)  # [C, 4B, T]: forward and reverse scans
    forward, backward = prefix[:, : 2 * B], prefix[:, 2 * B :].flip(2)
    # float64 up to the ratio: for growing weights (w < 0) numerator and denominator may pass float32's range
    total = forward + backward + torch.exp(uf.double())[:, None, None] * x.double()  # [C, 2B, T]
    y = total[:, :B] / total[:, B:]
    return y.permute(1, 2, 0).to(v.dtype)  # [C, B, T] -> [B, T, C]


def order_indices(order: Sequence, n: int, device: torch.device | None = None) -> Tensor:
    """[n] int64 stored-token index read at each position by a TokenOrder given as (inner, inner_step, outer_step,
    start); the fields may be symbolic ints."""
    inner, inner_step, outer_step, start = order
    t = torch.arange(n, device=device)
    outer = torch.div(t, inner, rounding_mode="floor")
    return start + outer * outer_step + (t - outer * inner) * inner_step  # t % inner without a symbolic remainder


def bi_wkv_ordered_decomposed(w: Tensor, u: Tensor, k: Tensor, v: Tensor, orders: Sequence) -> Tensor:
    """Bi-WKV of k, v [n, B, N, C] read in n token orders (flat list of 4 fields per order, the schema of
    `rwkvseg::bi_wkv_ordered`, or a sequence of TokenOrders); y [n, B, N, C] at the stored tokens."""
    orders = _order_tuples(orders)
    n, B, N, C = k.shape
    if len(orders) != n:
        raise ValueError(f"bi_wkv_ordered_decomposed: {len(orders)} orders for {n} slices of k; pass one per slice")
    index = [order_indices(o, N, k.device) for o in orders]  # [N] each
    k_seq = torch.cat([k[i].index_select(1, idx) for i, idx in enumerate(index)])  # [n*B, N, C] in scan order
    v_seq = torch.cat([v[i].index_select(1, idx) for i, idx in enumerate(index)])
    y_seq = bi_wkv_decomposed(w, u, k_seq, v_seq).reshape(n, B, N, C)
    positions = torch.arange(N, device=k.device)
    out = []
    for i, idx in enumerate(index):
        inverse = torch.zeros_like(idx).scatter(0, idx, positions)  # stored token -> its position in the order
        out.append(y_seq[i].index_select(1, inverse))
    return torch.stack(out)


def _order_tuples(orders: Sequence) -> list[tuple]:
    if len(orders) and hasattr(orders[0], "inner"):  # TokenOrder objects
        return [(o.inner, o.inner_step, o.outer_step, o.start) for o in orders]
    if len(orders) % ORDER_FIELDS:
        raise ValueError(f"orders must hold {ORDER_FIELDS} ints per order, got {len(orders)}")
    return [tuple(orders[i : i + ORDER_FIELDS]) for i in range(0, len(orders), ORDER_FIELDS)]
