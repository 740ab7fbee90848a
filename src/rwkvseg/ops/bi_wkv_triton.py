"""Triton Bi-WKV for CUDA tensors: forward and backward kernels with the contract of `bi_wkv`.

Per channel the operator is y_t = num_t / den_t with num, den = Sym([e^(k-kmax) v, e^(k-kmax)]) and
Sym(x)_t = sum_{i != t} e^(-(|t-i|-1) w) x_i + e^u x_t. Sym is a forward and a reverse linear recurrence,
S_{t+1} = e^-w S_t + x_t.

Tiling. A sub-chunk is R tokens of one block of BC channels, an [R, BC] register tile: channels on the lanes of
one warp, the R tokens inside each thread, so scans along the tokens (`tl.associative_scan`) run in registers with
no shared memory and no barrier. A program owns a super-chunk of G sub-chunks (G * R tokens) and walks it in a
loop, carrying the scan state from one sub-chunk to the next; the super-chunks are joined by a scan over their
summaries. Summaries and states are stored chunk-major ([B, chunks, components, C]) so every access is one
coalesced row.

forward   1. `_fwd_summary_kernel` walks each super-chunk from the right: per sub-chunk it stores the state that the
             later sub-chunks of the super-chunk send into it from the right (with the running k max that is its
             frame); per super-chunk its k max and its contributions to the states leaving it both ways.
          2. `_fwd_chunk_scan_kernel`: per (batch, channel block, side) a scan over the super-chunk summaries gives
             kmax and the states entering every super-chunk from the left or the right, in units of e^kmax.
          3. `_fwd_output_kernel` walks each super-chunk from the left, carrying the left state, adds the stored
             right states, and writes y once. It also stores the four states entering each sub-chunk when a
             backward will follow (one row per R tokens). A sequence of one super-chunk (T <= G * R) takes only
             this kernel, which then runs step 1's walk first (one launch forward).
          Bytes: k, v read twice (the second time partly from L2: step 3 visits the super-chunks in the reverse of
          step 1's order), y written once; the floor is one read and one write.
backward  The same operator applied to a = gy/den and b = -gy*y/den, plus dw, which needs the distance-weighted
          state Q_t = sum_{i<t} (t-1-i) e^(-(t-1-i) w) x_i: Q follows Q_{t+1} = e^-w (Q_t + S_t), so the scans
          carry (S, Q) pairs with an exact composition rule (no "total minus prefix" cancellation). num and den
          are recomputed from the sub-chunk states the forward stored.
          4. `_bwd_summary_kernel`: like 1, for the (S, Q) states of a and b.
          5. `_bwd_chunk_scan_kernel`: like 2.
          6. `_bwd_output_kernel`: like 3; writes dk, dv and per super-chunk partial sums for du and dw, reduced
             afterwards in float64 (deterministic, no atomics). One launch for a single super-chunk.

Max subtraction uses kmax per (batch, channel) over the whole sequence, as the chunked CPU path does; step 1 finds
it with a running max. Padded tokens of the last sub-chunk are identity maps. Decays inside a sub-chunk are
products of e^-w (at most R of them); longer decays are computed from their token count. Decay exponents stay
within |w| * T, which the layers bound by passing decay / T (as for the CPU path).

Several sequences in one launch: k and v only need a contiguous channel axis; group, batch and time strides are
free (an expanded k reads one tensor for several orders), and with token orders (`TokenOrder`: two nested time
strides) position t of a sequence reads any stored token the order names, so QuadScan's four orders of a map and
MMSegRWKV's two views of a window go to one launch without permuted copies; y and the gradients are written at the
stored tokens. Design and measurements: docs/kernel_notes.md.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .bi_wkv_chunked import bi_wkv_chunked
from .scan import TokenOrder, apply_in_orders

MAX_ORDERS = 4  # token orders one launch mixes (QuadScan has four)
_NO_MAX = tl.constexpr(-3.0e38)  # the running k max before any token: finite, so (max - max) never makes NaN


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
def _compose_q(d2, m2, a1, b1, qa1, qb1, a2, b2, qa2, qb2):
    # (S, Q) of a and b after map 1 then map 2 (m2 tokens, decay d2): S -> d S + s, Q -> d (Q + m S) + q
    return d2 * a1 + a2, d2 * b1 + b2, d2 * (qa1 + m2 * a1) + qa2, d2 * (qb1 + m2 * b1) + qb2


@triton.jit
def _combine_q(d1, m1, a1, b1, qa1, qb1, d2, m2, a2, b2, qa2, qb2):
    # the map of m tokens on (S, Q), composed "first 1, then 2"
    sa, sb, sqa, sqb = _compose_q(d2, m2, a1, b1, qa1, qb1, a2, b2, qa2, qb2)
    return d1 * d2, m1 + m2, sa, sb, sqa, sqb


@triton.jit
def _combine_count(lw1, c1, n1, e1, lw2, c2, n2, e2):
    # as _combine over c chunks of decay e^(-lw) each; the decay is recomputed from the count, since a product
    # of thousands of chunk decays drifts by ~count * eps
    d2 = _exp(-c2 * lw2)
    return lw1, c1 + c2, d2 * n1 + n2, d2 * e1 + e2


@triton.jit
def _combine_q_count(w1, m1, a1, b1, qa1, qb1, w2, m2, a2, b2, qa2, qb2):
    # as _combine_q with the decay of m tokens recomputed as e^(-m w)
    sa, sb, sqa, sqb = _compose_q(_exp(-m2 * w2), m2, a1, b1, qa1, qb1, a2, b2, qa2, qb2)
    return w1, m1 + m2, sa, sb, sqa, sqb


@triton.jit
def _seq(b, Bg, sg, sb):
    """Offset of sequence b, batch element b % Bg of order group b // Bg, in a tensor of group stride sg and
    batch stride sb."""
    g = b // Bg
    return g.to(tl.int64) * sg + (b - g * Bg).to(tl.int64) * sb


@triton.jit
def _pick(g, x0, x1, x2, x3):
    return tl.where(g == 0, x0, tl.where(g == 1, x1, tl.where(g == 2, x2, x3)))


@triton.jit
def _order(b, Bg, orders, ORDERED: tl.constexpr):
    """(inner, inner_step, outer_step, start) of the token order of sequence b: position t visits the stored
    token start + (t // inner) * outer_step + (t % inner) * inner_step. orders: 4 such quadruples, one per group."""
    if ORDERED:
        g = b // Bg
        return (
            _pick(g, orders[0], orders[4], orders[8], orders[12]),
            _pick(g, orders[1], orders[5], orders[9], orders[13]),
            _pick(g, orders[2], orders[6], orders[10], orders[14]),
            _pick(g, orders[3], orders[7], orders[11], orders[15]),
        )
    return (1, 1, 0, 0)


@triton.jit
def _program(NCB, n_sup, REVERSED: tl.constexpr):
    """(batch, super-chunk, channel block) of this program; REVERSED visits them in the opposite order, so a
    kernel that follows another first reads what the other read last (still in L2)."""
    pid = tl.program_id(0)
    if REVERSED:
        pid = tl.num_programs(0) - 1 - pid
    return pid // (NCB * n_sup), (pid // NCB) % n_sup, pid % NCB


@triton.jit
def _rows(seq, j, T, cols, C, stride_t, order, R: tl.constexpr, ORDERED: tl.constexpr):
    """Sub-chunk j of the sequence at offset seq as an [R, BC] tile: positions down the rows, the channels `cols`
    across; with ORDERED, position t reads the stored token that `order` names."""
    r = tl.arange(0, R)[:, None]
    t = j * R + r
    row_ok = t < T
    mask = row_ok & (cols < C)[None, :]
    if ORDERED:
        inner, inner_step, outer_step, start = order
        t = start + (t // inner) * outer_step + (t % inner) * inner_step
    offs = seq + t.to(tl.int64) * stride_t + cols[None, :]
    return offs, mask, row_ok


@triton.jit
def _load(ptr, seq, j, T, cols, C, stride_t, order, R: tl.constexpr, ORDERED: tl.constexpr, fill, ok):
    """Sub-chunk j as an fp32 [R, BC] tile (fill where masked); nothing is read unless ok (a prefetch past the
    end of a program's walk)."""
    offs, mask, _ = _rows(seq, tl.where(ok, j, 0), tl.where(ok, T, 0), cols, C, stride_t, order, R, ORDERED)
    return tl.load(ptr + offs, mask=mask, other=fill).to(tl.float32)


@triton.jit
def _load_kv(k_ptr, v_ptr, ks, skt, vs, svt, j, T, cols, C, order, R: tl.constexpr, ORDERED: tl.constexpr, ok):
    """The k tile (-inf where masked) and the v tile (0) of sub-chunk j, the inputs of every walk step."""
    k = _load(k_ptr, ks, j, T, cols, C, skt, order, R, ORDERED, float("-inf"), ok)
    v = _load(v_ptr, vs, j, T, cols, C, svt, order, R, ORDERED, 0.0, ok)
    return k, v


@triton.jit
def _row(ptr, b, j, n, K: tl.constexpr, C, cols):
    """Pointers to row j of a chunk-major [B, n, K, C] state tensor (component q is at + q * C)."""
    return ptr + ((b.to(tl.int64) * n + j) * K) * C + cols


@triton.jit
def _edge(x, r, row: tl.constexpr):
    return tl.sum(tl.where(r == row, x, 0.0), 0)  # [R, BC] -> [BC]


@triton.jit
def _n_sub_in(J, T, G, R: tl.constexpr):
    return tl.minimum(G, tl.cdiv(T - J * G * R, R))  # sub-chunks of super-chunk J that hold tokens


@triton.jit
def _rest(J, jj, T, G, R: tl.constexpr):
    """Tokens of super-chunk J after its sub-chunk jj (fewer in a ragged last super-chunk), as a float."""
    end = tl.minimum((J + 1) * G * R, T)
    return tl.maximum(end - (J * G + jj + 1) * R, 0).to(tl.float32)


@triton.jit
def _token_weights(w, R: tl.constexpr):
    """[R, BC] weights of each token in the states leaving its sub-chunk rightwards (df) and leftwards (db),
    and the token distances behind them."""
    r = tl.arange(0, R)[:, None].to(tl.float32)
    right = (R - 1) - r
    # capped: only padding rows of a sequence shorter than R reach the cap, and inf * 0 would make NaN
    return _exp(tl.minimum(-right * w[None, :], 88.0)), _exp(tl.minimum(-r * w[None, :], 88.0)), right, r


@triton.jit
def _entry_decays(w, R: tl.constexpr):
    """[R, BC] decays of the states entering a sub-chunk from the left (pl) and right (pr) at each token, and
    the token counts behind them. Exact exponentials rather than the scans' running products: a state crosses
    a whole super-chunk of sub-chunks, and a product of G * R decays would drift by ~G * R eps."""
    r = tl.arange(0, R)[:, None].to(tl.float32)
    left = r + 1.0
    right = R - r
    # capped: only padding rows of a sequence shorter than R reach the cap, and inf * 0 would make NaN
    return _exp(tl.minimum(-left * w[None, :], 88.0)), _exp(tl.minimum(-right * w[None, :], 88.0)), left, right


@triton.jit
def _sym(xn, xd, d, pl, pr, ew, eu, ln, ld, rn, rd, R: tl.constexpr):
    """Sym of num and den inside one sub-chunk, with the states entering it from the left (l) and right (r);
    also returns the left state leaving it."""
    # inclusive scans give the state after each token; the exclusive one is e^w (after - x)
    _, an, ad = tl.associative_scan((d, xn, xd), 0, _combine)
    an += pl * ln[None, :]
    ad += pl * ld[None, :]
    _, bn, bd = tl.associative_scan((d, xn, xd), 0, _combine, reverse=True)
    bn += pr * rn[None, :]
    bd += pr * rd[None, :]
    # (after - x) is exact when the token dominates its state, which keeps strong decays (large w) exact
    e = ew[None, :]
    o = eu[None, :]
    r = tl.arange(0, R)[:, None]
    num = e * ((an - xn) + (bn - xn)) + o * xn
    den = e * ((ad - xd) + (bd - xd)) + o * xd
    return num, den, _edge(an, r, R - 1), _edge(ad, r, R - 1)


@triton.jit
def _fwd_walk(
    k_ptr, v_ptr, w_ptr, sub_ptr, b, J, cols, T, C, n_sub, G, ks, skt, vs, svt, order,
    R: tl.constexpr, ORDERED: tl.constexpr,
):  # fmt: skip
    """Walks super-chunk J from its last sub-chunk to its first. Stores for each sub-chunk the state its later
    sub-chunks send into it from the right, with the running k max that is its frame ([B, n_sub, 3, C]); returns
    the super-chunk's k max and its contributions to the states leaving it rightwards (f) and leftwards (g)."""
    cmask = cols < C
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0)
    weights = _token_weights(w, R)
    df = weights[0]
    db = weights[1]
    decay_r = _exp(-R * w)
    m = tl.full(cols.shape, _NO_MAX, tl.float32)
    fn = tl.zeros(cols.shape, tl.float32)
    fd, gn, gd = fn, fn, fn
    count = _n_sub_in(J, T, G, R)
    # each step loads the next sub-chunk before working on this one, so its loads overlap the arithmetic
    k_next, v_next = _load_kv(
        k_ptr, v_ptr, ks, skt, vs, svt, J * G + count - 1, T, cols, C, order, R, ORDERED, count > 0
    )
    for i in range(count):
        jj = count - 1 - i
        j = J * G + jj
        k = k_next
        v = v_next
        k_next, v_next = _load_kv(k_ptr, v_ptr, ks, skt, vs, svt, j - 1, T, cols, C, order, R, ORDERED, i + 1 < count)
        out = _row(sub_ptr, b, j, n_sub, 3, C, cols)
        tl.store(out, m, mask=cmask)
        tl.store(out + C, gn, mask=cmask)
        tl.store(out + 2 * C, gd, mask=cmask)
        m_new = tl.maximum(m, tl.max(k, 0))
        rescale = _exp(m - m_new)
        ek = _exp(k - m_new[None, :])
        xn = ek * v
        tail = _exp(-_rest(J, jj, T, G, R) * w)  # from this sub-chunk's right edge to the super-chunk's
        fn = fn * rescale + tail * tl.sum(xn * df, 0)
        fd = fd * rescale + tail * tl.sum(ek * df, 0)
        gn = gn * (rescale * decay_r) + tl.sum(xn * db, 0)
        gd = gd * (rescale * decay_r) + tl.sum(ek * db, 0)
        m = m_new
    return m, fn, fd, gn, gd


@triton.jit
def _fwd_summary_kernel(
    k_ptr, v_ptr, w_ptr, sub_ptr, summ_ptr, T, C, n_sub, n_sup, G, Bg, skg, skb, skt, svg, svb, svt, orders,
    R: tl.constexpr, BC: tl.constexpr, NCB, ORDERED: tl.constexpr,
):  # fmt: skip
    b, J, cb = _program(NCB, n_sup, False)
    cols = cb * BC + tl.arange(0, BC)
    cmask = cols < C
    ks, vs, order = _seq(b, Bg, skg, skb), _seq(b, Bg, svg, svb), _order(b, Bg, orders, ORDERED)
    m, fn, fd, gn, gd = _fwd_walk(
        k_ptr, v_ptr, w_ptr, sub_ptr, b, J, cols, T, C, n_sub, G, ks, skt, vs, svt, order, R, ORDERED
    )
    out = _row(summ_ptr, b, J, n_sup, 5, C, cols)
    tl.store(out, m, mask=cmask)
    tl.store(out + C, fn, mask=cmask)
    tl.store(out + 2 * C, fd, mask=cmask)
    tl.store(out + 3 * C, gn, mask=cmask)
    tl.store(out + 4 * C, gd, mask=cmask)


@triton.jit
def _fwd_chunk_scan_kernel(
    summ_ptr, state_ptr, kmax_ptr, w_ptr, n, C, L, NCB, NB: tl.constexpr, BC: tl.constexpr,
):  # fmt: skip
    """Program (batch, channel block; side): kmax and the states entering every super-chunk of L tokens from the
    left (side 0) or the right (side 1), from an [NB, BC] tile of summaries at a time."""
    b = tl.program_id(0) // NCB
    cols = (tl.program_id(0) % NCB) * BC + tl.arange(0, BC)
    cmask = cols[None, :] < C
    right = tl.program_id(1)
    rows = tl.arange(0, NB)[:, None]
    lw = tl.zeros([NB, BC], tl.float32) + L * tl.load(w_ptr + cols, mask=cols < C, other=0.0)[None, :]
    one = tl.zeros([NB, BC], tl.float32) + 1.0
    summ = summ_ptr + b.to(tl.int64) * n * 5 * C + cols[None, :]
    state = state_ptr + b.to(tl.int64) * n * 4 * C + cols[None, :]
    n_tiles = tl.cdiv(n, NB)

    kmax = tl.full([BC], _NO_MAX, tl.float32)
    for i in range(n_tiles):
        j = i * NB + rows
        kmax = tl.maximum(kmax, tl.max(tl.load(summ + j * 5 * C, mask=(j < n) & cmask, other=_NO_MAX), 0))
    if right == 0:
        tl.store(kmax_ptr + b * C + cols, kmax, mask=cols < C)

    carry_n = tl.zeros([BC], tl.float32)
    carry_d = carry_n
    if right == 0:
        # row j scans the summaries of super-chunks < j (loaded shifted by one, so inclusive = exclusive)
        for i in range(n_tiles):
            j = i * NB + rows
            ok = (j >= 1) & (j < n) & cmask
            src = summ + (j - 1) * 5 * C
            scale = _exp(tl.load(src, mask=ok, other=float("-inf")) - kmax[None, :])
            fn = tl.load(src + C, mask=ok, other=0.0) * scale
            fd = tl.load(src + 2 * C, mask=ok, other=0.0) * scale
            _, cc, sn, sd = tl.associative_scan((lw, one, fn, fd), 0, _combine_count)
            dd = _exp(-cc * lw)
            sn += dd * carry_n[None, :]
            sd += dd * carry_d[None, :]
            tl.store(state + j * 4 * C, sn, mask=(j < n) & cmask)
            tl.store(state + j * 4 * C + C, sd, mask=(j < n) & cmask)
            carry_n = _edge(sn, rows, NB - 1)
            carry_d = _edge(sd, rows, NB - 1)
    else:
        # row j scans super-chunks > j, from the last one leftwards
        for ii in range(n_tiles):
            j = (n_tiles - 1 - ii) * NB + rows
            ok = (j + 1 < n) & cmask
            src = summ + (j + 1) * 5 * C
            scale = _exp(tl.load(src, mask=ok, other=float("-inf")) - kmax[None, :])
            gn = tl.load(src + 3 * C, mask=ok, other=0.0) * scale
            gd = tl.load(src + 4 * C, mask=ok, other=0.0) * scale
            _, cc, sn, sd = tl.associative_scan((lw, one, gn, gd), 0, _combine_count, reverse=True)
            dd = _exp(-cc * lw)
            sn += dd * carry_n[None, :]
            sd += dd * carry_d[None, :]
            tl.store(state + j * 4 * C + 2 * C, sn, mask=(j < n) & cmask)
            tl.store(state + j * 4 * C + 3 * C, sd, mask=(j < n) & cmask)
            carry_n = _edge(sn, rows, 0)
            carry_d = _edge(sd, rows, 0)


@triton.jit
def _fwd_output_kernel(
    k_ptr, v_ptr, w_ptr, u_ptr, kmax_ptr, sub_ptr, state_ptr, y_ptr, fstate_ptr,
    T, C, n_sub, n_sup, G, Bg, skg, skb, skt, svg, svb, svt, orders,
    R: tl.constexpr, BC: tl.constexpr, NCB, SINGLE: tl.constexpr, SAVE: tl.constexpr, ORDERED: tl.constexpr,
):  # fmt: skip
    b, J, cb = _program(NCB, n_sup, True)
    cols = cb * BC + tl.arange(0, BC)
    cmask = cols < C
    zero = tl.zeros([BC], tl.float32)
    ks, vs, order = _seq(b, Bg, skg, skb), _seq(b, Bg, svg, svb), _order(b, Bg, orders, ORDERED)
    if SINGLE:
        kmax, _, _, _, _ = _fwd_walk(
            k_ptr, v_ptr, w_ptr, sub_ptr, b, J, cols, T, C, n_sub, G, ks, skt, vs, svt, order, R, ORDERED
        )  # fmt: skip
        tl.store(kmax_ptr + b * C + cols, kmax, mask=cmask)
        tl.debug_barrier()  # the walk's stores are read back below
        ln, ld, rn_sup, rd_sup = zero, zero, zero, zero
    else:
        kmax = tl.load(kmax_ptr + b * C + cols, mask=cmask, other=0.0)
        p = _row(state_ptr, b, J, n_sup, 4, C, cols)
        ln = tl.load(p, mask=cmask, other=0.0)
        ld = tl.load(p + C, mask=cmask, other=0.0)
        rn_sup = tl.load(p + 2 * C, mask=cmask, other=0.0)
        rd_sup = tl.load(p + 3 * C, mask=cmask, other=0.0)
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0)
    u = tl.load(u_ptr + cols, mask=cmask, other=0.0)
    dec = _exp(-w)
    ew = _exp(w)
    eu = _exp(u)
    entry = _entry_decays(w, R)
    pl = entry[0]
    pr = entry[1]
    count = _n_sub_in(J, T, G, R)
    k_next, v_next = _load_kv(k_ptr, v_ptr, ks, skt, vs, svt, J * G, T, cols, C, order, R, ORDERED, count > 0)
    for jj in range(count):
        j = J * G + jj
        k = k_next
        v = v_next
        k_next, v_next = _load_kv(k_ptr, v_ptr, ks, skt, vs, svt, j + 1, T, cols, C, order, R, ORDERED, jj + 1 < count)
        yoffs, mask, row_ok = _rows(b.to(tl.int64) * T * C, j, T, cols, C, C, order, R, ORDERED)
        q = _row(sub_ptr, b, j, n_sub, 3, C, cols)
        scale = _exp(tl.load(q, mask=cmask, other=0.0) - kmax)
        tail = _exp(-_rest(J, jj, T, G, R) * w)  # the super-chunk's right state crosses the later sub-chunks
        rn = tl.load(q + C, mask=cmask, other=0.0) * scale + tail * rn_sup
        rd = tl.load(q + 2 * C, mask=cmask, other=0.0) * scale + tail * rd_sup
        ek = _exp(k - kmax[None, :])
        # padded tokens are identity maps (no decay), so nothing decays past the end of the sequence
        d = tl.where(row_ok, dec[None, :], 1.0)
        num, den, ln_next, ld_next = _sym(ek * v, ek, d, pl, pr, ew, eu, ln, ld, rn, rd, R)
        tl.store(y_ptr + yoffs, (num / den).to(y_ptr.dtype.element_ty), mask=mask)
        if SAVE:
            f = _row(fstate_ptr, b, j, n_sub, 4, C, cols)
            tl.store(f, ln, mask=cmask)
            tl.store(f + C, ld, mask=cmask)
            tl.store(f + 2 * C, rn, mask=cmask)
            tl.store(f + 3 * C, rd, mask=cmask)
        ln = ln_next
        ld = ld_next


@triton.jit
def _grad_inputs(k, v, gy, fstate_ptr, b, j, T, C, n_sub, cols, kmax, dec, pl, pr, ew, eu, R: tl.constexpr):
    """Recomputes num and den of sub-chunk j (tiles k, v, gy) from the stored states; returns a = dL/dnum,
    b = dL/dden."""
    cmask = cols < C
    _, mask, row_ok = _rows(0, j, T, cols, C, 0, (1, 1, 0, 0), R, False)
    f = _row(fstate_ptr, b, j, n_sub, 4, C, cols)
    ln = tl.load(f, mask=cmask, other=0.0)
    ld = tl.load(f + C, mask=cmask, other=0.0)
    rn = tl.load(f + 2 * C, mask=cmask, other=0.0)
    rd = tl.load(f + 3 * C, mask=cmask, other=0.0)
    ek = _exp(k - kmax[None, :])
    d = tl.where(row_ok, dec[None, :], 1.0)
    num, den, _, _ = _sym(ek * v, ek, d, pl, pr, ew, eu, ln, ld, rn, rd, R)
    # padded tokens have den = 0: keep their NaNs out of the scans
    a = tl.where(mask, gy / den, 0.0)
    return a, tl.where(mask, -a * (num / den), 0.0), ek, v, d, mask, row_ok


@triton.jit
def _bwd_walk(
    k_ptr, v_ptr, gy_ptr, w_ptr, u_ptr, kmax_ptr, fstate_ptr, sub_ptr, b, J, cols, T, C, n_sub, G,
    ks, skt, vs, svt, gs, sgt, order, R: tl.constexpr, ORDERED: tl.constexpr,
):  # fmt: skip
    """As _fwd_walk for the (S, Q) states of a and b: stores per sub-chunk the (S, Q) its later sub-chunks send
    into it from the right ([B, n_sub, 4, C]); returns the super-chunk's rightward and leftward (S, Q) summaries."""
    cmask = cols < C
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0)
    u = tl.load(u_ptr + cols, mask=cmask, other=0.0)
    kmax = tl.load(kmax_ptr + b * C + cols, mask=cmask, other=0.0)
    dec = _exp(-w)
    ew = _exp(w)
    eu = _exp(u)
    df, db, right, left = _token_weights(w, R)
    entry = _entry_decays(w, R)
    pl = entry[0]
    pr = entry[1]
    decay_r = _exp(-R * w)
    sa = tl.zeros([cols.shape[0]], tl.float32)
    sb, qa, qb, fa, fb, fqa, fqb = sa, sa, sa, sa, sa, sa, sa
    count = _n_sub_in(J, T, G, R)
    k_next, v_next = _load_kv(
        k_ptr, v_ptr, ks, skt, vs, svt, J * G + count - 1, T, cols, C, order, R, ORDERED, count > 0
    )
    g_next = _load(gy_ptr, gs, J * G + count - 1, T, cols, C, sgt, order, R, ORDERED, 0.0, count > 0)
    for i in range(count):
        jj = count - 1 - i
        j = J * G + jj
        k = k_next
        v = v_next
        gy = g_next
        k_next, v_next = _load_kv(k_ptr, v_ptr, ks, skt, vs, svt, j - 1, T, cols, C, order, R, ORDERED, i + 1 < count)
        g_next = _load(gy_ptr, gs, j - 1, T, cols, C, sgt, order, R, ORDERED, 0.0, i + 1 < count)
        out = _row(sub_ptr, b, j, n_sub, 4, C, cols)
        tl.store(out, sa, mask=cmask)
        tl.store(out + C, sb, mask=cmask)
        tl.store(out + 2 * C, qa, mask=cmask)
        tl.store(out + 3 * C, qb, mask=cmask)
        ab = _grad_inputs(k, v, gy, fstate_ptr, b, j, T, C, n_sub, cols, kmax, dec, pl, pr, ew, eu, R)
        a = ab[0]
        bb = ab[1]
        # leftwards: first the later sub-chunks, then this one (R tokens)
        qa = decay_r * (qa + R * sa) + tl.sum(a * db * left, 0)
        qb = decay_r * (qb + R * sb) + tl.sum(bb * db * left, 0)
        sa = decay_r * sa + tl.sum(a * db, 0)
        sb = decay_r * sb + tl.sum(bb * db, 0)
        # rightwards: first this sub-chunk, then the later ones (rest tokens)
        rest = _rest(J, jj, T, G, R)
        d_rest = _exp(-rest * w)
        ca = tl.sum(a * df, 0)
        cb = tl.sum(bb * df, 0)
        fqa += d_rest * (tl.sum(a * df * right, 0) + rest * ca)
        fqb += d_rest * (tl.sum(bb * df * right, 0) + rest * cb)
        fa += d_rest * ca
        fb += d_rest * cb
    return fa, fb, fqa, fqb, sa, sb, qa, qb


@triton.jit
def _bwd_summary_kernel(
    k_ptr, v_ptr, gy_ptr, w_ptr, u_ptr, kmax_ptr, fstate_ptr, sub_ptr, summ_ptr, T, C, n_sub, n_sup, G,
    Bg, skg, skb, skt, svg, svb, svt, sgg, sgb, sgt, orders,
    R: tl.constexpr, BC: tl.constexpr, NCB, ORDERED: tl.constexpr,
):  # fmt: skip
    b, J, cb = _program(NCB, n_sup, False)
    cols = cb * BC + tl.arange(0, BC)
    cmask = cols < C
    ks, vs, gs = _seq(b, Bg, skg, skb), _seq(b, Bg, svg, svb), _seq(b, Bg, sgg, sgb)
    sums = _bwd_walk(
        k_ptr, v_ptr, gy_ptr, w_ptr, u_ptr, kmax_ptr, fstate_ptr, sub_ptr, b, J, cols, T, C, n_sub, G,
        ks, skt, vs, svt, gs, sgt, _order(b, Bg, orders, ORDERED), R, ORDERED,
    )  # fmt: skip
    out = _row(summ_ptr, b, J, n_sup, 8, C, cols)
    fa, fb, fqa, fqb, ga, gb, gqa, gqb = sums
    tl.store(out, fa, mask=cmask)
    tl.store(out + C, fb, mask=cmask)
    tl.store(out + 2 * C, fqa, mask=cmask)
    tl.store(out + 3 * C, fqb, mask=cmask)
    tl.store(out + 4 * C, ga, mask=cmask)
    tl.store(out + 5 * C, gb, mask=cmask)
    tl.store(out + 6 * C, gqa, mask=cmask)
    tl.store(out + 7 * C, gqb, mask=cmask)


@triton.jit
def _bwd_chunk_scan_kernel(
    summ_ptr, state_ptr, w_ptr, n, C, L, NCB, NB: tl.constexpr, BC: tl.constexpr,
):  # fmt: skip
    """Program (batch, channel block; side): (S, Q) states of a and b entering every super-chunk of L tokens
    from the left (side 0, components 0-3) or the right (side 1, components 4-7)."""
    b = tl.program_id(0) // NCB
    cols = (tl.program_id(0) % NCB) * BC + tl.arange(0, BC)
    cmask = cols[None, :] < C
    reverse = tl.program_id(1) == 1
    rows = tl.arange(0, NB)[:, None]
    w = tl.zeros([NB, BC], tl.float32) + tl.load(w_ptr + cols, mask=cols < C, other=0.0)[None, :]
    m = tl.zeros([NB, BC], tl.float32) + L
    summ = summ_ptr + b.to(tl.int64) * n * 8 * C + cols[None, :]
    state = state_ptr + b.to(tl.int64) * n * 8 * C + cols[None, :]
    n_tiles = tl.cdiv(n, NB)
    ca = tl.zeros([BC], tl.float32)
    cb, cqa, cqb = ca, ca, ca
    for ii in range(n_tiles):
        if reverse:
            j = (n_tiles - 1 - ii) * NB + rows
            ok = (j + 1 < n) & cmask
            src = summ + (j + 1) * 8 * C + 4 * C
        else:
            j = ii * NB + rows
            ok = (j >= 1) & (j < n) & cmask
            src = summ + (j - 1) * 8 * C
        xa = tl.load(src, mask=ok, other=0.0)
        xb = tl.load(src + C, mask=ok, other=0.0)
        qa = tl.load(src + 2 * C, mask=ok, other=0.0)
        qb = tl.load(src + 3 * C, mask=ok, other=0.0)
        if reverse:
            _, mm, sa, sb, sqa, sqb = tl.associative_scan((w, m, xa, xb, qa, qb), 0, _combine_q_count, reverse=True)
        else:
            _, mm, sa, sb, sqa, sqb = tl.associative_scan((w, m, xa, xb, qa, qb), 0, _combine_q_count)
        dd = _exp(-mm * w)
        # compose with the carry from earlier tiles, which comes first
        sqa += dd * (cqa[None, :] + mm * ca[None, :])
        sqb += dd * (cqb[None, :] + mm * cb[None, :])
        sa += dd * ca[None, :]
        sb += dd * cb[None, :]
        out = state + j * 8 * C + reverse.to(tl.int32) * 4 * C
        tl.store(out, sa, mask=(j < n) & cmask)
        tl.store(out + C, sb, mask=(j < n) & cmask)
        tl.store(out + 2 * C, sqa, mask=(j < n) & cmask)
        tl.store(out + 3 * C, sqb, mask=(j < n) & cmask)
        if reverse:
            ca, cb, cqa, cqb = _edge(sa, rows, 0), _edge(sb, rows, 0), _edge(sqa, rows, 0), _edge(sqb, rows, 0)
        else:
            ca, cb = _edge(sa, rows, NB - 1), _edge(sb, rows, NB - 1)
            cqa, cqb = _edge(sqa, rows, NB - 1), _edge(sqb, rows, NB - 1)


@triton.jit
def _scan_q(d, m, a, b, ea, eb, eqa, eqb, p, count, REVERSE: tl.constexpr):
    """Inclusive (S, Q) states of a and b after every token, in scan order, with the (S, Q) entering the
    sub-chunk from that side; p and count: the entering state's exact decay and token count at each token."""
    zero = tl.zeros_like(a)
    _, _, sa, sb, qa, qb = tl.associative_scan((d, m, a, b, zero, zero), 0, _combine_q, reverse=REVERSE)
    return (
        sa + p * ea[None, :],
        sb + p * eb[None, :],
        qa + p * (eqa[None, :] + count * ea[None, :]),
        qb + p * (eqb[None, :] + count * eb[None, :]),
    )


@triton.jit
def _bwd_output_kernel(
    k_ptr, v_ptr, gy_ptr, w_ptr, u_ptr, kmax_ptr, fstate_ptr, sub_ptr, state_ptr, gk_ptr, gv_ptr, part_ptr,
    T, C, n_sub, n_sup, G, Bg, skg, skb, skt, svg, svb, svt, sgg, sgb, sgt, orders,
    R: tl.constexpr, BC: tl.constexpr, NCB, SINGLE: tl.constexpr, ORDERED: tl.constexpr,
):  # fmt: skip
    b, J, cb = _program(NCB, n_sup, True)
    cols = cb * BC + tl.arange(0, BC)
    cmask = cols < C
    zero = tl.zeros([BC], tl.float32)
    ks, vs, gs = _seq(b, Bg, skg, skb), _seq(b, Bg, svg, svb), _seq(b, Bg, sgg, sgb)
    order = _order(b, Bg, orders, ORDERED)
    if SINGLE:
        _bwd_walk(
            k_ptr, v_ptr, gy_ptr, w_ptr, u_ptr, kmax_ptr, fstate_ptr, sub_ptr, b, J, cols, T, C, n_sub, G,
            ks, skt, vs, svt, gs, sgt, order, R, ORDERED,
        )  # fmt: skip
        tl.debug_barrier()  # the walk's stores are read back below
        la, lb, lqa, lqb = zero, zero, zero, zero
        ra, rb, rqa, rqb = zero, zero, zero, zero
    else:
        p = _row(state_ptr, b, J, n_sup, 8, C, cols)
        la = tl.load(p, mask=cmask, other=0.0)
        lb = tl.load(p + C, mask=cmask, other=0.0)
        lqa = tl.load(p + 2 * C, mask=cmask, other=0.0)
        lqb = tl.load(p + 3 * C, mask=cmask, other=0.0)
        ra = tl.load(p + 4 * C, mask=cmask, other=0.0)
        rb = tl.load(p + 5 * C, mask=cmask, other=0.0)
        rqa = tl.load(p + 6 * C, mask=cmask, other=0.0)
        rqb = tl.load(p + 7 * C, mask=cmask, other=0.0)
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0)
    u = tl.load(u_ptr + cols, mask=cmask, other=0.0)
    kmax = tl.load(kmax_ptr + b * C + cols, mask=cmask, other=0.0)
    dec = _exp(-w)
    ew = _exp(w)
    eu = _exp(u)
    e = ew[None, :]
    pl, pr, cl, cr = _entry_decays(w, R)
    du_sum = zero
    dw_sum = zero
    count = _n_sub_in(J, T, G, R)
    k_next, v_next = _load_kv(k_ptr, v_ptr, ks, skt, vs, svt, J * G, T, cols, C, order, R, ORDERED, count > 0)
    g_next = _load(gy_ptr, gs, J * G, T, cols, C, sgt, order, R, ORDERED, 0.0, count > 0)
    for jj in range(count):
        j = J * G + jj
        k = k_next
        v = v_next
        gy = g_next
        k_next, v_next = _load_kv(k_ptr, v_ptr, ks, skt, vs, svt, j + 1, T, cols, C, order, R, ORDERED, jj + 1 < count)
        g_next = _load(gy_ptr, gs, j + 1, T, cols, C, sgt, order, R, ORDERED, 0.0, jj + 1 < count)
        a, bb, ek, v, d, mask, row_ok = _grad_inputs(
            k, v, gy, fstate_ptr, b, j, T, C, n_sub, cols, kmax, dec, pl, pr, ew, eu, R
        )
        # (S, Q) entering from the right: the later sub-chunks' part, plus the super-chunk's right state
        # carried across them (rest tokens)
        q = _row(sub_ptr, b, j, n_sub, 4, C, cols)
        rest = _rest(J, jj, T, G, R)
        d_rest = _exp(-rest * w)
        ea = tl.load(q, mask=cmask, other=0.0) + d_rest * ra
        eb = tl.load(q + C, mask=cmask, other=0.0) + d_rest * rb
        eqa = tl.load(q + 2 * C, mask=cmask, other=0.0) + d_rest * (rqa + rest * ra)
        eqb = tl.load(q + 3 * C, mask=cmask, other=0.0) + d_rest * (rqb + rest * rb)
        m = tl.where(row_ok, 1.0, 0.0) + tl.zeros_like(a)
        # inclusive (S, Q) after each token; exclusive: P = e^w (S - x), Q = e^w Q_after - P
        sa, sb, qa, qb = _scan_q(d, m, a, bb, la, lb, lqa, lqb, pl, cl, False)
        r = tl.arange(0, R)[:, None]
        la, lb, lqa, lqb = _edge(sa, r, R - 1), _edge(sb, r, R - 1), _edge(qa, r, R - 1), _edge(qb, r, R - 1)
        pa = e * (sa - a)
        pb = e * (sb - bb)
        qa = e * qa - pa
        qb = e * qb - pb
        sa, sb, ra_q, rb_q = _scan_q(d, m, a, bb, ea, eb, eqa, eqb, pr, cr, True)
        qa += e * ra_q - e * (sa - a)
        qb += e * rb_q - e * (sb - bb)
        wa = pa + e * (sa - a) + eu[None, :] * a
        wb = pb + e * (sb - bb) + eu[None, :] * bb
        goffs, _, _ = _rows(b.to(tl.int64) * T * C, j, T, cols, C, C, order, R, ORDERED)
        tl.store(gk_ptr + goffs, (ek * (v * wa + wb)).to(gk_ptr.dtype.element_ty), mask=mask)
        tl.store(gv_ptr + goffs, (ek * wa).to(gv_ptr.dtype.element_ty), mask=mask)
        du_sum += tl.sum(tl.where(mask, eu[None, :] * ek * (v * a + bb), 0.0), 0)
        dw_sum += tl.sum(tl.where(mask, ek * (v * qa + qb), 0.0), 0)
    part = part_ptr + (b * n_sup + J).to(tl.int64) * 2 * C + cols
    tl.store(part, du_sum, mask=cmask)
    tl.store(part + C, -dw_sum, mask=cmask)


@dataclass(frozen=True)
class TileConfig:
    """R tokens per sub-chunk (one register tile), G sub-chunks per program (a super-chunk of G * R tokens),
    BC channels per program (one warp: 32 channels one per lane, 16 channels with two lanes per channel sharing
    the R tokens); the super-chunk scans take [scan_rows, scan_BC] tiles. R is shared by forward and backward:
    the backward reads the states the forward stored per sub-chunk. G is capped at about 16 by accuracy: a
    super-chunk's walk composes its sub-chunk decays by products (error ~ G eps)."""

    R: int = 16
    G: int = 16
    BC: int = 32
    G_bwd: int = 16
    BC_bwd: int = 16
    scan_rows: int = 1024
    scan_BC: int = 2


# Programs per launch the walks ran fastest at on an H100 (132 SMs), forward and backward alike: fewer leave
# the SMs idle (a program is one warp on a dependent chain), more cost chunk-scan rows and launches
# (docs/kernel_notes.md, v7)
_PROGRAMS = 1024


def _cdiv(a: int, b: int) -> int:
    # host-side: triton.cdiv is a jit function, and calling it from Python costs microseconds per call
    return -(-a // b)


def _pick_tiles(B: int, T: int, C: int, R: int, widths: tuple[int, ...]) -> tuple[int, int]:
    """(G, BC) with G in {4, 8, 16}, BC in widths, whose program count B * cdiv(C, BC) * cdiv(T, G R) is nearest
    _PROGRAMS on a log scale; on a tie one super-chunk (one launch: host time counts at small shapes), then the
    wider channel block, then the longer super-chunk."""

    def rank(choice: tuple[int, int]):
        G, bc = choice
        n_sup = _cdiv(T, G * R)
        distance = abs(math.log(B * _cdiv(C, bc) * n_sup / _PROGRAMS))
        return round(distance, 6), n_sup > 1, -bc, -G

    return min(((G, bc) for G in (16, 8, 4) for bc in widths), key=rank)


@functools.lru_cache(maxsize=1024)  # a pure function of three ints, asked on every call
def tile_config(B: int, T: int, C: int) -> TileConfig:
    """The default tiles for B sequences of T tokens and C channels (chosen on an H100, docs/kernel_notes.md).
    T is not capped: longer sequences get more super-chunks; a sequence of one super-chunk takes one launch
    forward and one backward. The backward runs 16-channel programs, which measured faster than 32."""
    R = 16
    G, bc = _pick_tiles(B, T, C, R, (32, 16) if C % 32 == 0 else (16,))  # 16: no idle lanes at C = 48, 80...
    G_bwd, _ = _pick_tiles(B, T, C, R, (16,))
    return TileConfig(R=R, G=G, BC=bc, G_bwd=G_bwd, BC_bwd=16)


def _check(k: Tensor, v: Tensor) -> None:
    for name, t in (("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(
                f"bi_wkv_triton: {name} needs a contiguous channel axis (stride {t.stride()}); "
                "pass a view with channels last or call .contiguous()"
            )
    if k.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"bi_wkv_triton: k, v are {k.dtype}; use float32, bfloat16 or float16")


def _scan_launch(B: int, C: int, cfg: TileConfig, n_sup: int):
    rows = min(1 << (n_sup - 1).bit_length(), cfg.scan_rows)  # next power of two
    ncb = _cdiv(C, cfg.scan_BC)
    warps = max(1, min(8, rows * cfg.scan_BC // 256))
    return (B * ncb, 2), ncb, rows, warps


def _as_groups(x: Tensor) -> tuple[int, int, int, int]:
    """(sequences per order group, group stride, batch stride, time stride) of [B, T, C] (one group) or
    [n, B, N, C] (n token orders)."""
    if x.dim() == 3:
        return x.shape[0], 0, x.stride(0), x.stride(1)
    return x.shape[1], x.stride(0), x.stride(1), x.stride(2)


def _order_args(orders: tuple[TokenOrder, ...] | None) -> tuple[int, ...]:
    """The kernels' 16 ints: (inner, inner_step, outer_step, start) for each of up to MAX_ORDERS groups."""
    quads = [(o.inner, o.inner_step, o.outer_step, o.start) for o in orders or ()]
    quads += [(1, 1, 0, 0)] * (MAX_ORDERS - len(quads))
    return tuple(x for q in quads for x in q)


def _forward(w: Tensor, u: Tensor, k: Tensor, v: Tensor, orders, cfg: TileConfig, save: bool):
    T, C = k.shape[-2:]
    Bg, *k_strides = _as_groups(k)
    B = k.numel() // (T * C)  # sequences of all order groups (numel counts an expanded view's every element)
    R, G = cfg.R, cfg.G
    n_sub = _cdiv(T, R)
    n_sup = _cdiv(n_sub, G)
    ncb = _cdiv(C, cfg.BC)
    dev = k.device
    y = torch.empty(k.shape, dtype=v.dtype, device=dev)  # contiguous: the kernels write sequence b at b * T * C
    kmax = torch.empty((B, C), dtype=torch.float32, device=dev)
    sub = torch.empty((B, n_sub, 3, C), dtype=torch.float32, device=dev)  # right states inside super-chunks
    fstates = torch.empty((B, n_sub, 4, C), dtype=torch.float32, device=dev) if save else kmax
    states = kmax
    grid = (B * n_sup * ncb,)
    layout = (Bg, *k_strides, *_as_groups(v)[1:], _order_args(orders))
    ordered = orders is not None
    if n_sup > 1:
        summ = torch.empty((B, n_sup, 5, C), dtype=torch.float32, device=dev)
        _fwd_summary_kernel[grid](
            k, v, w, sub, summ, T, C, n_sub, n_sup, G, *layout, R, cfg.BC, ncb, ordered, num_warps=1
        )  # fmt: skip
        states = torch.empty((B, n_sup, 4, C), dtype=torch.float32, device=dev)
        sgrid, sncb, rows, warps = _scan_launch(B, C, cfg, n_sup)
        _fwd_chunk_scan_kernel[sgrid](summ, states, kmax, w, n_sup, C, G * R, sncb, rows, cfg.scan_BC, num_warps=warps)
    _fwd_output_kernel[grid](
        k, v, w, u, kmax, sub, states, y, fstates, T, C, n_sub, n_sup, G, *layout,
        R, cfg.BC, ncb, n_sup == 1, save, ordered, num_warps=1,
    )  # fmt: skip
    return y, kmax, fstates


def _backward(w, u, k, v, kmax, fstates, gy, orders, cfg: TileConfig):
    T, C = k.shape[-2:]
    Bg = _as_groups(k)[0]
    B = kmax.shape[0]
    R, G = cfg.R, cfg.G_bwd
    n_sub = _cdiv(T, R)
    n_sup = _cdiv(n_sub, G)
    ncb = _cdiv(C, cfg.BC_bwd)
    dev = k.device
    if gy.stride(-1) != 1:
        gy = gy.contiguous()
    grid = (B * n_sup * ncb,)
    layout = (Bg, *_as_groups(k)[1:], *_as_groups(v)[1:], *_as_groups(gy)[1:], _order_args(orders))
    ordered = orders is not None
    sub = torch.empty((B, n_sub, 4, C), dtype=torch.float32, device=dev)
    states = kmax
    if n_sup > 1:
        summ = torch.empty((B, n_sup, 8, C), dtype=torch.float32, device=dev)
        _bwd_summary_kernel[grid](
            k, v, gy, w, u, kmax, fstates, sub, summ, T, C, n_sub, n_sup, G, *layout, R, cfg.BC_bwd, ncb, ordered,
            num_warps=1,
        )  # fmt: skip
        states = torch.empty((B, n_sup, 8, C), dtype=torch.float32, device=dev)
        sgrid, sncb, rows, warps = _scan_launch(B, C, cfg, n_sup)
        _bwd_chunk_scan_kernel[sgrid](summ, states, w, n_sup, C, G * R, sncb, rows, cfg.scan_BC, num_warps=warps)
    gk = torch.empty(k.shape, dtype=k.dtype, device=dev)  # contiguous, like y
    gv = torch.empty(v.shape, dtype=v.dtype, device=dev)
    part = torch.empty((B * n_sup, 2, C), dtype=torch.float32, device=dev)
    _bwd_output_kernel[grid](
        k, v, gy, w, u, kmax, fstates, sub, states, gk, gv, part, T, C, n_sub, n_sup, G, *layout,
        R, cfg.BC_bwd, ncb, n_sup == 1, ordered, num_warps=1,
    )  # fmt: skip
    gu, gw = part.sum(0, dtype=torch.float64)  # [B * n_sup, 2, C] -> [2, C]
    return gw, gu, gk, gv


def _on_device(x: Tensor):
    # CPU tensors reach the kernels only under TRITON_INTERPRET=1 (the CI test of the kernels)
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


class TritonBiWKV(torch.autograd.Function):
    """k, v: [B, T, C], or [n, B, N, C] read in n token orders (at most MAX_ORDERS); y and the gradients of k, v
    are contiguous tensors of k's shape."""

    @staticmethod
    def forward(ctx, w: Tensor, u: Tensor, k: Tensor, v: Tensor, orders, config: TileConfig | None) -> Tensor:
        _check(k, v)
        T, C = k.shape[-2:]
        wf, uf = w.float().contiguous(), u.float().contiguous()
        cfg = config or tile_config(k.numel() // (T * C), T, C)  # numel counts every order's sequences
        save = any(ctx.needs_input_grad[:4])  # the backward's per-sub-chunk states, only when one will follow
        with _on_device(k):
            y, kmax, fstates = _forward(wf, uf, k, v, orders, cfg, save)
        ctx.save_for_backward(wf, uf, k, v, kmax, fstates)
        ctx.dtypes = (w.dtype, u.dtype)
        ctx.orders = orders
        ctx.cfg = cfg
        return y

    @staticmethod
    def backward(ctx, gy: Tensor):
        wf, uf, k, v, kmax, fstates = ctx.saved_tensors
        with _on_device(k):
            gw, gu, gk, gv = _backward(wf, uf, k, v, kmax, fstates, gy, ctx.orders, ctx.cfg)
        return gw.to(ctx.dtypes[0]), gu.to(ctx.dtypes[1]), gk, gv, None, None


def bi_wkv_triton(
    w: Tensor,
    u: Tensor,
    k: Tensor,
    v: Tensor,
    orders: tuple[TokenOrder, ...] | None = None,
    config: TileConfig | None = None,
) -> Tensor:
    """Bi-WKV on CUDA through Triton; the contract of `bi_wkv` (w, u [C]; k, v [B, T, C] -> y [B, T, C]), or
    of `bi_wkv_ordered` when orders are given (k, v [n, B, N, C] stored tokens, sequence (i, b) reads k[i, b]
    in orders[i]; y [n, B, N, C] at the stored tokens).

    fp32 accumulation for float32, bfloat16 and float16 inputs; y has v's dtype. k and v may be strided views
    with any batch, time (and group) strides as long as the channel axis is contiguous: a layer hands several
    windows or views to one launch without copies, e.g. one k expanded over its n scan orders (stride 0).
    config: tile sizes (tests and benchmarks); by default `tile_config(B, T, C)`.
    float64 inputs (gradcheck on a GPU) run the exact chunked path instead: the kernels accumulate in fp32.
    """
    if orders is not None:
        if k.dim() != 4 or len(orders) != k.shape[0]:
            raise ValueError(f"bi_wkv_triton: {len(orders)} orders need k, v [n, B, N, C] with n = {len(orders)}")
        for order in orders:
            order.check(k.shape[2])  # an order outside the N tokens would read outside k
    if orders is not None and len(orders) > MAX_ORDERS:
        # one launch holds MAX_ORDERS orders; more take one launch per MAX_ORDERS
        parts = [
            bi_wkv_triton(w, u, k[i : i + MAX_ORDERS], v[i : i + MAX_ORDERS], orders[i : i + MAX_ORDERS], config)
            for i in range(0, len(orders), MAX_ORDERS)
        ]
        return torch.cat(parts)
    if k.dtype == torch.float64:
        return bi_wkv_chunked(w, u, k, v) if orders is None else apply_in_orders(bi_wkv_chunked, w, u, k, v, orders)
    return TritonBiWKV.apply(w, u, k, v, orders, config)


def bi_wkv_triton_grads(
    w: Tensor,
    u: Tensor,
    k: Tensor,
    v: Tensor,
    gy: Tensor,
    orders: tuple[TokenOrder, ...] | None = None,
    config: TileConfig | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dw, du, dk, dv) of `bi_wkv_triton` at the output gradient gy (k's shape), in the dtypes of w, u, k, v: the
    forward kernels run again to store the sub-chunk states, then the backward kernels (the backward of the
    registered operator, which keeps only its inputs). Same kernels and tiles as autograd through bi_wkv_triton.
    float32, bfloat16 and float16 only (the registered operator sends float64 to the chunked path)."""
    if orders is not None and len(orders) > MAX_ORDERS:
        parts = [
            bi_wkv_triton_grads(w, u, *(t[i : i + MAX_ORDERS] for t in (k, v, gy)), orders[i : i + MAX_ORDERS], config)
            for i in range(0, len(orders), MAX_ORDERS)
        ]
        gw, gu, gk, gv = zip(*parts, strict=True)
        return sum(gw), sum(gu), torch.cat(gk), torch.cat(gv)
    _check(k, v)
    T, C = k.shape[-2:]
    wf, uf = w.float().contiguous(), u.float().contiguous()
    cfg = config or tile_config(k.numel() // (T * C), T, C)
    with _on_device(k):
        _, kmax, fstates = _forward(wf, uf, k, v, orders, cfg, True)
        gw, gu, gk, gv = _backward(wf, uf, k, v, kmax, fstates, gy, orders, cfg)
    return gw.to(w.dtype), gu.to(u.dtype), gk, gv
