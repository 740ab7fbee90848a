"""Backward kernels of the Triton Bi-WKV: summary walk, chunk scan, output walk (docs/kernel_design.md, steps
4-6). The same operator as the forward applied to a = gy / den and b = -gy y / den, with (S, Q) states for dw.

Arguments as in `triton_forward`: dims = (T, C, n_sub, n_sup, G); layout = (sequences per order group, then
the group / batch / time strides of k, v and gy), see `_kv_source` and `_gy_source`; orders = 16 ints.
"""

import triton
import triton.language as tl

from .triton_common import (
    _combine_q,
    _combine_q_count,
    _edge,
    _entry_decays,
    _exp,
    _gy_source,
    _kv_source,
    _load4,
    _load_gy,
    _load_kv,
    _n_sub_in,
    _order,
    _program,
    _rest,
    _row,
    _rows,
    _store2,
    _store4,
    _sym,
    _token_weights,
)


@triton.jit
def _grad_inputs(k, v, gy, fstate_ptr, b, j, T, C, n_sub, cols, kmax, dec, pl, pr, ew, eu, R: tl.constexpr):
    """Recomputes num and den of sub-chunk j (tiles k, v, gy) from the stored states; returns a = dL/dnum,
    b = dL/dden."""
    cmask = cols < C
    _, mask, row_ok = _rows(0, j, T, cols, C, 0, (1, 1, 0, 0), R, False)
    ln, ld, rn, rd = _load4(_row(fstate_ptr, b, j, n_sub, 4, C, cols), C, cmask)
    ek = _exp(k - kmax[None, :])
    d = tl.where(row_ok, dec[None, :], 1.0)
    num, den, _, _ = _sym(ek * v, ek, d, pl, pr, ew, eu, ln, ld, rn, rd, R)
    # padded tokens have den = 0: keep their NaNs out of the scans
    a = tl.where(mask, gy / den, 0.0)
    return a, tl.where(mask, -a * (num / den), 0.0), ek, v, d, mask, row_ok


@triton.jit
def _bwd_walk(
    k_ptr, v_ptr, gy_ptr, w_ptr, u_ptr, kmax_ptr, fstate_ptr, sub_ptr, b, J, cols, dims, kv, gsrc, order,
    R: tl.constexpr, ORDERED: tl.constexpr,
):  # fmt: skip
    """As _fwd_walk for the (S, Q) states of a and b: stores per sub-chunk the (S, Q) its later sub-chunks send
    into it from the right ([B, n_sub, 4, C]); returns the super-chunk's rightward and leftward (S, Q) summaries."""
    T, C, n_sub, _, G = dims
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
    k_next, v_next = _load_kv(k_ptr, v_ptr, kv, J * G + count - 1, T, cols, C, order, R, ORDERED, count > 0)
    g_next = _load_gy(gy_ptr, gsrc, J * G + count - 1, T, cols, C, order, R, ORDERED, count > 0)
    for i in range(count):
        jj = count - 1 - i
        j = J * G + jj
        k = k_next
        v = v_next
        gy = g_next
        k_next, v_next = _load_kv(k_ptr, v_ptr, kv, j - 1, T, cols, C, order, R, ORDERED, i + 1 < count)
        g_next = _load_gy(gy_ptr, gsrc, j - 1, T, cols, C, order, R, ORDERED, i + 1 < count)
        _store4(_row(sub_ptr, b, j, n_sub, 4, C, cols), C, cmask, sa, sb, qa, qb)
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
    k_ptr, v_ptr, gy_ptr, w_ptr, u_ptr, kmax_ptr, fstate_ptr, sub_ptr, summ_ptr, dims, layout, orders,
    R: tl.constexpr, BC: tl.constexpr, NCB, ORDERED: tl.constexpr,
):  # fmt: skip
    """Step 4, grid (B * n_sup * NCB,): walks one super-chunk (`_bwd_walk`). Reads k, v, gy, kmax [B, C] and
    the forward's entering states fstate [B, n_sub, 4, C]; writes the per-sub-chunk right (S, Q) states sub
    [B, n_sub, 4, C] and the super-chunk summary summ [B, n_sup, 8, C] = (rightward S_a, S_b, Q_a, Q_b, leftward
    S_a, S_b, Q_a, Q_b)."""
    C = dims[1]
    n_sup = dims[3]
    b, J, cb = _program(NCB, n_sup, False)
    cols = cb * BC + tl.arange(0, BC)
    cmask = cols < C
    kv, gsrc = _kv_source(b, layout), _gy_source(b, layout)
    sums = _bwd_walk(
        k_ptr, v_ptr, gy_ptr, w_ptr, u_ptr, kmax_ptr, fstate_ptr, sub_ptr, b, J, cols, dims, kv, gsrc,
        _order(b, layout[0], orders, ORDERED), R, ORDERED,
    )  # fmt: skip
    out = _row(summ_ptr, b, J, n_sup, 8, C, cols)
    fa, fb, fqa, fqb, ga, gb, gqa, gqb = sums
    _store4(out, C, cmask, fa, fb, fqa, fqb)
    _store4(out + 4 * C, C, cmask, ga, gb, gqa, gqb)


@triton.jit
def _bwd_chunk_scan_kernel(
    summ_ptr, state_ptr, w_ptr, n, C, L, NCB, NB: tl.constexpr, BC: tl.constexpr,
):  # fmt: skip
    """Step 5, grid (B * NCB, 2): program (batch, channel block; side). Reads the n super-chunk summaries of L
    tokens each (summ [B, n, 8, C]) in [NB, BC] tiles with a carry between tiles; writes the (S, Q) states of a
    and b entering every super-chunk from the left (side 0, components 0-3) or the right (side 1, components
    4-7) of state [B, n, 8, C]."""
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
        xa, xb, qa, qb = _load4(src, C, ok)
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
        _store4(state + j * 8 * C + reverse.to(tl.int32) * 4 * C, C, (j < n) & cmask, sa, sb, sqa, sqb)
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
    dims, layout, orders, R: tl.constexpr, BC: tl.constexpr, NCB, SINGLE: tl.constexpr, ORDERED: tl.constexpr,
):  # fmt: skip
    """Step 6, grid (B * n_sup * NCB,), programs in the reverse order of step 4: walks one super-chunk from the
    left. Reads k, v, gy, kmax, fstate [B, n_sub, 4, C], the right (S, Q) states sub [B, n_sub, 4, C] and the
    entering states state [B, n_sup, 8, C]; writes dk, dv at the stored tokens (contiguous, k's shape) and the
    super-chunk's partial sums part [B n_sup, 2, C] = (du, dw). SINGLE (one super-chunk): runs step 4's walk
    first."""
    T, C, n_sub, n_sup, G = dims
    b, J, cb = _program(NCB, n_sup, True)
    cols = cb * BC + tl.arange(0, BC)
    cmask = cols < C
    zero = tl.zeros([BC], tl.float32)
    kv, gsrc = _kv_source(b, layout), _gy_source(b, layout)
    order = _order(b, layout[0], orders, ORDERED)
    if SINGLE:
        _bwd_walk(
            k_ptr, v_ptr, gy_ptr, w_ptr, u_ptr, kmax_ptr, fstate_ptr, sub_ptr, b, J, cols, dims, kv, gsrc, order,
            R, ORDERED,
        )  # fmt: skip
        tl.debug_barrier()  # the walk's stores are read back below
        la, lb, lqa, lqb = zero, zero, zero, zero
        ra, rb, rqa, rqb = zero, zero, zero, zero
    else:
        p = _row(state_ptr, b, J, n_sup, 8, C, cols)
        la, lb, lqa, lqb = _load4(p, C, cmask)
        ra, rb, rqa, rqb = _load4(p + 4 * C, C, cmask)
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
    k_next, v_next = _load_kv(k_ptr, v_ptr, kv, J * G, T, cols, C, order, R, ORDERED, count > 0)
    g_next = _load_gy(gy_ptr, gsrc, J * G, T, cols, C, order, R, ORDERED, count > 0)
    for jj in range(count):
        j = J * G + jj
        k = k_next
        v = v_next
        gy = g_next
        k_next, v_next = _load_kv(k_ptr, v_ptr, kv, j + 1, T, cols, C, order, R, ORDERED, jj + 1 < count)
        g_next = _load_gy(gy_ptr, gsrc, j + 1, T, cols, C, order, R, ORDERED, jj + 1 < count)
        a, bb, ek, v, d, mask, row_ok = _grad_inputs(
            k, v, gy, fstate_ptr, b, j, T, C, n_sub, cols, kmax, dec, pl, pr, ew, eu, R
        )
        # (S, Q) entering from the right: the later sub-chunks' part, plus the super-chunk's right state
        # carried across them (rest tokens)
        sub_a, sub_b, sub_qa, sub_qb = _load4(_row(sub_ptr, b, j, n_sub, 4, C, cols), C, cmask)
        rest = _rest(J, jj, T, G, R)
        d_rest = _exp(-rest * w)
        ea = sub_a + d_rest * ra
        eb = sub_b + d_rest * rb
        eqa = sub_qa + d_rest * (rqa + rest * ra)
        eqb = sub_qb + d_rest * (rqb + rest * rb)
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
    _store2(part_ptr + (b * n_sup + J).to(tl.int64) * 2 * C + cols, C, cmask, du_sum, -dw_sum)
