"""Thin convolutions padded to 8 input channels (layers/padded_conv.py): the same values and gradients as the torch
convolutions they replace, in float64, ungrouped and one channel per group, strided and padded, with and without a
bias; the layout they keep; what they leave alone; the parameters; the padded weight they keep without autograd; a
fullgraph trace; whole models."""

import copy
import pickle

import pytest
import torch
import torch._dynamo
from torch import nn

import rwkvseg.layers.padded_conv as padded_conv_module
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


def _twin_of_a_thin_conv():
    """A channels-last float64 Conv3d 4 -> 8, its padded twin (sharing its parameters) and a channels-last input."""
    torch.manual_seed(0)
    plain = module_to(nn.Sequential(nn.Conv3d(4, 8, 3, padding=1).double()), "channels_last", 3)[0]
    twin = use_padded_thin_convs(nn.Sequential(plain))[0]
    assert isinstance(twin, PaddedConv3d) and twin.weight is plain.weight
    return plain, twin, tensor_to(torch.randn(2, 4, 5, 6, 7, dtype=torch.float64), "channels_last")


def test_forwards_without_autograd_reuse_the_padded_weight(monkeypatch):
    plain, twin, x = _twin_of_a_thin_conv()
    pads = []
    real = padded_conv_module.dense_padded_weight
    monkeypatch.setattr(padded_conv_module, "dense_padded_weight", lambda *args: pads.append(1) or real(*args))
    with torch.no_grad():
        first = twin(x)
        assert torch.equal(twin(x), first) and twin.padded_weight() is twin.padded_weight()
        torch.testing.assert_close(first, plain(x), rtol=1e-12, atol=1e-12)
    twin.weight.requires_grad_(False)  # a frozen layer: no autograd on the weight in grad mode either
    assert torch.equal(twin(x), first) and len(pads) == 1
    twin.weight.requires_grad_(True)
    twin(x)
    assert len(pads) == 2  # training: padded on every call


def test_a_changed_weight_is_padded_again():
    """In-place changes, load_state_dict, optimizer steps and a swapped tensor each give the twin the plain
    convolution's new values; a fused step (no new version) does once eval() dropped the kept weight."""
    plain, twin, x = _twin_of_a_thin_conv()

    def check(changed):
        with torch.no_grad():
            y = twin(x)
            torch.testing.assert_close(y, plain(x), rtol=1e-12, atol=1e-12)
            assert changed is None or not torch.allclose(y, changed)
        return y

    y = check(None)
    with torch.no_grad():
        twin.weight.add_(1)
    y = check(y)
    twin.load_state_dict({k: torch.randn_like(v) for k, v in twin.state_dict().items()})
    y = check(y)
    plain.weight.data = torch.randn_like(plain.weight)  # same Parameter and version, other storage
    y = check(y)
    for optimizer in (torch.optim.SGD(twin.parameters(), lr=0.1), torch.optim.Adam(twin.parameters(), fused=True)):
        twin.zero_grad()
        twin(x).square().sum().backward()
        optimizer.step()
        twin.eval()  # as validation does
        y = check(y)
        twin.train()


def test_gradients_reach_the_weight_after_forwards_that_kept_it():
    plain, twin, x = _twin_of_a_thin_conv()
    reference = copy.deepcopy(plain)
    with torch.no_grad():
        twin(x)
    assert_same_values_and_grads(nn.Sequential(twin), nn.Sequential(reference), x)
    # a frozen layer keeps its padded weight in grad mode, and its convolution saves it for the input's gradient:
    # kept from an inference_mode forward, it must still be a normal tensor
    for conv in (twin, reference):
        conv.weight.requires_grad_(False)
    twin.eval()  # drops the kept weight, as a predictor's eval() does
    with torch.inference_mode():
        twin(x)
    grad = torch.randn_like(reference(x))
    inputs = [x.detach().requires_grad_() for _ in range(2)]
    (got,), (expected,) = (torch.autograd.grad(m(i), i, grad) for m, i in zip((twin, reference), inputs, strict=True))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_the_kept_weight_is_no_state():
    _, twin, x = _twin_of_a_thin_conv()
    model = nn.Sequential(twin)
    with torch.no_grad():
        y = model(x)
    assert twin._kept is not None and list(model.state_dict()) == ["0.weight", "0.bias"]
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert copied[0]._kept is None
        with torch.no_grad():
            assert torch.equal(copied(x), y)


def test_padded_twin_traces_whole_without_autograd_and_without_the_kept_weight():
    _, twin, x = _twin_of_a_thin_conv()
    model = nn.Sequential(twin).eval()
    with torch.no_grad():
        eager = model(x)
        kept = twin._kept
        torch._dynamo.reset()
        try:
            compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
        finally:
            torch._dynamo.reset()
    assert twin._kept is kept  # the trace pads in the graph
    torch.testing.assert_close(compiled, eager)


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
