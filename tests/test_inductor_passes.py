"""KeepChannelsLast3d (rwkvseg.inductor_passes): where it pins a convolution's arguments, that compiling with it
changes no value (outputs and gradients against eager), and on CUDA that the compiled 3D convolutions then run in
eager's channels-last layout."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._inductor import inductor_prims
from torch.fx.experimental.proxy_tensor import make_fx

from rwkvseg.cli.bench import inductor_settings
from rwkvseg.compiling import inductor_options
from rwkvseg.inductor_passes import KeepChannelsLast3d

CL3D = torch.channels_last_3d
FORCE = inductor_prims.force_stride_order


def pinned(graph: torch.fx.Graph) -> dict[str, tuple[int, ...]]:
    """The argument nodes the pass pinned, by name, with the strides they were pinned to."""
    return {n.args[0].name: tuple(n.args[1]) for n in graph.nodes if n.target == FORCE}


def conv_graph(x: torch.Tensor, w: torch.Tensor) -> torch.fx.Graph:
    ones, zeros = [1] * (x.dim() - 2), [0] * (x.dim() - 2)  # stride, padding, dilation; output padding

    def f(x, w):
        return torch.ops.aten.convolution.default(x, w, None, ones, ones, ones, False, zeros, 1)

    return make_fx(f, tracing_mode="fake")(x, w).graph


def test_pins_channels_last_3d_arguments_to_their_strides():
    x = torch.randn(1, 4, 6, 6, 6).contiguous(memory_format=CL3D)
    w = torch.randn(8, 4, 3, 3, 3).contiguous(memory_format=CL3D)
    graph = conv_graph(x, w)
    KeepChannelsLast3d()(graph)
    assert pinned(graph) == {"x_1": x.stride(), "w_1": w.stride()}
    conv = next(n for n in graph.nodes if n.target == torch.ops.aten.convolution.default)
    assert [a.target for a in conv.args[:2]] == [FORCE, FORCE]  # the convolution reads the pinned nodes
    graph.lint()


@pytest.mark.parametrize(
    "shapes",
    [
        ((1, 4, 6, 6, 6), (8, 4, 3, 3, 3), None),  # channels-first 3D: Inductor decides, as without the pass
        ((1, 4, 6, 6), (8, 4, 3, 3), torch.channels_last),  # 2D: Inductor's own layout optimisation covers it
        ((1, 1, 6, 6, 6), (8, 1, 3, 3, 3), CL3D),  # one channel: channels-last and channels-first at once
    ],
    ids=["channels-first-3d", "2d", "one-channel"],
)
def test_leaves_other_convolutions_alone(shapes):
    x_shape, w_shape, layout = shapes
    x, w = torch.randn(x_shape), torch.randn(w_shape)
    if layout is not None:
        x, w = x.contiguous(memory_format=layout), w.contiguous(memory_format=layout)
    graph = conv_graph(x, w)
    KeepChannelsLast3d()(graph)
    assert pinned(graph) == {}


class Net3d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv3d(4, 8, 3, padding=1), nn.Conv3d(8, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 4, D, H, W] -> [B, 3, D, H, W]
        y = self.a(x).contiguous(memory_format=CL3D)  # channels-last whatever the CPU convolution returns
        return self.b(nn.functional.gelu(y) * 2)


class Counting(KeepChannelsLast3d):
    """The pass, counting what it pins (forward and backward graphs)."""

    def __init__(self) -> None:
        super().__init__()
        self.pins = 0

    def __call__(self, graph: torch.fx.Graph) -> None:
        super().__call__(graph)
        self.pins += len(pinned(graph))


def test_inductor_with_the_pass_matches_eager_outputs_and_gradients():
    torch.manual_seed(0)
    net = Net3d().to(memory_format=CL3D)
    x = torch.randn(2, 4, 6, 6, 6).contiguous(memory_format=CL3D)
    eager_out = net(x)
    eager_out.square().mean().backward()
    eager_grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    counting = Counting()
    # no cached graph: the pass must run in this process (Inductor's cache keys on the pass's uuid, not on counting)
    options = {**inductor_options("default"), "post_grad_custom_post_pass": counting, "fx_graph_cache": False}
    torch._dynamo.reset()
    with torch._functorch.config.patch(enable_autograd_cache=False):
        out = torch.compile(net, options=options, fullgraph=True)(x)
        out.square().mean().backward()
    # forward: the input, the intermediate map and both weights; backward: convolution_backward's arguments
    assert counting.pins >= 4
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-6)
    for p, g in zip(net.parameters(), eager_grads, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


def test_inductor_options_add_the_pass_only_when_asked():
    assert "post_grad_custom_post_pass" not in inductor_options("reduce-overhead")
    options = inductor_options("reduce-overhead", freeze=True, keep_conv_layouts=True)
    assert options["triton.cudagraphs"] and options["freezing"]
    assert isinstance(options["post_grad_custom_post_pass"], KeepChannelsLast3d)
    assert KeepChannelsLast3d().uuid() == KeepChannelsLast3d().uuid()  # a stable part of Inductor's cache key


@pytest.mark.gpu
@pytest.mark.parametrize("keep", [False, True], ids=["inductor", "eager-layouts"])
def test_compiled_3d_convolutions_run_channels_last_on_cuda(keep):
    """On CUDA the eager model runs every convolution channels-last; compiled, Inductor alone turns most of them
    channels-first, and with the pass none (the second convolution's input is a pointwise result)."""
    from torch._inductor import select_algorithm

    net = nn.Sequential(nn.Conv3d(4, 16, 3, padding=1), nn.GELU(), nn.Conv3d(16, 16, 3, padding=1), nn.GELU())
    net = net.cuda().to(memory_format=CL3D)
    x = torch.randn(1, 4, 16, 16, 16, device="cuda").contiguous(memory_format=CL3D)
    seen: list[bool] = []
    original = select_algorithm.extern_kernels.convolution

    def spy(inp, weight, *args, **kwargs):
        seen.append(inp.stride(1) == 1 and weight.stride(1) == 1)
        return original(inp, weight, *args, **kwargs)

    torch._dynamo.reset()
    compiled = torch.compile(net, options=inductor_options("default", keep_conv_layouts=keep))
    select_algorithm.extern_kernels.convolution = spy
    try:
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
            out = compiled(x)
            expected = net(x)
    finally:
        select_algorithm.extern_kernels.convolution = original
    assert len(seen) == 2
    assert all(seen) if keep else not all(seen)
    torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backend", ["inductor", "aot_eager"])
def test_compile_callable_passes_a_modes_options_to_inductor_only(monkeypatch, backend):
    from rwkvseg.compiling import compile_callable

    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **settings: seen.append(settings) or fn)
    compile_callable(lambda x: x, "reduce-overhead", backend)
    (settings,) = seen
    assert settings["dynamic"] is False and "mode" not in settings  # a mode or options, never both
    if backend == "inductor":  # the same options the mode names, and no layout pass unless asked for
        assert settings["options"] == torch._inductor.list_mode_options("reduce-overhead")
    else:
        assert "options" not in settings


def test_inductor_settings_read_values_as_set_does_and_refuse_unknown_keys():
    items = ["reorder_for_peak_memory=false", "triton.cudagraph_trees=false", "max_autotune_gemm_backends=ATEN"]
    settings = inductor_settings(items)
    assert settings == {
        "reorder_for_peak_memory": False,
        "triton.cudagraph_trees": False,
        "max_autotune_gemm_backends": "ATEN",
    }
    assert inductor_settings([]) == {}
    assert inductor_options("default", freeze=True, extra=settings) == {"freezing": True, **settings}
    with pytest.raises(ValueError, match="no setting 'reorder_peak'"):
        inductor_settings(["reorder_peak=false"])
    with pytest.raises(ValueError, match="must look like KEY=VALUE"):
        inductor_settings(["reorder_for_peak_memory"])
    with pytest.raises(ValueError, match="use --freeze"):  # an option alone would freeze nothing (freezing())
        inductor_settings(["freezing=true"])
