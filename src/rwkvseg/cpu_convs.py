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
only: the same module, parameters and state dict), which sends exactly the calls that PyTorch would run slowly to
oneDNN, eagerly: `mkldnn._convolution_pointwise` when no gradient is needed, `aten.mkldnn_convolution` when one is
(it has a registered backward). Every other call, every device but the CPU, tracing for export and torch.compile
take the plain convolution: Inductor's fake kernel of the oneDNN op gives channels-last outputs where the real op
keeps its input's layout, and dynamo cannot trace the thread count the rule reads, so compiled CPU graphs keep
PyTorch's own choice. oneDNN sums in another order than the reference path, so outputs differ by float32 rounding,
as between any two convolution backends.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

CPU_CONVS = ("onednn", "stock")  # the settings naming whether use_onednn_convs is applied (bench models --cpu-convs)
ATEN_NATIVE_MAX = 20480  # ATen: a batch-1, one-group, small-kernel float32 call of N*C*D*H at most this runs natively


def takes_slow_path(conv: nn.Conv3d, x: Tensor) -> bool:
    """Whether PyTorch's CPU backend choice sends conv(x) (x [N, C, D, H, W]) to its native slow convolution
    although oneDNN could run it: ATen's rule, both of its clauses (docs above). A float32 CPU map only; a 1 x 1
    kernel in one thread, unstrided and undilated, stays native by ATen's choice (it is faster there). Whether
    oneDNN is there at all is use_onednn_convs's question (torch.compile cannot trace torch.backends). Not for
    code that dynamo traces (it cannot trace the thread count): OneDnnConv3d asks only when not compiling."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 5 or x.is_mkldnn:
        return False
    if conv.weight.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):  # autocast casts inside F.conv3d
        return False
    kh, kw = conv.weight.shape[-2:]
    strided, dilated = any(s != 1 for s in conv.stride), any(d != 1 for d in conv.dilation)
    several = torch.get_num_threads() > 1
    onednn_worth_it = strided or dilated or x.shape[0] >= 16 or (kh, kw) != (1, 1) or several
    big = math.prod(x.shape[:4]) > ATEN_NATIVE_MAX
    aten_takes_onednn = conv.groups > 1 or (kh > 3 and kw > 3) or x.shape[0] > 1 or big
    return onednn_worth_it and not aten_takes_onednn


def _exporting() -> bool:
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


class OneDnnConv3d(nn.Conv3d):
    """nn.Conv3d whose calls that PyTorch would run on its slow CPU path run in oneDNN instead (module docs)."""

    def forward(self, x: Tensor) -> Tensor:  # x [N, C, D, H, W] -> [N, out_channels, D', H', W']
        if torch.compiler.is_compiling() or _exporting():  # the plain convolution: see the module docs
            return super().forward(x)
        if self.padding_mode != "zeros" or isinstance(self.padding, str) or not takes_slow_path(self, x):
            return super().forward(x)
        settings = (list(self.padding), list(self.stride), list(self.dilation), self.groups)
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        if not needs_grad:  # inference: the fused op Inductor itself emits (no autograd)
            return torch.ops.mkldnn._convolution_pointwise(x, self.weight, self.bias, *settings, "none", [], "")
        return torch.ops.aten.mkldnn_convolution(x, self.weight, self.bias, *settings)


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
