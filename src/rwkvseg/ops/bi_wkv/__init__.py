"""Bi-WKV, the bidirectional WKV token mixer: public entry points (one signature, three implementations, chosen
by device) over the implementations of this package:

    naive.py            float64 O(T^2) brute force, the ground truth (`bi_wkv_reference`)
    chunked.py          exact O(T) path in plain PyTorch (`bi_wkv_chunked`), CPU and float64
    tiled.py            the Triton kernels' own chunked algorithm and tiles in plain PyTorch (`bi_wkv_tiled`), to
                        debug the kernels against
    tiles.py            the kernels' tile policy (`TileConfig`, `tile_config`)
    triton_common.py    @triton.jit helpers shared by the kernels
    triton_forward.py   forward kernels (summary walk, chunk scan, output walk)
    triton_backward.py  backward kernels (the same three steps)
    triton.py           launchers and autograd (`bi_wkv_triton`)
    library.py          the torch.library operators `rwkvseg::bi_wkv*` that `impl="auto"` calls
"""

from __future__ import annotations

import functools
import importlib.util

import torch
from torch import Tensor

from ..scan import TokenOrder, apply_in_orders, check_orders
from .chunked import bi_wkv_chunked
from .library import CHUNK, channels_contiguous, orders_to_ints, tracing, uses_triton
from .naive import bi_wkv_reference
from .tiled import bi_wkv_tiled

__all__ = [
    "IMPLEMENTATIONS",
    "bi_wkv",
    "bi_wkv_chunked",
    "bi_wkv_ordered",
    "bi_wkv_reference",
    "bi_wkv_tiled",
    "check_inputs",
    "tracing",
    "triton_usable",
]

IMPLEMENTATIONS = ("auto", "chunked", "triton", "reference")
_FLOAT_INPUTS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def triton_usable(x: Tensor) -> bool:
    """True when x lives on a CUDA device and Triton can be imported."""
    return x.is_cuda and importlib.util.find_spec("triton") is not None


def check_inputs(w: Tensor, u: Tensor, k: Tensor, v: Tensor) -> None:
    """Raise ValueError with what to change when the inputs do not fit bi_wkv's contract."""
    if k.dim() != 3:
        raise ValueError(f"bi_wkv: k must be [B, T, C], got shape {tuple(k.shape)}; flatten tokens to one axis first")
    if v.shape != k.shape:
        raise ValueError(f"bi_wkv: v has shape {tuple(v.shape)} but k has {tuple(k.shape)}; they must match")
    _check_sequences(w, u, k, v, k.shape)


def _check_sequences(w: Tensor, u: Tensor, k: Tensor, v: Tensor, shape: tuple[int, int, int]) -> None:
    # check_inputs once k and v have one shape holding [B, T, C] sequences; bi_wkv_ordered passes the shape of a
    # slice of its [n, B, N, C] k, v instead of indexing slices out (a microsecond each per call)
    B, T, C = shape
    if T < 1 or B < 1:
        raise ValueError(f"bi_wkv: empty input of shape {tuple(shape)}; need B >= 1 and T >= 1")
    for name, p in (("w", w), ("u", u)):
        if p.shape != (C,):
            raise ValueError(f"bi_wkv: {name} must have shape [C] = [{C}], got {tuple(p.shape)}")
    for name, t in (("w", w), ("u", u), ("k", k), ("v", v)):
        if t.dtype not in _FLOAT_INPUTS:
            raise ValueError(f"bi_wkv: {name} has dtype {t.dtype}; use float32, bfloat16, float16 or float64")
    if k.dtype != v.dtype:
        raise ValueError(f"bi_wkv: k is {k.dtype} but v is {v.dtype}; cast both to one dtype")
    devices = {t.device for t in (w, u, k, v)}
    if len(devices) > 1:
        raise ValueError(f"bi_wkv: inputs are on different devices {sorted(map(str, devices))}; move them to one")


@functools.cache
def _triton_module():
    """This package's module `triton`, imported on first use (it needs Triton) and then kept: an import statement
    in a function costs about 0.7 us each call (2-core CPU), the cached lookup 0.03 us. For the eager path only:
    dynamo warns about lru_cache wrappers it traces."""
    from . import triton

    return triton


def _eager_triton(w: Tensor, u: Tensor, k: Tensor, v: Tensor, orders: tuple[TokenOrder, ...] | None) -> Tensor:
    """The Triton kernels' own autograd Function, called without the registered operator (eager calls on CUDA)."""
    return _triton_module().bi_wkv_triton(w, u, channels_contiguous(k), channels_contiguous(v), orders)


def bi_wkv(w: Tensor, u: Tensor, k: Tensor, v: Tensor, *, impl: str = "auto", chunk: int = CHUNK) -> Tensor:
    """Bidirectional WKV of Vision-RWKV, exactly the formula of `docs/bi_wkv.md`.

    w, u: [C] decay and bonus, already divided by the sequence length by the caller.
    k, v: [B, T, C]. Returns y: [B, T, C] in v's dtype, with autograd for all four inputs.
    impl: "auto" (the registered operator `torch.ops.rwkvseg.bi_wkv`, which torch.compile, CUDA graphs and
    export see as one op: Triton on CUDA when available, else the chunked O(T) path; eager calls on CUDA take
    the same kernels without the operator's dispatch: see below), "chunked", "triton", or
    "reference" (the O(T^2) float64 brute force; tests only); these three call their path directly.
    chunk: the chunked path's chunk length; "auto" with another chunk than CHUNK runs the chunked path directly.

    Eager calls on CUDA skip the operator: torch.library's Python dispatch is host time that bounds short
    sequences (on this project's 2-core CPU a custom op with autograd costs about 94 us per call against 22 us for
    an autograd.Function; on an H200 host eager forwards still took 0.15-0.24 ms at short shapes, so the dispatch
    is not the main host cost there). They call the Triton autograd Function directly (its forward kernels
    alone when no graph is recorded), the same kernels, so the same outputs and gradients (the operator's
    backward reruns the forward kernels for the states the Function keeps: `bi_wkv_triton_grads`, equal
    bitwise). Traced calls keep the operator.
    """
    check_inputs(w, u, k, v)
    if impl == "auto":
        if chunk == CHUNK:
            if not tracing() and uses_triton(k):  # eager on CUDA: see the docstring; tracing first (dynamo cannot
                # trace uses_triton's importlib lookup)
                return _eager_triton(w, u, k, v, None)
            return torch.ops.rwkvseg.bi_wkv(w, u, k, v)
        impl = "triton" if triton_usable(k) else "chunked"
    if impl == "chunked":
        return bi_wkv_chunked(w, u, k, v, chunk)
    if impl == "triton":
        if not triton_usable(k):
            raise ValueError("bi_wkv: impl='triton' needs CUDA tensors and `pip install triton`; use impl='chunked'")
        from .triton import bi_wkv_triton

        return bi_wkv_triton(w, u, k, v)
    if impl == "reference":
        return bi_wkv_reference(w, u, k, v).to(v.dtype)
    raise ValueError(f"bi_wkv: unknown impl {impl!r}; choose one of {IMPLEMENTATIONS}")


def bi_wkv_ordered(
    w: Tensor,
    u: Tensor,
    k: Tensor,
    v: Tensor,
    orders: tuple[TokenOrder, ...],
    *,
    impl: str = "auto",
    chunk: int = CHUNK,
) -> Tensor:
    """Bi-WKV of sequences that read stored tokens in given orders (QuadScan's orders of one grid, a window's
    two views), in one call and, on CUDA, one launch without permuted copies.

    k, v: [n, B, N, C] stored tokens, one slice per order (an expanded view reads one tensor in n orders);
    orders: n TokenOrders over the N tokens. Sequence (i, b) is k[i, b] read in orders[i]; y [n, B, N, C] holds
    each output at its stored token, so y[i] = unscan(bi_wkv(scan_i(k[i]), scan_i(v[i]))). w, u: [C], scaled
    by 1/N by the caller. impl as for `bi_wkv` ("auto": the registered `torch.ops.rwkvseg.bi_wkv_ordered`, the
    orders passed as `orders_to_ints(orders)`); the portable paths copy each order's sequences out and y back
    through strided views (`TokenOrder.read` / `write`).
    """
    if k.dim() != 4 or v.shape != k.shape or k.shape[0] == 0:
        raise ValueError(
            f"bi_wkv_ordered: k, v must be [n, B, N, C] of one shape with n >= 1, got {tuple(k.shape)} and "
            f"{tuple(v.shape)}"
        )
    if len(orders) != k.shape[0]:
        raise ValueError(f"bi_wkv_ordered: {len(orders)} orders for {k.shape[0]} slices of k; pass one per slice")
    _check_sequences(w, u, k, v, k.shape[1:])  # check_inputs(w, u, k[0], v[0])
    orders = tuple(orders)
    check_orders(orders, k.shape[2])
    if impl == "auto":
        if chunk == CHUNK:
            if not tracing() and uses_triton(k):
                return _eager_triton(w, u, k, v, orders)
            return torch.ops.rwkvseg.bi_wkv_ordered(w, u, k, v, orders_to_ints(orders))
        impl = "triton" if triton_usable(k) else "chunked"
    if impl == "chunked":
        return apply_in_orders(lambda *a: bi_wkv_chunked(*a, chunk), w, u, k, v, orders)
    if impl == "triton":
        if not triton_usable(k):
            raise ValueError(
                "bi_wkv_ordered: impl='triton' needs CUDA tensors and `pip install triton`; use impl='chunked'"
            )
        from .triton import bi_wkv_triton

        return bi_wkv_triton(w, u, k, v, orders)
    if impl == "reference":
        return apply_in_orders(bi_wkv_reference, w, u, k, v, orders).to(v.dtype)
    raise ValueError(f"bi_wkv_ordered: unknown impl {impl!r}; choose one of {IMPLEMENTATIONS}")
