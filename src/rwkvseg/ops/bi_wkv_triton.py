"""Triton Bi-WKV for CUDA tensors: forward and backward kernels with the contract of `bi_wkv`.

Per channel the operator is y_t = num_t / den_t with num, den = Sym([e^(k-kmax) v, e^(k-kmax)]) and
Sym(x)_t = sum_{i != t} e^(-(|t-i|-1) w) x_i + e^u x_t. Sym is a forward and a reverse linear recurrence,
S_{t+1} = e^-w S_t + x_t. The sequence is cut into chunks of L = R * S tokens; a chunk kernel holds one
(batch, chunk, block of BC channels) as an [R, S, BC] register tile: channels on lanes, S slabs on warps, R tokens
of a slab inside one thread, so the scans along the tokens (`tl.associative_scan`) run in registers. The default
(S = 1, L = 16) is one warp per chunk with no shared memory and no barrier; for S > 1 the slabs are joined by a
small [S, S, BC] weighted sum.

forward   1. `_fwd_summary_kernel`: reads k, v once; writes per chunk its k max and the chunk's contribution to
             the state leaving it rightwards and leftwards (5 floats per chunk and channel).
          2. `_fwd_chunk_scan_kernel`: per (batch, channel, side) a scan over the chunk summaries gives kmax and
             the states entering every chunk from the left or the right (in units of e^kmax).
          3. `_fwd_output_kernel`: reads k, v again, scans its chunk both ways from the entering states and writes
             y once. A sequence of one chunk (T <= L) needs only this kernel, which then also finds kmax.
          Bytes: k, v read twice, y written once (20 B/token-channel in fp32 against the 12 B floor).
backward  The same operator applied to a = gy/den and b = -gy*y/den, plus dw, which needs the distance-weighted
          state Q_t = sum_{i<t} (t-1-i) e^(-(t-1-i) w) x_i: Q follows Q_{t+1} = e^-w (Q_t + S_t), so the scans
          carry (S, Q) pairs with an exact composition rule (no "total minus prefix" cancellation).
          4. `_bwd_summary_kernel`: recomputes num, den (reads k, v, gy; keeps nothing from the forward but kmax
             and the chunk states), writes chunk summaries of (a, b) with their Q moments.
          5. `_bwd_chunk_scan_kernel`: scan over chunks, as in 2.
          6. `_bwd_output_kernel`: recomputes a, b, applies Sym with the entering states, writes dk, dv and per
             chunk partial sums for du and dw, reduced afterwards in float64 (deterministic, no atomics).

Max subtraction uses kmax per (batch, channel) over the whole sequence, as the chunked CPU path does; it comes
out of the chunk summaries, so no extra pass over k. Padded tokens of the last chunk are identity maps. Decays
inside a chunk are products of e^-w (at most L of them); across chunks they are recomputed from the chunk count.
Decay exponents stay within |w| * T, which the layers bound by passing decay / T (as for the CPU path).

Several sequences in one launch: k and v only need a contiguous channel axis; batch and time strides are free,
so windows or scan orders that a layer can express as one [N, T, C] view (e.g. x.view(B * n, T, C) of contiguous
windows, or a slice along channels or every s-th token) go to one launch without a copy. Design and measurements:
docs/kernel_notes.md.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .bi_wkv_chunked import bi_wkv_chunked


@triton.jit
def _exp(x):
    """e^x to a few ulp: tl.exp rounds x * log2(e) first, ~1e-6 relative error at |x| ~ 10 (k - kmax is there).
    Cody-Waite: x = n ln2 + r with ln2 in two parts, e^x = 2^n 2^(r log2 e), |r| <= ln2 / 2."""
    x = tl.maximum(x, -104.0)  # e^-104 is 0 in fp32; keeps -inf (padding) from making NaN
    n = tl.floor(x * 1.4426950408889634 + 0.5)
    r = x - n * 0.693145751953125 - n * 1.4286068203094173e-06
    return tl.exp2(n) * tl.exp2(r * 1.4426950408889634)


@triton.jit
def _combine(d1, n1, e1, d2, n2, e2):
    # (d, s) is the map S -> d S + s; composing "first 1, then 2"
    return d1 * d2, d2 * n1 + n2, d2 * e1 + e2


@triton.jit
def _combine_q(d1, m1, a1, b1, qa1, qb1, d2, m2, a2, b2, qa2, qb2):
    # the map of m tokens on (S, Q): S -> d S + s, Q -> d (Q + m S) + q, composed "first 1, then 2"
    return (
        d1 * d2,
        m1 + m2,
        d2 * a1 + a2,
        d2 * b1 + b2,
        d2 * (qa1 + m2 * a1) + qa2,
        d2 * (qb1 + m2 * b1) + qb2,
    )


@triton.jit
def _combine_count(lw1, c1, n1, e1, lw2, c2, n2, e2):
    # as _combine over c chunks of decay e^(-lw) each; the decay is recomputed from the count, since a product
    # of thousands of chunk decays drifts by ~count * eps (1e-5 at T = 32768 with 16-token chunks)
    d2 = _exp(-c2 * lw2)
    return lw1, c1 + c2, d2 * n1 + n2, d2 * e1 + e2


@triton.jit
def _combine_q_count(w1, m1, a1, b1, qa1, qb1, w2, m2, a2, b2, qa2, qb2):
    # as _combine_q with the decay of m tokens recomputed as e^(-m w)
    d2 = _exp(-m2 * w2)
    return (
        w1,
        m1 + m2,
        d2 * a1 + a2,
        d2 * b1 + b2,
        d2 * (qa1 + m2 * a1) + qa2,
        d2 * (qb1 + m2 * b1) + qb2,
    )


@triton.jit
def _tile(b, j, cb, T, C, stride_b, stride_t, R: tl.constexpr, S: tl.constexpr, BC: tl.constexpr):
    """A chunk of L = R * S tokens as an [R, S, BC] tile: token s * R + r of the chunk sits at [r, s, :].

    Triton lays this shape out with the S slabs across warps, the channels across lanes and the R rows of a
    slab inside one thread, so the scans along axis 0 run in registers, without shared memory or barriers.
    """
    r = tl.arange(0, R)[:, None, None]
    pos = tl.arange(0, S)[None, :, None] * R + r  # [R, S, 1]
    cols = cb * BC + tl.arange(0, BC)
    t = j * (R * S) + pos
    mask = (t < T) & (cols < C)[None, None, :]
    offs = b.to(tl.int64) * stride_b + t.to(tl.int64) * stride_t + cols[None, None, :]
    return offs, mask, t < T, r, pos, cols


@triton.jit
def _slab_weights(D, R: tl.constexpr, S: tl.constexpr, REVERSE: tl.constexpr):
    """How the states leaving the slabs of a chunk reach each slab: W[s, s'] = D^gap for slabs s' before s in
    scan order (gap slabs in between, D = e^(-R w)), WQ = W * gap * R for the Q moments, and P[s] = D^own, own *
    R = PR[s], for the state entering the chunk. Powers by repeated products; capped because only padding (whose
    states are zero) can reach the cap, and inf * 0 would poison the sums."""
    s = tl.arange(0, S)[:, None, None]
    s2 = tl.arange(0, S)[None, :, None]
    s1 = tl.arange(0, S)[:, None]
    if REVERSE:
        gap = s2 - s - 1
        own = S - 1 - s1
    else:
        gap = s - 1 - s2
        own = s1
    W = tl.zeros([S, S, D.shape[0]], tl.float32)
    P = tl.zeros([S, D.shape[0]], tl.float32)
    power = tl.full(D.shape, 1.0, tl.float32)
    for m in tl.static_range(S):
        W = tl.where(gap == m, power[None, None, :], W)
        P = tl.where(own == m, power[None, :], P)
        power = tl.minimum(power * D, 1e30)
    return W, W * (gap * R).to(tl.float32), P, (own * R).to(tl.float32)


@triton.jit
def _slab_entry(W, P, F, e):
    """State entering each slab [S, BC]: the earlier slabs' states F [S, BC], decayed, and the chunk's e [BC]."""
    return tl.sum(W * F[None, :, :], 1) + P * e[None, :]


@triton.jit
def _slab_entry_q(W, WQ, P, PR, F, FQ, e, eq):
    return tl.sum(WQ * F[None, :, :] + W * FQ[None, :, :], 1) + P * (eq[None, :] + PR * e[None, :])


@triton.jit
def _edge(x, r, row: tl.constexpr):
    return tl.sum(tl.where(r == row, x, 0.0), 0)  # [R, S, BC] -> [S, BC]


@triton.jit
def _sym_tile(xn, xd, d, ew, eu, fwd_w, bwd_w, sfn, sfd, sbn, sbd, r, R: tl.constexpr):
    """Sym of num and den inside one chunk, with the states entering it from the left (sf) and right (sb)."""
    W, _, P, _ = fwd_w
    # inclusive scans give the state after each token; the exclusive one is e^w (after - x)
    dd, an, ad = tl.associative_scan((d, xn, xd), 0, _combine)
    an += dd * _slab_entry(W, P, _edge(an, r, R - 1), sfn)[None, :, :]
    ad += dd * _slab_entry(W, P, _edge(ad, r, R - 1), sfd)[None, :, :]
    W, _, P, _ = bwd_w
    dd, bn, bd = tl.associative_scan((d, xn, xd), 0, _combine, reverse=True)
    bn += dd * _slab_entry(W, P, _edge(bn, r, 0), sbn)[None, :, :]
    bd += dd * _slab_entry(W, P, _edge(bd, r, 0), sbd)[None, :, :]
    # (after - x) is exact when the token dominates its state, which keeps strong decays (large w) exact
    e = ew[None, None, :]
    o = eu[None, None, :]
    return e * ((an - xn) + (bn - xn)) + o * xn, e * ((ad - xd) + (bd - xd)) + o * xd


@triton.jit
def _chunk_sums(x, pos, w, L: tl.constexpr):
    """The chunk's contributions to the states leaving it rightwards and leftwards, with their Q moments."""
    df = _exp(-(L - 1 - pos).to(tl.float32) * w[None, None, :])
    db = _exp(-pos.to(tl.float32) * w[None, None, :])
    x_df = x * df
    x_db = x * db
    return (
        tl.sum(tl.sum(x_df, 0), 0),
        tl.sum(tl.sum(x_df * (L - 1 - pos).to(tl.float32), 0), 0),
        tl.sum(tl.sum(x_db, 0), 0),
        tl.sum(tl.sum(x_db * pos.to(tl.float32), 0), 0),
    )


@triton.jit
def _fwd_summary_kernel(
    k_ptr, v_ptr, w_ptr, summ_ptr, T, C, n, skb, skt, svb, svt,
    R: tl.constexpr, S: tl.constexpr, BC: tl.constexpr, NCB,
):  # fmt: skip
    pid = tl.program_id(0)
    cb = pid % NCB
    j = (pid // NCB) % n
    b = pid // (NCB * n)
    koffs, mask, _, _, pos, cols = _tile(b, j, cb, T, C, skb, skt, R, S, BC)
    voffs, _, _, _, _, _ = _tile(b, j, cb, T, C, svb, svt, R, S, BC)
    cmask = cols < C
    k = tl.load(k_ptr + koffs, mask=mask, other=float("-inf")).to(tl.float32)
    v = tl.load(v_ptr + voffs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0)
    m = tl.max(tl.max(k, 0), 0)
    ek = _exp(k - m[None, None, :])
    fn, _, gn, _ = _chunk_sums(ek * v, pos, w, R * S)
    fd, _, gd, _ = _chunk_sums(ek, pos, w, R * S)
    plane = n * C
    out = summ_ptr + b.to(tl.int64) * 5 * plane + cols * n + j
    tl.store(out, m, mask=cmask)
    tl.store(out + plane, fn, mask=cmask)
    tl.store(out + 2 * plane, fd, mask=cmask)
    tl.store(out + 3 * plane, gn, mask=cmask)
    tl.store(out + 4 * plane, gd, mask=cmask)


@triton.jit
def _fwd_chunk_scan_kernel(summ_ptr, state_ptr, kmax_ptr, w_ptr, n, C, L: tl.constexpr, NB: tl.constexpr):
    """Program (b * C + c, side): kmax and the states entering every chunk from the left (side 0) or the right."""
    pid = tl.program_id(0)
    right = tl.program_id(1)
    c = pid % C
    b = pid // C
    lw = tl.zeros([NB], tl.float32) + L * tl.load(w_ptr + c)  # log-decay across one whole chunk
    one = tl.zeros([NB], tl.float32) + 1.0
    idx = tl.arange(0, NB)
    n_tiles = tl.cdiv(n, NB)
    plane = n * C
    summ = summ_ptr + b.to(tl.int64) * 5 * plane + c.to(tl.int64) * n
    state = state_ptr + b.to(tl.int64) * 4 * plane + c.to(tl.int64) * n

    kmax = tl.max(tl.full([NB], float("-inf"), tl.float32), 0)
    for i in range(n_tiles):
        j = i * NB + idx
        kmax = tl.maximum(kmax, tl.max(tl.load(summ + j, mask=j < n, other=float("-inf")), 0))
    if right == 0:
        tl.store(kmax_ptr + b * C + c, kmax)

    carry_n = tl.sum(tl.zeros([NB], tl.float32), 0)
    carry_d = carry_n
    if right == 0:
        # row j scans the summaries of chunks < j (loaded shifted by one, so inclusive = exclusive)
        for i in range(n_tiles):
            j = i * NB + idx
            ok = (j >= 1) & (j < n)
            src = summ + (j - 1)
            scale = _exp(tl.load(src, mask=ok, other=float("-inf")) - kmax)
            fn = tl.load(src + plane, mask=ok, other=0.0) * scale
            fd = tl.load(src + 2 * plane, mask=ok, other=0.0) * scale
            _, cc, sn, sd = tl.associative_scan((lw, one, fn, fd), 0, _combine_count)
            dd = _exp(-cc * lw)
            sn += dd * carry_n
            sd += dd * carry_d
            tl.store(state + j, sn, mask=j < n)
            tl.store(state + plane + j, sd, mask=j < n)
            carry_n = tl.sum(tl.where(idx == NB - 1, sn, 0.0), 0)
            carry_d = tl.sum(tl.where(idx == NB - 1, sd, 0.0), 0)
    else:
        # row j scans chunks > j, from the last chunk leftwards
        for ii in range(n_tiles):
            j = (n_tiles - 1 - ii) * NB + idx
            ok = j + 1 < n
            src = summ + (j + 1)
            scale = _exp(tl.load(src, mask=ok, other=float("-inf")) - kmax)
            gn = tl.load(src + 3 * plane, mask=ok, other=0.0) * scale
            gd = tl.load(src + 4 * plane, mask=ok, other=0.0) * scale
            _, cc, sn, sd = tl.associative_scan((lw, one, gn, gd), 0, _combine_count, reverse=True)
            dd = _exp(-cc * lw)
            sn += dd * carry_n
            sd += dd * carry_d
            tl.store(state + 2 * plane + j, sn, mask=j < n)
            tl.store(state + 3 * plane + j, sd, mask=j < n)
            carry_n = tl.sum(tl.where(idx == 0, sn, 0.0), 0)
            carry_d = tl.sum(tl.where(idx == 0, sd, 0.0), 0)


@triton.jit
def _recompute(
    k_ptr, v_ptr, w_ptr, u_ptr, kmax_ptr, state_ptr, b, j, cb, T, C, n, skb, skt, svb, svt,
    R: tl.constexpr, S: tl.constexpr, BC: tl.constexpr, HAS_STATES: tl.constexpr, FIND_KMAX: tl.constexpr,
):  # fmt: skip
    """Loads one tile and returns num, den and what the backward needs besides."""
    koffs, mask, row_ok, r, pos, cols = _tile(b, j, cb, T, C, skb, skt, R, S, BC)
    voffs, _, _, _, _, _ = _tile(b, j, cb, T, C, svb, svt, R, S, BC)
    cmask = cols < C
    k = tl.load(k_ptr + koffs, mask=mask, other=float("-inf")).to(tl.float32)
    v = tl.load(v_ptr + voffs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0)
    u = tl.load(u_ptr + cols, mask=cmask, other=0.0)
    if FIND_KMAX:
        kmax = tl.max(tl.max(k, 0), 0)
        tl.store(kmax_ptr + b * C + cols, kmax, mask=cmask)  # single chunk: j == 0
    else:
        kmax = tl.load(kmax_ptr + b * C + cols, mask=cmask, other=0.0)
    ek = _exp(k - kmax[None, None, :])
    dec = _exp(-w)
    ew = _exp(w)
    eu = _exp(u)
    D = _exp(-R * w)
    if HAS_STATES:
        p = state_ptr + b.to(tl.int64) * 4 * n * C + cols * n + j
        sfn = tl.load(p, mask=cmask, other=0.0)
        sfd = tl.load(p + n * C, mask=cmask, other=0.0)
        sbn = tl.load(p + 2 * n * C, mask=cmask, other=0.0)
        sbd = tl.load(p + 3 * n * C, mask=cmask, other=0.0)
    else:
        sfn = tl.zeros([BC], tl.float32)
        sfd = sfn
        sbn = sfn
        sbd = sfn
    # padded tokens are identity maps (no decay), so decay powers never run past the real sequence
    d = tl.where(row_ok, dec[None, None, :], 1.0)
    fwd_w = _slab_weights(D, R, S, False)
    bwd_w = _slab_weights(D, R, S, True)
    num, den = _sym_tile(ek * v, ek, d, ew, eu, fwd_w, bwd_w, sfn, sfd, sbn, sbd, r, R)
    return num, den, ek, v, mask, row_ok, r, pos, cols, cmask, w, d, ew, eu, fwd_w, bwd_w


@triton.jit
def _fwd_output_kernel(
    k_ptr, v_ptr, w_ptr, u_ptr, kmax_ptr, state_ptr, y_ptr, T, C, n, skb, skt, svb, svt, syb, syt,
    R: tl.constexpr, S: tl.constexpr, BC: tl.constexpr, NCB, HAS_STATES: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    cb = pid % NCB
    j = (pid // NCB) % n
    b = pid // (NCB * n)
    out = _recompute(
        k_ptr, v_ptr, w_ptr, u_ptr, kmax_ptr, state_ptr, b, j, cb, T, C, n, skb, skt, svb, svt,
        R, S, BC, HAS_STATES, not HAS_STATES,
    )  # fmt: skip
    num, den, mask = out[0], out[1], out[4]
    yoffs, _, _, _, _, _ = _tile(b, j, cb, T, C, syb, syt, R, S, BC)
    tl.store(y_ptr + yoffs, (num / den).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_inputs(gy_ptr, num, den, mask, b, j, cb, T, C, sgb, sgt, R: tl.constexpr, S: tl.constexpr, BC: tl.constexpr):
    goffs, _, _, _, _, _ = _tile(b, j, cb, T, C, sgb, sgt, R, S, BC)
    gy = tl.load(gy_ptr + goffs, mask=mask, other=0.0).to(tl.float32)
    # padded tokens have den = 0: keep their NaNs out of the scans
    a = tl.where(mask, gy / den, 0.0)  # dL/dnum
    return a, tl.where(mask, -a * (num / den), 0.0)  # dL/dden


@triton.jit
def _bwd_summary_kernel(
    k_ptr, v_ptr, gy_ptr, w_ptr, u_ptr, kmax_ptr, state_ptr, summ_ptr, T, C, n, skb, skt, svb, svt, sgb, sgt,
    R: tl.constexpr, S: tl.constexpr, BC: tl.constexpr, NCB,
):  # fmt: skip
    pid = tl.program_id(0)
    cb = pid % NCB
    j = (pid // NCB) % n
    b = pid // (NCB * n)
    out = _recompute(
        k_ptr, v_ptr, w_ptr, u_ptr, kmax_ptr, state_ptr, b, j, cb, T, C, n, skb, skt, svb, svt,
        R, S, BC, True, False,
    )  # fmt: skip
    num, den, mask, pos, cols, cmask, w = out[0], out[1], out[4], out[7], out[8], out[9], out[10]
    a, bb = _grad_inputs(gy_ptr, num, den, mask, b, j, cb, T, C, sgb, sgt, R, S, BC)
    fa, fqa, ga, gqa = _chunk_sums(a, pos, w, R * S)
    fb, fqb, gb, gqb = _chunk_sums(bb, pos, w, R * S)
    plane = n * C
    dst = summ_ptr + b.to(tl.int64) * 8 * plane + cols * n + j
    tl.store(dst, fa, mask=cmask)
    tl.store(dst + plane, fb, mask=cmask)
    tl.store(dst + 2 * plane, fqa, mask=cmask)
    tl.store(dst + 3 * plane, fqb, mask=cmask)
    tl.store(dst + 4 * plane, ga, mask=cmask)
    tl.store(dst + 5 * plane, gb, mask=cmask)
    tl.store(dst + 6 * plane, gqa, mask=cmask)
    tl.store(dst + 7 * plane, gqb, mask=cmask)


@triton.jit
def _bwd_scan_side(summ, state, w, m, idx, n, n_tiles, plane, C, NB: tl.constexpr, REVERSE: tl.constexpr):
    zero = tl.sum(tl.zeros([NB], tl.float32), 0)
    ca, cb, cqa, cqb = zero, zero, zero, zero
    for ii in range(n_tiles):
        if REVERSE:
            j = (n_tiles - 1 - ii) * NB + idx
            ok = j + 1 < n
            src = summ + (j + 1) + 4 * plane
        else:
            j = ii * NB + idx
            ok = (j >= 1) & (j < n)
            src = summ + (j - 1)
        xa = tl.load(src, mask=ok, other=0.0)
        xb = tl.load(src + plane, mask=ok, other=0.0)
        qa = tl.load(src + 2 * plane, mask=ok, other=0.0)
        qb = tl.load(src + 3 * plane, mask=ok, other=0.0)
        _, mm, sa, sb, sqa, sqb = tl.associative_scan((w, m, xa, xb, qa, qb), 0, _combine_q_count, reverse=REVERSE)
        dd = _exp(-mm * w)
        # compose with the carry from earlier tiles, which comes first
        sqa += dd * (cqa + mm * ca)
        sqb += dd * (cqb + mm * cb)
        sa += dd * ca
        sb += dd * cb
        out = state + j + REVERSE * 4 * plane
        tl.store(out, sa, mask=j < n)
        tl.store(out + plane, sb, mask=j < n)
        tl.store(out + 2 * plane, sqa, mask=j < n)
        tl.store(out + 3 * plane, sqb, mask=j < n)
        edge = idx == (0 if REVERSE else NB - 1)
        ca = tl.sum(tl.where(edge, sa, 0.0), 0)
        cb = tl.sum(tl.where(edge, sb, 0.0), 0)
        cqa = tl.sum(tl.where(edge, sqa, 0.0), 0)
        cqb = tl.sum(tl.where(edge, sqb, 0.0), 0)


@triton.jit
def _bwd_chunk_scan_kernel(summ_ptr, state_ptr, w_ptr, n, C, L: tl.constexpr, NB: tl.constexpr):
    """Program (b * C + c, side): (S, Q) states of a and b entering every chunk from the left or the right."""
    pid = tl.program_id(0)
    c = pid % C
    b = pid // C
    w = tl.zeros([NB], tl.float32) + tl.load(w_ptr + c)
    idx = tl.arange(0, NB)
    n_tiles = tl.cdiv(n, NB)
    plane = n * C
    summ = summ_ptr + b.to(tl.int64) * 8 * plane + c.to(tl.int64) * n
    state = state_ptr + b.to(tl.int64) * 8 * plane + c.to(tl.int64) * n
    m = tl.zeros([NB], tl.float32) + L
    if tl.program_id(1) == 0:
        _bwd_scan_side(summ, state, w, m, idx, n, n_tiles, plane, C, NB, False)
    else:
        _bwd_scan_side(summ, state, w, m, idx, n, n_tiles, plane, C, NB, True)


@triton.jit
def _scan_q(d, m, a, b, weights, ea, eb, eqa, eqb, r, R: tl.constexpr, REVERSE: tl.constexpr):
    """Inclusive (S, Q) states of a and b after every token, in scan order, with what enters the chunk."""
    W, WQ, P, PR = weights
    zero = tl.zeros_like(a)
    dd, mm, sa, sb, qa, qb = tl.associative_scan((d, m, a, b, zero, zero), 0, _combine_q, reverse=REVERSE)
    edge: tl.constexpr = 0 if REVERSE else R - 1
    sa_e, sb_e = _edge(sa, r, edge), _edge(sb, r, edge)
    enter_qa = _slab_entry_q(W, WQ, P, PR, sa_e, _edge(qa, r, edge), ea, eqa)[None, :, :]
    enter_qb = _slab_entry_q(W, WQ, P, PR, sb_e, _edge(qb, r, edge), eb, eqb)[None, :, :]
    enter_a = _slab_entry(W, P, sa_e, ea)[None, :, :]
    enter_b = _slab_entry(W, P, sb_e, eb)[None, :, :]
    return (
        sa + dd * enter_a,
        sb + dd * enter_b,
        qa + dd * (enter_qa + mm * enter_a),
        qb + dd * (enter_qb + mm * enter_b),
    )


@triton.jit
def _bwd_output_kernel(
    k_ptr, v_ptr, gy_ptr, w_ptr, u_ptr, kmax_ptr, state_ptr, state2_ptr, gk_ptr, gv_ptr, part_ptr,
    T, C, n, skb, skt, svb, svt, sgb, sgt,
    R: tl.constexpr, S: tl.constexpr, BC: tl.constexpr, NCB, HAS_STATES: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    cb = pid % NCB
    j = (pid // NCB) % n
    b = pid // (NCB * n)
    out = _recompute(
        k_ptr, v_ptr, w_ptr, u_ptr, kmax_ptr, state_ptr, b, j, cb, T, C, n, skb, skt, svb, svt,
        R, S, BC, HAS_STATES, False,
    )  # fmt: skip
    num, den, ek, v, mask, row_ok, r = out[0], out[1], out[2], out[3], out[4], out[5], out[6]
    cols, cmask, d, ew, eu, fwd_w, bwd_w = out[8], out[9], out[11], out[12], out[13], out[14], out[15]
    a, bb = _grad_inputs(gy_ptr, num, den, mask, b, j, cb, T, C, sgb, sgt, R, S, BC)
    if HAS_STATES:
        p = state2_ptr + b.to(tl.int64) * 8 * n * C + cols * n + j
        fa = tl.load(p, mask=cmask, other=0.0)
        fb = tl.load(p + n * C, mask=cmask, other=0.0)
        fqa = tl.load(p + 2 * n * C, mask=cmask, other=0.0)
        fqb = tl.load(p + 3 * n * C, mask=cmask, other=0.0)
        ga = tl.load(p + 4 * n * C, mask=cmask, other=0.0)
        gb = tl.load(p + 5 * n * C, mask=cmask, other=0.0)
        gqa = tl.load(p + 6 * n * C, mask=cmask, other=0.0)
        gqb = tl.load(p + 7 * n * C, mask=cmask, other=0.0)
    else:
        fa = tl.zeros([BC], tl.float32)
        fb, fqa, fqb, ga, gb, gqa, gqb = fa, fa, fa, fa, fa, fa, fa
    m = tl.where(row_ok, 1.0, 0.0) + tl.zeros_like(a)
    e = ew[None, None, :]
    # inclusive (S, Q) after each token; exclusive: P = e^w (S - x), Q = e^w Q_after - P
    sa, sb, qa, qb = _scan_q(d, m, a, bb, fwd_w, fa, fb, fqa, fqb, r, R, False)
    pa = e * (sa - a)
    pb = e * (sb - bb)
    qa = e * qa - pa
    qb = e * qb - pb
    sa, sb, ra_q, rb_q = _scan_q(d, m, a, bb, bwd_w, ga, gb, gqa, gqb, r, R, True)
    ra = e * (sa - a)
    rb = e * (sb - bb)
    qa += e * ra_q - ra
    qb += e * rb_q - rb
    wa = pa + ra + eu[None, None, :] * a
    wb = pb + rb + eu[None, None, :] * bb
    gv = ek * wa
    gk = ek * (v * wa + wb)
    goffs, _, _, _, _, _ = _tile(b, j, cb, T, C, C * T, C, R, S, BC)
    tl.store(gk_ptr + goffs, gk.to(gk_ptr.dtype.element_ty), mask=mask)
    tl.store(gv_ptr + goffs, gv.to(gv_ptr.dtype.element_ty), mask=mask)
    du = tl.where(mask, eu[None, None, :] * ek * (v * a + bb), 0.0)
    dw = tl.where(mask, ek * (v * qa + qb), 0.0)
    part = part_ptr + (b * n + j).to(tl.int64) * 2 * C + cols
    tl.store(part, tl.sum(tl.sum(du, 0), 0), mask=cmask)
    tl.store(part + C, -tl.sum(tl.sum(dw, 0), 0), mask=cmask)


@dataclass(frozen=True)
class TileConfig:
    """Chunk length L = R * S tokens (shared by forward and backward: the backward reuses the forward's chunk
    states), split into S slabs of R tokens, one slab per warp; BC channels per program, one per lane.
    S = 1 keeps every scan inside a thread: no shared memory and no barrier in the chunk kernels."""

    L: int = 16
    BC: int = 32
    S: int = 1
    BC_bwd: int = 16
    S_bwd: int = 1
    scan_block: int = 4096


def tile_config(T: int, C: int) -> TileConfig:
    """16-token chunks, one warp per (chunk, channel block); T is not capped, shorter sequences are padded."""
    return TileConfig()


def _scan_warps(nb: int) -> int:
    return max(1, min(8, nb // 256))  # short chunk scans (T ~ 256) come in thousands: one warp each


def _check(k: Tensor, v: Tensor) -> None:
    for name, t in (("k", k), ("v", v)):
        if t.stride(2) != 1:
            raise ValueError(
                f"bi_wkv_triton: {name} needs a contiguous channel axis (stride {t.stride()}); "
                "pass a view with channels last or call .contiguous()"
            )
    if k.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"bi_wkv_triton: k, v are {k.dtype}; use float32, bfloat16 or float16")


def _forward(w: Tensor, u: Tensor, k: Tensor, v: Tensor, cfg: TileConfig):
    B, T, C = k.shape
    n = triton.cdiv(T, cfg.L)
    ncb = triton.cdiv(C, cfg.BC)
    R = cfg.L // cfg.S
    y = torch.empty((B, T, C), dtype=v.dtype, device=k.device)
    kmax = torch.empty((B, C), dtype=torch.float32, device=k.device)
    states = torch.empty((B, 4, C, n), dtype=torch.float32, device=k.device) if n > 1 else kmax
    grid = (B * n * ncb,)
    strides = (k.stride(0), k.stride(1), v.stride(0), v.stride(1))
    if n > 1:
        summ = torch.empty((B, 5, C, n), dtype=torch.float32, device=k.device)
        _fwd_summary_kernel[grid](k, v, w, summ, T, C, n, *strides, R, cfg.S, cfg.BC, ncb, num_warps=cfg.S)
        nb = min(triton.next_power_of_2(n), cfg.scan_block)
        _fwd_chunk_scan_kernel[(B * C, 2)](summ, states, kmax, w, n, C, cfg.L, nb, num_warps=_scan_warps(nb))
    _fwd_output_kernel[grid](
        k, v, w, u, kmax, states, y, T, C, n, *strides, y.stride(0), y.stride(1),
        R, cfg.S, cfg.BC, ncb, n > 1, num_warps=cfg.S,
    )  # fmt: skip
    return y, kmax, states


def _backward(w, u, k, v, kmax, states, gy, cfg: TileConfig):
    B, T, C = k.shape
    n = triton.cdiv(T, cfg.L)
    ncb = triton.cdiv(C, cfg.BC_bwd)
    R = cfg.L // cfg.S_bwd
    if gy.stride(2) != 1:
        gy = gy.contiguous()
    grid = (B * n * ncb,)
    strides = (k.stride(0), k.stride(1), v.stride(0), v.stride(1), gy.stride(0), gy.stride(1))
    state2 = kmax
    if n > 1:
        summ = torch.empty((B, 8, C, n), dtype=torch.float32, device=k.device)
        _bwd_summary_kernel[grid](
            k, v, gy, w, u, kmax, states, summ, T, C, n, *strides, R, cfg.S_bwd, cfg.BC_bwd, ncb, num_warps=cfg.S_bwd
        )
        state2 = torch.empty((B, 8, C, n), dtype=torch.float32, device=k.device)
        nb = min(triton.next_power_of_2(n), max(1, cfg.scan_block // 2))  # 6-tuple scans: half the tile
        _bwd_chunk_scan_kernel[(B * C, 2)](summ, state2, w, n, C, cfg.L, nb, num_warps=_scan_warps(nb))
    gk = torch.empty((B, T, C), dtype=k.dtype, device=k.device)
    gv = torch.empty((B, T, C), dtype=v.dtype, device=k.device)
    part = torch.empty((B * n, 2, C), dtype=torch.float32, device=k.device)
    _bwd_output_kernel[grid](
        k, v, gy, w, u, kmax, states, state2, gk, gv, part, T, C, n, *strides,
        R, cfg.S_bwd, cfg.BC_bwd, ncb, n > 1, num_warps=cfg.S_bwd,
    )  # fmt: skip
    gu, gw = part.sum(0, dtype=torch.float64)  # [B*n, 2, C] -> [2, C]
    return gw, gu, gk, gv


def _on_device(x: Tensor):
    # CPU tensors reach the kernels only under TRITON_INTERPRET=1 (the CI test of the kernels)
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


class TritonBiWKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: Tensor, u: Tensor, k: Tensor, v: Tensor, config: TileConfig | None) -> Tensor:
        _check(k, v)
        _, T, C = k.shape
        wf, uf = w.float().contiguous(), u.float().contiguous()
        cfg = config or tile_config(T, C)
        with _on_device(k):
            y, kmax, states = _forward(wf, uf, k, v, cfg)
        ctx.save_for_backward(wf, uf, k, v, kmax, states)
        ctx.dtypes = (w.dtype, u.dtype)
        ctx.cfg = cfg
        return y

    @staticmethod
    def backward(ctx, gy: Tensor):
        wf, uf, k, v, kmax, states = ctx.saved_tensors
        with _on_device(k):
            gw, gu, gk, gv = _backward(wf, uf, k, v, kmax, states, gy, ctx.cfg)
        return gw.to(ctx.dtypes[0]), gu.to(ctx.dtypes[1]), gk, gv, None


def bi_wkv_triton(w: Tensor, u: Tensor, k: Tensor, v: Tensor, config: TileConfig | None = None) -> Tensor:
    """Bi-WKV on CUDA through Triton; the contract of `bi_wkv` (w, u [C]; k, v [B, T, C] -> y [B, T, C]).

    fp32 accumulation for float32, bfloat16 and float16 inputs; y has v's dtype. k and v may be strided views
    with any batch and time strides as long as the channel axis is contiguous, so a layer can hand several
    windows or scan orders to one launch by viewing them as one batch (y is always a fresh contiguous tensor).
    config: tile sizes (tests and benchmarks); by default `tile_config(T, C)`.
    float64 inputs (gradcheck on a GPU) run the exact chunked path instead: the kernels accumulate in fp32.
    """
    if k.dtype == torch.float64:
        return bi_wkv_chunked(w, u, k, v)
    return TritonBiWKV.apply(w, u, k, v, config)
