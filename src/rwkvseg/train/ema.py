"""An exponential moving average of a model's weights (optim.ema): what a run validates and checkpoints in place
of the raw weights, which keep training.

After optimizer step s (counted from 1): for s <= start the average is a copy of the weights, later it moves
towards them, ema = decay * ema + (1 - decay) * weights (one multi-tensor lerp). Buffers (BatchNorm running
statistics, its step counter) are copied from the model at every step, not averaged: they are already running
averages of the batch statistics, a counter cannot be averaged, and `update_bn` (a pass over the training set
to recompute the statistics under the averaged weights) would cost an epoch's forward at every validation.
The update runs eagerly after the optimizer, outside the compiled step (and so outside its CUDA graphs), reads
no tensor on the host and branches only on the host's step count: it never makes the host wait for the device.
The average lives on the training device in the dtypes of the model's parameters (float32: mixed precision is
autocast, the parameters stay float32).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class WeightEma:
    """The average of `model`'s weights (a copy of the module, never trained: `.module`), kept by update(step)."""

    def __init__(self, model: nn.Module, decay: float, start: int = 0) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"optim.ema = {decay!r} must be in (0, 1) for an average (0 switches it off)")
        self.decay, self.start = float(decay), int(start)
        self.module = copy.deepcopy(model).requires_grad_(False).eval()
        # the tensors of both, aligned once: parameters() and buffers() list a shared tensor once, in both copies
        self._params, self._source_params = list(self.module.parameters()), list(model.parameters())
        self._buffers, self._source_buffers = list(self.module.buffers()), list(model.buffers())

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold the model's weights after optimizer step `step` (1 for the first) into the average."""
        if step <= self.start:
            torch._foreach_copy_(self._params, self._source_params)
        else:
            torch._foreach_lerp_(self._params, self._source_params, 1.0 - self.decay)
        if self._buffers:
            torch._foreach_copy_(self._buffers, self._source_buffers)

    def record(self) -> dict[str, Any]:
        """What the checkpoints and summary.json say about the weights they hold."""
        return {"weights": "ema", "decay": self.decay, "start": self.start}

    def state_dict(self) -> dict[str, Any]:
        return {**self.record(), "module": self.module.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The average a state_dict holds (its decay and start stay this object's: the config's)."""
        self.module.load_state_dict(state["module"])
