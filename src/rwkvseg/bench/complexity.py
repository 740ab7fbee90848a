"""Model complexity: parameter counts, multiply-accumulate counts, and CPU latency.

MACs follow the convention of the papers we compare against (thop's): multiply-adds of the convolution and
linear layers only. Norms, activations, pooling, resampling and the WKV token mixer are not counted; the WKV
cost is O(T * C) element-wise work per sequence, small beside the projections around it.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..memory_format import to_memory_format

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED_CONVS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
MAC_METHODS = ("hooks", "torch")


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _layer_macs(module: nn.Module, inputs: tuple, output: torch.Tensor) -> int:
    if isinstance(module, _CONVS):
        # every output element is a dot product over in_channels / groups * kernel volume inputs
        per_output = module.in_channels // module.groups * math.prod(module.kernel_size)
        return output.numel() * per_output
    if isinstance(module, _TRANSPOSED_CONVS):
        # every input element is scattered into out_channels / groups * kernel volume outputs
        per_input = module.out_channels // module.groups * math.prod(module.kernel_size)
        return inputs[0].numel() * per_input
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    return 0


def _zero_input(model: nn.Module, input_shape: Sequence[int]) -> torch.Tensor:
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    return torch.zeros(tuple(input_shape), device=device, dtype=dtype)


def _sum_over_layers(model: nn.Module, input_shape: Sequence[int], per_layer) -> int:
    """sum of per_layer(module, inputs, output) over every conv, transposed conv and linear layer called in one
    forward pass on a zero input (eval mode, no gradients)."""
    x = _zero_input(model, input_shape)
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        total += per_layer(module, inputs, output)

    was_training = model.training
    model.eval()
    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, (*_CONVS, *_TRANSPOSED_CONVS, nn.Linear))
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total


def count_macs(model: nn.Module, input_shape: Sequence[int], method: str = "hooks") -> int:
    """Multiply-accumulates of one forward pass on a zero input of input_shape (batch included, e.g.
    (1, 3, 256, 256) or (1, 4, 128, 128, 128)); runs in eval mode without gradients on the model's device.

    method "hooks" (the convention of the papers, as thop counts): forward hooks on every nn.Conv{1,2,3}d,
    nn.ConvTranspose{1,2,3}d and nn.Linear; a conv counts output elements x in_channels / groups x kernel
    volume, a linear output elements x in_features; biases, norms, activations and anything called
    functionally (the WKV operator included) count nothing.
    method "torch": torch.utils.flop_counter.FlopCounterMode FLOPs / 2, which also counts every matmul issued
    outside modules, including those inside the WKV implementation; a cross-check, not the reported number.
    """
    if method not in MAC_METHODS:
        raise ValueError(f"count_macs: unknown method {method!r}; choose one of {MAC_METHODS}")
    if method == "hooks":
        return _sum_over_layers(model, input_shape, _layer_macs)
    x = _zero_input(model, input_shape)
    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(x)
        return counter.get_total_flops() // 2
    finally:
        model.train(was_training)


def count_layer_io(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Elements the conv, transposed conv and linear layers of one forward pass read (their input) and write
    (their output), summed over layers; the same layers and zero input as count_macs. At 2 bytes an element
    (bf16) this is the memory traffic a forward cannot avoid when every other op (norms, activations, residual
    adds) is fused into those layers' reads and writes: a floor for a memory-bound model, beside the MACs'
    floor for a compute-bound one. Weights are not counted."""

    def io(module: nn.Module, inputs: tuple, output: torch.Tensor) -> int:
        return inputs[0].numel() + output.numel()

    return _sum_over_layers(model, input_shape, io)


def measure_latency(
    model: nn.Module,
    input_shape: Sequence[int],
    threads: int | None = None,
    warmup: int = 3,
    repeats: int = 20,
    channels_last: bool = False,
) -> dict[str, float]:
    """Wall time of model(x) in eval mode under torch.inference_mode, in milliseconds per call.

    threads sets torch's intra-op thread count for the measurement and restores it afterwards (CPU only).
    channels_last runs model and input in channels-last memory format (oneDNN's preferred layout on CPU) and
    converts the model back afterwards. Returns median, min and max over `repeats` timed calls after `warmup`
    untimed ones; CUDA is synchronised around each call so the numbers are device time, not launch time.
    """
    if repeats < 1:
        raise ValueError(f"measure_latency: repeats must be >= 1, got {repeats}")
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    x = torch.randn(tuple(input_shape), device=device)
    if channels_last:
        x = to_memory_format(model, x, "channels_last")
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    was_training = model.training
    model.eval()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                model(x)
            for _ in range(repeats):
                sync()
                start = time.perf_counter()
                model(x)
                sync()
                times.append((time.perf_counter() - start) * 1e3)
    finally:
        torch.set_num_threads(previous_threads)
        model.train(was_training)
        if channels_last:
            to_memory_format(model, x, "contiguous")
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times)}


def complexity_row(
    name: str,
    model: nn.Module,
    input_shape: Sequence[int],
    threads: int | None = None,
    repeats: int = 0,
    channels_last: bool = False,
) -> dict[str, float | str]:
    """One table row: parameters (M), MACs (G, hooks convention), the conv and linear layers' input + output in MiB
    at 2 bytes an element (count_layer_io) and, when repeats > 0, CPU/GPU latency."""
    row: dict[str, float | str] = {
        "model": name,
        "params_m": count_parameters(model) / 1e6,
        "gmacs": count_macs(model, input_shape) / 1e9,
        "layer_io_mib": count_layer_io(model, input_shape) * 2 / 2**20,  # bf16
    }
    if repeats > 0:
        row.update(measure_latency(model, input_shape, threads=threads, repeats=repeats, channels_last=channels_last))
    return row
