import pytest
import torch

from rwkvseg.ops import (
    QUAD_SCAN_ORDERS,
    TokenOrder,
    bi_wkv,
    bi_wkv_ordered,
    bi_wkv_reference,
    check_inputs,
    scan_2d,
    scan_order,
    unscan_2d,
    view_order,
)
from rwkvseg.ops.bi_wkv.chunked import decayed_pair_sum, decayed_prefix

W_RANGES = {"mixed": (-8.0, 8.0), "growth": (-8.0, -4.0), "decay": (4.0, 8.0), "flat": (0.0, 0.0)}


def make_inputs(B, T, C, w_range, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    lo, hi = w_range
    w = (torch.rand(C, generator=g) * (hi - lo) + lo) / T
    u = torch.randn(C, generator=g) / T
    k = torch.randn(B, T, C, generator=g) * 2
    v = torch.randn(B, T, C, generator=g)
    return [t.to(dtype) for t in (w, u, k, v)]


def rel_err(x, ref):
    diff = (x.double() - ref).norm()
    scale = ref.norm()
    return (diff / scale).item() if scale > 0 else diff.item()


def run(fn, inputs, gy):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    y = fn(*leaves)
    y.backward(gy)
    return y, [t.grad for t in leaves]


@pytest.mark.parametrize("T", [1, 2, 7, 64, 65, 257, 1100])
@pytest.mark.parametrize("w_range", list(W_RANGES))
def test_chunked_matches_brute_force_fp32(T, w_range):
    inputs = make_inputs(2, T, 5, W_RANGES[w_range], seed=T)
    gy = torch.randn(2, T, 5, generator=torch.Generator().manual_seed(1))
    y, grads = run(bi_wkv, inputs, gy)
    y_ref, grads_ref = run(bi_wkv_reference, [t.double() for t in inputs], gy.double())
    assert y.dtype == torch.float32
    assert rel_err(y, y_ref) <= 1e-5
    for name, g, g_ref in zip("wukv", grads, grads_ref, strict=True):
        assert rel_err(g, g_ref) <= 1e-5, name


@pytest.mark.parametrize("chunk", [2, 3, 8])
def test_multilevel_recursion_gradcheck(chunk):
    # small chunks force three or more levels of the chunk recursion, with ragged padding at each level
    w, u, k, v = (t.double().requires_grad_() for t in make_inputs(2, 19, 3, (-8, 8), seed=chunk))
    assert torch.autograd.gradcheck(lambda *a: bi_wkv(*a, chunk=chunk), (w, u, k, v))


def test_chunk_size_does_not_change_result():
    inputs = make_inputs(1, 3000, 4, (-8, 8))
    ys = [bi_wkv(*inputs, chunk=c) for c in (16, 64, 128)]
    for y in ys[1:]:
        assert rel_err(y, ys[0].double()) <= 1e-6


def test_decayed_prefix_matches_sequential_scan():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 300, 3, dtype=torch.float64, generator=g)
    w = torch.tensor([0.02, -0.01, 0.0], dtype=torch.float64)
    expected = torch.zeros_like(x)
    state = torch.zeros(2, 3, dtype=torch.float64)
    for t in range(1, 300):
        state = torch.exp(-w) * state + x[:, t - 1]
        expected[:, t] = state
    channels_first = decayed_prefix(x.permute(2, 0, 1).contiguous(), w, chunk=8)  # [C, N, T]
    torch.testing.assert_close(channels_first.permute(1, 2, 0), expected)


def test_decayed_pair_sum_matches_explicit_pairs():
    g = torch.Generator().manual_seed(4)
    a = torch.randn(2, 50, 3, dtype=torch.float64, generator=g)
    x = torch.randn(2, 50, 3, dtype=torch.float64, generator=g)
    w = torch.tensor([0.05, -0.03, 0.0], dtype=torch.float64)
    t = torch.arange(50, dtype=torch.float64)
    gap = (t[:, None] - t[None, :] - 1)[..., None]  # [T, T, 1]
    weight = torch.where(gap >= 0, gap * torch.exp(-gap.clamp(min=0) * w), 0.0)  # [T, T, C]
    expected = torch.einsum("btc,tic,bic->c", a, weight, x)
    a_cf, x_cf = (t.permute(2, 0, 1).contiguous() for t in (a, x))  # [C, N, T]
    torch.testing.assert_close(decayed_pair_sum(a_cf, x_cf, w, chunk=4), expected)


def test_bf16_inputs_accumulate_in_fp32():
    w, u, k, v = make_inputs(2, 500, 6, (-8, 8))
    k16, v16 = k.bfloat16(), v.bfloat16()
    gy = torch.randn(2, 500, 6)
    y, grads = run(bi_wkv, [w, u, k16, v16], gy.bfloat16())
    assert y.dtype == torch.bfloat16
    assert grads[2].dtype == torch.bfloat16 and grads[0].dtype == torch.float32
    # against the brute force on the same (bf16-rounded) inputs: only output rounding remains
    y_ref, grads_ref = run(
        bi_wkv_reference, [w.double(), u.double(), k16.double(), v16.double()], gy.bfloat16().double()
    )
    assert rel_err(y, y_ref) <= 1e-2
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert rel_err(g, g_ref) <= 2e-2


def test_autocast_region_is_respected():
    inputs = make_inputs(1, 100, 4, (-8, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = bi_wkv(*inputs)
    assert y.dtype == torch.float32
    assert rel_err(y, bi_wkv_reference(*inputs)) <= 1e-5


def test_large_k_range_stays_finite():
    w, u, k, v = make_inputs(1, 400, 3, (-8, 8))
    k = k * 20  # spread of about +-150 in k
    y = bi_wkv(w, u, k, v)
    assert torch.isfinite(y).all()
    assert rel_err(y, bi_wkv_reference(w, u, k, v)) <= 1e-5


BAD_INPUTS = [
    (lambda w, u, k, v: (w, u, k[0], v[0]), "must be \\[B, T, C\\]"),
    (lambda w, u, k, v: (w, u, k, v[:, :-1]), "must match"),
    (lambda w, u, k, v: (w[:-1], u, k, v), "w must have shape"),
    (lambda w, u, k, v: (w, u.double(), k, v.long()), "dtype"),
    (lambda w, u, k, v: (w, u, k, v.double()), "cast both"),
    (lambda w, u, k, v: (w, u, k[:, :0], v[:, :0]), "empty"),
]


@pytest.mark.parametrize(("change", "message"), BAD_INPUTS)
def test_bad_inputs_raise_clear_errors(change, message):
    inputs = make_inputs(1, 8, 4, (-8, 8))
    with pytest.raises(ValueError, match=message):
        bi_wkv(*change(*inputs))


@pytest.mark.parametrize(("change", "message"), BAD_INPUTS[2:])
def test_ordered_bad_inputs_raise_the_errors_of_one_slice(change, message):
    # bi_wkv_ordered checks its [n, B, N, C] k, v without slicing them: the errors of check_inputs on a slice
    w, u, k, v = change(*make_inputs(2, 8, 4, (-8, 8)))
    with pytest.raises(ValueError, match=message) as expected:
        check_inputs(w, u, k, v)
    orders = (TokenOrder.identity(k.shape[1]),) * 3
    with pytest.raises(ValueError) as got:
        bi_wkv_ordered(w, u, k.expand(3, -1, -1, -1), v.expand(3, -1, -1, -1), orders)
    assert str(got.value) == str(expected.value)


def test_unknown_impl_and_triton_on_cpu():
    inputs = make_inputs(1, 8, 4, (-8, 8))
    with pytest.raises(ValueError, match="unknown impl"):
        bi_wkv(*inputs, impl="cuda")
    with pytest.raises(ValueError, match="needs CUDA"):
        bi_wkv(*inputs, impl="triton")


def _explicit_orders(w, u, k, v, orders):
    """Each order's sequence copied out with scan_2d, the brute force, and mapped back with unscan_2d."""
    H, W = 3, 5
    maps = [t.transpose(-1, -2).reshape(*t.shape[:-2], t.shape[-1], H, W) for t in (k, v)]  # [n, B, C, H, W]
    ys = []
    for i, order in enumerate(orders):
        y = bi_wkv_reference(w, u, scan_2d(maps[0][i], order), scan_2d(maps[1][i], order))
        ys.append(unscan_2d(y, order, (H, W)).flatten(2).transpose(1, 2))
    return torch.stack(ys)


@pytest.mark.parametrize("impl", ["chunked", "reference"])
def test_ordered_reads_each_scan_order_of_the_stored_tokens(impl):
    # one k, v read in all four QuadScan orders (an expanded view), against explicit scanned copies: the output
    # and the gradients, which sum over the orders
    orders = QUAD_SCAN_ORDERS
    token_orders = tuple(scan_order(o, (3, 5)) for o in orders)
    w, u, k, v = make_inputs(2, 15, 4, W_RANGES["mixed"], seed=3, dtype=torch.float64)
    gy = torch.randn(4, 2, 15, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def ordered(w, u, k, v):
        return bi_wkv_ordered(w, u, k.expand(4, -1, -1, -1), v.expand(4, -1, -1, -1), token_orders, impl=impl)

    def explicit(w, u, k, v):
        return _explicit_orders(w, u, k.expand(4, -1, -1, -1), v.expand(4, -1, -1, -1), orders)

    y, grads = run(ordered, [w, u, k, v], gy)
    y_ref, grads_ref = run(explicit, [w, u, k, v], gy)
    assert y.shape == (4, 2, 15, 4)
    assert rel_err(y, y_ref) <= 1e-12
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert rel_err(g, g_ref) <= 1e-12


def test_ordered_with_one_tensor_per_order_and_the_identity():
    # separate k, v per order; the identity order is plain bi_wkv
    w, u, k, v = make_inputs(6, 24, 3, W_RANGES["mixed"], seed=4)
    k, v = k.view(2, 3, 24, 3), v.view(2, 3, 24, 3)
    size = (2, 3, 4)
    y = bi_wkv_ordered(w, u, k, v, (view_order("thw", size), view_order("hwt", size)))
    torch.testing.assert_close(y[0], bi_wkv(w, u, k[0], v[0]), rtol=0, atol=0)
    hwt = view_order("hwt", size).indices(24)
    torch.testing.assert_close(y[1][:, hwt], bi_wkv(w, u, k[1][:, hwt], v[1][:, hwt]), rtol=1e-6, atol=1e-6)


def test_ordered_rejects_bad_calls():
    w, u, k, v = make_inputs(2, 12, 3, W_RANGES["mixed"])
    k4, v4 = k[None], v[None]
    with pytest.raises(ValueError, match=r"\[n, B, N, C\]"):
        bi_wkv_ordered(w, u, k, v, (TokenOrder.identity(12),))
    with pytest.raises(ValueError, match="n >= 1"):
        bi_wkv_ordered(w, u, k4[:0], v4[:0], ())
    with pytest.raises(ValueError, match="one per slice"):
        bi_wkv_ordered(w, u, k4, v4, (TokenOrder.identity(12),) * 2)
    with pytest.raises(ValueError, match="visit each"):
        bi_wkv_ordered(w, u, k4, v4, (TokenOrder(4, 1, 1),))
    with pytest.raises(ValueError, match="unknown impl"):
        bi_wkv_ordered(w, u, k4, v4, (TokenOrder.identity(12),), impl="cuda")
