"""Bi-WKV as plain tensor operators for export: exact, O(T), and traceable with a symbolic sequence length.

`bi_wkv_ordered_decomposed` computes exactly the formula of docs/bi_wkv.md with operators that torch.export traces
for a symbolic T without guards and that the ONNX exporter and onnxruntime handle for a dynamic T (Exp, Mul,
CumSum, Gather, ScatterElements): no reshape into chunks, whose padding the symbolic-shape engine cannot prove.

Per channel, the one-sided sum P_t = sum_{i < t} exp(-(t - i - 1) w) x_i factors as
exp(-(t - 1 - c) w) * sum_{i < t} exp((i - c) w) x_i, one exclusive prefix sum, computed in float64 and centred at
c = (T - 1) / 2 so that both factors stay below exp(|w| T / 2 + |w|): finite for |w| T up to ~1400 (the layers
pass w = decay / T, so |w| T = |decay|, about 5 in the released weights). A common factor does not change the
relative rounding of a prefix sum, so this is as accurate as a float64 sequential scan (float32 results within
~1e-7 of the float64 brute force). The reverse direction is a real scan of the sequence read backwards, never
"total minus prefix", and k is shifted by its per-sequence maximum. Time and memory are O(B T C): no T x T matrix.

Layout, for onnxruntime's sake: every sequence is read from the stored tokens [n, B, N, C] through one Gather of
computed rows into [T, M, C] (T outermost: CumSum then adds contiguous [M, C] slices instead of walking single
elements), the reverse scans read the tokens in reverse order (an index flip, no data flip), the exclusive shift
is in the read index (position t reads token t - 1; position 0 is zeroed by its factor), and one Gather through
the inverse order brings both directions' sums back to the stored tokens. No transposes, pads or flips of data.

float32 sums (`sums=torch.float32`, what export picks when every call of the model has |w| T <= F32_SUMS_MAX_WT,
`largest_wt`): with |w| T <= 32 every factor lies in [e^-48, e^48] and every sum below T e^48, far inside
float32's normal range, and the largest token's own share of a denominator is at least e^-32, so nothing that
matters overflows or underflows; what remains is float32's rounding of a sequential prefix sum, about
sqrt(T) 6e-8 relative (measured with onnxruntime: within 4e-6 of the float64 brute force up to T = 4096).
Half the memory traffic of float64 and no casts: 3 of ~48 ms of the exported U-RWKV-s on 2 CPU cores.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

ORDER_FIELDS = 4  # inner, inner_step, outer_step, start (rwkvseg.ops.scan.TokenOrder)
F32_SUMS_MAX_WT = 32.0  # largest |w| T for float32 prefix sums (module docstring); released weights: about 5


def decayed_prefix(rows: Tensor, read: Tensor, w: Tensor) -> Tensor:
    """P[t, m] = sum_{i < t} exp(-(t - i - 1) w) rows[read[i, m]] for rows [R, C] and read [T, M] (the row that
    sequence m reads at position t; T may be symbolic) -> [T, M, C] in rows' dtype, computed as
    exp(-(t - 1 - c) w) * sum_{i < t} exp((i - c) w) x_i, c = (T - 1) / 2."""
    T, C = read.shape[0], rows.shape[1]
    pos = torch.arange(T, dtype=rows.dtype, device=rows.device)  # [T]
    centred = pos - pos.mean() - 1  # t - 1 - (T - 1) / 2: both factors below exp(|w| T / 2 + |w|)
    wd = w.to(rows.dtype)[None, :]  # [1, C]
    # slot t holds term t - 1 (the sum stops before t); slot 0 reads any row and its factor zeroes it
    grow = (torch.exp(centred[:, None] * wd) * (pos > 0).to(rows.dtype)[:, None])[:, None, :]  # [T, 1, C]
    shrink = torch.exp(-centred[:, None] * wd)[:, None, :]
    shifted = torch.cat([read[:1], read[:-1]])  # [T, M]
    terms = rows.index_select(0, shifted.reshape(-1)).reshape(T, -1, C) * grow  # [T, M, C]
    return torch.cumsum(terms, dim=0) * shrink


def bi_wkv_decomposed(w: Tensor, u: Tensor, k: Tensor, v: Tensor, *, sums: torch.dtype = torch.float64) -> Tensor:
    """Bi-WKV y [B, T, C] for k, v [B, T, C] and w, u [C] (already divided by T), in plain exportable operators:
    the ordered form with the identity order."""
    T = k.shape[1]
    return bi_wkv_ordered_decomposed(w, u, k[None], v[None], [T, 1, T, 0], sums=sums)[0]


def order_indices(order: Sequence, n: int, device: torch.device | None = None) -> Tensor:
    """[n] int64 stored-token index read at each position by a TokenOrder given as (inner, inner_step, outer_step,
    start); the fields may be symbolic ints."""
    inner, inner_step, outer_step, start = order
    t = torch.arange(n, device=device)
    outer = torch.div(t, inner, rounding_mode="floor")
    return start + outer * outer_step + (t - outer * inner) * inner_step  # t % inner without a symbolic remainder


def bi_wkv_ordered_decomposed(
    w: Tensor, u: Tensor, k: Tensor, v: Tensor, orders: Sequence, *, sums: torch.dtype = torch.float64
) -> Tensor:
    """Bi-WKV of k, v [n, B, N, C] read in n token orders (flat list of 4 fields per order, the schema of
    `rwkvseg::bi_wkv_ordered`, or a sequence of TokenOrders); y [n, B, N, C] at the stored tokens.

    The inputs' exp and product run in float32 (float64 for float64 inputs), the prefix sums and the ratio in
    `sums`: float64 by default (numerator and denominator may pass float32's range for w < 0 and large |w| T),
    float32 only where |w| T is known to be small (`F32_SUMS_MAX_WT`); returns v's dtype.
    """
    orders = _order_tuples(orders)
    n, B, N, C = k.shape
    if len(orders) != n:
        raise ValueError(f"bi_wkv_ordered_decomposed: {len(orders)} orders for {n} slices of k; pass one per slice")
    dtype = torch.float64 if v.dtype == torch.float64 else torch.float32
    device = k.device
    kf, vf = k.to(dtype), v.to(dtype)
    ek = torch.exp(kf - kf.amax(dim=2, keepdim=True))  # a sequence's maximum is its stored tokens' maximum
    x = torch.stack([ek * vf, ek], dim=1).to(sums)  # [n, 2, B, N, C]: numerator and denominator terms
    index = torch.stack([order_indices(o, N, device) for o in orders])  # [n, N]: token read at each position
    scans = torch.stack([index, index.flip(1)], dim=1)  # [n, 2, N]: forward and reverse scans
    i = torch.arange(n, device=device)[:, None, None, None, None]
    h = torch.arange(2, device=device)[None, None, :, None, None]
    b = torch.arange(B, device=device)[None, None, None, :, None]
    read = ((i * 2 + h) * B + b) * N + scans[:, :, None, None, :]  # [n, 2 scans, 2 halves, B, N]: rows of x
    prefix = decayed_prefix(x.reshape(-1, C), read.permute(4, 0, 1, 2, 3).reshape(N, -1), w)  # [N, M, C]
    # back to the stored tokens: token s sits at position p in the forward scan and N - 1 - p in the reverse one
    place = torch.zeros_like(index).scatter(1, index, torch.arange(N, device=device).expand(n, N))  # [n, N]
    at = torch.stack([place, N - 1 - place], dim=1)[:, :, None, None, :]  # [n, 2, 1, 1, N]
    s = torch.arange(2, device=device)[None, :, None, None, None]
    column = ((i * 2 + s) * 2 + h) * B + b  # [n, 2, 2, B, 1]: the sequence's column m in prefix
    gathered = prefix.reshape(-1, C).index_select(0, (at * (4 * n * B) + column).reshape(-1))
    both = gathered.reshape(n, 2, 2, B, N, C)  # [n, scan, half, B, N, C] at the stored tokens
    total = both[:, 0] + both[:, 1] + torch.exp(u.to(sums)) * x  # [n, 2, B, N, C]
    return (total[:, 0] / total[:, 1]).to(v.dtype)


def _order_tuples(orders: Sequence) -> list[tuple]:
    if len(orders) and hasattr(orders[0], "inner"):  # TokenOrder objects
        return [(o.inner, o.inner_step, o.outer_step, o.start) for o in orders]
    if len(orders) % ORDER_FIELDS:
        raise ValueError(f"orders must hold {ORDER_FIELDS} ints per order, got {len(orders)}")
    return [tuple(orders[i : i + ORDER_FIELDS]) for i in range(0, len(orders), ORDER_FIELDS)]


class _LargestWT(TorchDispatchMode):
    """Records the largest |w| T over the Bi-WKV operator calls it sees (T: the sequence length of k)."""

    def __init__(self):
        super().__init__()
        self.largest = 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.rwkvseg.bi_wkv.default, torch.ops.rwkvseg.bi_wkv_ordered.default):
            w, k = args[0], args[2]
            self.largest = max(self.largest, float(w.detach().abs().max()) * k.shape[-2])
        return func(*args, **(kwargs or {}))


def largest_wt(model: torch.nn.Module, example: Tensor) -> float:
    """The largest |w| T of the model's Bi-WKV calls on example, from one forward pass (0 without any). rwkvseg's
    layers pass w = decay / T, so the value holds for every input size."""
    from .. import ops  # noqa: F401  (importing rwkvseg.ops registers the operators)

    observer = _LargestWT()
    with torch.no_grad(), observer:
        model(example)
    return observer.largest


def sums_dtype(model: torch.nn.Module, example: Tensor) -> torch.dtype:
    """float32 for the decomposition's prefix sums where the model's |w| T allows it (module docstring), else
    float64."""
    return torch.float32 if largest_wt(model, example) <= F32_SUMS_MAX_WT else torch.float64
