"""The arithmetic a prediction runs in: float32 (the default) or bfloat16 autocast, on the CPU as on a GPU.

bf16 halves what every convolution reads and lets CPUs with native bfloat16 instructions (AVX512-BF16, AMX)
multiply at about twice the float32 rate; the outputs leave the model as float32, so the sliding window's sums,
the flips' average, the activation and the resampling stay in float32 whatever the model ran in. A CPU without
those instructions emulates bf16 more slowly than it runs float32: asking for bf16 there is refused. Under bf16
the convolution and linear weights are held in bfloat16 (rwkvseg.bf16_weights: the outputs are those of autocast's
casts, without a cast per call). Measured effects on speed and scores: docs/speed.md ("Predicting in bfloat16").
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..bf16_weights import hold_bf16_weights
from ..devices import bf16_unsupported

PRECISIONS = ("fp32", "bf16")


def check_precision(precision: str, device: torch.device | str) -> None:
    """A clear error for a precision that is unknown or that this device cannot run faster than float32."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision!r} unknown; choose one of {', '.join(PRECISIONS)}")
    reason = bf16_unsupported(device) if precision == "bf16" else None
    if reason:
        raise ValueError(f"--precision bf16: {reason}; use --precision fp32")


def in_precision(
    forward: Callable[[torch.Tensor], torch.Tensor], precision: str, device: torch.device | str
) -> Callable[[torch.Tensor], torch.Tensor]:
    """forward run in precision on device (after check_precision), its output as float32; fp32: forward itself."""
    if precision == "fp32":
        return forward
    device_type = torch.device(device).type

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type, dtype=torch.bfloat16):
            y = forward(x)
        return y.float()

    return run


def for_precision(model: nn.Module, precision: str) -> nn.Module:
    """model ready to run in precision (after check_precision), in place: bf16 holds its convolution and linear
    weights in bfloat16 (hold_bf16_weights); fp32 leaves it as it is."""
    return hold_bf16_weights(model) if precision == "bf16" else model
