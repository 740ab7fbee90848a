"""3-D convolutions on the CPU through oneDNN where PyTorch would run its slow reference path.

PyTorch chooses a CPU backend for every convolution call (ATen's `ConvParams::use_mkldnn`; tests/test_cpu_convs.py
checks the rule below against torch's own choice): a float32 call goes to oneDNN unless its batch is 1, it has one
group, its kernel is at most 3 along one of its last two axes and N * C * D * H is at most 20480 (a rule written
for 2-D maps, where those four sizes are N, C, H and W). In 3-D that excludes every batch-1 map of few channels:
such calls run `slow_conv3d` (unfold + GEMM). On this project's 2-core CPU a 1 x 16 x 32 x 32 x 64 map through a
3 x 3 x 3 kernel took 55 ms there against 3.1 ms in oneDNN, and MMSegRWKV's lite variant spent three quarters of
its 1 x 4 x 32^3 inference in it (docs/speed.md, "3-D convolutions on the CPU"). Sliding-window prediction and the
service run batch-1 windows, so that is where it costs.

`use_onednn_convs(model)` turns every plain `nn.Conv3d` of a model into an `OneDnnConv3d` in place (its class
only: the same module, parameters and state dict). Its CPU calls go through one registered operator,
`rwkvseg::cpu_conv3d`, which applies the rule at run time (so torch.compile traces it as one opaque call, without
reading the thread count) and runs the calls PyTorch would run slowly in oneDNN (`mkldnn._convolution_pointwise`,
the oneDNN convolution Inductor itself emits), every other one as `F.conv3d`; its output keeps its input's layout
either way, which its fake implementation states, and its gradient is ATen's `convolution_backward` (whose own
backend choice is not changed). Other devices, autocast and tracing for export take the plain convolution.
oneDNN sums in another order than the reference path, so outputs differ by float32 rounding, as between any two
convolution backends.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .memory_format import map_layout

CPU_CONVS = ("onednn", "stock")  # the settings naming whether use_onednn_convs is applied (bench models --cpu-convs)
ATEN_NATIVE_MAX = 20480  # ATen: a batch-1, one-group, small-kernel float32 call of N*C*D*H at most this runs natively


def takes_slow_path(x: Tensor, weight: Tensor, stride: Sequence[int], dilation: Sequence[int], groups: int) -> bool:
    """Whether PyTorch's CPU backend choice sends conv3d(x, weight, ...) (x [N, C, D, H, W]) to its native slow
    convolution although oneDNN could run it: ATen's rule, both of its clauses (docs above). A float32 CPU map only;
    a 1 x 1 kernel in one thread, unstrided and undilated, stays native by ATen's choice (it is faster there).
    Whether oneDNN is there at all is use_onednn_convs's question. Run-time only: it reads the thread count."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 5 or x.is_mkldnn:
        return False
    if weight.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):  # autocast casts inside F.conv3d
        return False
    kh, kw = weight.shape[-2:]
    strided, dilated = any(s != 1 for s in stride), any(d != 1 for d in dilation)
    several = torch.get_num_threads() > 1
    onednn_worth_it = strided or dilated or x.shape[0] >= 16 or (kh, kw) != (1, 1) or several
    big = math.prod(x.shape[:4]) > ATEN_NATIVE_MAX
    aten_takes_onednn = groups > 1 or (kh > 3 and kw > 3) or x.shape[0] > 1 or big
    return onednn_worth_it and not aten_takes_onednn


@torch.library.custom_op(
    "rwkvseg::cpu_conv3d",
    mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor? bias, int[] stride, int[] padding, int[] dilation, int groups) -> Tensor",
)
def cpu_conv3d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> Tensor:
    """F.conv3d(x, weight, bias, stride, padding, dilation, groups) of a CPU map [N, C, D, H, W], in oneDNN
    where PyTorch would run its slow path (takes_slow_path); the output in x's own layout (map_layout)."""
    if takes_slow_path(x, weight, stride, dilation, groups):
        settings = (list(padding), list(stride), list(dilation), groups)
        out = torch.ops.mkldnn._convolution_pointwise(x, weight, bias, *settings, "none", [], "")
    else:
        out = F.conv3d(x, weight, bias, stride, padding, dilation, groups)
    return out.contiguous(memory_format=map_layout(x))


@cpu_conv3d.register_fake
def _(x, weight, bias, stride, padding, dilation, groups):  # the plain convolution's shape, in x's own layout
    return F.conv3d(x, weight, bias, stride, padding, dilation, groups).contiguous(memory_format=map_layout(x))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(x, weight)
    ctx.settings = (list(stride), list(padding), list(dilation), groups)
    ctx.bias_sizes = None if bias is None else list(bias.shape)


def _backward(ctx, grad: Tensor):
    x, weight = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.settings
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.bias_sizes is not None and ctx.needs_input_grad[2]]
    gx, gw, gb = torch.ops.aten.convolution_backward(
        grad, x, weight, ctx.bias_sizes, stride, padding, dilation, False, [0, 0, 0], groups, mask
    )
    return gx, gw, gb, None, None, None, None


cpu_conv3d.register_autograd(_backward, setup_context=_setup_context)


def _exporting() -> bool:
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()


class OneDnnConv3d(nn.Conv3d):
    """nn.Conv3d whose CPU calls go through rwkvseg::cpu_conv3d: the ones PyTorch would run on its slow path run in
    oneDNN, the others (float64 among them) as the plain convolution (module docs)."""

    def forward(self, x: Tensor) -> Tensor:  # x [N, C, D, H, W] -> [N, out_channels, D', H', W']
        if (
            x.device.type != "cpu"
            or x.dim() != 5
            or self.padding_mode != "zeros"
            or isinstance(self.padding, str)
            or torch.is_autocast_enabled("cpu")
            or _exporting()
        ):
            return super().forward(x)
        return cpu_conv3d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def use_onednn_convs(model: nn.Module) -> nn.Module:
    """In place: every plain nn.Conv3d of model (model itself too) becomes an OneDnnConv3d, the same module with the
    subclass's forward (it adds no state); returns model. Subclasses of nn.Conv3d (the GEMM, padded and
    space-to-depth twins of rwkvseg.layers) are kept as they are. Without oneDNN (a torch built without it, or
    torch.backends.mkldnn disabled) nothing changes."""
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return model
    for module in model.modules():
        if type(module) is nn.Conv3d:
            module.__class__ = OneDnnConv3d
    return model
