"""Convolution and linear weights held in bfloat16 for inference under bf16 autocast (a shared leaf: prediction and
the benchmarks use it).

Autocast casts those weights to bfloat16 at every call, with the same rounding as holding them in bfloat16, so the
outputs do not change; held, the parameters take half the memory and no call makes bfloat16 copies of them (a
compiled graph may cast them early and hold the copies across its memory peak: docs/speed.md, "What is known to
limit us"). Everything else (normalization layers, Bi-WKV's decays) stays as it was, float32, as autocast runs it.
Not for training: the optimizer would step bfloat16 weights.
"""

from __future__ import annotations

import torch
from torch import nn

# the layers whose weights bf16 autocast casts to bfloat16 at every call (convolutions and matrix products)
BF16_WEIGHT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
BF16_WEIGHT_LAYERS += (nn.Linear,)


def hold_bf16_weights(model: nn.Module) -> nn.Module:
    """In place: the float32 weights and biases of model's convolutions and linear layers (BF16_WEIGHT_LAYERS and
    their subclasses) held in bfloat16; returns model."""
    for module in model.modules():
        if isinstance(module, BF16_WEIGHT_LAYERS):
            for param in module.parameters(recurse=False):
                if param.dtype == torch.float32:
                    param.data = param.data.to(torch.bfloat16)
    return model
