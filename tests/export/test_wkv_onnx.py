import numpy as np
import pytest
import torch

from rwkvseg.export.onnx import decompose_bi_wkv
from rwkvseg.export.wkv_onnx import (
    F32_SUMS_MAX_WT,
    bi_wkv_decomposed,
    bi_wkv_ordered_decomposed,
    largest_wt,
    sums_dtype,
)
from rwkvseg.models import create_model
from rwkvseg.ops import apply_in_orders, bi_wkv, bi_wkv_reference, scan_order, view_order

W_RANGES = {"mixed": (-8.0, 8.0), "growth": (-8.0, -4.0), "decay": (4.0, 8.0), "flat": (0.0, 0.0)}


def make_inputs(B, T, C, w_range, seed=0):
    g = torch.Generator().manual_seed(seed)
    lo, hi = w_range
    w = (torch.rand(C, generator=g) * (hi - lo) + lo) / T
    u = torch.randn(C, generator=g) / T
    k = torch.randn(B, T, C, generator=g) * 2
    v = torch.randn(B, T, C, generator=g)
    return w, u, k, v


def rel_err(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("T", [1, 2, 7, 64, 257, 1100])
@pytest.mark.parametrize("w_range", list(W_RANGES))
def test_decomposed_matches_brute_force(T, w_range):
    inputs = make_inputs(2, T, 5, W_RANGES[w_range], seed=T)
    ref = bi_wkv_reference(*(t.double() for t in inputs))
    y = bi_wkv_decomposed(*inputs)
    assert y.dtype == torch.float32 and y.shape == inputs[2].shape
    assert rel_err(y, ref) <= 1e-6


def test_decomposed_stays_exact_far_beyond_the_layers_scale():
    # |w| T = 600 (the chunked float32 path overflows to nan there): float64 sums and ratio stay exact
    w, u, k, v = make_inputs(1, 300, 4, (-600.0, 600.0), seed=5)
    ref = bi_wkv_reference(w.double(), u.double(), k.double(), v.double())
    assert rel_err(bi_wkv_decomposed(w, u, k, v), ref) <= 1e-6


def test_ordered_decomposed_matches_per_order_reference():
    g = torch.Generator().manual_seed(0)
    for orders, N in (
        (tuple(scan_order(o, (5, 7)) for o in ("rows", "rows_reversed", "cols", "cols_reversed")), 35),
        ((view_order("thw", (3, 4, 5)), view_order("hwt", (3, 4, 5))), 60),
    ):
        n = len(orders)
        k, v = torch.randn(n, 2, N, 6, generator=g) * 2, torch.randn(n, 2, N, 6, generator=g)
        w, u = torch.randn(6, generator=g) * 4 / N, torch.randn(6, generator=g) / N
        ref = apply_in_orders(bi_wkv_reference, w.double(), u.double(), k.double(), v.double(), orders)
        flat = [f for o in orders for f in (o.inner, o.inner_step, o.outer_step, o.start)]
        assert rel_err(bi_wkv_ordered_decomposed(w, u, k, v, flat), ref) <= 1e-6
        assert rel_err(bi_wkv_ordered_decomposed(w, u, k, v, orders), ref) <= 1e-6


class _Op(torch.nn.Module):
    def forward(self, w, u, k, v):
        return torch.ops.rwkvseg.bi_wkv(w, u, k, v)


@pytest.mark.parametrize(
    ("sums", "tolerance", "w_ranges"),
    [
        (torch.float64, 1e-6, ("mixed", "growth", "decay")),
        # float32 sums, as export picks them for |w| T <= 32: float32's sequential rounding, ~sqrt(T) 6e-8
        (torch.float32, 1e-5, ("mixed", "growth", "decay", "f32_limit")),
    ],
)
def test_custom_op_exports_to_onnx_with_dynamic_batch_and_length(tmp_path, sums, tolerance, w_ranges):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    inputs = make_inputs(2, 100, 5, (-8, 8))
    B, T = torch.export.Dim("B"), torch.export.Dim("T")
    ep = torch.export.export(_Op(), inputs, dynamic_shapes=({}, {}, {0: B, 1: T}, {0: B, 1: T}))
    assert any("rwkvseg" in str(n.target) for n in ep.graph.nodes)
    ep = decompose_bi_wkv(ep, sums)
    assert not any("rwkvseg" in str(n.target) for n in ep.graph.nodes)
    torch.onnx.export(ep, inputs, tmp_path / "wkv.onnx", dynamo=True, input_names=list("wukv"), verbose=False)
    casts = [a.i for n in onnx.load(str(tmp_path / "wkv.onnx")).graph.node if n.op_type == "Cast" for a in n.attribute]
    assert (onnx.TensorProto.DOUBLE in casts) == (sums == torch.float64)
    session = ort.InferenceSession(str(tmp_path / "wkv.onnx"), providers=["CPUExecutionProvider"])
    ranges = {**W_RANGES, "f32_limit": (-F32_SUMS_MAX_WT, F32_SUMS_MAX_WT)}
    for B, T in ((1, 1), (3, 7), (2, 64), (1, 257), (2, 4096)):
        for w_range in w_ranges:
            inputs = make_inputs(B, T, 5, ranges[w_range], seed=T)
            double = [t.double() for t in inputs]
            ref = bi_wkv_reference(*double) if T <= 257 else bi_wkv(*double, impl="chunked")
            y = session.run(None, {n: t.numpy() for n, t in zip("wukv", inputs, strict=True)})[0]
            assert y.shape == (B, T, 5)
            assert rel_err(torch.from_numpy(y), ref) <= tolerance, (B, T, w_range)
            assert np.abs(y - ref.numpy()).max() <= 10 * tolerance, (B, T, w_range)


class _Decayed(torch.nn.Module):
    """One Bi-WKV call with w = decay / T, as rwkvseg's layers make it."""

    def __init__(self, largest: float):
        super().__init__()
        self.decay = torch.nn.Parameter(torch.linspace(-largest, largest / 2, 6))

    def forward(self, x):  # [B, T, 6]
        T = x.shape[1]
        return torch.ops.rwkvseg.bi_wkv(self.decay / T, self.decay / (3 * T), x, x.flip(1))


def test_float32_sums_only_where_every_calls_w_times_t_is_small():
    for largest, expected in ((5.0, torch.float32), (F32_SUMS_MAX_WT - 1, torch.float32), (40.0, torch.float64)):
        for T in (12, 300):  # |w| T does not change with the length
            x = torch.randn(2, T, 6)
            assert largest_wt(_Decayed(largest), x) == pytest.approx(largest, rel=1e-6)
            assert sums_dtype(_Decayed(largest), x) == expected
    assert largest_wt(torch.nn.Conv2d(3, 1, 1), torch.randn(1, 3, 8, 8)) == 0.0
    for name, shapes in (("urwkv_test", ((1, 3, 32, 32), (2, 3, 96, 64))), ("mmsegrwkv_test", ((1, 4, 64, 64, 64),))):
        torch.manual_seed(0)
        model = create_model(name, shapes[0][1], 1).eval()
        observed = {round(largest_wt(model, torch.randn(*shape)), 4) for shape in shapes}
        assert len(observed) == 1 and 0 < observed.pop() <= F32_SUMS_MAX_WT, name
