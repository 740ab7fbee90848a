"""Where a model runs: the `device` setting resolved and checked (training, prediction, the service, federated
sites), a model placed on it as every entry point places it, and whether bfloat16 pays there."""

from __future__ import annotations

import torch
from torch import nn

from .cpu_convs import use_onednn_convs


def resolve_device(name: str = "auto", setting: str = "device") -> torch.device:
    """`auto` -> cuda when torch sees a GPU, else cpu; another name once torch has that device (a CUDA device torch
    does not see would fail later, at loading, with a message about something else). setting: how the error names
    the option ("device", "--device")."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{setting} {name!r} is not a device; use cpu, cuda, cuda:1 or auto") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{setting} {name}: torch sees no CUDA device (no GPU, or a CPU build of torch); use cpu")
        if device.index is not None and device.index >= count:
            raise ValueError(f"{setting} {name}: torch sees {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return device


def placed(model: nn.Module, device: torch.device | str) -> nn.Module:
    """model moved to device in place; on the CPU with its plain 3-D convolutions kept off PyTorch's slow path
    (rwkvseg.cpu_convs: same modules, parameters and state dict). Returns model."""
    model.to(device)
    if torch.device(device).type == "cpu":
        use_onednn_convs(model)
    return model


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bfloat16 natively on this CPU (AVX512-BF16 or AMX; elsewhere it emulates bf16, slower
    than float32). torch answers through a private operator; a torch without it is not second-guessed: True."""
    supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return True if supported is None else bool(supported())


def bf16_unsupported(device: torch.device | str) -> str | None:
    """Why bfloat16 arithmetic does not pay on device (for the error of the option that asked for it), or None
    where it does: a CPU with native bfloat16, a GPU with bf16 support."""
    device = torch.device(device)
    if device.type == "cpu" and not cpu_has_native_bf16():
        return "this CPU has no native bfloat16 arithmetic (AVX512-BF16 or AMX), where bf16 runs slower than float32"
    if device.type == "cuda" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        return f"{device} has no bfloat16 support"
    return None
