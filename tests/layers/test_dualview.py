import math

import pytest
import torch
from torch import nn

from rwkvseg.layers.dualview import (
    BiShiftChannelMix,
    DualViewBlock,
    DualViewSpatialMix,
    WindowedDualViewStage,
)
from rwkvseg.ops import bi_wkv_reference, from_view, to_view


def _randomise(module: nn.Module, seed: int = 0) -> None:
    """Move every parameter off its init so that a wrong channel or view pairing cannot cancel out."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _manual_shift(seq: torch.Tensor) -> torch.Tensor:
    """Bi-Shift written out token by token: first C//4 channels from t-1, the rest from t+1, zeros at the ends."""
    T, C = seq.shape[1:]
    q = C // 4
    out = torch.zeros_like(seq)
    for t in range(T):
        if t > 0:
            out[:, t, :q] = seq[:, t - 1, :q]
        if t < T - 1:
            out[:, t, q:] = seq[:, t + 1, q:]
    return out


def _reference_spatial_mix(mix: DualViewSpatialMix, x: torch.Tensor, size) -> torch.Tensor:
    """The spec's formula with explicit index permutations and the float64 brute-force WKV."""
    T, H, W = size
    L = x.shape[1]
    x = x.double()
    grid = torch.arange(L).reshape(T, H, W)
    orders = {"A": grid.flatten(), "B": grid.permute(1, 2, 0).flatten()}  # (t,h,w) and (h,w,t)
    p = {n: t.detach().double() for n, t in mix.named_parameters()}
    ys = {}
    for name, order in orders.items():
        seq = x[:, order]
        xx = _manual_shift(seq)
        k = (seq * p["mix_k"] + xx * (1 - p["mix_k"])) @ p["key.weight"].T
        v = (seq * p["mix_v"] + xx * (1 - p["mix_v"])) @ p["value.weight"].T
        r = (seq * p["mix_r"] + xx * (1 - p["mix_r"])) @ p["receptance.weight"].T
        y = torch.sigmoid(r) * bi_wkv_reference(p["decay"] / L, p["bonus"] / L, k, v)
        back = torch.empty_like(y)
        back[:, order] = y
        ys[name] = back
    fused = p["alpha"] * ys["A"] + (1 - p["alpha"]) * ys["B"]
    return fused @ p["output.weight"].T


@pytest.mark.parametrize("size", [(3, 5, 7), (1, 4, 2), (2, 1, 3)])
def test_views_are_exact_inverses(size):
    x = torch.randn(2, math.prod(size), 6)
    hwt = to_view(from_view(x, "thw", size), "hwt")
    assert torch.equal(to_view(from_view(hwt, "hwt", size), "thw"), x)
    T, H, W = size
    # view B puts the same (h, w) of neighbouring slices next to each other
    expected = x.reshape(2, T, H, W, 6).permute(0, 2, 3, 1, 4).reshape(2, -1, 6)
    assert torch.equal(hwt, expected)


def test_spatial_mix_matches_the_formula_with_explicit_views():
    torch.manual_seed(0)
    size = (3, 4, 5)
    mix = DualViewSpatialMix(12, layer=1, n_layer=3)
    _randomise(mix)
    x = torch.randn(2, math.prod(size), 12)
    out = mix(x, size)
    ref = _reference_spatial_mix(mix, x, size)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)


def test_views_differ_so_alpha_matters():
    torch.manual_seed(1)
    size = (3, 4, 5)
    mix = DualViewSpatialMix(8, layer=0, n_layer=2)
    _randomise(mix)
    x = torch.randn(1, 60, 8)
    with torch.no_grad():
        mix.alpha.fill_(1.0)
        only_a = mix(x, size)
        mix.alpha.fill_(0.0)
        only_b = mix(x, size)
    assert (only_a - only_b).abs().max() > 1e-3


def test_fancy_init():
    dim, n_layer = 16, 8
    first, last = DualViewSpatialMix(dim, 0, n_layer), DualViewSpatialMix(dim, n_layer - 1, n_layer)
    h = torch.arange(dim) / (dim - 1)
    torch.testing.assert_close(first.decay.data, -5 + 8 * h**0.7)
    torch.testing.assert_close(last.decay.data, -5 + 8 * h**2.0)
    assert first.decay[0] == -5 and first.decay[-1] == 3
    zigzag = torch.tensor([(i + 1) % 3 - 1 for i in range(dim)]) * 0.5
    torch.testing.assert_close(first.bonus.data, math.log(0.3) + zigzag)
    assert torch.all(first.alpha == 0.5)
    ramp = torch.arange(dim) / dim
    torch.testing.assert_close(last.mix_v.data, ramp ** (1 / n_layer) + 0.3)
    torch.testing.assert_close(BiShiftChannelMix(dim, 0, n_layer).mix_k.data, ramp)
    with pytest.raises(ValueError, match="outside"):
        DualViewSpatialMix(dim, n_layer, n_layer)


def test_channel_mix_formula():
    torch.manual_seed(2)
    mix = BiShiftChannelMix(8, 1, 4)
    _randomise(mix)
    x = torch.randn(2, 9, 8)
    xx = _manual_shift(x)
    k = torch.relu(torch.lerp(xx, x, mix.mix_k) @ mix.key.weight.T) ** 2
    ref = torch.sigmoid(torch.lerp(xx, x, mix.mix_r) @ mix.receptance.weight.T) * (k @ mix.value.weight.T)
    torch.testing.assert_close(mix(x), ref)


@pytest.mark.parametrize("T", [7, 6, 2])
def test_stage_windows_are_independent_and_the_ragged_one_uses_its_own_length(T):
    """The stage on a long volume equals the stage run on each window alone (window 3: full and ragged ones)."""
    torch.manual_seed(3)
    stage = WindowedDualViewStage(8, depth=2, window=3, first_layer=0, n_layer=2)
    _randomise(stage)
    x = torch.randn(2, 8, T, 3, 5)
    out = stage(x)
    parts = [stage(x[:, :, s : s + 3]) for s in range(0, T, 3)]
    torch.testing.assert_close(out, torch.cat(parts, dim=2), rtol=1e-5, atol=1e-5)
    assert out.shape == x.shape


def test_block_backward_reaches_every_parameter():
    torch.manual_seed(4)
    block = DualViewBlock(8, 0, 1)
    x = torch.randn(2, 30, 8, requires_grad=True)
    block(x, (2, 3, 5)).square().mean().backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert torch.isfinite(x.grad).all()


def test_block_under_bf16_autocast_follows_fp32():
    """In the model the tokens arrive in bf16 from autocast convs while the mixing parameters stay fp32."""
    torch.manual_seed(5)
    block = DualViewBlock(8, 0, 2)
    x = torch.randn(2, 30, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = block(x.bfloat16(), (2, 3, 5))
    ref = block(x, (2, 3, 5))
    assert torch.isfinite(y).all()
    assert ((y.float() - ref).norm() / ref.norm()) < 3e-2


def test_block_drop_path_drops_whole_samples_in_training_and_scales_the_kept_ones():
    torch.manual_seed(6)
    block = DualViewBlock(8, 0, 2, drop_path=0.5)
    plain = DualViewBlock(8, 0, 2)
    plain.load_state_dict(block.state_dict())  # the same weights: drop_path adds none
    x, size = torch.randn(64, 30, 8, requires_grad=True), (2, 3, 5)
    y = block.train()(x, size)
    with torch.no_grad():
        assert torch.equal(block.eval()(x, size), plain.eval()(x, size))  # eval: the identity
        spatial = plain.spatial(plain.ln1(x), size)
        seen = set()
        for i in range(64):  # each sample: each branch dropped (0) or kept and scaled by 1 / (1 - 0.5) (2)
            matches = []
            for first in (0, 2):
                x1 = x[i : i + 1] + first * spatial[i : i + 1]
                channel = plain.channel(plain.ln2(x1))
                matches += [(first, second) for second in (0, 2) if torch.allclose(y[i : i + 1], x1 + second * channel)]
            assert len(matches) == 1, (i, matches)
            seen.add(matches[0])
    assert seen == {(0, 0), (0, 2), (2, 0), (2, 2)}  # all four cases among 64 samples
    y.square().mean().backward()
    assert block.spatial.decay.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()
    with pytest.raises(ValueError, match="drop_path"):
        DualViewBlock(8, 0, 2, drop_path=1.0)
