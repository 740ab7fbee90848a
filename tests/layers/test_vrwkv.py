import math
import warnings

import pytest
import torch
import torch._dynamo

import rwkvseg.layers.vrwkv as vrwkv_module
import rwkvseg.ops.token_shift as token_shift_module
from rwkvseg.layers.vrwkv import ChannelMix, QuadScanBlock, SpatialMix, fancy_init
from rwkvseg.ops import QUAD_SCAN_ORDERS, bi_wkv_reference, permutation_shift, q_shift, scan_2d, unscan_2d


def seeded(module, seed=0):
    """Randomise every parameter (the fancy init alone hides ordering mistakes), in float64."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5 + (1.0 if p.dim() == 1 else 0.0))
    return module.double()


def rand_map(B=2, C=8, H=5, W=7, seed=1):
    return torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_fancy_init_values():
    init = fancy_init(8)
    assert init["decay"][0].item() == pytest.approx(-5.0)
    assert init["decay"][-1].item() == pytest.approx(3.0)
    assert init["decay"][3].item() == pytest.approx(-5 + 8 * (3 / 7) ** 0.7)
    zigzag = torch.tensor([0.0, 1.0, -1.0, 0.0, 1.0, -1.0, 0.0, 1.0])
    torch.testing.assert_close(init["bonus"], math.log(0.3) + 0.5 * zigzag)
    torch.testing.assert_close(init["mix_k"], torch.arange(8) / 8)
    torch.testing.assert_close(init["mix_v"], torch.arange(8) / 8)
    torch.testing.assert_close(init["mix_r"], (torch.arange(8) / 8) ** 0.5)


def test_spatial_mix_matches_formula_with_decay_over_T():
    C, H, W = 8, 3, 5
    mix = seeded(SpatialMix(C))
    x = torch.randn(2, H * W, C, dtype=torch.float64)
    xx = q_shift(x, (H, W))
    k = mix.key(x * mix.mix_k + xx * (1 - mix.mix_k))
    v = mix.value(x * mix.mix_v + xx * (1 - mix.mix_v))
    r = mix.receptance(x * mix.mix_r + xx * (1 - mix.mix_r))
    y = bi_wkv_reference(mix.decay / (H * W), mix.bonus / (H * W), k, v)
    expected = mix.output(torch.sigmoid(r) * torch.nn.functional.layer_norm(y, (C,), mix.norm.weight, mix.norm.bias))
    torch.testing.assert_close(mix(x, (H, W)), expected)


def test_channel_mix_squared_relu_and_shapes():
    mix = seeded(ChannelMix(6, hidden_ratio=4, token_shift="none"))
    x = torch.randn(1, 12, 6, dtype=torch.float64)
    k = torch.relu(mix.key(x)) ** 2
    expected = torch.sigmoid(mix.receptance(x)) * mix.value(mix.norm(k))
    torch.testing.assert_close(mix(x, (3, 4)), expected)
    assert mix.key.out_features == 24


ORDER_SETS = [
    ("rows", "rows_reversed", "cols", "cols_reversed"),
    ("rows",),
    ("cols_reversed",),
    ("rows", "cols"),
    ("rows", "rows_reversed", "cols"),
]


@pytest.mark.parametrize("orders", ORDER_SETS)
@pytest.mark.parametrize("token_shift", ["q_shift", "q_shift_map", "permutation", "none"])
def test_batched_orders_equal_literal_per_order_evaluation(orders, token_shift):
    block = seeded(QuadScanBlock(8, orders, token_shift))
    x = rand_map()
    torch.testing.assert_close(block(x), block(x, per_order=True))


def test_spatial_mix_is_symmetric_under_reversing_the_whole_sequence():
    mix = seeded(SpatialMix(8, token_shift="none"))
    x = torch.randn(2, 35, 8, dtype=torch.float64)
    torch.testing.assert_close(mix(x.flip(1), (5, 7)).flip(1), mix(x, (5, 7)))


def test_reversing_each_row_is_a_different_order_from_rows():
    """ "Each row right to left" keeps rows top to bottom: not the sequence reversal, so the distances between
    tokens of different rows change and the result differs (the four orders are four distinct mixings)."""
    x = rand_map()
    a, b = (seeded(QuadScanBlock(8, (o,), "none")) for o in ("rows", "rows_reversed"))
    assert not torch.allclose(a(x), b(x), atol=1e-3)


def test_scan_frame_and_map_frame_shift_agree_only_on_the_row_order():
    x = rand_map()
    scan, mapped = (seeded(QuadScanBlock(8, ("rows",), s)) for s in ("q_shift", "q_shift_map"))
    torch.testing.assert_close(scan(x), mapped(x))
    scan, mapped = (seeded(QuadScanBlock(8, ("rows_reversed",), s)) for s in ("q_shift", "q_shift_map"))
    assert not torch.allclose(scan(x), mapped(x), atol=1e-3)


@pytest.mark.parametrize("token_shift", ["q_shift", "none"])
def test_column_order_is_the_row_order_on_the_transposed_map(token_shift):
    x = rand_map()
    rows, cols = (seeded(QuadScanBlock(8, (o,), token_shift)) for o in ("rows", "cols"))
    torch.testing.assert_close(cols.mix_spatial(x), rows.mix_spatial(x.transpose(2, 3)).transpose(2, 3))


@pytest.mark.parametrize(
    "orders,token_shift,equivariant",
    [
        (("rows", "rows_reversed", "cols", "cols_reversed"), "q_shift", True),
        (("rows", "cols"), "none", True),
        (("rows", "rows_reversed", "cols", "cols_reversed"), "q_shift_map", False),
        (("rows",), "q_shift", False),
        (("rows", "rows_reversed", "cols", "cols_reversed"), "permutation", True),
        (("rows", "rows_reversed"), "permutation", False),
    ],
)
def test_spatial_transpose_equivariance_flag_is_exact(orders, token_shift, equivariant):
    block = seeded(QuadScanBlock(8, orders, token_shift))
    assert block.spatial_transpose_equivariant == equivariant
    x = rand_map()
    same = torch.allclose(block.mix_spatial(x.transpose(2, 3)), block.mix_spatial(x).transpose(2, 3))
    assert same == equivariant


def test_single_row_order_is_the_plain_vision_rwkv_block():
    block = seeded(QuadScanBlock(8, ("rows",), "q_shift"))
    x = rand_map()
    H, W = x.shape[2:]
    t = x.flatten(2).transpose(1, 2)
    t = t + block.gamma1 * block.spatial(block.norm1(t), (H, W))
    t = t + block.gamma2 * block.channel(block.norm2(t), (H, W))
    torch.testing.assert_close(block(x), t.transpose(1, 2).reshape(x.shape))


@pytest.mark.parametrize("order", ["rows", "cols_reversed"])
def test_permutation_shift_is_the_plain_block_on_the_scanned_sequence(order):
    """With one order the block is Vision-RWKV's on the scanned sequence, each token mixed with its partner of
    the released code's permutation on that sequence's grid (spatial) and on the map (channel)."""
    block = seeded(QuadScanBlock(8, (order,), "permutation"))
    x = rand_map()
    size = x.shape[2:]
    grid = size if order == "rows" else size[::-1]
    s = scan_2d(block.norm1(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(x.shape), order)
    k, v, sr = block.spatial.project(s, permutation_shift(s, grid))
    mixed = unscan_2d(block.spatial.output(sr * block.spatial.wkv(k, v)), order, size)
    y = x + block.gamma1[:, None, None] * mixed
    t = y.flatten(2).transpose(1, 2)
    xk = block.norm2(t)
    shifted = permutation_shift(xk, size)
    mk, mr = block.channel.mix_k, block.channel.mix_r
    hidden = torch.relu(block.channel.key(xk * mk + shifted * (1 - mk))).square()
    out = torch.sigmoid(block.channel.receptance(xk * mr + shifted * (1 - mr))) * block.channel.value(
        block.channel.norm(hidden)
    )
    expected = (t + block.gamma2 * out).transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(block(x), expected)


def _forget_permutation_indices():
    vrwkv_module._kept_partners.cache_clear()
    token_shift_module._kept_flip_permutation.cache_clear()


def test_permutation_indices_are_built_once_per_grid(monkeypatch):
    """The permutation shift's indices depend on the grid alone: eager forwards build them once per (order, size,
    device) and share them."""
    built = []
    for module in (vrwkv_module, token_shift_module):
        real = module.flip_permutation
        monkeypatch.setattr(module, "flip_permutation", lambda s, d=None, f=real: built.append(tuple(s)) or f(s, d))
    _forget_permutation_indices()
    block = seeded(QuadScanBlock(8, QUAD_SCAN_ORDERS, "permutation"))
    x = rand_map()  # 5 x 7
    first, literal = block(x), block(x, per_order=True)
    # batched: rows and rows_reversed scan a 5 x 7 grid, the column orders a 7 x 5 one, the channel mix the 5 x 7
    # map; literal: the permutation on each scanned grid, 5 x 7 or 7 x 5
    assert sorted(built) == [(5, 7)] * 3 + [(7, 5)] * 3
    built.clear()
    assert torch.equal(block(x), first) and torch.equal(block(x, per_order=True), literal) and built == []
    block(rand_map(H=7, W=5))
    # another map size: the orders' indices again; the channel mix's 7 x 5 grid is the one the literal pass kept
    assert sorted(built) == [(5, 7)] * 2 + [(7, 5)] * 2
    cpu = torch.device("cpu")
    assert vrwkv_module.permutation_partners("cols", (5, 7), cpu) is vrwkv_module.permutation_partners(
        "cols", (5, 7), cpu
    )


def test_kept_permutation_indices_give_the_values_of_freshly_built_ones(monkeypatch):
    block = seeded(QuadScanBlock(8, QUAD_SCAN_ORDERS, "permutation"))
    x = rand_map()
    kept = [(block(x), block(x, per_order=True)) for _ in range(2)]
    for module in (vrwkv_module, token_shift_module):
        monkeypatch.setattr(module, "tracing", lambda: True)  # the traced path: built on every call
    built = block(x), block(x, per_order=True)
    assert all(torch.equal(a, b) for pair in kept for a, b in zip(pair, built, strict=True))


def test_permutation_indices_first_built_under_inference_mode_serve_training():
    # x[:, index] saves index for backward, which an inference tensor refuses
    _forget_permutation_indices()
    block = QuadScanBlock(8, QUAD_SCAN_ORDERS, "permutation")
    x = torch.randn(1, 8, 4, 6)
    with torch.inference_mode():
        block(x)
    block(x).sum().backward()
    assert block.spatial.mix_k.grad is not None


def test_permutation_block_traces_whole_without_the_kept_indices():
    """Compiled, the indices are built in the graph (dynamo warns about every lru_cache wrapper it traces)."""
    block = seeded(QuadScanBlock(8, QUAD_SCAN_ORDERS, "permutation"))
    x = rand_map()
    eager = block(x)  # keeps the indices
    torch._dynamo.reset()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            compiled = torch.compile(block, fullgraph=True, backend="aot_eager")(x)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager)


def test_block_backward_reaches_every_parameter():
    block = QuadScanBlock(8)
    x = torch.randn(2, 8, 3, 5, requires_grad=True)
    block(x).square().sum().backward()
    assert torch.isfinite(x.grad).all()
    for name, p in block.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_block_rejects_bad_settings():
    with pytest.raises(ValueError, match="orders"):
        QuadScanBlock(8, ("diagonal",))
    with pytest.raises(ValueError, match="distinct"):
        QuadScanBlock(8, ("rows", "rows"))
    with pytest.raises(ValueError, match="token_shift"):
        QuadScanBlock(8, token_shift="shift")
    with pytest.raises(ValueError, match="shifted tokens"):
        SpatialMix(4).project(torch.zeros(1, 2, 4), None)
    for mixer in (SpatialMix, ChannelMix):  # a map-frame shift is the block's business, not one mixer's
        with pytest.raises(ValueError, match="token_shift 'q_shift_map'"):
            mixer(4, token_shift="q_shift_map")
