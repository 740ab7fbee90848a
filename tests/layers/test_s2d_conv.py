"""Strided convolutions as stride-1 convolutions over a space-to-depth map (layers/s2d_conv.py): the same values and
gradients as the torch convolution, in float64, for MMSegRWKV's stem and for shapes where the padded input must be
extended or cut; the rearrangements themselves; what stays; a fullgraph trace; the model flag."""

import copy

import pytest
import torch
from torch import nn

from rwkvseg.layers.s2d_conv import (
    S2DConv2d,
    S2DConv3d,
    count_s2d_convs,
    s2d_weight,
    space_to_depth,
    use_s2d_convs,
)
from rwkvseg.layers.twins import is_channels_last
from rwkvseg.memory_format import module_to, tensor_to
from rwkvseg.models import create_model
from twin_checks import assert_matches_cudnn, assert_same_models, assert_same_values_and_grads, assert_traces_whole

# (in, out, kernel, stride, padding, input size) per case, 3D; 2D cases take the first two axes
CASES = {
    "mmsegrwkv-stem": (8, 6, 7, 2, 3, (16, 16, 16)),
    "extend": (3, 5, (3, 5, 4), (2, 3, 2), (1, 2, 0), (9, 10, 11)),  # the padded input extended with zeros
    "cut": (2, 3, 4, 2, 0, (9, 8, 11)),  # positions no output reads are cut (axes 1 and 3)
    "stride-one-axis": (4, 4, (3, 1, 2), (2, 1, 1), (1, 0, 0), (7, 5, 6)),
}


def _conv(dims, case):
    c_in, c_out, kernel, stride, padding, size = CASES[case]
    pick = (lambda v: v if isinstance(v, int) else v[:dims]) if dims == 2 else (lambda v: v)
    conv = (nn.Conv2d if dims == 2 else nn.Conv3d)(
        c_in, c_out, pick(kernel), stride=pick(stride), padding=pick(padding)
    )
    return conv, size[:dims]


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("case", sorted(CASES))
def test_s2d_twin_matches_the_torch_convolution_in_values_and_gradients(dims, case):
    torch.manual_seed(0)
    conv, size = _conv(dims, case)
    reference = module_to(nn.Sequential(conv).double(), "channels_last", dims)
    twin = use_s2d_convs(copy.deepcopy(reference))
    assert isinstance(twin[0], (S2DConv2d, S2DConv3d))
    x = tensor_to(torch.randn(2, conv.in_channels, *size, dtype=torch.float64), "channels_last")
    assert_same_values_and_grads(twin, reference, x)


@pytest.mark.parametrize("channels_last", [False, True])
def test_space_to_depth_puts_each_block_into_channels(channels_last):
    x = torch.arange(2 * 4 * 6.0).view(1, 2, 4, 6)  # [B, C, 4, 6], stride (2, 3): Q = (2, 2)
    y = space_to_depth(tensor_to(x, "channels_last") if channels_last else x, (2, 3), channels_last)
    assert y.shape == (1, 2 * 6, 2, 2) and is_channels_last(y) == channels_last
    for c in range(2):
        for r1 in range(2):
            for r2 in range(3):
                for q1 in range(2):
                    for q2 in range(2):
                        assert y[0, c * 6 + r1 * 3 + r2, q1, q2] == x[0, c, 2 * q1 + r1, 3 * q2 + r2]


def test_weight_taps_move_to_their_channels_and_padding_taps_are_zero():
    w = torch.arange(1.0, 4.0).view(1, 1, 3)  # 1D view of a kernel of 3 taps, stride 2 -> 2 taps of 2 channels
    folded = s2d_weight(w.view(1, 1, 3, 1), (2, 1))  # [1, 2, 2, 1]
    assert folded[0, :, :, 0].tolist() == [[1.0, 3.0], [2.0, 0.0]]  # channel r, tap j: w[2 j + r], zero past k


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv3d(4, 4, 3, padding=1),  # stride 1
        nn.Conv3d(4, 4, 2, stride=2),  # kernel == stride: a patch embedding already
        nn.Conv3d(4, 4, 3, stride=2, groups=2),
        nn.Conv3d(4, 4, 3, stride=2, dilation=2),
        nn.Conv3d(4, 4, 3, stride=2, padding=1, padding_mode="replicate"),
        nn.ConvTranspose3d(4, 4, 3, stride=2),
    ],
    ids=str,
)
def test_convolutions_that_are_not_strided_wider_than_their_stride_stay(conv):
    model = use_s2d_convs(nn.Sequential(conv))
    assert model[0] is conv and count_s2d_convs(model) == 0


def test_channels_first_maps_keep_the_plain_convolution_and_parameters_are_shared():
    torch.manual_seed(0)
    conv = nn.Conv3d(8, 4, 7, stride=2, padding=3)
    model = use_s2d_convs(nn.Sequential(conv))
    assert model[0].weight is conv.weight and model[0].bias is conv.bias
    x = torch.randn(1, 8, 9, 9, 9)
    assert torch.equal(model(x), conv(x))  # the same call
    with pytest.raises(ValueError, match=r"nn\.Sequential"):
        use_s2d_convs(nn.Conv3d(8, 4, 7, stride=2))


def test_s2d_twin_traces_whole_under_fullgraph():
    torch.manual_seed(0)
    conv, size = _conv(3, "extend")
    model = module_to(use_s2d_convs(nn.Sequential(conv)), "channels_last", 3)
    assert_traces_whole(model, tensor_to(torch.randn(1, conv.in_channels, *size), "channels_last"))


def test_mmsegrwkv_with_every_rewrite_loads_the_same_weights_and_computes_the_same():
    torch.manual_seed(0)
    plain = create_model("mmsegrwkv_test", 2, 3)
    fast = create_model("mmsegrwkv_test", 2, 3, gemm_convs=True, pad_thin_convs=True, s2d_convs=True)
    assert count_s2d_convs(fast) == 1  # the stem
    assert_same_models(plain, fast, (1, 2, 5, 7, 3))


@pytest.mark.gpu
def test_s2d_twin_matches_cudnn_under_bf16_autocast_on_cuda():
    torch.manual_seed(0)
    conv = nn.Conv3d(8, 32, 7, stride=2, padding=3)
    reference = module_to(nn.Sequential(conv).cuda(), "channels_last", 3)
    twin = use_s2d_convs(copy.deepcopy(reference))
    x = tensor_to(torch.randn(1, 8, 32, 32, 32, device="cuda"), "channels_last")
    assert is_channels_last(assert_matches_cudnn(twin, reference, x))
