"""Bi-WKV as PyTorch operators (`torch.library`), so torch.compile, CUDA graphs and export see one opaque op.

    rwkvseg::bi_wkv(Tensor w, Tensor u, Tensor k, Tensor v) -> Tensor
    rwkvseg::bi_wkv_ordered(Tensor w, Tensor u, Tensor k, Tensor v, SymInt[] orders) -> Tensor
    rwkvseg::bi_wkv_backward(Tensor grad_y, Tensor w, Tensor u, Tensor k, Tensor v) -> (Tensor, Tensor, Tensor, Tensor)
    rwkvseg::bi_wkv_ordered_backward(Tensor grad_y, Tensor w, Tensor u, Tensor k, Tensor v, SymInt[] orders)
        -> (Tensor, Tensor, Tensor, Tensor)

k, v: [B, T, C] (bi_wkv) or [n, B, N, C] stored tokens read in n token orders (bi_wkv_ordered); w, u: [C].
orders: 4 ints per order, TokenOrder's (inner, inner_step, outer_step, start). y: contiguous, k's shape, v's
dtype. The backward ops return (dw, du, dk, dv) in the dtypes of w, u, k, v, dk and dv contiguous.

Kernels: the Triton path on CUDA (when Triton imports and the inputs are not float64), the exact chunked O(T)
path everywhere else (CPU, CUDA without Triton, float64). The autograd formula saves only the inputs; the
backward ops recompute the forward's states (one forward pass) and run the path's exact backward. Fake
implementations give the output shapes for tracing. Registering is import-time work by nature: importing
`rwkvseg.ops` defines the ops once per process.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Sequence

import torch
from torch import Tensor

from ..scan import TokenOrder, apply_in_orders
from .chunked import bi_wkv_chunked, bi_wkv_chunked_grads

CHUNK = 64  # chunk length of the chunked path inside the operators


def orders_to_ints(orders: Sequence[TokenOrder]) -> list[int]:
    """The `orders` argument of rwkvseg::bi_wkv_ordered: (inner, inner_step, outer_step, start) per order."""
    return [x for o in orders for x in (o.inner, o.inner_step, o.outer_step, o.start)]


def ints_to_orders(flat: Sequence[int]) -> tuple[TokenOrder, ...]:
    """Inverse of orders_to_ints."""
    if len(flat) % 4:
        raise ValueError(f"rwkvseg::bi_wkv_ordered: orders holds {len(flat)} ints; pass 4 per order")
    return tuple(TokenOrder(*(int(x) for x in flat[i : i + 4])) for i in range(0, len(flat), 4))


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def uses_triton(k: Tensor) -> bool:
    """True where the operators run the Triton kernels: CUDA inputs that are not float64, Triton installed."""
    return k.is_cuda and k.dtype != torch.float64 and _triton_installed()


def tracing() -> bool:
    """True while torch.compile, torch.export or torch.jit traces: `bi_wkv` / `bi_wkv_ordered` then call the
    registered operators, which a tracer must see as one opaque op; eager calls on Triton inputs skip them."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()


def channels_contiguous(x: Tensor) -> Tensor:
    # the Triton kernels take any batch, time and group strides but need a contiguous channel axis
    return x if x.stride(-1) == 1 else x.contiguous()


def _forward(w: Tensor, u: Tensor, k: Tensor, v: Tensor, orders: tuple[TokenOrder, ...] | None) -> Tensor:
    with torch.no_grad():  # the forward kernels store no backward states without grad
        if uses_triton(k):
            from .triton import bi_wkv_triton

            y = bi_wkv_triton(w, u, channels_contiguous(k), channels_contiguous(v), orders)
        elif orders is None:
            y = bi_wkv_chunked(w, u, k, v, CHUNK)
        else:
            y = apply_in_orders(lambda *a: bi_wkv_chunked(*a, CHUNK), w, u, k, v, orders)
    return y.contiguous()


def _grads(
    w: Tensor, u: Tensor, k: Tensor, v: Tensor, gy: Tensor, orders: tuple[TokenOrder, ...] | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    with torch.no_grad():
        if uses_triton(k):
            from .triton import bi_wkv_triton_grads

            grads = bi_wkv_triton_grads(w, u, channels_contiguous(k), channels_contiguous(v), gy, orders)
        elif orders is None:
            grads = bi_wkv_chunked_grads(w, u, k, v, gy, CHUNK)
        else:
            # apply_in_orders' sequences are permuted copies: read gy like k, write dk, dv back like y
            n, B, N, C = k.shape
            k_seq, v_seq, gy_seq = (torch.cat([o.read(t[i]) for i, o in enumerate(orders)]) for t in (k, v, gy))
            gw, gu, gk_seq, gv_seq = bi_wkv_chunked_grads(w, u, k_seq, v_seq, gy_seq, CHUNK)
            gk, gv = (
                torch.stack([o.write(g.reshape(n, B, N, C)[i]) for i, o in enumerate(orders)]) for g in (gk_seq, gv_seq)
            )
            grads = gw, gu, gk, gv
    return tuple(g.contiguous() for g in grads)


@torch.library.custom_op(
    "rwkvseg::bi_wkv", mutates_args=(), schema="(Tensor w, Tensor u, Tensor k, Tensor v) -> Tensor"
)
def bi_wkv_op(w: Tensor, u: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Bi-WKV of k, v [B, T, C] -> y [B, T, C] (`rwkvseg.ops.bi_wkv` checks the inputs and calls this)."""
    return _forward(w, u, k, v, None)


@torch.library.custom_op(
    "rwkvseg::bi_wkv_ordered",
    mutates_args=(),
    schema="(Tensor w, Tensor u, Tensor k, Tensor v, SymInt[] orders) -> Tensor",
)
def bi_wkv_ordered_op(w: Tensor, u: Tensor, k: Tensor, v: Tensor, orders: Sequence[int]) -> Tensor:
    """Bi-WKV of k, v [n, B, N, C] read in n token orders (`orders_to_ints`) -> y [n, B, N, C] at the stored
    tokens (`rwkvseg.ops.bi_wkv_ordered` checks the inputs and orders and calls this)."""
    return _forward(w, u, k, v, ints_to_orders(orders))


@torch.library.custom_op(
    "rwkvseg::bi_wkv_backward",
    mutates_args=(),
    schema="(Tensor grad_y, Tensor w, Tensor u, Tensor k, Tensor v) -> (Tensor, Tensor, Tensor, Tensor)",
)
def bi_wkv_backward_op(
    grad_y: Tensor, w: Tensor, u: Tensor, k: Tensor, v: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dw, du, dk, dv) of rwkvseg::bi_wkv at grad_y."""
    return _grads(w, u, k, v, grad_y, None)


@torch.library.custom_op(
    "rwkvseg::bi_wkv_ordered_backward",
    mutates_args=(),
    schema=(
        "(Tensor grad_y, Tensor w, Tensor u, Tensor k, Tensor v, SymInt[] orders) -> (Tensor, Tensor, Tensor, Tensor)"
    ),
)
def bi_wkv_ordered_backward_op(
    grad_y: Tensor, w: Tensor, u: Tensor, k: Tensor, v: Tensor, orders: Sequence[int]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dw, du, dk, dv) of rwkvseg::bi_wkv_ordered at grad_y."""
    return _grads(w, u, k, v, grad_y, ints_to_orders(orders))


def _fake_y(w: Tensor, u: Tensor, k: Tensor, v: Tensor, orders: Sequence[int] | None = None) -> Tensor:
    return k.new_empty(k.shape, dtype=v.dtype)


def _fake_grads(grad_y: Tensor, w: Tensor, u: Tensor, k: Tensor, v: Tensor, orders: Sequence[int] | None = None):
    return w.new_empty(w.shape), u.new_empty(u.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:
    w, u, k, v, *orders = inputs
    ctx.save_for_backward(w, u, k, v)
    ctx.orders = orders  # [] for bi_wkv, [orders] for bi_wkv_ordered


def _backward(ctx, grad_y: Tensor):
    w, u, k, v = ctx.saved_tensors
    if ctx.orders:
        return (*torch.ops.rwkvseg.bi_wkv_ordered_backward(grad_y, w, u, k, v, *ctx.orders), None)
    return torch.ops.rwkvseg.bi_wkv_backward(grad_y, w, u, k, v)


bi_wkv_op.register_fake(_fake_y)
bi_wkv_ordered_op.register_fake(_fake_y)
bi_wkv_backward_op.register_fake(_fake_grads)
bi_wkv_ordered_backward_op.register_fake(_fake_grads)
bi_wkv_op.register_autograd(_backward, setup_context=_setup_context)
bi_wkv_ordered_op.register_autograd(_backward, setup_context=_setup_context)
