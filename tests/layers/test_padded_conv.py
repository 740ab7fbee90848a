"""Thin convolutions padded to 8 input channels (layers/padded_conv.py): the same values and gradients as the torch
convolutions they replace, in float64, ungrouped and one channel per group, strided and padded, with and without a
bias; the layout they keep; what they leave alone; the parameters; a fullgraph trace; whole models."""

import copy

import pytest
import torch
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
from twin_checks import assert_matches_cudnn, assert_same_models, assert_same_values_and_grads, assert_traces_whole

CONV = {2: nn.Conv2d, 3: nn.Conv3d}
SIZE = {2: (6, 7), 3: (6, 7, 5)}
# (in, out, kernel, stride, padding, groups, bias): MMSegRWKV's enc1 and ModalResFM embedding, U-RWKV's stem, a
# strided one with 5 channels, a depthwise one of 3 channels, a 12-channel one (padded to 16)
SETTINGS = [
    (4, 6, 3, 1, 1, 1, False),
    (4, 8, 3, 1, 1, 4, True),
    (3, 5, 3, 1, 1, 1, True),
    (5, 4, 3, 2, 1, 1, True),
    (3, 3, 3, 1, 1, 3, False),
    (12, 4, 3, 1, 1, 1, True),
    (3, 4, 2, 2, 0, 1, False),
]


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
    y = assert_same_values_and_grads(padded, reference, x)
    assert is_channels_last(y) == is_channels_last(reference(x))  # the CPU's 3D convolutions answer channels-first


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
        nn.Conv3d(12, 12, 3, groups=12),  # depthwise, 8 channels or more: dense, it would cost 16x
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
    assert_traces_whole(model, tensor_to(torch.randn(1, 4, 5, 6, 7), "channels_last"))


@pytest.mark.parametrize(
    ("name", "in_channels", "shape"), [("mmsegrwkv_test", 2, (1, 2, 5, 7, 3)), ("urwkv_test", 3, (2, 3, 20, 28))]
)
def test_models_with_both_rewrites_load_the_same_weights_and_compute_the_same(name, in_channels, shape):
    torch.manual_seed(0)
    plain = create_model(name, in_channels, 3)
    fast = create_model(name, in_channels, 3, gemm_convs=True, pad_thin_convs=True)
    assert count_padded_convs(fast) > 0 and count_padded_convs(plain) == 0
    assert_same_models(plain, fast, shape)


@pytest.mark.gpu
@pytest.mark.parametrize("setting", SETTINGS[:3], ids=str)
def test_padded_twin_matches_cudnn_under_bf16_autocast_on_cuda(setting):
    c_in, c_out, kernel, stride, padding, groups, bias = setting
    torch.manual_seed(0)
    conv = nn.Conv3d(c_in, c_out, kernel, stride=stride, padding=padding, groups=groups, bias=bias)
    reference = module_to(nn.Sequential(conv).cuda(), "channels_last", 3)
    padded = use_padded_thin_convs(copy.deepcopy(reference))
    x = tensor_to(torch.randn(1, c_in, 32, 32, 32, device="cuda"), "channels_last")
    assert is_channels_last(assert_matches_cudnn(padded, reference, x))
