"""@triton.jit helpers shared by the forward and backward kernels: accurate exponentials, the scan combines,
sequence and token-order addressing, tile loads and state-row loads and stores, per-token decay tables, and Sym
inside one sub-chunk. Design: docs/kernel_design.md."""

import triton
import triton.language as tl

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
def _kv_source(b, layout):
    """(k offset, k time stride, v offset, v time stride) of sequence b. layout: (sequences per order group,
    then group, batch and time strides of k, of v, and in the backward of gy)."""
    Bg = layout[0]
    return _seq(b, Bg, layout[1], layout[2]), layout[3], _seq(b, Bg, layout[4], layout[5]), layout[6]


@triton.jit
def _gy_source(b, layout):
    """(gy offset, gy time stride) of sequence b in a backward layout."""
    return _seq(b, layout[0], layout[7], layout[8]), layout[9]


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
def _load_kv(k_ptr, v_ptr, kv, j, T, cols, C, order, R: tl.constexpr, ORDERED: tl.constexpr, ok):
    """The k tile (-inf where masked) and the v tile (0) of sub-chunk j, the inputs of every walk step;
    kv: `_kv_source` of the sequence."""
    ks, skt, vs, svt = kv
    k = _load(k_ptr, ks, j, T, cols, C, skt, order, R, ORDERED, float("-inf"), ok)
    v = _load(v_ptr, vs, j, T, cols, C, svt, order, R, ORDERED, 0.0, ok)
    return k, v


@triton.jit
def _load_gy(gy_ptr, gsrc, j, T, cols, C, order, R: tl.constexpr, ORDERED: tl.constexpr, ok):
    """The gy tile (0 where masked) of sub-chunk j; gsrc: `_gy_source` of the sequence."""
    return _load(gy_ptr, gsrc[0], j, T, cols, C, gsrc[1], order, R, ORDERED, 0.0, ok)


@triton.jit
def _row(ptr, b, j, n, K: tl.constexpr, C, cols):
    """Pointers to row j of a chunk-major [B, n, K, C] state tensor (component q is at + q * C)."""
    return ptr + ((b.to(tl.int64) * n + j) * K) * C + cols


@triton.jit
def _load2(p, C, mask):
    """Components 0 and 1 of a state row at p (0 where masked); component q is at p + q * C."""
    return tl.load(p, mask=mask, other=0.0), tl.load(p + C, mask=mask, other=0.0)


@triton.jit
def _load3(p, C, mask):
    """Components 0-2 of a state row at p (0 where masked)."""
    x0, x1 = _load2(p, C, mask)
    return x0, x1, tl.load(p + 2 * C, mask=mask, other=0.0)


@triton.jit
def _load4(p, C, mask):
    """Components 0-3 of a state row at p (0 where masked)."""
    x0, x1 = _load2(p, C, mask)
    x2, x3 = _load2(p + 2 * C, C, mask)
    return x0, x1, x2, x3


@triton.jit
def _store2(p, C, mask, x0, x1):
    """Stores x0, x1 as components 0 and 1 of the state row at p."""
    tl.store(p, x0, mask=mask)
    tl.store(p + C, x1, mask=mask)


@triton.jit
def _store3(p, C, mask, x0, x1, x2):
    _store2(p, C, mask, x0, x1)
    tl.store(p + 2 * C, x2, mask=mask)


@triton.jit
def _store4(p, C, mask, x0, x1, x2, x3):
    _store2(p, C, mask, x0, x1)
    _store2(p + 2 * C, C, mask, x2, x3)


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
