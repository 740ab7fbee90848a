"""Thin convolutions padded to 8 input channels, the width cuDNN's bf16 channels-last tensor-core kernels read.

A model's first convolutions read its few input channels (MMSegRWKV: 4 MRI sequences; U-RWKV: 3 colours), where
cuDNN falls back to slow kernels: measured with `scripts/conv_rates.py` on one H200 (bf16, channels-last, session
19), MMSegRWKV's enc1 4 -> 32 3x3x3 convolution at 128^3 ran at 22 TFLOP/s (0.65 ms; its 32 -> 32 twins at 210),
ModalResFM's 4 -> 8 embedding (4 groups of one channel) at 1.1 TFLOP/s (0.84 ms), U-RWKV's 3 -> 16 stem at 2.7.

`use_padded_thin_convs(model)` swaps every plain nn.Conv{2,3}d with in_channels not a multiple of 8, ungrouped, or
with one input channel per group and fewer than 8 of them (a wider depthwise convolution would multiply its work
by its width as a dense one), for a subclass that, on channels-last maps, appends zero channels to the input
up to a multiple of 8 and zero rows to the weight (a grouped one becomes the dense block-diagonal weight it
stands for) and runs one ungrouped convolution: the same values up to the order of the sums, the same parameters
(released weights load), more multiply-adds at a rate cuDNN reaches. Channels-first maps keep the plain
convolution. Convolutions already swapped for another twin (layers/gemm_conv.py, layers/s2d_conv.py) stay so.

Where autograd does not need the weight (no grad mode, or a weight that does not require grad: prediction,
validation, a frozen layer) a twin keeps its padded weight and reuses it while the weight is the same tensor with
the same version counter, storage, strides, dtype and device: an in-place change (an optimizer step,
load_state_dict) bumps the version and the next forward pads again. Fused optimizer steps and writes through
`.data` do not bump it (torch 2.13), so train() / eval() also drop the kept weight: a training loop switches to
eval before it validates. The kept weight is no state: not in the state dict, not pickled or deep-copied.
Training forwards with grad pad on every call, so the gradients reach the weight; traced forwards (torch.compile,
export) pad in the graph.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rwkvseg.ops import tracing

from .layouts import map_layout
from .twins import PLAIN_CONVS, ChannelsLastTwin, swap_convs

MULTIPLE = 8  # bf16: 16-byte channel vectors


def is_thin(conv: nn.Module) -> bool:
    """A plain nn.Conv2d / nn.Conv3d (not a subclass) with in_channels not a multiple of MULTIPLE, ungrouped or
    one input channel per group and fewer than MULTIPLE channels, zeros padding."""
    return (
        type(conv) in PLAIN_CONVS.values()
        and conv.in_channels % MULTIPLE != 0
        and (conv.groups == 1 or conv.groups == conv.in_channels < MULTIPLE)
        and conv.padding_mode == "zeros"
    )


def dense_padded_weight(weight: Tensor, groups: int, in_channels: int) -> Tensor:
    """weight [C_out, C_in / groups, *k] of a convolution with `groups` groups -> the ungrouped weight
    [C_out, C_pad, *k] it stands for, C_pad = in_channels up to a multiple of MULTIPLE, zero where an output does
    not read an input. Differentiable: the gradient of each original entry is that of its one dense copy."""
    c_out, per_group, *kernel = weight.shape
    padded = -(-in_channels // MULTIPLE) * MULTIPLE
    if groups == 1:
        zeros = weight.new_zeros(c_out, padded - in_channels, *kernel)
        return torch.cat([weight, zeros.to(memory_format=map_layout(weight))], dim=1)
    if per_group != 1:
        raise ValueError(f"dense_padded_weight: only groups of one input channel, got {per_group} per group")
    # output o reads input o // (C_out / groups): a one-hot [C_out, C_pad] mask times the one weight per output
    reads = torch.arange(c_out, device=weight.device) // (c_out // groups)
    mask = F.one_hot(reads, padded).to(weight.dtype)  # [C_out, C_pad]
    return weight * mask.view(c_out, padded, *([1] * len(kernel)))  # [C_out, 1, *k] * [C_out, C_pad, 1..] -> dense


def pad_channels(x: Tensor) -> Tensor:
    """[B, C, *S] -> [B, C_pad, *S] with zero channels appended up to a multiple of MULTIPLE, in x's layout."""
    extra = -x.shape[1] % MULTIPLE
    zeros = x.new_zeros(x.shape[0], extra, *x.shape[2:]).to(memory_format=map_layout(x))
    return torch.cat([x, zeros], dim=1)


class _PaddedConv(ChannelsLastTwin):
    """The channels-last forward of the padded twins (mixed into nn.Conv2d / nn.Conv3d)."""

    # (the weight, its version counter, storage, strides, dtype and device, a view keeping that storage alive so its
    # address cannot come back holding other values, the padded weight)
    _kept: tuple[Tensor, tuple[Any, ...], Tensor, Tensor] | None = None

    def padded_weight(self) -> Tensor:
        """dense_padded_weight of this twin's weight, [C_out, C_pad, *k]: kept and reused while autograd does not
        need the weight and the weight is unchanged (module docstring); read it, never write it in place."""
        weight = self.weight
        if tracing() or (torch.is_grad_enabled() and weight.requires_grad) or weight.is_inference():
            return dense_padded_weight(weight, self.groups, self.in_channels)
        key = (weight._version, weight.data_ptr(), weight.stride(), weight.dtype, weight.device)
        kept = self._kept
        if kept is not None and kept[0] is weight and kept[1] == key:
            return kept[3]
        # a normal tensor even under inference_mode: a frozen layer's convolution saves it for backward later
        with torch.inference_mode(False), torch.no_grad():
            padded = dense_padded_weight(weight, self.groups, self.in_channels)
            self._kept = (weight, key, weight.detach(), padded)
        return padded

    def train(self, mode: bool = True) -> Any:
        self._kept = None  # fused optimizer steps change the weight without a new version
        return super().train(mode)  # type: ignore[misc]

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()  # type: ignore[misc]
        state.pop("_kept", None)  # a copy pads its own weight
        return state

    def channels_last_forward(self, x: Tensor) -> Tensor:
        weight = self.padded_weight()
        conv = F.conv2d if x.dim() == 4 else F.conv3d
        # [B, C_in, *S] -> [B, C_pad, *S] (channels-last) -> [B, C_out, *S'] (channels-last)
        return conv(pad_channels(x), weight, self.bias, self.stride, self.padding, self.dilation, 1)


class PaddedConv2d(_PaddedConv, nn.Conv2d):
    """nn.Conv2d whose channels-last inputs are padded to MULTIPLE channels (dense_padded_weight, pad_channels)."""


class PaddedConv3d(_PaddedConv, nn.Conv3d):
    """nn.Conv3d whose channels-last inputs are padded to MULTIPLE channels (dense_padded_weight, pad_channels)."""


_PADDED = {2: PaddedConv2d, 3: PaddedConv3d}


def use_padded_thin_convs(model: nn.Module) -> nn.Module:
    """In place: every thin convolution of model (is_thin) becomes its padded twin, sharing its parameters."""
    return swap_convs(model, lambda m: _PADDED[len(m.kernel_size)] if is_thin(m) else None, "use_padded_thin_convs")


def count_padded_convs(model: nn.Module) -> int:
    """How many padded twins model holds (what use_padded_thin_convs swapped in)."""
    return sum(isinstance(m, _PaddedConv) for m in model.modules())
