"""Thin convolutions padded to 8 input channels (layers/padded_conv.py): the same values and gradients as the torch
convolutions they replace, in float64, ungrouped and one channel per group, strided and padded, with and without a
bias; the layout they keep; what they leave alone; the parameters; a fullgraph trace; whole models."""

import copy

import pytest
import torch
import torch._dynamo
from torch import nn

from rwkvseg.layers.gemm_conv import GemmPointwiseConv3d, use_gemm_convs
from rwkvseg.layers.padded_conv import (
    PaddedConv2d,
    PaddedConv3d,
    count_padded_convs,
    dense_padded_weight,
    pad_channels,
    use_padded_thin_convs,
)
from rwkvseg.layers.twins import is_channels_last
from rwkvseg.memory_format import module_to, tensor_to
from rwkvseg.models import create_model

CONV = {2: nn.Conv2d, 3: nn.Conv3d}
SIZE = {2: (6, 7), 3: (6, 7, 5)}
# (in, out, kernel, stride, padding, groups, bias): MMSegRWKV's enc1 and ModalResFM embedding, U-RWKV's stem, a
# strided one with 5 channels (13 after padding: not a multiple), a depthwise one
SETTINGS = [
    (4, 6, 3, 1, 1, 1, False),
    (4, 8, 3, 1, 1, 4, True),
    (3, 5, 3, 1, 1, 1, True),
    (5, 4, 3, 2, 1, 1, True),
    (12, 12, 3, 1, 1, 12, False),
    (3, 4, 2, 2, 0, 1, False),
]


def _values_and_grads(model, x, grad):
    x = x.detach().requires_grad_()
    y = model(x)
    return y, torch.autograd.grad(y, [x, *model.parameters()], grad)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("setting", SETTINGS, ids=str)
def test_padded_twin_matches_the_torch_convolution_in_values_and_gradients(dims, setting):
    c_in, c_out, kernel, stride, padding, groups, bias = setting
    torch.manual_seed(0)
    reference = CONV[dims](c_in, c_out, kernel, stride=stride, padding=padding, groups=groups, bias=bias)
    reference = module_to(nn.Sequential(reference).double(), "channels_last", dims)
    padded = use_padded_thin_convs(copy.deepcopy(reference))
    assert isinstance(padded[0], (PaddedConv2d, PaddedConv3d))
    x = tensor_to(torch.randn(2, c_in, *SIZE[dims], dtype=torch.float64), "channels_last")
    y_ref = reference(x)
    grad = torch.randn_like(y_ref)
    y_ref, grads_ref = _values_and_grads(reference, x, grad)
    y, grads = _values_and_grads(padded, x, grad)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    assert len(grads) == len(grads_ref) == 2 + bias  # the input, the weight, the bias
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)
    assert is_channels_last(y) == is_channels_last(y_ref)  # the CPU's 3D convolutions answer channels-first


def test_dense_weight_is_the_block_diagonal_of_a_grouped_one():
    weight = torch.arange(1.0, 9.0).view(8, 1, 1, 1, 1)  # 4 groups of one input channel, 2 outputs each
    dense = dense_padded_weight(weight, groups=4, in_channels=4)[..., 0, 0, 0]  # [8, 8]
    expected = torch.zeros(8, 8)
    for o in range(8):
        expected[o, o // 2] = o + 1.0
    assert torch.equal(dense, expected)
    ungrouped = dense_padded_weight(torch.ones(2, 3, 1, 1), groups=1, in_channels=3)
    assert ungrouped.shape == (2, 8, 1, 1) and ungrouped[:, 3:].abs().sum() == 0
    with pytest.raises(ValueError, match="one input channel"):
        dense_padded_weight(torch.ones(4, 2, 1, 1), groups=2, in_channels=4)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_padding_keeps_the_layout_and_appends_zero_channels(layout):
    x = tensor_to(torch.randn(1, 3, 4, 5, 6), layout)
    padded = pad_channels(x)
    assert padded.shape == (1, 8, 4, 5, 6) and torch.equal(padded[:, :3], x) and padded[:, 3:].abs().sum() == 0
    assert is_channels_last(padded) == (layout == "channels_last")


def test_channels_first_maps_keep_the_plain_convolution(monkeypatch):
    conv = use_padded_thin_convs(nn.Sequential(nn.Conv3d(4, 8, 3, padding=1)))
    calls = []
    real = torch.nn.functional.conv3d
    monkeypatch.setattr(torch.nn.functional, "conv3d", lambda x, w, *a: calls.append(x.shape[1]) or real(x, w, *a))
    conv(torch.randn(1, 4, 3, 3, 3))
    conv(tensor_to(torch.randn(1, 4, 3, 3, 3), "channels_last"))
    assert calls == [4, 8]  # channels-first: 4 channels as given; channels-last: padded to 8


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv3d(8, 4, 3),  # a multiple of 8 already
        nn.Conv3d(6, 6, 3, groups=3),  # two channels per group
        nn.Conv3d(4, 4, 3, padding=1, padding_mode="reflect"),
        nn.ConvTranspose3d(4, 4, 2, stride=2),
    ],
    ids=str,
)
def test_convolutions_that_are_not_thin_stay(conv):
    model = use_padded_thin_convs(nn.Sequential(conv))
    assert model[0] is conv and count_padded_convs(model) == 0


def test_gemm_twins_stay_gemms_and_parameters_are_shared():
    model = use_gemm_convs(nn.Sequential(nn.Conv3d(4, 8, 1), nn.Conv3d(8, 4, 1), nn.Conv3d(4, 4, 3)))
    params = dict(model.named_parameters())
    use_padded_thin_convs(model)
    assert isinstance(model[0], GemmPointwiseConv3d) and isinstance(model[2], PaddedConv3d)
    assert count_padded_convs(model) == 1
    assert all(p is params[name] for name, p in model.named_parameters())
    with pytest.raises(ValueError, match=r"nn\.Sequential"):
        use_padded_thin_convs(nn.Conv3d(3, 3, 3))


def test_padded_twins_trace_whole_under_fullgraph():
    torch.manual_seed(0)
    model = module_to(use_padded_thin_convs(nn.Sequential(nn.Conv3d(4, 8, 3, padding=1, groups=4))), "channels_last", 3)
    x = tensor_to(torch.randn(1, 4, 5, 6, 7), "channels_last")
    grad = torch.randn(1, 8, 5, 6, 7)
    y_ref, grads_ref = _values_and_grads(model, x, grad)
    torch._dynamo.reset()
    try:
        y, grads = _values_and_grads(torch.compile(model, fullgraph=True, backend="aot_eager"), x, grad)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(y, y_ref)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize(
    ("name", "in_channels", "shape"), [("mmsegrwkv_test", 2, (1, 2, 5, 7, 3)), ("urwkv_test", 3, (2, 3, 20, 28))]
)
def test_models_with_both_rewrites_load_the_same_weights_and_compute_the_same(name, in_channels, shape):
    torch.manual_seed(0)
    plain = create_model(name, in_channels, 3)
    fast = create_model(name, in_channels, 3, gemm_convs=True, pad_thin_convs=True)
    assert count_padded_convs(fast) > 0 and count_padded_convs(plain) == 0
    fast.load_state_dict(plain.state_dict())
    x = tensor_to(torch.randn(shape), "channels_last")
    for model in (plain, fast):
        module_to(model.eval(), "channels_last", len(shape) - 2)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), plain(x), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("setting", SETTINGS[:3], ids=str)
def test_padded_twin_matches_cudnn_under_bf16_autocast_on_cuda(setting):
    c_in, c_out, kernel, stride, padding, groups, bias = setting
    torch.manual_seed(0)
    conv = nn.Conv3d(c_in, c_out, kernel, stride=stride, padding=padding, groups=groups, bias=bias)
    reference = module_to(nn.Sequential(conv).cuda(), "channels_last", 3)
    padded = use_padded_thin_convs(copy.deepcopy(reference))
    x = tensor_to(torch.randn(1, c_in, 32, 32, 32, device="cuda"), "channels_last")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y_ref, y = reference(x), padded(x)
    assert y.dtype == y_ref.dtype == torch.bfloat16 and is_channels_last(y)
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=2e-2, atol=2e-2 * y_ref.abs().max().item())
