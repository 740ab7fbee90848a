"""GEMM twins of pointwise and stride == kernel transposed convolutions (layers/gemm_conv.py): the same values and
gradients as the torch modules they replace, in float64 (only the order of the sums differs), in both layouts, the
layout they return, what they leave alone, the state dict, a fullgraph trace, whole models and cuDNN."""

import copy

import pytest
import torch
from torch import nn

from rwkvseg.layers.gemm_conv import (
    GemmConvTranspose2d,
    GemmConvTranspose3d,
    GemmPointwiseConv2d,
    GemmPointwiseConv3d,
    count_gemm_convs,
    use_gemm_convs,
)
from rwkvseg.layers.resfm import ModalResFM
from rwkvseg.layers.twins import is_channels_last
from rwkvseg.memory_format import module_to, tensor_to
from rwkvseg.models import create_model
from twin_checks import assert_matches_cudnn, assert_same_models, assert_same_values_and_grads, assert_traces_whole

CONV = {2: nn.Conv2d, 3: nn.Conv3d}
TRANSPOSED = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
KERNEL = {2: (2, 3), 3: (2, 4, 1)}  # the first transposed convolution's kernel (= stride), non-cubic
SIZE = {2: (3, 5), 3: (3, 5, 4)}
LAYOUTS = ("contiguous", "channels_last")


def _net(dims: int, bias: bool) -> nn.Sequential:
    """Pointwise and transposed convolutions between other layers: 5 -> 2 channels, spatial x KERNEL x 2."""
    return nn.Sequential(
        CONV[dims](5, 7, 1, bias=bias),
        nn.GELU(),
        TRANSPOSED[dims](7, 3, KERNEL[dims], stride=KERNEL[dims], bias=bias),
        CONV[dims](3, 4, 1),
        TRANSPOSED[dims](4, 2, 2, stride=2, bias=not bias),
    )


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bias", [True, False])
def test_twins_match_the_torch_convolutions_in_values_gradients_and_layout(dims, layout, bias):
    torch.manual_seed(0)
    reference = module_to(_net(dims, bias).double(), layout, dims)
    gemm = use_gemm_convs(copy.deepcopy(reference))
    assert count_gemm_convs(gemm) == 4
    assert isinstance(gemm[0], (GemmPointwiseConv2d, GemmPointwiseConv3d))
    assert isinstance(gemm[2], (GemmConvTranspose2d, GemmConvTranspose3d))
    x = tensor_to(torch.randn(2, 5, *SIZE[dims], dtype=torch.float64), layout)
    y = assert_same_values_and_grads(gemm, reference, x)
    assert y.shape == (2, 2, *[2 * s * k for s, k in zip(SIZE[dims], KERNEL[dims], strict=True)])
    # the input's layout, as cuDNN returns it (the CPU's 3D transposed convolution answers channels-first)
    assert is_channels_last(y) == (layout == "channels_last")


@pytest.mark.parametrize("dims", [2, 3])
def test_pointwise_twin_is_a_matrix_multiply_only_on_channels_last_maps(dims, monkeypatch):
    calls = []
    real = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *a: calls.append(1) or real(*a))
    conv = use_gemm_convs(nn.Sequential(CONV[dims](4, 6, 1)))
    conv(torch.randn(1, 4, *SIZE[dims]))
    assert calls == []  # channels-first: cuDNN's convolution (a GEMM would copy the map first)
    conv(tensor_to(torch.randn(1, 4, *SIZE[dims]), "channels_last"))
    assert calls == [1]


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv3d(4, 4, 3, padding=1),
        nn.Conv3d(4, 4, 1, stride=2),
        nn.Conv3d(4, 4, 1, groups=2),
        nn.Conv2d(4, 4, 1, padding=1),
        nn.Conv2d(4, 4, 1, padding="same"),
        nn.ConvTranspose3d(4, 4, 3, stride=2),
        nn.ConvTranspose3d(4, 4, 2, stride=2, padding=1),
        nn.ConvTranspose3d(4, 4, 2, stride=2, groups=2),
        nn.ConvTranspose2d(4, 4, 2, stride=2, output_padding=1, dilation=2),
        nn.Linear(4, 4),
    ],
    ids=str,
)
def test_convolutions_that_are_not_plain_matrix_multiplies_stay(conv):
    model = use_gemm_convs(nn.Sequential(conv))
    assert model[0] is conv
    assert count_gemm_convs(model) == 0


def test_twins_share_the_parameters_and_the_state_dict_keys():
    torch.manual_seed(0)
    model = _net(3, bias=True)
    params = dict(model.named_parameters())
    keys = model.state_dict().keys()
    use_gemm_convs(model)
    assert model.state_dict().keys() == keys
    assert all(p is params[name] for name, p in model.named_parameters())
    with pytest.raises(ValueError, match=r"nn\.Sequential"):
        use_gemm_convs(nn.Conv3d(2, 2, 1))


def test_modal_fm_term_keeps_the_layout_of_its_embeddings():
    torch.manual_seed(0)
    fm = ModalResFM(4, 2)
    z = torch.randn(2, 8, 3, 5, 4)
    term = fm.fm_term(z)
    term_cl = fm.fm_term(tensor_to(z, "channels_last"))
    assert not is_channels_last(term) and is_channels_last(term_cl)
    torch.testing.assert_close(term_cl, term, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("name", "in_channels", "shape"), [("mmsegrwkv_test", 2, (1, 2, 5, 7, 3)), ("urwkv_test", 1, (2, 1, 20, 28))]
)
def test_models_with_gemm_convs_load_the_same_weights_and_compute_the_same(name, in_channels, shape):
    torch.manual_seed(0)
    plain = create_model(name, in_channels, 3)
    gemm = create_model(name, in_channels, 3, gemm_convs=True)
    assert count_gemm_convs(gemm) > 0 and count_gemm_convs(plain) == 0
    assert_same_models(plain, gemm, shape)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_twins_trace_whole_under_fullgraph(layout):
    torch.manual_seed(0)
    model = module_to(use_gemm_convs(_net(3, bias=True)), layout, 3)
    assert_traces_whole(model, tensor_to(torch.randn(1, 5, *SIZE[3]), layout))


@pytest.mark.gpu
@pytest.mark.parametrize("dims", [2, 3])
def test_twins_match_cudnn_under_bf16_autocast_on_cuda(dims):
    torch.manual_seed(0)
    reference = module_to(_net(dims, bias=True).cuda(), "channels_last", dims)
    x = tensor_to(torch.randn(2, 5, *[4 * s for s in SIZE[dims]], device="cuda"), "channels_last")
    assert is_channels_last(assert_matches_cudnn(use_gemm_convs(copy.deepcopy(reference)), reference, x))
