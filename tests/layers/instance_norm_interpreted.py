"""Run the fused instance norm's Triton kernels on the CPU (TRITON_INTERPRET=1 must be set before triton is
imported, hence a process of its own) against float64 nn.InstanceNorm + activation; prints one JSON line of
max errors per case, beside the largest error of PyTorch's own fp32 ops on the same inputs ("torch_fp32").
`python instance_norm_interpreted.py channels_first|channels_last` picks the kernels: contiguous maps, or
channels-last ones (4-D and 5-D); y and gx must come back in x's layout ("layout_kept").
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
# channels-last: (affine, slope, shape, mean, block_c); block 32 with 2 or 4 channels per tile gives tiles of 16 or 8
# positions, several chunks per sample and several channel blocks, the last of each ragged (C = 5, 6, 7)
CL_CASES = [
    (False, 1.0, (2, 5, 6, 7), 3.0, 4),
    (True, 0.01, (2, 7, 5, 6), 3.0, 2),
    (True, 0.01, (1, 5, 3, 5, 7), 3.0, 4),
    (False, 0.0, (2, 6, 3, 3, 4), 3.0, 4),
    (True, 0.0, (1, 5, 3, 5, 7), 1000.0, 4),
]


def _case(
    affine: bool, slope: float, shape: tuple[int, ...], mean: float, block_c: int | None = None
) -> dict[str, float]:
    """Errors of forward and backward against float64; with block_c, x is channels-last (gy stays contiguous, so
    the backward's conversion of gy to x's layout is part of the check)."""
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
    layout = _channels_last(x) if block_c else torch.contiguous_format
    x = x.contiguous(memory_format=layout)
    tiles = dict(block=32 if block_c else 16, programs=20, block_c=block_c)
    y, m, rstd = instance_norm_triton.forward(x, w, b, 1e-5, slope, **tiles)
    grads = instance_norm_triton.backward(gy, x, w, b, m, rstd, slope, **tiles)
    errors["y"] = (y.double() - ref).abs().max().item()
    errors["mean"] = (m.double() - x64.mean(tuple(range(2, x.dim()))).flatten()).abs().max().item()
    for name, got, want in zip(("gx", "gweight", "gbias"), grads, ref_grads, strict=False):
        errors[name] = (got.double() - want).abs().max().item()
    if not affine:
        errors["no_affine_grads"] = float(grads[1] is not None or grads[2] is not None)
    errors["layout_kept"] = float(_kept(y, layout) and _kept(grads[0], layout))
    return errors


def _channels_last(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.dim() == 4 else torch.channels_last_3d


def _kept(t: torch.Tensor, layout: torch.memory_format) -> bool:
    """t is in layout (and, for a channels-last one, not also plain contiguous)."""
    return t.is_contiguous(memory_format=layout) and (layout == torch.contiguous_format or not t.is_contiguous())


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


def _low_precision(dtype: torch.dtype, shape: tuple[int, ...]) -> dict[str, float]:
    """A channels-last map in bf16 / fp16 against fp32 ops on the same values: y and gx keep dtype and layout."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(dtype)
    w, b = torch.rand(shape[1], generator=g) + 0.5, torch.randn(shape[1], generator=g)
    gy = torch.randn(shape, generator=g).to(dtype)
    leaves = [t.float().requires_grad_() for t in (x, w, b)]
    ref = F.leaky_relu(F.instance_norm(leaves[0], weight=leaves[1], bias=leaves[2], eps=1e-5), 0.01)
    ref_gx, ref_gw, _ = torch.autograd.grad(ref, leaves, gy.float())  # fp32 statistics of the low-precision values
    layout = _channels_last(x)
    x = x.contiguous(memory_format=layout)
    y, m, rstd = instance_norm_triton.forward(x, w, b, 1e-5, 0.01, block=32, programs=4, block_c=8)
    gx, gw, _ = instance_norm_triton.backward(gy, x, w, b, m, rstd, 0.01, block=32, programs=4, block_c=8)
    return {
        "dtype_kept": float(y.dtype == gx.dtype == dtype),
        "layout_kept": float(_kept(y, layout) and _kept(gx, layout)),
        "y": ((y.float() - ref).abs().max() / ref.abs().max()).item(),
        "gx": ((gx.float() - ref_gx).abs().max() / ref_gx.abs().max()).item(),
        "gweight": ((gw - ref_gw).abs().max() / ref_gw.abs().max()).item(),
    }


def main(suite: str) -> None:
    if suite == "channels_first":
        results = {f"{a}-{s}-{m}": _case(a, s, shape, m) for a, s, shape, m in CASES}
        results["bf16"] = _bf16()
    elif suite == "channels_last":
        results = {f"{a}-{s}-{shape}-{m}": _case(a, s, shape, m, bc) for a, s, shape, m, bc in CL_CASES}
        results["bf16"] = _low_precision(torch.bfloat16, (1, 12, 5, 3, 7))
        results["fp16"] = _low_precision(torch.float16, (1, 12, 9, 7))
    else:
        raise SystemExit(f"unknown suite {suite!r}: pass channels_first or channels_last")
    sys.stdout.write(json.dumps(results) + "\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "channels_first")
