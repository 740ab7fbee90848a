"""The Triton Bi-WKV kernels: output and all four gradients against the float64 brute force (small T) and the
float64 O(T) path (large T), NaN-poisoned outputs, strided inputs. GPU tests run through the device tool; one
small case runs in CI on CPU under Triton's interpreter."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rwkvseg.ops import (
    QUAD_SCAN_ORDERS,
    apply_in_orders,
    bi_wkv,
    bi_wkv_chunked,
    bi_wkv_ordered,
    bi_wkv_reference,
    scan_order,
    view_order,
)

triton = pytest.importorskip("triton")

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
SRC = Path(__file__).resolve().parents[2] / "src"
LENGTHS = (1, 15, 63, 64, 257, 4097, 32768)
BRUTE_FORCE_MAX_T = 4097
# fp32: the targets of docs/bi_wkv.md. bf16: inputs, y, dk, dv and gy are bf16 (2^-9 relative rounding each),
# so the bound is a few of those roundings; the reference runs on the same rounded inputs.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def make_inputs(B, T, C, seed, device, dtype=torch.float32, w_range=(-8.0, 8.0)):
    g = torch.Generator().manual_seed(seed)
    lo, hi = w_range
    w = (torch.rand(C, generator=g) * (hi - lo) + lo) / T
    u = torch.randn(C, generator=g) / T
    k = (torch.randn(B, T, C, generator=g) * 2).to(dtype)
    v = torch.randn(B, T, C, generator=g).to(dtype)
    gy = torch.randn(B, T, C, generator=g).to(dtype)
    return [t.to(device) for t in (w, u, k, v)], gy.to(device)


def rel_err(x, ref):
    diff = (x.double() - ref.double()).norm()
    scale = ref.double().norm()
    return (diff / scale).item() if scale > 0 else diff.item()


def with_grads(fn, inputs, gy):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    y = fn(*leaves)
    y.backward(gy)
    return [y.detach(), *(t.grad for t in leaves)]


def poison_allocator(device, nbytes):
    """Fill the blocks the caching allocator hands out next with NaN, so an unwritten output element shows."""
    blocks = [torch.full((nbytes // 4 + 1,), float("nan"), device=device)]
    blocks += [torch.full((2**k,), float("nan"), device=device) for k in range(4, 19) for _ in range(4)]
    del blocks


def errors_against_reference(B, T, C, dtype, seed=0, w_range=(-8.0, 8.0)):
    from rwkvseg.ops.bi_wkv.triton import bi_wkv_triton

    inputs, gy = make_inputs(B, T, C, seed, "cuda", dtype, w_range)
    poison_allocator("cuda", 16 * B * T * C)
    fast = with_grads(bi_wkv_triton, inputs, gy)
    for t in fast:
        assert torch.isfinite(t).all(), "an output or gradient element was not written (NaN poison survived)"
    exact = [t.double() for t in inputs]
    if T <= BRUTE_FORCE_MAX_T:
        ref = with_grads(bi_wkv_reference, exact, gy.double())
    else:
        ref = with_grads(bi_wkv_chunked, exact, gy.double())
    assert fast[0].dtype == dtype and fast[3].dtype == dtype and fast[1].dtype == torch.float32
    return {name: rel_err(a, b) for name, a, b in zip(("y", "dw", "du", "dk", "dv"), fast, ref, strict=True)}


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T", LENGTHS)
def test_matches_float64(T, dtype):
    B, C = (2, 37) if T <= BRUTE_FORCE_MAX_T else (1, 19)
    errors = errors_against_reference(B, T, C, dtype, seed=T)
    print(json.dumps({"T": T, "dtype": str(dtype), **errors}))
    assert max(errors.values()) <= TOLERANCE[dtype], errors


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("w_range", [(-8.0, -4.0), (4.0, 8.0), (0.0, 0.0)], ids=["growth", "decay", "flat"])
def test_decay_ranges(w_range):
    errors = errors_against_reference(3, 1000, 9, torch.float32, seed=5, w_range=w_range)
    assert max(errors.values()) <= 1e-5, errors


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(
    "cfg",
    [
        dict(R=8, G=3, BC=8, G_bwd=2, BC_bwd=4, scan_rows=2, scan_BC=4),
        dict(R=4, G=1, BC=4, G_bwd=5, BC_bwd=8, scan_rows=4, scan_BC=2),
        dict(R=16, G=16, BC=16, G_bwd=7, BC_bwd=16),
    ],
)
def test_tile_configs_agree(cfg):
    # small super-chunks and scan tiles exercise the carries between super-chunks and scan tiles, ragged channel
    # blocks and a ragged last super-chunk
    from rwkvseg.ops.bi_wkv.triton import TileConfig, bi_wkv_triton

    inputs, gy = make_inputs(2, 777, 13, 3, "cuda")
    fast = with_grads(lambda *a: bi_wkv_triton(*a, config=TileConfig(**cfg)), inputs, gy)
    ref = with_grads(bi_wkv_reference, [t.double() for t in inputs], gy.double())
    for name, a, b in zip(("y", "dw", "du", "dk", "dv"), fast, ref, strict=True):
        assert rel_err(a, b) <= 1e-5, name


@pytest.mark.gpu
@needs_cuda
def test_strided_views_match_contiguous():
    from rwkvseg.ops.bi_wkv.triton import bi_wkv_triton

    (w, u, k, v), gy = make_inputs(3, 300, 10, 1, "cuda")
    # channel slices of a wider tensor and every second token of a longer one: no copies needed
    k_wide = torch.cat([k, torch.randn_like(k)], dim=2)[:, :, :10]
    v_long = torch.stack([v, torch.randn_like(v)], dim=2).flatten(1, 2)[:, ::2]
    assert not k_wide.is_contiguous() and not v_long.is_contiguous()
    contiguous = with_grads(bi_wkv_triton, [w, u, k, v], gy)
    strided = with_grads(bi_wkv_triton, [w, u, k_wide, v_long], gy)
    for a, b in zip(contiguous, strided, strict=True):
        assert torch.equal(a, b)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("T", [40, 5000])
def test_inference_forward_matches_training_forward(T):
    # without autograd the forward skips storing the per-sub-chunk states; y must not change
    from rwkvseg.ops.bi_wkv.triton import bi_wkv_triton

    (w, u, k, v), _ = make_inputs(2, T, 33, 6, "cuda")
    with torch.no_grad():
        inference = bi_wkv_triton(w, u, k, v)
    training = bi_wkv_triton(w.requires_grad_(), u, k, v)
    assert torch.equal(inference, training.detach())


@pytest.mark.gpu
@needs_cuda
def test_dispatcher_picks_triton_on_cuda():
    (w, u, k, v), _ = make_inputs(2, 100, 6, 2, "cuda")
    torch.testing.assert_close(bi_wkv(w, u, k, v), bi_wkv(w, u, k, v, impl="triton"), rtol=0, atol=0)
    torch.testing.assert_close(bi_wkv(w, u, k, v), bi_wkv(w, u, k, v, impl="chunked"), rtol=1e-5, atol=1e-5)


def _check_ordered(n_orders, B, N, C, orders, expand, seed, config=None):
    """The ordered kernel (output, gradients of w, u, k, v) equals the plain kernel on gathered copies with the
    same tiles (the arithmetic is the same; only the addresses differ), and with the default tiles lies within
    1e-5 of the float64 O(T) path. k, v: one [B, N, C] tensor expanded over the orders, or one per order."""
    from rwkvseg.ops.bi_wkv.triton import TileConfig, bi_wkv_triton

    cfg = TileConfig(**config) if config else None
    (w, u, k, v), _ = make_inputs(B if expand else n_orders * B, N, C, seed, "cuda")
    if not expand:
        k, v = k.view(n_orders, B, N, C), v.view(n_orders, B, N, C)
    gy = torch.randn(n_orders, B, N, C, generator=torch.Generator().manual_seed(seed)).cuda()

    def grouped(k, v):
        return (k.expand(n_orders, -1, -1, -1), v.expand(n_orders, -1, -1, -1)) if expand else (k, v)

    def in_place(w, u, k, v):
        return bi_wkv_triton(w, u, *grouped(k, v), orders, cfg)

    def on_copies(w, u, k, v):
        return apply_in_orders(lambda *a: bi_wkv_triton(*a, config=cfg), w, u, *grouped(k, v), orders)

    def exact(w, u, k, v):
        return apply_in_orders(bi_wkv_chunked, w, u, *grouped(k, v), orders)

    poison_allocator("cuda", 16 * n_orders * B * N * C)
    got = with_grads(in_place, [w, u, k, v], gy)
    for t in got:
        assert torch.isfinite(t).all(), "an output or gradient element was not written (NaN poison survived)"
    names = ("y", "dw", "du", "dk", "dv")
    copies = with_grads(on_copies, [w, u, k, v], gy)
    for name, a, b in zip(names, got, copies, strict=True):
        # sums may round differently: an expanded k sums its orders' gradients in another order than autograd
        # sums the copies', and more than MAX_ORDERS orders add dw, du over several launches
        exact_match = name == "y" or (name in ("dk", "dv") and not expand)
        assert torch.equal(a, b) if exact_match else rel_err(a, b) <= 1e-6, name
    if config is None:
        ref = with_grads(exact, [t.double() for t in (w, u, k, v)], gy.double())
        errors = {name: rel_err(a, b) for name, a, b in zip(names, got, ref, strict=True)}
        assert max(errors.values()) <= 1e-5, errors


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("size", [(13, 21), (64, 64), (3, 100)])
@pytest.mark.parametrize("config", [None, dict(R=8, G=3, BC=8, G_bwd=2, BC_bwd=4, scan_rows=2, scan_BC=4)])
def test_quad_scan_orders_read_in_place(size, config):
    # one k, v (expanded, group stride 0) read in all four QuadScan orders in one launch
    orders = tuple(scan_order(o, size) for o in QUAD_SCAN_ORDERS)
    _check_ordered(4, 2, size[0] * size[1], 19, orders, expand=True, seed=size[0], config=config)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("size", [(8, 16, 16), (4, 8, 8), (3, 5, 7), (1, 4, 4)])
def test_two_views_read_in_place(size):
    # view A in place and view B in (h, w, t) order over the same (t, h, w) storage, one k, v per view
    orders = (view_order("thw", size), view_order("hwt", size))
    _check_ordered(2, 3, size[0] * size[1] * size[2], 33, orders, expand=False, seed=size[0])


@pytest.mark.gpu
@needs_cuda
def test_more_orders_than_one_launch_holds():
    from rwkvseg.ops.bi_wkv.triton import MAX_ORDERS

    orders = tuple(scan_order(o, (6, 7)) for o in QUAD_SCAN_ORDERS) * 2
    assert len(orders) > MAX_ORDERS
    _check_ordered(len(orders), 2, 42, 5, orders, expand=False, seed=8)


@pytest.mark.gpu
@needs_cuda
def test_ordered_dispatch_and_bf16():
    size = (4, 6, 5)
    orders = (view_order("thw", size), view_order("hwt", size))
    (w, u, k, v), _ = make_inputs(4, 120, 16, 9, "cuda", torch.bfloat16)
    k, v = k.view(2, 2, 120, 16), v.view(2, 2, 120, 16)
    y = bi_wkv_ordered(w, u, k, v, orders)
    assert y.dtype == torch.bfloat16
    ref = bi_wkv_ordered(*(t.double() for t in (w, u, k, v)), orders, impl="chunked")
    assert rel_err(y, ref) <= 1e-2


@pytest.mark.gpu
@needs_cuda
def test_forward_buffers_match_the_tiled_algorithm():
    # the kernels' intermediate states against the plain-PyTorch walk of the same tiles (several super-chunks,
    # scan tiles with carries): where y goes wrong, these show which step did
    from rwkvseg.ops.bi_wkv import tiled
    from rwkvseg.ops.bi_wkv.triton import TileConfig, _forward

    cfg = TileConfig(G=4, BC=16, scan_rows=4)
    (w, u, k, v), _ = make_inputs(2, 1000, 40, 11, "cuda")
    kernel = _forward(w, u, k, v, None, cfg, True)  # y, kmax, fstates
    exact = tiled.forward(*(t.double() for t in (w, u, k, v)), cfg)
    for name, got in zip(("y", "kmax", "fstates"), kernel, strict=True):
        assert rel_err(got, exact[name]) <= 1e-5, name


def test_order_args_are_the_orders_ints_cached_or_not():
    from rwkvseg.ops.bi_wkv.triton import _order_args

    orders = tuple(scan_order(o, (3, 5)) for o in QUAD_SCAN_ORDERS)
    assert _order_args(orders) == (5, 1, 5, 0, 5, -1, 5, 4, 3, 5, 1, 0, 3, -5, 1, 10)
    assert _order_args(None) == (1, 1, 0, 0) * 4  # unused groups: the identity
    for given in (None, orders[:1], orders[2:], orders):
        assert _order_args(given) == _order_args.__wrapped__(given)


def test_float64_runs_the_exact_chunked_path():
    from rwkvseg.ops.bi_wkv.triton import bi_wkv_triton

    inputs, _ = make_inputs(2, 50, 3, 4, "cpu", torch.float64)
    assert torch.equal(bi_wkv_triton(*inputs), bi_wkv_chunked(*inputs))


def test_kernels_under_interpreter():
    """Runs every kernel (one super-chunk, and several with ragged super-chunks and scan tiles; plain and
    reading four scan orders in place) on the CPU."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(SRC)}
    script = Path(__file__).with_name("triton_interpreted.py")
    proc = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    for T, errs in errors.items():
        assert max(errs) <= 1e-5, (T, errs)
