"""Triton Bi-WKV for CUDA tensors: launchers and autograd of the kernels in `triton_forward` and `triton_backward`
(helpers in `triton_common`, tiles in `tiles`), with the contract of `bi_wkv`; `tiled` runs the same algorithm
in plain PyTorch.

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
stored tokens. Design and measurements: docs/kernel_design.md.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import Tensor

from ..scan import TokenOrder, apply_in_orders, check_orders
from .chunked import bi_wkv_chunked
from .tiles import TileConfig, cdiv, scan_launch, tile_config
from .triton_backward import _bwd_chunk_scan_kernel, _bwd_output_kernel, _bwd_summary_kernel
from .triton_forward import _fwd_chunk_scan_kernel, _fwd_output_kernel, _fwd_summary_kernel

__all__ = ["MAX_ORDERS", "TileConfig", "TritonBiWKV", "bi_wkv_triton", "bi_wkv_triton_grads", "tile_config"]

MAX_ORDERS = 4  # token orders one launch mixes (QuadScan has four)
# the module globals this wrapper launches, by name: the host-side tools replace them (rwkvseg.bench.wkv)
KERNELS = (
    "_fwd_summary_kernel",
    "_fwd_chunk_scan_kernel",
    "_fwd_output_kernel",
    "_bwd_summary_kernel",
    "_bwd_chunk_scan_kernel",
    "_bwd_output_kernel",
)


def _check(k: Tensor, v: Tensor) -> None:
    for name, t in (("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(
                f"bi_wkv_triton: {name} needs a contiguous channel axis (stride {t.stride()}); "
                "pass a view with channels last or call .contiguous()"
            )
    if k.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"bi_wkv_triton: k, v are {k.dtype}; use float32, bfloat16 or float16")


def _as_groups(x: Tensor) -> tuple[int, int, int, int]:
    """(sequences per order group, group stride, batch stride, time stride) of [B, T, C] (one group) or
    [n, B, N, C] (n token orders)."""
    s = x.stride()  # one call: each .stride(i) costs as much as the whole tuple
    if len(s) == 3:
        return x.shape[0], 0, s[0], s[1]
    return x.shape[1], s[0], s[1], s[2]


@functools.lru_cache(maxsize=256)  # a pure function of frozen TokenOrders, asked on every call
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
    n_sub = cdiv(T, R)
    n_sup = cdiv(n_sub, G)
    ncb = cdiv(C, cfg.BC)
    dev = k.device
    # contiguous: the kernels write sequence b at b * T * C (empty_like: half the host time of empty(k.shape))
    y = torch.empty_like(k, dtype=v.dtype, memory_format=torch.contiguous_format)
    kmax = torch.empty((B, C), dtype=torch.float32, device=dev)
    sub = torch.empty((B, n_sub, 3, C), dtype=torch.float32, device=dev)  # right states inside super-chunks
    fstates = torch.empty((B, n_sub, 4, C), dtype=torch.float32, device=dev) if save else kmax
    states = kmax
    grid = (B * n_sup * ncb,)
    dims = (T, C, n_sub, n_sup, G)
    layout = (Bg, *k_strides, *_as_groups(v)[1:])
    order_args = _order_args(orders)
    ordered = orders is not None
    if n_sup > 1:
        summ = torch.empty((B, n_sup, 5, C), dtype=torch.float32, device=dev)
        _fwd_summary_kernel[grid](
            k, v, w, sub, summ, dims, layout, order_args, R, cfg.BC, ncb, ordered, num_warps=1
        )  # fmt: skip
        states = torch.empty((B, n_sup, 4, C), dtype=torch.float32, device=dev)
        sgrid, sncb, rows, warps = scan_launch(B, C, cfg, n_sup)
        _fwd_chunk_scan_kernel[sgrid](summ, states, kmax, w, n_sup, C, G * R, sncb, rows, cfg.scan_BC, num_warps=warps)
    _fwd_output_kernel[grid](
        k, v, w, u, kmax, sub, states, y, fstates, dims, layout, order_args,
        R, cfg.BC, ncb, n_sup == 1, save, ordered, num_warps=1,
    )  # fmt: skip
    return y, kmax, fstates


def _backward(w, u, k, v, kmax, fstates, gy, orders, cfg: TileConfig):
    T, C = k.shape[-2:]
    Bg, *k_strides = _as_groups(k)
    B = kmax.shape[0]
    R, G = cfg.R, cfg.G_bwd
    n_sub = cdiv(T, R)
    n_sup = cdiv(n_sub, G)
    ncb = cdiv(C, cfg.BC_bwd)
    dev = k.device
    if gy.stride(-1) != 1:
        gy = gy.contiguous()
    grid = (B * n_sup * ncb,)
    dims = (T, C, n_sub, n_sup, G)
    layout = (Bg, *k_strides, *_as_groups(v)[1:], *_as_groups(gy)[1:])
    order_args = _order_args(orders)
    ordered = orders is not None
    sub = torch.empty((B, n_sub, 4, C), dtype=torch.float32, device=dev)
    states = kmax
    if n_sup > 1:
        summ = torch.empty((B, n_sup, 8, C), dtype=torch.float32, device=dev)
        _bwd_summary_kernel[grid](
            k, v, gy, w, u, kmax, fstates, sub, summ, dims, layout, order_args, R, cfg.BC_bwd, ncb, ordered,
            num_warps=1,
        )  # fmt: skip
        states = torch.empty((B, n_sup, 8, C), dtype=torch.float32, device=dev)
        sgrid, sncb, rows, warps = scan_launch(B, C, cfg, n_sup)
        _bwd_chunk_scan_kernel[sgrid](summ, states, w, n_sup, C, G * R, sncb, rows, cfg.scan_BC, num_warps=warps)
    gk = torch.empty_like(k, memory_format=torch.contiguous_format)  # contiguous, like y
    gv = torch.empty_like(v, memory_format=torch.contiguous_format)
    part = torch.empty((B * n_sup, 2, C), dtype=torch.float32, device=dev)
    _bwd_output_kernel[grid](
        k, v, gy, w, u, kmax, fstates, sub, states, gk, gv, part, dims, layout, order_args,
        R, cfg.BC_bwd, ncb, n_sup == 1, ordered, num_warps=1,
    )  # fmt: skip
    gu, gw = part.sum(0, dtype=torch.float64).unbind()  # [B * n_sup, 2, C] -> 2 x [C]
    return gw, gu, gk, gv


def _prepare(w: Tensor, u: Tensor, k: Tensor, v: Tensor, config: TileConfig | None):
    """What every kernel call starts with: the checks, w and u as fp32, the tiles."""
    _check(k, v)
    T, C = k.shape[-2:]
    cfg = config or tile_config(k.numel() // (T * C), T, C)  # numel counts every order's sequences
    return w.float().contiguous(), u.float().contiguous(), cfg


def _on_device(x: Tensor):
    """Triton launches on the current CUDA device: a device guard only where x lives on another one (entering and
    leaving the guard is host time on every call). CPU tensors reach the kernels only under TRITON_INTERPRET=1 (the
    CI test of the kernels)."""
    if not x.is_cuda or x.device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(x.device)


class TritonBiWKV(torch.autograd.Function):
    """k, v: [B, T, C], or [n, B, N, C] read in n token orders (at most MAX_ORDERS); y and the gradients of k, v
    are contiguous tensors of k's shape."""

    @staticmethod
    def forward(ctx, w: Tensor, u: Tensor, k: Tensor, v: Tensor, orders, config: TileConfig | None) -> Tensor:
        wf, uf, cfg = _prepare(w, u, k, v, config)
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
        orders = tuple(orders)
        check_orders(orders, k.shape[2])  # an order outside the N tokens would read outside k
    if orders is not None and len(orders) > MAX_ORDERS:
        # one launch holds MAX_ORDERS orders; more take one launch per MAX_ORDERS
        parts = [
            bi_wkv_triton(w, u, k[i : i + MAX_ORDERS], v[i : i + MAX_ORDERS], orders[i : i + MAX_ORDERS], config)
            for i in range(0, len(orders), MAX_ORDERS)
        ]
        return torch.cat(parts)
    if k.dtype == torch.float64:
        return bi_wkv_chunked(w, u, k, v) if orders is None else apply_in_orders(bi_wkv_chunked, w, u, k, v, orders)
    if torch.is_grad_enabled() and (w.requires_grad or u.requires_grad or k.requires_grad or v.requires_grad):
        return TritonBiWKV.apply(w, u, k, v, orders, config)
    # no graph to record: the forward kernels alone, without the autograd Function's bookkeeping (a few us)
    wf, uf, cfg = _prepare(w, u, k, v, config)
    with _on_device(k):
        return _forward(wf, uf, k, v, orders, cfg, False)[0]


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
    wf, uf, cfg = _prepare(w, u, k, v, config)
    with _on_device(k):
        _, kmax, fstates = _forward(wf, uf, k, v, orders, cfg, True)
        gw, gu, gk, gv = _backward(wf, uf, k, v, kmax, fstates, gy, orders, cfg)
    return gw.to(w.dtype), gu.to(u.dtype), gk, gv
