"""Checks shared by the tests of the convolution twins (layers/gemm_conv.py, padded_conv.py, s2d_conv.py): a twin
computes what the module it replaces computes, values and every gradient, eagerly, traced whole, in whole models and
on CUDA under bf16 autocast."""

import torch
import torch._dynamo
from torch import nn

from rwkvseg.memory_format import module_to, tensor_to


def values_and_grads(model: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """model(x) and the gradients of <model(x), grad> for x and every parameter."""
    x = x.detach().requires_grad_()
    y = model(x)
    return y, torch.autograd.grad(y, [x, *model.parameters()], grad)


def assert_same_values_and_grads(model: nn.Module, reference: nn.Module, x: torch.Tensor, tol: float = 1e-12):
    """model and reference (float64 for the tight default) agree on x in values and every gradient; returns model(x)."""
    grad = torch.randn_like(reference(x))
    y_ref, grads_ref = values_and_grads(reference, x, grad)
    y, grads = values_and_grads(model, x, grad)
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
    assert len(grads) == len(grads_ref) == 1 + len(list(reference.parameters()))
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=tol, atol=tol)
    return y


def assert_traces_whole(model: nn.Module, x: torch.Tensor) -> None:
    """torch.compile(model, fullgraph=True) (aot_eager: Dynamo and AOTAutograd's joint graph) gives eager's values
    and gradients."""
    grad = torch.randn_like(model(x))
    y_ref, grads_ref = values_and_grads(model, x, grad)
    torch._dynamo.reset()
    try:
        y, grads = values_and_grads(torch.compile(model, fullgraph=True, backend="aot_eager"), x, grad)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(y, y_ref)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref)


def assert_same_models(plain: nn.Module, rewritten: nn.Module, shape: tuple[int, ...]) -> None:
    """rewritten loads plain's state dict (released weights load either way) and, both channels-last in eval mode,
    computes what plain computes on a random input of shape."""
    rewritten.load_state_dict(plain.state_dict())
    x = tensor_to(torch.randn(shape), "channels_last")
    for model in (plain, rewritten):
        module_to(model.eval(), "channels_last", len(shape) - 2)
    with torch.no_grad():
        torch.testing.assert_close(rewritten(x), plain(x), rtol=1e-5, atol=1e-5)


def assert_matches_cudnn(twin: nn.Module, reference: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """On CUDA under bf16 autocast, twin(x) is reference(x) (cuDNN) within bf16 rounding; returns twin(x)."""
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y_ref, y = reference(x), twin(x)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=2e-2, atol=2e-2 * y_ref.abs().max().item())
    return y
