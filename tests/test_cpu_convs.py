"""rwkvseg.cpu_convs: the rule for PyTorch's slow CPU path, checked against torch's own choice (the profiler names
the kernel that ran); OneDnnConv3d against the plain convolution (outputs and gradients), eager and compiled; the
swap keeps the module and its state; prediction and training on the CPU use it."""

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

from rwkvseg.cpu_convs import OneDnnConv3d, cpu_conv3d, takes_slow_path, use_onednn_convs

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")


@contextmanager
def threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def kernels_run(conv: nn.Conv3d, x: torch.Tensor) -> set[str]:
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as p:
        F.conv3d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    return {e.key for e in p.key_averages()}


CASES = [  # (in, out, kernel, stride, dilation, groups, input shape, threads)
    (16, 8, 3, 1, 1, 1, (1, 16, 32, 32, 8), 2),  # 16 * 32 * 32 = 16384 <= 20480: slow
    (16, 8, 3, 1, 1, 1, (1, 16, 40, 32, 8), 2),  # 20480: still slow
    (16, 8, 3, 1, 1, 1, (1, 16, 41, 32, 8), 2),  # 20992: oneDNN
    (32, 8, 3, 1, 1, 1, (1, 32, 32, 32, 8), 2),  # 32768: oneDNN
    (16, 8, 3, 1, 1, 1, (2, 16, 8, 8, 8), 2),  # batch 2: oneDNN
    (16, 8, 3, 1, 1, 2, (1, 16, 8, 8, 8), 2),  # two groups: oneDNN
    (4, 8, 5, 1, 1, 1, (1, 4, 8, 8, 8), 2),  # kernel 5 x 5 in its last two axes: oneDNN
    (4, 8, (5, 3, 5), 1, 1, 1, (1, 4, 8, 8, 8), 2),  # kernel 3 along one of them: slow
    (4, 8, 3, 2, 1, 1, (1, 4, 8, 8, 8), 2),  # strided: slow
    (4, 8, 3, 1, 2, 1, (1, 4, 8, 8, 8), 2),  # dilated: the slow dilated path
    (4, 8, 1, 1, 1, 1, (1, 4, 8, 8, 8), 2),  # 1 x 1 in two threads: slow
    (4, 8, 1, 1, 1, 1, (1, 4, 8, 8, 8), 1),  # 1 x 1 in one thread: native by ATen's choice, left to it
    (4, 8, 3, 1, 1, 1, (1, 4, 8, 8, 8), 1),  # 3 x 3 in one thread: slow
]


@pytest.mark.parametrize("cin, cout, kernel, stride, dilation, groups, shape, n_threads", CASES)
def test_the_rule_is_torchs_own_choice(cin, cout, kernel, stride, dilation, groups, shape, n_threads):
    conv = nn.Conv3d(cin, cout, kernel, stride=stride, dilation=dilation, groups=groups, padding=1)
    x = torch.randn(shape)
    with threads(n_threads):
        ran = kernels_run(conv, x)
        predicted = takes_slow_path(x, conv.weight, conv.stride, conv.dilation, conv.groups)
    slow = any(k.startswith("aten::slow_conv") for k in ran)
    onednn = "aten::mkldnn_convolution" in ran
    assert slow != onednn, ran  # exactly one backend ran
    if kernel == 1 and n_threads == 1:
        assert slow and not predicted  # the native 1 x 1 case ATen prefers: not ours to change
    else:
        assert predicted == slow, ran


def test_only_float32_cpu_maps_are_taken():
    w, x, ones = torch.randn(8, 4, 3, 3, 3), torch.randn(1, 4, 8, 8, 8), (1, 1, 1)
    assert takes_slow_path(x, w, ones, ones, 1)
    assert not takes_slow_path(x.double(), w.double(), ones, ones, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not takes_slow_path(x, w, ones, ones, 1)


def swapped_pair(**settings) -> tuple[nn.Conv3d, nn.Conv3d]:
    torch.manual_seed(0)
    plain = nn.Conv3d(16, 8, 3, **settings)
    return plain, use_onednn_convs(nn.Sequential(copy.deepcopy(plain)))[0]


@pytest.mark.parametrize("settings", [dict(padding=1), dict(padding=0, stride=2), dict(padding=(1, 0, 2), bias=False)])
def test_outputs_and_gradients_match_the_plain_convolution(settings):
    plain, fast = swapped_pair(**settings)
    assert type(fast) is OneDnnConv3d
    x = torch.randn(1, 16, 16, 12, 20)
    assert takes_slow_path(x, fast.weight, fast.stride, fast.dilation, fast.groups)
    with torch.inference_mode():
        expected = plain(x)
        with profile(activities=[ProfilerActivity.CPU]) as p:
            out = fast(x)
    assert "mkldnn::_convolution_pointwise" in {e.key for e in p.key_averages()}
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)

    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad = torch.randn_like(expected)
    plain(xa).backward(grad)
    fast(xb).backward(grad)
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast.weight.grad, plain.weight.grad, rtol=1e-4, atol=1e-3)
    if plain.bias is not None:
        torch.testing.assert_close(fast.bias.grad, plain.bias.grad, rtol=1e-4, atol=1e-3)


def test_calls_off_the_slow_path_are_the_plain_convolution_exactly():
    plain, fast = swapped_pair(padding=1)
    for x in (torch.randn(2, 16, 8, 8, 8), torch.randn(1, 16, 8, 8, 8).double()):  # batch 2; float64
        if x.dtype == torch.float64:
            plain, fast = plain.double(), fast.double()
        with torch.no_grad():
            assert torch.equal(fast(x), plain(x))


def test_compiled_graphs_trace_the_operator_whole_and_run_it_in_onednn():
    plain, _ = swapped_pair(padding=1)
    torch.manual_seed(1)
    pointwise = nn.Conv3d(8, 4, 1)  # 1 x 1: the rule reads the thread count, at run time inside the operator
    plain_net = nn.Sequential(plain, nn.GELU(), pointwise)
    net = use_onednn_convs(copy.deepcopy(plain_net))
    x = torch.randn(1, 16, 8, 8, 8)
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as p:
        out = compiled(x)
    assert "mkldnn::_convolution_pointwise" in {e.key for e in p.key_averages()}
    with torch.no_grad():
        torch.testing.assert_close(out, plain_net(x), rtol=1e-4, atol=1e-4)
    x.requires_grad_()
    compiled(x).sum().backward()
    expected = x.detach().clone().requires_grad_()
    plain_net(expected).sum().backward()
    torch.testing.assert_close(x.grad, expected.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d])
@pytest.mark.parametrize("shape", [(1, 16, 8, 8, 8), (2, 16, 8, 8, 8)])  # the slow path's shape, and one off it
def test_the_operator_passes_torchs_own_checks(shape, layout):
    """torch.library.opcheck: the fake implementation's shapes and strides against the real ones, the registered
    gradient, and the operator's schema (as torch.compile and AOTAutograd rely on them)."""
    torch.manual_seed(0)
    x = torch.randn(shape).contiguous(memory_format=layout).requires_grad_()
    weight = torch.randn(8, 16, 3, 3, 3).requires_grad_()
    for bias in (torch.randn(8).requires_grad_(), None):
        torch.library.opcheck(cpu_conv3d, (x, weight, bias, [1, 1, 1], [1, 1, 1], [1, 1, 1], 1))
    out = cpu_conv3d(x.detach(), weight.detach(), None, [1, 1, 1], [1, 1, 1], [1, 1, 1], 1)
    assert out.is_contiguous(memory_format=layout)


def test_tracing_for_export_records_the_plain_convolution():
    _, fast = swapped_pair(padding=1)
    traced = torch.jit.trace(fast, torch.randn(1, 16, 8, 8, 8))
    graph = str(traced.inlined_graph)
    assert "aten::_convolution" in graph and "mkldnn" not in graph


def test_the_swap_keeps_modules_parameters_and_subclasses():
    class Twin(nn.Conv3d):
        pass

    model = nn.Sequential(nn.Conv3d(4, 8, 3), Twin(8, 8, 1), nn.Conv2d(3, 3, 1), nn.ConvTranspose3d(8, 4, 2))
    before = dict(model.state_dict(keep_vars=True))
    modules = list(model.modules())
    assert use_onednn_convs(model) is model
    assert [type(m) for m in model] == [OneDnnConv3d, Twin, nn.Conv2d, nn.ConvTranspose3d]
    assert list(model.modules()) == modules
    after = model.state_dict(keep_vars=True)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    use_onednn_convs(model)  # again: nothing changes
    assert type(model[0]) is OneDnnConv3d


def test_cpu_prediction_runs_the_swapped_convolutions():
    from rwkvseg.data.specs import dataset_spec
    from rwkvseg.infer.predict import PredictConfig
    from rwkvseg.infer.predict3d import Predictor3D
    from rwkvseg.models import create_model

    spec = dataset_spec("brats")
    meta = {"dims": 3, "dataset": spec.to_dict(), "target": "labels", "patch_size": [16, 16, 16]}
    predictor = Predictor3D(create_model("segresnet", 4, 4, init_filters=8), meta, PredictConfig(device="cpu"))
    kinds = {type(m) for m in predictor.model.modules() if isinstance(m, nn.Conv3d)}
    assert kinds == {OneDnnConv3d}


def test_without_onednn_nothing_is_swapped():
    model = nn.Sequential(nn.Conv3d(4, 8, 3))
    with torch.backends.mkldnn.flags(enabled=False):
        use_onednn_convs(model)
    assert type(model[0]) is nn.Conv3d
