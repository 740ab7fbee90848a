"""Exact O(T) Bi-WKV in plain PyTorch, for CPUs and as the portable fallback on any device.

The symmetric operator sum_{i != t} exp(-(|t-i|-1) w) x_i splits into a prefix sum over i < t and the same prefix
sum over the reversed sequence (a real reverse scan: no "total minus prefix" cancellation). Each prefix sum is
chunked: an exact decay matrix inside chunks of `chunk` tokens (one batched matmul over channels), and the states
that enter each chunk come from the same prefix sum one level up, over chunk summaries with decay `chunk * w`.
Exponents stay within |w| * T, which the layers bound by passing decay / T.

The backward is the same symmetric operator applied to gy / den and -gy * y / den, plus a distance-weighted pair
sum for dw, so memory stays O(B * T * C) with no autograd graph over the chunks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _decay_matrix(w: Tensor, length: int, weighted: bool = False) -> Tensor:
    """[C, L, L] with D[c, t, i] = exp(-(t - i - 1) w_c) for i < t (times (t - i - 1) if weighted), else 0."""
    pos = torch.arange(length, device=w.device, dtype=w.dtype)
    gap = pos[:, None] - pos[None, :] - 1  # [L, L]
    lower = gap >= 0
    gap = gap.clamp(min=0)
    d = torch.exp(-gap * w[:, None, None])  # [C, L, L]
    if weighted:
        d = d * gap
    return d * lower


def _to_chunks(x: Tensor, length: int) -> Tensor:
    B, T, C = x.shape
    n = -(-T // length)
    if n * length != T:
        x = F.pad(x, (0, 0, 0, n * length - T))
    return x.reshape(B, n, length, C)  # [B, T, C] -> [B, n, L, C]


def _chunk_matmul(d: Tensor, xc: Tensor) -> Tensor:
    """out[b, j, t, c] = sum_i d[c, t, i] * xc[b, j, i, c]: one bmm with channels as the batch."""
    B, n, L, C = xc.shape
    xs = xc.permute(3, 2, 0, 1).reshape(C, L, B * n)  # [B, n, L, C] -> [C, L, B*n]
    out = torch.bmm(d, xs)
    return out.view(C, L, B, n).permute(2, 3, 1, 0)  # -> [B, n, L, C]


def decayed_prefix(x: Tensor, w: Tensor, chunk: int = 64) -> Tensor:
    """P[:, t] = sum_{i < t} exp(-(t - i - 1) w) * x[:, i] for x [B, T, C], w [C]; returns [B, T, C]."""
    B, T, C = x.shape
    L = min(chunk, T)
    xc = _to_chunks(x, L)
    n = xc.shape[1]
    out = _chunk_matmul(_decay_matrix(w, L), xc)
    if n > 1:
        pos = torch.arange(L, device=x.device, dtype=x.dtype)[:, None]  # [L, 1]
        summary = torch.einsum("bnlc,lc->bnc", xc, torch.exp(-(L - 1 - pos) * w))
        entry = decayed_prefix(summary, L * w, chunk)  # [B, n, C]: the state entering each chunk
        out = out + entry[:, :, None, :] * torch.exp(-pos * w)
    return out.reshape(B, n * L, C)[:, :T]


def decayed_pair_sum(a: Tensor, x: Tensor, w: Tensor, chunk: int = 64) -> Tensor:
    """sum over b, t and i < t of (t - i - 1) exp(-(t - i - 1) w) a[b, t] x[b, i]; [B, T, C] each -> [C] float64.

    Pairs inside a chunk use the weighted decay matrix; for t in chunk J and i in chunk I < J the distance splits
    as tau + (L - 1 - sigma) + (J - I - 1) L, which leaves prefix sums and the same pair sum over chunk summaries.
    """
    B, T, C = a.shape
    L = min(chunk, T)
    ac, xc = _to_chunks(a, L), _to_chunks(x, L)
    n = ac.shape[1]
    total = (ac * _chunk_matmul(_decay_matrix(w, L, weighted=True), xc)).sum((0, 1, 2), dtype=torch.float64)
    if n > 1:
        pos = torch.arange(L, device=a.device, dtype=a.dtype)[:, None]  # [L, 1]
        head = torch.exp(-pos * w)  # [L, C]
        tail = torch.exp(-(L - 1 - pos) * w)
        alpha = torch.einsum("bnlc,lc->bnc", ac, head)
        alpha_w = torch.einsum("bnlc,lc->bnc", ac, head * pos)
        beta = torch.einsum("bnlc,lc->bnc", xc, tail)
        beta_w = torch.einsum("bnlc,lc->bnc", xc, tail * (L - 1 - pos))
        prefix = decayed_prefix(torch.cat([beta, beta_w]), L * w, chunk)  # [2B, n, C]
        total = total + (alpha_w * prefix[:B] + alpha * prefix[B:]).sum((0, 1), dtype=torch.float64)
        total = total + L * decayed_pair_sum(alpha, beta, L * w, chunk)
    return total


def symmetric_apply(x: Tensor, w: Tensor, u: Tensor, chunk: int = 64) -> Tensor:
    """sum_{i != t} exp(-(|t - i| - 1) w) x_i + exp(u) x_t for x [N, T, C]."""
    n = x.shape[0]
    prefix = decayed_prefix(torch.cat([x, x.flip(1)]), w, chunk)  # [2N, T, C]: forward and reverse scans
    return prefix[:n] + prefix[n:].flip(1) + torch.exp(u) * x


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class ChunkedBiWKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: Tensor, u: Tensor, k: Tensor, v: Tensor, chunk: int) -> Tensor:
        dtype = _compute_dtype(k)
        with torch.autocast(k.device.type, enabled=False):
            wf, uf, kf, vf = (t.to(dtype) for t in (w, u, k, v))
            kmax = kf.amax(1, keepdim=True)  # [B, 1, C]; the ratio is invariant to this shift
            ek = torch.exp(kf - kmax)
            num, den = symmetric_apply(torch.cat([ek * vf, ek]), wf, uf, chunk).chunk(2)
            y = num / den
        ctx.save_for_backward(w, u, k, v, kmax, y, den)
        ctx.chunk = chunk
        return y.to(v.dtype)

    @staticmethod
    def backward(ctx, gy: Tensor):
        w, u, k, v, kmax, y, den = ctx.saved_tensors
        chunk = ctx.chunk
        dtype = y.dtype
        with torch.autocast(k.device.type, enabled=False):
            wf, uf, kf, vf = (t.to(dtype) for t in (w, u, k, v))
            gy = gy.to(dtype)
            ek = torch.exp(kf - kmax)
            a = gy / den  # dL/dnum
            b = -gy * y / den  # dL/dden
            wa, wb = symmetric_apply(torch.cat([a, b]), wf, uf, chunk).chunk(2)
            gv = ek * wa
            gk = ek * (vf * wa + wb)
            gu = (torch.exp(uf) * ek * (vf * a + b)).sum((0, 1), dtype=torch.float64)
            ekv = ek * vf
            lhs = torch.cat([a, b, a.flip(1), b.flip(1)])
            rhs = torch.cat([ekv, ek, ekv.flip(1), ek.flip(1)])
            gw = -decayed_pair_sum(lhs, rhs, wf, chunk)
        return gw.to(w.dtype), gu.to(u.dtype), gk.to(k.dtype), gv.to(v.dtype), None


def bi_wkv_chunked(w: Tensor, u: Tensor, k: Tensor, v: Tensor, chunk: int = 64) -> Tensor:
    """Exact O(T) Bi-WKV with a custom backward; fp32 accumulation (fp64 for fp64 inputs)."""
    return ChunkedBiWKV.apply(w, u, k, v, chunk)
