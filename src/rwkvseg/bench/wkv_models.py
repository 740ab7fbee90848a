"""Model-level effect of the Bi-WKV implementation: one training step (forward + backward) of a whole model with
each implementation, on the same device in the same run.

The models call `rwkvseg.ops.bi_wkv` and `bi_wkv_ordered` with impl="auto"; `use_wkv_impl` swaps those names, in
every loaded rwkvseg module that imported them, for versions with the implementation fixed, so the model code
stays untouched.
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import sys
from collections.abc import Iterator

import torch
from torch import nn

from ..ops import bi_wkv, bi_wkv_ordered

# (in_channels, num_classes, input shape) of the issue: U-RWKV at batch 16 x 256^2, MMSegRWKV at 2 x 4 x 128^3
MODEL_CASES = {
    "urwkv": (3, 1, (16, 3, 256, 256)),
    "mmsegrwkv": (4, 3, (2, 4, 128, 128, 128)),
}


@contextlib.contextmanager
def use_wkv_impl(impl: str) -> Iterator[None]:
    """Inside the block every rwkvseg module that holds `bi_wkv` or `bi_wkv_ordered` calls it with impl=impl."""
    swaps = []
    for fn in (bi_wkv, bi_wkv_ordered):  # this module's own names are swapped too
        fixed = functools.partial(fn, impl=impl)
        for name, module in list(sys.modules.items()):
            if name.startswith("rwkvseg.") and getattr(module, fn.__name__, None) is fn:
                setattr(module, fn.__name__, fixed)
                swaps.append((module, fn))
    try:
        yield
    finally:
        for module, fn in swaps:
            setattr(module, fn.__name__, fn)


def train_step_row(
    model: nn.Module, input_shape: tuple[int, ...], impl: str, repeats: int = 3, amp: bool = False
) -> dict:
    """Median ms of forward + backward (loss = mean of the logits) and the peak allocated MB above the model and
    its input, on CUDA (events) with the Bi-WKV implementation fixed to impl."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        raise ValueError(f"train_step_row: the model is on {device}; the model benchmark needs --device cuda")
    x = torch.randn(input_shape, device=device)
    model.train()

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            loss = model(x).float().mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    row = {"impl": impl, "input": "x".join(map(str, input_shape)), "amp_bf16": amp}
    with use_wkv_impl(impl):
        try:
            step()  # warm-up: Triton compilation, allocator, cuDNN choices
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            times = []
            for _ in range(repeats):
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step()
                stop.record()
                torch.cuda.synchronize(device)
                times.append(start.elapsed_time(stop))
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            return {**row, "step_ms": None, "peak_mb": None, "note": "out of memory"}
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return {**row, "step_ms": statistics.median(times), "peak_mb": peak}
