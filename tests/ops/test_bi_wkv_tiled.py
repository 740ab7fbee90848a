"""The plain-PyTorch version of the Triton kernels' algorithm (`bi_wkv_tiled`): output and all four gradients
against the float64 brute force, for tiles with one and several super-chunks, ragged last sub-chunks and
super-chunks, and chunk-scan tiles with carries between them."""

import pytest
import torch

from rwkvseg.ops import bi_wkv_reference
from rwkvseg.ops.bi_wkv import bi_wkv_tiled
from rwkvseg.ops.bi_wkv.tiled import forward
from rwkvseg.ops.bi_wkv.tiles import TileConfig, tile_config

CASES = [  # B, T, C, tiles
    (2, 1, 3, None),
    (2, 13, 3, None),  # T < R: one padded sub-chunk
    (1, 100, 4, None),  # default tiles: one super-chunk
    (2, 45, 5, TileConfig(R=4, G=3, G_bwd=2, scan_rows=2)),  # ragged super-chunks, 2-row scan tiles
    (1, 70, 3, TileConfig(R=8, G=2, G_bwd=3, scan_rows=2)),
    (2, 97, 2, TileConfig(R=4, G=1, G_bwd=5, scan_rows=4)),  # one sub-chunk per super-chunk forward
]


def make_inputs(B, T, C, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    w = (torch.rand(C, generator=g) * 16 - 8) / T
    u = torch.randn(C, generator=g) / T
    k, v, gy = (torch.randn(B, T, C, generator=g) for _ in range(3))
    return [t.to(dtype) for t in (w, u, k * 2, v)], gy.to(dtype)


def with_grads(fn, inputs, gy):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    y = fn(*leaves)
    y.backward(gy)
    return [y.detach(), *(t.grad for t in leaves)]


def rel_err(x, ref):
    diff, scale = (x.double() - ref.double()).norm(), ref.double().norm()
    return (diff / scale).item() if scale > 0 else diff.item()  # T = 1: y = v, and dw, du, dk are 0


@pytest.mark.parametrize(("B", "T", "C", "cfg"), CASES)
@pytest.mark.parametrize(("dtype", "bound"), [(torch.float64, 1e-12), (torch.float32, 1e-5)], ids=["fp64", "fp32"])
def test_matches_brute_force(B, T, C, cfg, dtype, bound):
    inputs, gy = make_inputs(B, T, C, T, dtype)
    got = with_grads(lambda *a: bi_wkv_tiled(*a, config=cfg), inputs, gy)
    ref = with_grads(bi_wkv_reference, [t.double() for t in inputs], gy.double())
    assert [t.dtype for t in got] == [dtype] * 5
    errors = {name: rel_err(a, b) for name, a, b in zip(("y", "dw", "du", "dk", "dv"), got, ref, strict=True)}
    assert max(errors.values()) <= bound, errors


def test_buffers_have_the_kernels_layouts():
    B, T, C = 2, 45, 5
    cfg = TileConfig(R=4, G=3, G_bwd=2, scan_rows=2)
    (w, u, k, v), _ = make_inputs(B, T, C, 0, torch.float64)
    out = forward(w, u, k, v, cfg)
    n_sub, n_sup = 12, 4
    shapes = {name: tuple(t.shape) for name, t in out.items()}
    assert shapes == {
        "y": (B, T, C),
        "kmax": (B, C),
        "sub": (B, n_sub, 3, C),
        "summ": (B, n_sup, 5, C),
        "states": (B, n_sup, 4, C),
        "fstates": (B, n_sub, 4, C),
    }
    assert torch.equal(out["kmax"], k.amax(1))  # the running max of the walks is the sequence's max
    assert not (out["states"][:, 0, :2] != 0).any() and not (out["states"][:, -1, 2:] != 0).any()  # nothing enters


def test_default_tiles_are_the_kernels():
    inputs, _ = make_inputs(2, 300, 7, 1, torch.float64)
    assert torch.equal(bi_wkv_tiled(*inputs), bi_wkv_tiled(*inputs, config=tile_config(2, 300, 7)))
