"""Run the fused instance norm's Triton kernels on the CPU (TRITON_INTERPRET=1 must be set before triton is
imported, hence a process of its own) against float64 nn.InstanceNorm3d + activation; prints one JSON line of
max errors per case, beside the largest error of PyTorch's own fp32 ops on the same inputs ("torch_fp32").
Run by tests/layers/test_fused_instance_norm.py."""

import json
import sys

import torch
import torch.nn.functional as F

from rwkvseg.layers import instance_norm_triton

# (affine, slope, shape, mean): block 16 and 20 programs give several chunks per row, the last one ragged;
# |mean| >> std checks that the shifted sums do not cancel
CASES = [
    (False, 1.0, (2, 3, 5, 6, 7), 3.0),
    (True, 0.01, (1, 2, 9, 4, 5), 3.0),
    (True, 0.0, (2, 2, 3, 5, 7), 1000.0),
]


def _case(affine: bool, slope: float, shape: tuple[int, ...], mean: float) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    x64 = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + mean
    w64 = torch.rand(shape[1], generator=g, dtype=torch.float64) + 0.5 if affine else None
    b64 = torch.randn(shape[1], generator=g, dtype=torch.float64) if affine else None
    gy = torch.randn(shape, generator=g)
    x, w, b = (None if t is None else t.float() for t in (x64, w64, b64))
    x64, w64, b64 = (None if t is None else t.double() for t in (x, w, b))  # the reference sees the fp32 inputs
    leaves = [t.requires_grad_() for t in (x64, w64, b64) if t is not None]
    ref = F.leaky_relu(F.instance_norm(x64, weight=w64, bias=b64, eps=1e-5), slope)
    ref_grads = torch.autograd.grad(ref, leaves, gy.double())
    errors = {"torch_fp32": _torch_fp32_error(x, w, b, slope, gy, ref, ref_grads)}
    y, m, rstd = instance_norm_triton.forward(x, w, b, 1e-5, slope, block=16, programs=20)
    grads = instance_norm_triton.backward(gy, x, w, b, m, rstd, slope, block=16, programs=20)
    errors["y"] = (y.double() - ref).abs().max().item()
    errors["mean"] = (m.double() - x64.mean((2, 3, 4)).flatten()).abs().max().item()
    for name, got, want in zip(("gx", "gweight", "gbias"), grads, ref_grads, strict=False):
        errors[name] = (got.double() - want).abs().max().item()
    if not affine:
        errors["no_affine_grads"] = float(grads[1] is not None or grads[2] is not None)
    return errors


def _torch_fp32_error(x, w, b, slope, gy, ref, ref_grads) -> float:
    leaves = [t.clone().requires_grad_() for t in (x, w, b) if t is not None]
    weight, bias = (leaves[1], leaves[2]) if len(leaves) == 3 else (None, None)
    y = F.leaky_relu(F.instance_norm(leaves[0], weight=weight, bias=bias, eps=1e-5), slope)
    grads = torch.autograd.grad(y, leaves, gy)
    return max(
        (got.double() - want).abs().max().item() for got, want in zip((y, *grads), (ref, *ref_grads), strict=True)
    )


def _bf16() -> dict[str, float]:
    x = torch.randn(1, 2, 6, 5, 7, generator=torch.Generator().manual_seed(0)).bfloat16()
    y, _, _ = instance_norm_triton.forward(x, None, None, 1e-5, 0.01, block=32, programs=4)
    ref = F.leaky_relu(F.instance_norm(x.float()), 0.01)  # fp32 statistics of the bf16 values
    return {"dtype_is_bf16": float(y.dtype == torch.bfloat16), "y": (y.float() - ref).abs().max().item()}


def main() -> None:
    results = {f"{affine}-{slope}-{mean}": _case(affine, slope, shape, mean) for affine, slope, shape, mean in CASES}
    results["bf16"] = _bf16()
    sys.stdout.write(json.dumps(results) + "\n")


if __name__ == "__main__":
    main()
