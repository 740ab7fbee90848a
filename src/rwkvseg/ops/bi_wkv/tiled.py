"""The Triton kernels' own chunked algorithm in plain PyTorch, step by step: the thing to debug the kernels against.

Same tiles (`TileConfig`: sub-chunks of R tokens, super-chunks of G sub-chunks, chunk-scan tiles of scan_rows
rows), same walks, same state tensors in the same chunk-major layouts ([B, chunks, components, C]), same formulas
(docs/kernel_design.md, steps 1-6): compare any intermediate with the kernel's buffer of the same name. What the
kernels distribute over programs is a loop here (super-chunks J, sub-chunks j) or a batch dimension (sequences,
channels: the channel blocks BC only split the channels across programs). The in-register scans
(`tl.associative_scan`) are loops over the R tokens; the chunk scans' tiles are closed-form sums with decays from
token counts, as `_combine_count` and `_combine_q_count` compute them. Exponentials are torch.exp (the kernels'
`_exp` is e^x to a few ulp).

Plain [B, T, C] sequences only (token orders change the kernels' addresses, not their arithmetic); computes in
float64 for float64 inputs and float32 otherwise. Slow (Python loops over T / R sub-chunks): for tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .tiles import TileConfig, cdiv, tile_config

_NO_MAX = -3.0e38  # the running k max before any token (the kernels' _NO_MAX)


@dataclass(frozen=True)
class _Tiles:
    """A sequence of T tokens cut into n_sub sub-chunks of R tokens and n_sup super-chunks of G sub-chunks."""

    T: int
    R: int
    G: int

    @property
    def n_sub(self) -> int:
        return cdiv(self.T, self.R)

    @property
    def n_sup(self) -> int:
        return cdiv(self.n_sub, self.G)

    def count(self, J: int) -> int:
        """Sub-chunks of super-chunk J that hold tokens (`_n_sub_in`)."""
        return min(self.G, cdiv(self.T - J * self.G * self.R, self.R))

    def rest(self, J: int, jj: int) -> int:
        """Tokens of super-chunk J after its sub-chunk jj (`_rest`)."""
        end = min((J + 1) * self.G * self.R, self.T)
        return max(end - (J * self.G + jj + 1) * self.R, 0)

    def row_ok(self, j: int, like: Tensor) -> Tensor:
        """[R, 1] True at the rows of sub-chunk j that hold tokens."""
        return (j * self.R + torch.arange(self.R, device=like.device) < self.T)[:, None]


def _sub_chunks(x: Tensor, R: int, fill: float) -> Tensor:
    """[B, T, C] -> [B, n_sub, R, C], the last sub-chunk padded with fill (the kernels' masked loads)."""
    B, T, C = x.shape
    pad = cdiv(T, R) * R - T
    x = torch.cat([x, x.new_full((B, pad, C), fill)], 1)
    return x.view(B, -1, R, C)


def _token_weights(w: Tensor, R: int):
    """[R, C] weights of each token in the states leaving its sub-chunk rightwards (df) and leftwards (db), and
    the token distances behind them (right, left)."""
    r = torch.arange(R, dtype=w.dtype, device=w.device)[:, None]
    right = (R - 1) - r
    return torch.exp((-right * w).clamp(max=88.0)), torch.exp((-r * w).clamp(max=88.0)), right, r


def _entry_decays(w: Tensor, R: int):
    """[R, C] exact decays of the states entering a sub-chunk from the left (pl) and right (pr) at each token, and
    the token counts behind them (cl, cr)."""
    r = torch.arange(R, dtype=w.dtype, device=w.device)[:, None]
    left = r + 1.0
    right = R - r
    return torch.exp((-left * w).clamp(max=88.0)), torch.exp((-right * w).clamp(max=88.0)), left, right


def _scan(d: Tensor, xs: tuple[Tensor, ...], reverse: bool) -> list[Tensor]:
    """Inclusive scans S_t = d_t S_(t-1) + x_t over the R rows of [B, R, C] tiles (`_combine`); reverse runs from
    the last row."""
    rows = range(d.shape[1] - 1, -1, -1) if reverse else range(d.shape[1])
    outs = [torch.empty_like(x) for x in xs]
    state = [torch.zeros_like(x[:, 0]) for x in xs]
    for t in rows:
        for i, x in enumerate(xs):
            state[i] = d[:, t] * state[i] + x[:, t]
            outs[i][:, t] = state[i]
    return outs


def _scan_q(d, m, a, b, ea, eb, eqa, eqb, p, count, reverse: bool):
    """Inclusive (S, Q) states of a and b after every token in scan order (`_combine_q`: S_t = d_t S + x_t,
    Q_t = d_t (Q + m_t S)), plus the (S, Q) entering the sub-chunk from that side at exact decay p, count tokens."""
    rows = range(d.shape[1] - 1, -1, -1) if reverse else range(d.shape[1])
    sa, sb, qa, qb = (torch.empty_like(a) for _ in range(4))
    s_a = s_b = q_a = q_b = torch.zeros_like(a[:, 0])
    for t in rows:
        q_a = d[:, t] * (q_a + m[:, t] * s_a)
        q_b = d[:, t] * (q_b + m[:, t] * s_b)
        s_a = d[:, t] * s_a + a[:, t]
        s_b = d[:, t] * s_b + b[:, t]
        sa[:, t], sb[:, t], qa[:, t], qb[:, t] = s_a, s_b, q_a, q_b
    ea, eb, eqa, eqb = (x[:, None] for x in (ea, eb, eqa, eqb))
    return sa + p * ea, sb + p * eb, qa + p * (eqa + count * ea), qb + p * (eqb + count * eb)


def _sym(xn, xd, d, pl, pr, ew, eu, ln, ld, rn, rd):
    """Sym of num and den inside one sub-chunk ([B, R, C] tiles) with the states entering it from the left (l) and
    right (r) [B, C]; also returns the left state leaving it (`_sym`)."""
    an, ad = _scan(d, (xn, xd), reverse=False)
    an = an + pl * ln[:, None]
    ad = ad + pl * ld[:, None]
    bn, bd = _scan(d, (xn, xd), reverse=True)
    bn = bn + pr * rn[:, None]
    bd = bd + pr * rd[:, None]
    num = ew * ((an - xn) + (bn - xn)) + eu * xn
    den = ew * ((ad - xd) + (bd - xd)) + eu * xd
    return num, den, an[:, -1], ad[:, -1]


def _chunk_scan(x: tuple[Tensor, ...], L: float, w: Tensor, rows: int, reverse: bool, with_q: bool) -> list[Tensor]:
    """Exclusive scans over super-chunk summaries x_i [B, n, C] (each a map of L tokens): row j gets the state
    entering super-chunk j from the left (sum over i < j) or, reverse, from the right (i > j). Tiles of `rows`
    rows are scanned in closed form with decays e^(-count L w) from token counts (`_combine_count`,
    `_combine_q_count`: with_q, x = (S_a, S_b, Q_a, Q_b) and Q composes as Q -> d (Q + m S) + q), then composed
    with the carry from earlier tiles."""
    n = x[0].shape[1]
    shifted = [torch.zeros_like(t) for t in x]  # row j holds summary j - 1 (j + 1 reverse): inclusive = exclusive
    for s, t in zip(shifted, x, strict=True):
        if reverse:
            s[:, :-1] = t[:, 1:]
        else:
            s[:, 1:] = t[:, :-1]
    out = [torch.empty_like(t) for t in x]
    carry = [torch.zeros_like(t[:, 0]) for t in x]
    tiles = [range(i, min(i + rows, n)) for i in range(0, n, rows)]
    for tile in reversed(tiles) if reverse else tiles:
        for j in tile:
            # rows of this tile from its first row in scan order up to j
            span = [i for i in tile if (i >= j if reverse else i <= j)]
            acc = [torch.zeros_like(t[:, 0]) for t in x]
            for i in span:
                m = abs(j - i) * L  # tokens between summary i and row j
                d = torch.exp(-m * w)
                if with_q:
                    acc[2] = acc[2] + d * (shifted[2][:, i] + m * shifted[0][:, i])
                    acc[3] = acc[3] + d * (shifted[3][:, i] + m * shifted[1][:, i])
                acc[0] = acc[0] + d * shifted[0][:, i]
                acc[1] = acc[1] + d * shifted[1][:, i]
            mm = len(span) * L
            dd = torch.exp(-mm * w)
            if with_q:
                acc[2] = acc[2] + dd * (carry[2] + mm * carry[0])
                acc[3] = acc[3] + dd * (carry[3] + mm * carry[1])
            acc[0] = acc[0] + dd * carry[0]
            acc[1] = acc[1] + dd * carry[1]
            for o, a in zip(out, acc, strict=True):
                o[:, j] = a
        edge = tile[0] if reverse else tile[-1]
        carry = [o[:, edge] for o in out]
    return out


def _fwd_walk(k, v, w, sub, J: int, tiles: _Tiles):
    """Step 1's walk of super-chunk J from its last sub-chunk to its first (`_fwd_walk`): fills sub[:, j] =
    (running k max, leftward num, den from the later sub-chunks); returns (k max, f_num, f_den, g_num, g_den)."""
    R, G = tiles.R, tiles.G
    df, db, _, _ = _token_weights(w, R)
    decay_r = torch.exp(-R * w)
    B, C = k.shape[0], k.shape[-1]
    m = k.new_full((B, C), _NO_MAX)
    fn = fd = gn = gd = k.new_zeros(B, C)
    count = tiles.count(J)
    for jj in reversed(range(count)):
        j = J * G + jj
        sub[:, j] = torch.stack([m, gn, gd], 1)
        m_new = torch.maximum(m, k[:, j].amax(1))
        rescale = torch.exp(m - m_new)
        ek = torch.exp(k[:, j] - m_new[:, None])
        xn = ek * v[:, j]
        tail = torch.exp(-tiles.rest(J, jj) * w)  # from this sub-chunk's right edge to the super-chunk's
        fn = fn * rescale + tail * (xn * df).sum(1)
        fd = fd * rescale + tail * (ek * df).sum(1)
        gn = gn * (rescale * decay_r) + (xn * db).sum(1)
        gd = gd * (rescale * decay_r) + (ek * db).sum(1)
        m = m_new
    return m, fn, fd, gn, gd


def forward(w: Tensor, u: Tensor, k: Tensor, v: Tensor, cfg: TileConfig) -> dict[str, Tensor]:
    """Forward steps 1-3 on k, v [B, T, C] with the forward tiles (R, G, scan_rows). Returns y [B, T, C] and the
    kernels' buffers: kmax [B, C], sub [B, n_sub, 3, C], summ [B, n_sup, 5, C] and states [B, n_sup, 4, C] (only
    for several super-chunks), fstates [B, n_sub, 4, C]."""
    B, T, C = k.shape
    tiles = _Tiles(T, cfg.R, cfg.G)
    R, G, n_sub, n_sup = tiles.R, tiles.G, tiles.n_sub, tiles.n_sup
    kt, vt = _sub_chunks(k, R, float("-inf")), _sub_chunks(v, R, 0.0)  # [B, n_sub, R, C]
    sub = k.new_zeros(B, n_sub, 3, C)
    out: dict[str, Tensor] = {"sub": sub}
    # step 1 (one super-chunk: the output kernel runs this walk itself)
    summ = k.new_zeros(B, n_sup, 5, C)
    for J in range(n_sup):
        summ[:, J] = torch.stack(_fwd_walk(kt, vt, w, sub, J, tiles), 1)
    kmax = summ[:, :, 0].amax(1)
    zeros = k.new_zeros(B, n_sup, C)
    if n_sup > 1:
        # step 2: kmax, and the states entering each super-chunk in units of e^kmax
        scale = torch.exp(summ[:, :, 0] - kmax[:, None])
        left = _chunk_scan((summ[:, :, 1] * scale, summ[:, :, 2] * scale), G * R, w, cfg.scan_rows, False, False)
        right = _chunk_scan((summ[:, :, 3] * scale, summ[:, :, 4] * scale), G * R, w, cfg.scan_rows, True, False)
        states = torch.stack([*left, *right], 2)
        out.update(summ=summ, states=states)
    else:
        states = torch.stack([zeros] * 4, 2)
    # step 3: walk each super-chunk from the left
    dec, ew, eu = torch.exp(-w), torch.exp(w), torch.exp(u)
    pl, pr, _, _ = _entry_decays(w, R)
    y = k.new_empty(B, n_sub, R, C)
    fstates = k.new_zeros(B, n_sub, 4, C)
    for J in range(n_sup):
        ln, ld, rn_sup, rd_sup = states[:, J].unbind(1)
        for jj in range(tiles.count(J)):
            j = J * G + jj
            scale = torch.exp(sub[:, j, 0] - kmax)
            tail = torch.exp(-tiles.rest(J, jj) * w)  # the super-chunk's right state crosses the later sub-chunks
            rn = sub[:, j, 1] * scale + tail * rn_sup
            rd = sub[:, j, 2] * scale + tail * rd_sup
            ek = torch.exp(kt[:, j] - kmax[:, None])
            d = torch.where(tiles.row_ok(j, k), dec, 1.0).expand(B, R, C)  # padded tokens: identity maps
            num, den, ln_next, ld_next = _sym(ek * vt[:, j], ek, d, pl, pr, ew, eu, ln, ld, rn, rd)
            y[:, j] = num / den
            fstates[:, j] = torch.stack([ln, ld, rn, rd], 1)
            ln, ld = ln_next, ld_next
    out.update(y=y.flatten(1, 2)[:, :T], kmax=kmax, fstates=fstates)
    return out


def _grad_inputs(kt, vt, gt, fstates, j, tiles: _Tiles, kmax, dec, pl, pr, ew, eu):
    """Recomputes num and den of sub-chunk j from the forward's stored states; a = dL/dnum, b = dL/dden."""
    ln, ld, rn, rd = fstates[:, j].unbind(1)
    row_ok = tiles.row_ok(j, kt)
    ek = torch.exp(kt[:, j] - kmax[:, None])
    d = torch.where(row_ok, dec, 1.0).expand_as(ek)
    num, den, _, _ = _sym(ek * vt[:, j], ek, d, pl, pr, ew, eu, ln, ld, rn, rd)
    a = torch.where(row_ok, gt[:, j] / den, 0.0)  # padded tokens have den = 0
    return a, torch.where(row_ok, -a * (num / den), 0.0), ek, d, row_ok


def backward(w, u, k, v, gy, kmax, fstates, cfg: TileConfig) -> dict[str, Tensor]:
    """Backward steps 4-6 with the backward tiles (R, G_bwd, scan_rows) from the forward's kmax and fstates.
    Returns dw, du [C], dk, dv [B, T, C] and the kernels' buffers: sub [B, n_sub, 4, C], summ and states
    [B, n_sup, 8, C] (only for several super-chunks), part [B n_sup, 2, C]."""
    B, T, C = k.shape
    tiles = _Tiles(T, cfg.R, cfg.G_bwd)
    R, G, n_sub, n_sup = tiles.R, tiles.G, tiles.n_sub, tiles.n_sup
    kt, vt, gt = _sub_chunks(k, R, float("-inf")), _sub_chunks(v, R, 0.0), _sub_chunks(gy, R, 0.0)
    dec, ew, eu = torch.exp(-w), torch.exp(w), torch.exp(u)
    df, db, right, left = _token_weights(w, R)
    pl, pr, cl, cr = _entry_decays(w, R)
    decay_r = torch.exp(-R * w)
    grad_inputs = (kt, vt, gt, fstates)
    consts = (kmax, dec, pl, pr, ew, eu)
    out: dict[str, Tensor] = {}
    # step 4: per super-chunk, from its last sub-chunk to its first (`_bwd_walk`)
    sub = k.new_zeros(B, n_sub, 4, C)
    summ = k.new_zeros(B, n_sup, 8, C)
    for J in range(n_sup):
        sa = sb = qa = qb = fa = fb = fqa = fqb = k.new_zeros(B, C)
        for jj in reversed(range(tiles.count(J))):
            j = J * G + jj
            sub[:, j] = torch.stack([sa, sb, qa, qb], 1)
            a, bb, _, _, _ = _grad_inputs(*grad_inputs, j, tiles, *consts)
            # leftwards: first the later sub-chunks, then this one (R tokens)
            qa = decay_r * (qa + R * sa) + (a * db * left).sum(1)
            qb = decay_r * (qb + R * sb) + (bb * db * left).sum(1)
            sa = decay_r * sa + (a * db).sum(1)
            sb = decay_r * sb + (bb * db).sum(1)
            # rightwards: first this sub-chunk, then the later ones (rest tokens)
            rest = tiles.rest(J, jj)
            d_rest = torch.exp(-rest * w)
            ca, cb = (a * df).sum(1), (bb * df).sum(1)
            fqa = fqa + d_rest * ((a * df * right).sum(1) + rest * ca)
            fqb = fqb + d_rest * ((bb * df * right).sum(1) + rest * cb)
            fa = fa + d_rest * ca
            fb = fb + d_rest * cb
        summ[:, J] = torch.stack([fa, fb, fqa, fqb, sa, sb, qa, qb], 1)
    if n_sup > 1:
        # step 5: (S, Q) states of a and b entering each super-chunk
        left_states = _chunk_scan(summ[:, :, :4].unbind(2), G * R, w, cfg.scan_rows, False, True)
        right_states = _chunk_scan(summ[:, :, 4:].unbind(2), G * R, w, cfg.scan_rows, True, True)
        states = torch.stack([*left_states, *right_states], 2)
        out.update(summ=summ, states=states)
    else:
        states = k.new_zeros(B, n_sup, 8, C)
    # step 6: walk each super-chunk from the left
    gk, gv = k.new_empty(B, n_sub, R, C), k.new_empty(B, n_sub, R, C)
    part = k.new_empty(B, n_sup, 2, C)
    for J in range(n_sup):
        la, lb, lqa, lqb, ra, rb, rqa, rqb = states[:, J].unbind(1)
        du_sum = dw_sum = k.new_zeros(B, C)
        for jj in range(tiles.count(J)):
            j = J * G + jj
            a, bb, ek, d, row_ok = _grad_inputs(*grad_inputs, j, tiles, *consts)
            v_j = vt[:, j]
            # (S, Q) entering from the right: the later sub-chunks' part, plus the super-chunk's right state
            # carried across them (rest tokens)
            rest = tiles.rest(J, jj)
            d_rest = torch.exp(-rest * w)
            ea = sub[:, j, 0] + d_rest * ra
            eb = sub[:, j, 1] + d_rest * rb
            eqa = sub[:, j, 2] + d_rest * (rqa + rest * ra)
            eqb = sub[:, j, 3] + d_rest * (rqb + rest * rb)
            m = torch.where(row_ok, 1.0, 0.0).to(a.dtype).expand_as(a)
            # inclusive (S, Q) after each token; exclusive: P = e^w (S - x), Q = e^w Q_after - P
            sa, sb, qa, qb = _scan_q(d, m, a, bb, la, lb, lqa, lqb, pl, cl, reverse=False)
            la, lb, lqa, lqb = sa[:, -1], sb[:, -1], qa[:, -1], qb[:, -1]
            pa = ew * (sa - a)
            pb = ew * (sb - bb)
            qa = ew * qa - pa
            qb = ew * qb - pb
            sa, sb, ra_q, rb_q = _scan_q(d, m, a, bb, ea, eb, eqa, eqb, pr, cr, reverse=True)
            qa = qa + ew * ra_q - ew * (sa - a)
            qb = qb + ew * rb_q - ew * (sb - bb)
            wa = pa + ew * (sa - a) + eu * a
            wb = pb + ew * (sb - bb) + eu * bb
            gk[:, j] = ek * (v_j * wa + wb)
            gv[:, j] = ek * wa
            du_sum = du_sum + torch.where(row_ok, eu * ek * (v_j * a + bb), 0.0).sum(1)
            dw_sum = dw_sum + torch.where(row_ok, ek * (v_j * qa + qb), 0.0).sum(1)
        part[:, J] = torch.stack([du_sum, -dw_sum], 1)
    du, dw = part.flatten(0, 1).sum(0).unbind(0)  # [B n_sup, 2, C] -> [2, C]
    out.update(sub=sub, part=part, dw=dw, du=du, dk=gk.flatten(1, 2)[:, :T], dv=gv.flatten(1, 2)[:, :T])
    return out


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class _TiledBiWKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: Tensor, u: Tensor, k: Tensor, v: Tensor, cfg: TileConfig) -> Tensor:
        dtype = _compute_dtype(k)
        wf, uf, kf, vf = (t.to(dtype) for t in (w, u, k, v))
        fwd = forward(wf, uf, kf, vf, cfg)
        ctx.save_for_backward(wf, uf, kf, vf, fwd["kmax"], fwd["fstates"])
        ctx.cfg = cfg
        ctx.dtypes = tuple(t.dtype for t in (w, u, k, v))
        return fwd["y"].to(v.dtype)

    @staticmethod
    def backward(ctx, gy: Tensor):
        wf, uf, kf, vf, kmax, fstates = ctx.saved_tensors
        bwd = backward(wf, uf, kf, vf, gy.to(kf.dtype), kmax, fstates, ctx.cfg)
        grads = (bwd[name].to(dtype) for name, dtype in zip(("dw", "du", "dk", "dv"), ctx.dtypes, strict=True))
        return (*grads, None)


def bi_wkv_tiled(w: Tensor, u: Tensor, k: Tensor, v: Tensor, config: TileConfig | None = None) -> Tensor:
    """Bi-WKV of k, v [B, T, C] -> y [B, T, C] by the Triton kernels' algorithm and tiles, in plain PyTorch, with
    autograd through the kernels' backward algorithm. config: tiles, by default `tile_config(B, T, C)` (what
    the kernels would run)."""
    B, T, C = k.shape
    return _TiledBiWKV.apply(w, u, k, v, config or tile_config(B, T, C))
