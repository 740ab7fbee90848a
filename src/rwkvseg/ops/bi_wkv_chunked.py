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
    """[C, L, L] with D[c, i, t] = exp(-(t - i - 1) w_c) for i < t (times (t - i - 1) if weighted), else 0.

    Laid out [source i, target t] so that chunks [C, N*n, L] @ D gives the targets with no transposes.
    """
    pos = torch.arange(length, device=w.device, dtype=w.dtype)
    gap = pos[None, :] - pos[:, None] - 1  # [L(i), L(t)]
    lower = gap >= 0
    gap = gap.clamp(min=0)
    d = torch.exp(-gap * w[:, None, None])  # [C, L, L]
    if weighted:
        d = d * gap
    return d * lower


def _to_chunks(x: Tensor, length: int) -> Tensor:
    C, N, T = x.shape
    n = -(-T // length)
    if n * length != T:
        x = F.pad(x, (0, n * length - T))
    return x.reshape(C, N * n, length)  # [C, N, T] -> [C, N*n, L]


def decayed_prefix(x: Tensor, w: Tensor, chunk: int = 64) -> Tensor:
    """P[c, :, t] = sum_{i < t} exp(-(t - i - 1) w_c) * x[c, :, i] for x [C, N, T], w [C]; returns [C, N, T].

    Channels first and time last keep every step a contiguous batched matmul over channels.
    """
    C, N, T = x.shape
    L = min(chunk, T)
    xc = _to_chunks(x, L)  # [C, N*n, L]
    n = xc.shape[1] // N
    out = torch.bmm(xc, _decay_matrix(w, L))  # [C, N*n, L]
    if n > 1:
        pos = torch.arange(L, device=x.device, dtype=x.dtype)
        tail = torch.exp(-(L - 1 - pos) * w[:, None])  # [C, L]: weight of each token on the next chunk's state
        summary = torch.bmm(xc, tail[:, :, None]).view(C, N, n)
        entry = decayed_prefix(summary, L * w, chunk)  # [C, N, n]: the state entering each chunk
        head = torch.exp(-pos * w[:, None])  # [C, L]
        out = out.view(C, N, n, L).add_(entry[..., None] * head[:, None, None, :])
    return out.reshape(C, N, n * L)[..., :T]


def decayed_pair_sum(a: Tensor, x: Tensor, w: Tensor, chunk: int = 64) -> Tensor:
    """sum over n, t and i < t of (t - i - 1) exp(-(t - i - 1) w) a[:, n, t] x[:, n, i]; [C, N, T] -> [C] float64.

    Pairs inside a chunk use the weighted decay matrix; for t in chunk J and i in chunk I < J the distance splits
    as tau + (L - 1 - sigma) + (J - I - 1) L, which leaves prefix sums and the same pair sum over chunk summaries.
    """
    C, N, T = a.shape
    L = min(chunk, T)
    ac, xc = _to_chunks(a, L), _to_chunks(x, L)  # [C, N*n, L]
    n = ac.shape[1] // N
    total = (ac * torch.bmm(xc, _decay_matrix(w, L, weighted=True))).sum((1, 2), dtype=torch.float64)
    if n > 1:
        pos = torch.arange(L, device=a.device, dtype=a.dtype)
        head = torch.exp(-pos * w[:, None])  # [C, L]
        tail = torch.exp(-(L - 1 - pos) * w[:, None])
        alpha = torch.bmm(ac, torch.stack([head, head * pos], 2)).view(C, N, n, 2)
        beta = torch.bmm(xc, torch.stack([tail, tail * (L - 1 - pos)], 2)).view(C, N, n, 2)
        prefix = decayed_prefix(beta.permute(0, 3, 1, 2).reshape(C, 2 * N, n), L * w, chunk).view(C, 2, N, n)
        cross = alpha[..., 1] * prefix[:, 0] + alpha[..., 0] * prefix[:, 1]
        total = total + cross.sum((1, 2), dtype=torch.float64)
        total = total + L * decayed_pair_sum(alpha[..., 0], beta[..., 0], L * w, chunk)
    return total


def symmetric_apply(x: Tensor, w: Tensor, u: Tensor, chunk: int = 64) -> Tensor:
    """sum_{i != t} exp(-(|t - i| - 1) w) x_i + exp(u) x_t along the last axis of x [C, N, T]."""
    n = x.shape[1]
    prefix = decayed_prefix(torch.cat([x, x.flip(2)], 1), w, chunk)  # [C, 2N, T]: forward and reverse scans
    return prefix[:, :n] + prefix[:, n:].flip(2) + torch.exp(u)[:, None, None] * x


def _channels_first(x: Tensor, dtype: torch.dtype) -> Tensor:
    return x.to(dtype).permute(2, 0, 1).contiguous()  # [B, T, C] -> [C, B, T]


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _forward(w: Tensor, u: Tensor, k: Tensor, v: Tensor, chunk: int) -> tuple[Tensor, Tensor, Tensor]:
    """y [C, B, T] in the compute dtype, with the k max [C, B, 1] and the denominator [C, B, T] the backward uses."""
    dtype = _compute_dtype(k)
    with torch.autocast(k.device.type, enabled=False):
        wf, uf = w.to(dtype), u.to(dtype)
        kf, vf = (_channels_first(t, dtype) for t in (k, v))  # [B, T, C] -> [C, B, T]
        kmax = kf.amax(2, keepdim=True)  # [C, B, 1]; the ratio is invariant to this shift
        ek = torch.exp(kf - kmax)
        num, den = symmetric_apply(torch.cat([ek * vf, ek], 1), wf, uf, chunk).chunk(2, 1)
        return num / den, kmax, den


def _backward(w, u, k, v, kmax, y, den, gy, chunk: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dw, du, dk, dv) in the dtypes of w, u, k, v; dk, dv are [B, T, C] views of channels-first tensors."""
    dtype = y.dtype
    with torch.autocast(k.device.type, enabled=False):
        wf, uf = w.to(dtype), u.to(dtype)
        kf, vf, gy = (_channels_first(t, dtype) for t in (k, v, gy))  # [B, T, C] -> [C, B, T]
        ek = torch.exp(kf - kmax)
        a = gy / den  # dL/dnum
        b = -gy * y / den  # dL/dden
        wa, wb = symmetric_apply(torch.cat([a, b], 1), wf, uf, chunk).chunk(2, 1)
        gv = ek * wa
        gk = ek * (vf * wa + wb)
        gu = (torch.exp(uf)[:, None, None] * ek * (vf * a + b)).sum((1, 2), dtype=torch.float64)
        ekv = ek * vf
        lhs = torch.cat([a, b, a.flip(2), b.flip(2)], 1)
        rhs = torch.cat([ekv, ek, ekv.flip(2), ek.flip(2)], 1)
        gw = -decayed_pair_sum(lhs, rhs, wf, chunk)
    gk, gv = (g.permute(1, 2, 0) for g in (gk, gv))  # [C, B, T] -> [B, T, C]
    return gw.to(w.dtype), gu.to(u.dtype), gk.to(k.dtype), gv.to(v.dtype)


class ChunkedBiWKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: Tensor, u: Tensor, k: Tensor, v: Tensor, chunk: int) -> Tensor:
        y, kmax, den = _forward(w, u, k, v, chunk)
        ctx.save_for_backward(w, u, k, v, kmax, y, den)
        ctx.chunk = chunk
        return y.permute(1, 2, 0).to(v.dtype)  # [C, B, T] -> [B, T, C]

    @staticmethod
    def backward(ctx, gy: Tensor):
        return (*_backward(*ctx.saved_tensors, gy, ctx.chunk), None)


def bi_wkv_chunked(w: Tensor, u: Tensor, k: Tensor, v: Tensor, chunk: int = 64) -> Tensor:
    """Exact O(T) Bi-WKV with a custom backward; fp32 accumulation (fp64 for fp64 inputs)."""
    return ChunkedBiWKV.apply(w, u, k, v, chunk)


def bi_wkv_chunked_grads(
    w: Tensor, u: Tensor, k: Tensor, v: Tensor, gy: Tensor, chunk: int = 64
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dw, du, dk, dv) of `bi_wkv_chunked` at the output gradient gy [B, T, C], recomputing the forward: the
    backward of the registered operator, which keeps only its inputs."""
    y, kmax, den = _forward(w, u, k, v, chunk)
    return _backward(w, u, k, v, kmax, y, den, gy, chunk)
