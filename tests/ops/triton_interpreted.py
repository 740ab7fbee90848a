"""Runs every Triton Bi-WKV kernel on the CPU; run with TRITON_INTERPRET=1 (`test_kernels_under_interpreter` starts
it in a subprocess, since Triton reads the variable when it is imported).

Cases: one super-chunk with the default tiles; several ragged super-chunks and scan tiles; QuadScan's four orders
of one expanded 3 x 5 grid read in place; the forward kernels' buffers (y, kmax, the states entering each
sub-chunk) against the plain-PyTorch `tiled` walk of the same tiles in float64. Prints one JSON line: per case
the relative errors of (y, dw, du, dk, dv) against the float64 brute force (of the buffers against `tiled`), and
for the plain cases whether `bi_wkv_triton_grads` (the registered operator's backward) equals autograd's
gradients bitwise, and for the plain and ordered cases whether a forward without autograd (no graph to record)
equals autograd's y bitwise (0.0 for equal, 1.0 for not).
"""

import json

import torch

from rwkvseg.ops import QUAD_SCAN_ORDERS, apply_in_orders, bi_wkv_reference, scan_order
from rwkvseg.ops.bi_wkv import tiled
from rwkvseg.ops.bi_wkv.triton import TileConfig, _forward, bi_wkv_triton, bi_wkv_triton_grads

PLAIN_CASES = (  # B, T, C, tiles
    (2, 5, 3, None),
    (2, 29, 5, TileConfig(R=4, G=3, BC=4, G_bwd=2, BC_bwd=2, scan_rows=2, scan_BC=2)),  # fwd 12+12+5, bwd 8+8+8+5
)
ORDERS_TILES = TileConfig(R=4, G=2, BC=4, G_bwd=3, BC_bwd=2, scan_rows=2, scan_BC=2)


def outputs_and_grads(fn, inputs, gy, dtype, expand=None):
    """[y, dw, du, dk, dv] of fn on copies of inputs cast to dtype; expand: k, v expanded over that many orders."""
    leaves = [t.detach().to(dtype).clone().requires_grad_() for t in inputs]
    w, u, k, v = leaves
    if expand:
        k, v = k.expand(expand, -1, -1, -1), v.expand(expand, -1, -1, -1)
    y = fn(w, u, k, v)
    y.backward(gy.to(dtype))
    return [y.detach(), *(t.grad for t in leaves)]


def rel_errors(got, ref):
    return [((a.double() - b).norm() / b.norm()).item() for a, b in zip(got, ref, strict=True)]


def plain_case(B, T, C, cfg):
    g = torch.Generator().manual_seed(T)
    w = (torch.rand(C, generator=g) * 16 - 8) / T
    u = torch.randn(C, generator=g) / T
    k, v, gy = (torch.randn(B, T, C, generator=g) for _ in range(3))
    k = k * 2
    fast = outputs_and_grads(lambda *a: bi_wkv_triton(*a, config=cfg), (w, u, k, v), gy, torch.float32)
    exact = outputs_and_grads(bi_wkv_reference, (w, u, k, v), gy, torch.float64)
    # the registered operator's backward (forward kernels rerun for their states) equals autograd's, bitwise
    grads = bi_wkv_triton_grads(w, u, k, v, gy, config=cfg)
    same = [0.0 if torch.equal(a, b) else 1.0 for a, b in zip(grads, fast[1:], strict=True)]
    with torch.no_grad():  # no graph to record: the forward kernels without the autograd Function
        inference = bi_wkv_triton(w, u, k, v, config=cfg)
    same.append(0.0 if torch.equal(inference, fast[0]) else 1.0)
    return rel_errors(fast, exact), same


def orders_case():
    orders = tuple(scan_order(o, (3, 5)) for o in QUAD_SCAN_ORDERS)
    g = torch.Generator().manual_seed(0)
    w, u = (torch.rand(3, generator=g) * 16 - 8) / 15, torch.randn(3, generator=g) / 15
    k, v = torch.randn(2, 15, 3, generator=g) * 2, torch.randn(2, 15, 3, generator=g)
    gy = torch.randn(4, 2, 15, 3, generator=g)
    inputs = (w, u, k, v)
    fast = outputs_and_grads(lambda *a: bi_wkv_triton(*a, orders, ORDERS_TILES), inputs, gy, torch.float32, 4)
    exact = outputs_and_grads(lambda *a: apply_in_orders(bi_wkv_reference, *a, orders), inputs, gy, torch.float64, 4)
    with torch.no_grad():
        inference = bi_wkv_triton(w, u, k.expand(4, -1, -1, -1), v.expand(4, -1, -1, -1), orders, ORDERS_TILES)
    return [*rel_errors(fast, exact), 0.0 if torch.equal(inference, fast[0]) else 1.0]


def buffers_case(B, T, C, cfg):
    g = torch.Generator().manual_seed(1)
    w = (torch.rand(C, generator=g) * 16 - 8) / T
    u = torch.randn(C, generator=g) / T
    k, v = torch.randn(B, T, C, generator=g) * 2, torch.randn(B, T, C, generator=g)
    kernel = _forward(w, u, k, v, None, cfg, True)  # y, kmax, fstates
    exact = tiled.forward(*(t.double() for t in (w, u, k, v)), cfg)
    return rel_errors(kernel, [exact[name] for name in ("y", "kmax", "fstates")])


def main() -> None:
    out = {}
    for B, T, C, cfg in PLAIN_CASES:
        out[str(T)], out[f"{T} grads"] = plain_case(B, T, C, cfg)
    out["orders"] = orders_case()
    out["tiled buffers"] = buffers_case(*PLAIN_CASES[1])
    print(json.dumps(out))


if __name__ == "__main__":
    main()
