"""Forward kernels of the Triton Bi-WKV: summary walk, chunk scan, output walk (docs/kernel_design.md, steps 1-3).

Walking kernels run one program per (sequence, super-chunk, channel block) and take
    dims = (T, C, n_sub, n_sup, G): tokens, channels, sub-chunks, super-chunks, sub-chunks per super-chunk;
    layout = (sequences per order group, k's group / batch / time strides, v's), see `_kv_source`;
    orders = 16 ints, (inner, inner_step, outer_step, start) of up to four token orders, see `_order`.
State tensors are chunk-major [B, chunks, components, C] float32.
"""

import triton
import triton.language as tl

from .triton_common import (
    _NO_MAX,
    _combine_count,
    _edge,
    _entry_decays,
    _exp,
    _kv_source,
    _load2,
    _load3,
    _load4,
    _load_kv,
    _n_sub_in,
    _order,
    _program,
    _rest,
    _row,
    _rows,
    _store2,
    _store3,
    _store4,
    _sym,
    _token_weights,
)


@triton.jit
def _fwd_walk(
    k_ptr, v_ptr, w_ptr, sub_ptr, b, J, cols, dims, kv, order, R: tl.constexpr, ORDERED: tl.constexpr,
):  # fmt: skip
    """Walks super-chunk J from its last sub-chunk to its first. Stores for each sub-chunk the state its later
    sub-chunks send into it from the right, with the running k max that is its frame ([B, n_sub, 3, C]); returns
    the super-chunk's k max and its contributions to the states leaving it rightwards (f) and leftwards (g)."""
    T, C, n_sub, _, G = dims
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
    k_next, v_next = _load_kv(k_ptr, v_ptr, kv, J * G + count - 1, T, cols, C, order, R, ORDERED, count > 0)
    for i in range(count):
        jj = count - 1 - i
        j = J * G + jj
        k = k_next
        v = v_next
        k_next, v_next = _load_kv(k_ptr, v_ptr, kv, j - 1, T, cols, C, order, R, ORDERED, i + 1 < count)
        _store3(_row(sub_ptr, b, j, n_sub, 3, C, cols), C, cmask, m, gn, gd)
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
    k_ptr, v_ptr, w_ptr, sub_ptr, summ_ptr, dims, layout, orders,
    R: tl.constexpr, BC: tl.constexpr, NCB, ORDERED: tl.constexpr,
):  # fmt: skip
    """Step 1, grid (B * n_sup * NCB,): walks one super-chunk (`_fwd_walk`). Reads k, v; writes the per-sub-chunk
    right states sub [B, n_sub, 3, C] and the super-chunk summary summ [B, n_sup, 5, C] = (k max, rightward
    num, den, leftward num, den)."""
    C = dims[1]
    n_sup = dims[3]
    b, J, cb = _program(NCB, n_sup, False)
    cols = cb * BC + tl.arange(0, BC)
    cmask = cols < C
    kv, order = _kv_source(b, layout), _order(b, layout[0], orders, ORDERED)
    m, fn, fd, gn, gd = _fwd_walk(k_ptr, v_ptr, w_ptr, sub_ptr, b, J, cols, dims, kv, order, R, ORDERED)
    out = _row(summ_ptr, b, J, n_sup, 5, C, cols)
    tl.store(out, m, mask=cmask)
    _store4(out + C, C, cmask, fn, fd, gn, gd)


@triton.jit
def _fwd_chunk_scan_kernel(
    summ_ptr, state_ptr, kmax_ptr, w_ptr, n, C, L, NCB, NB: tl.constexpr, BC: tl.constexpr,
):  # fmt: skip
    """Step 2, grid (B * NCB, 2): program (batch, channel block; side). Reads the n super-chunk summaries of L
    tokens each (summ [B, n, 5, C]) in [NB, BC] tiles with a carry between tiles; writes kmax [B, C] (side 0)
    and the states entering every super-chunk, in units of e^kmax, from the left (side 0, components 0-1) or
    the right (side 1, components 2-3) of state [B, n, 4, C]."""
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
            fn, fd = _load2(src + C, C, ok)
            fn = fn * scale
            fd = fd * scale
            _, cc, sn, sd = tl.associative_scan((lw, one, fn, fd), 0, _combine_count)
            dd = _exp(-cc * lw)
            sn += dd * carry_n[None, :]
            sd += dd * carry_d[None, :]
            _store2(state + j * 4 * C, C, (j < n) & cmask, sn, sd)
            carry_n = _edge(sn, rows, NB - 1)
            carry_d = _edge(sd, rows, NB - 1)
    else:
        # row j scans super-chunks > j, from the last one leftwards
        for ii in range(n_tiles):
            j = (n_tiles - 1 - ii) * NB + rows
            ok = (j + 1 < n) & cmask
            src = summ + (j + 1) * 5 * C
            scale = _exp(tl.load(src, mask=ok, other=float("-inf")) - kmax[None, :])
            gn, gd = _load2(src + 3 * C, C, ok)
            gn = gn * scale
            gd = gd * scale
            _, cc, sn, sd = tl.associative_scan((lw, one, gn, gd), 0, _combine_count, reverse=True)
            dd = _exp(-cc * lw)
            sn += dd * carry_n[None, :]
            sd += dd * carry_d[None, :]
            _store2(state + j * 4 * C + 2 * C, C, (j < n) & cmask, sn, sd)
            carry_n = _edge(sn, rows, 0)
            carry_d = _edge(sd, rows, 0)


@triton.jit
def _fwd_output_kernel(
    k_ptr, v_ptr, w_ptr, u_ptr, kmax_ptr, sub_ptr, state_ptr, y_ptr, fstate_ptr, dims, layout, orders,
    R: tl.constexpr, BC: tl.constexpr, NCB, SINGLE: tl.constexpr, SAVE: tl.constexpr, ORDERED: tl.constexpr,
):  # fmt: skip
    """Step 3, grid (B * n_sup * NCB,), programs in the reverse order of step 1 (its last reads are in L2): walks
    one super-chunk from the left. Reads k, v, kmax [B, C], the right states sub [B, n_sub, 3, C] and the entering
    states state [B, n_sup, 4, C]; writes y at the stored tokens (contiguous, k's shape) and with SAVE the four
    states entering each sub-chunk, fstate [B, n_sub, 4, C] = (left num, den, right num, den). SINGLE (one
    super-chunk): runs step 1's walk first and writes kmax itself."""
    T, C, n_sub, n_sup, G = dims
    b, J, cb = _program(NCB, n_sup, True)
    cols = cb * BC + tl.arange(0, BC)
    cmask = cols < C
    zero = tl.zeros([BC], tl.float32)
    kv, order = _kv_source(b, layout), _order(b, layout[0], orders, ORDERED)
    if SINGLE:
        kmax, _, _, _, _ = _fwd_walk(k_ptr, v_ptr, w_ptr, sub_ptr, b, J, cols, dims, kv, order, R, ORDERED)
        tl.store(kmax_ptr + b * C + cols, kmax, mask=cmask)
        tl.debug_barrier()  # the walk's stores are read back below
        ln, ld, rn_sup, rd_sup = zero, zero, zero, zero
    else:
        kmax = tl.load(kmax_ptr + b * C + cols, mask=cmask, other=0.0)
        ln, ld, rn_sup, rd_sup = _load4(_row(state_ptr, b, J, n_sup, 4, C, cols), C, cmask)
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0)
    u = tl.load(u_ptr + cols, mask=cmask, other=0.0)
    dec = _exp(-w)
    ew = _exp(w)
    eu = _exp(u)
    entry = _entry_decays(w, R)
    pl = entry[0]
    pr = entry[1]
    count = _n_sub_in(J, T, G, R)
    k_next, v_next = _load_kv(k_ptr, v_ptr, kv, J * G, T, cols, C, order, R, ORDERED, count > 0)
    for jj in range(count):
        j = J * G + jj
        k = k_next
        v = v_next
        k_next, v_next = _load_kv(k_ptr, v_ptr, kv, j + 1, T, cols, C, order, R, ORDERED, jj + 1 < count)
        yoffs, mask, row_ok = _rows(b.to(tl.int64) * T * C, j, T, cols, C, C, order, R, ORDERED)
        sub_m, sub_n, sub_d = _load3(_row(sub_ptr, b, j, n_sub, 3, C, cols), C, cmask)
        scale = _exp(sub_m - kmax)
        tail = _exp(-_rest(J, jj, T, G, R) * w)  # the super-chunk's right state crosses the later sub-chunks
        rn = sub_n * scale + tail * rn_sup
        rd = sub_d * scale + tail * rd_sup
        ek = _exp(k - kmax[None, :])
        # padded tokens are identity maps (no decay), so nothing decays past the end of the sequence
        d = tl.where(row_ok, dec[None, :], 1.0)
        num, den, ln_next, ld_next = _sym(ek * v, ek, d, pl, pr, ew, eu, ln, ld, rn, rd, R)
        tl.store(y_ptr + yoffs, (num / den).to(y_ptr.dtype.element_ty), mask=mask)
        if SAVE:
            _store4(_row(fstate_ptr, b, j, n_sub, 4, C, cols), C, cmask, ln, ld, rn, rd)
        ln = ln_next
        ld = ld_next
