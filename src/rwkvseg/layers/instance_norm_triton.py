"""Triton kernels of the fused instance norm + activation (forward and backward) for channels-first maps.

Every (sample, channel) row of x [B, C, *spatial] is one contiguous run of N values. PyTorch's CUDA instance norm
reduces a row with one thread block, which leaves most of the GPU idle when B * C is small (32 rows for MMSegRWKV's
full-resolution blocks). Here each row is cut into chunks, one program per (row, chunk): the statistics come back
as partial (count, mean, M2) per chunk and are merged with Chan's formula on the host side in fp32, so no program
waits on another and no fp32 copy of the map is made. The backward recomputes x_hat from x and the saved
statistics instead of storing it.

act(z) = z for z > 0, slope * z otherwise: slope 0.01 is MONAI's LeakyReLU, 0 a ReLU, 1 no activation.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 1024  # elements per tile
PROGRAMS_PER_SM = 8


@triton.jit
def _stats_kernel(x_ptr, part_ptr, N, CHUNK, SPLITS, BLOCK: tl.constexpr):
    """part[row, split] = (count, mean, M2) of x[row, split * CHUNK : (split + 1) * CHUNK], in fp32.

    Sums run over x - shift with shift the mean of the chunk's first tile, so that M2 = S2 - S1^2 / n does not
    cancel when |mean| >> std.
    """
    row = tl.program_id(0)
    split = tl.program_id(1)
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, N)
    base = x_ptr + row.to(tl.int64) * N
    offs = tl.arange(0, BLOCK)
    first = start + offs
    x0 = tl.load(base + first, mask=first < end, other=0.0).to(tl.float32)
    shift = tl.sum(x0) / tl.minimum(end - start, BLOCK).to(tl.float32)
    s1 = tl.zeros([BLOCK], dtype=tl.float32)
    s2 = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(start, end, BLOCK):
        idx = off + offs
        mask = idx < end
        d = tl.where(mask, tl.load(base + idx, mask=mask, other=0.0).to(tl.float32) - shift, 0.0)
        s1 += d
        s2 += d * d
    n = (end - start).to(tl.float32)
    t1 = tl.sum(s1)
    out = part_ptr + (row * SPLITS + split) * 3
    tl.store(out, n)
    tl.store(out + 1, shift + t1 / n)
    tl.store(out + 2, tl.sum(s2) - t1 * t1 / n)


@triton.jit
def _affine(row, C, w_ptr, b_ptr, AFFINE: tl.constexpr):
    if AFFINE:
        w = tl.load(w_ptr + row % C).to(tl.float32)
        b = tl.load(b_ptr + row % C).to(tl.float32)
    else:
        w = 1.0
        b = 0.0
    return w, b


@triton.jit
def _forward_kernel(
    x_ptr, y_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, N, C, CHUNK, slope, AFFINE: tl.constexpr, BLOCK: tl.constexpr
):
    """y = act((x - mean) * rstd * w + b) over one chunk of one row."""
    row = tl.program_id(0)
    start = tl.program_id(1) * CHUNK
    end = tl.minimum(start + CHUNK, N)
    mean = tl.load(mean_ptr + row)
    rstd = tl.load(rstd_ptr + row)
    w, b = _affine(row, C, w_ptr, b_ptr, AFFINE)
    scale = rstd * w
    base = row.to(tl.int64) * N
    offs = tl.arange(0, BLOCK)
    for off in range(start, end, BLOCK):
        idx = off + offs
        mask = idx < end
        x = tl.load(x_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
        z = (x - mean) * scale + b
        y = tl.where(z > 0, z, z * slope)
        tl.store(y_ptr + base + idx, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_reduce_kernel(
    x_ptr,
    gy_ptr,
    mean_ptr,
    rstd_ptr,
    w_ptr,
    b_ptr,
    part_ptr,
    N,
    C,
    CHUNK,
    SPLITS,
    slope,
    AFFINE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """part[row, split] = (sum g, sum g * x_hat) over one chunk, g = gy * act'(z) the gradient at z = x_hat w + b."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, N)
    mean = tl.load(mean_ptr + row)
    rstd = tl.load(rstd_ptr + row)
    w, b = _affine(row, C, w_ptr, b_ptr, AFFINE)
    base = row.to(tl.int64) * N
    offs = tl.arange(0, BLOCK)
    a1 = tl.zeros([BLOCK], dtype=tl.float32)
    a2 = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(start, end, BLOCK):
        idx = off + offs
        mask = idx < end
        x = tl.load(x_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
        gy = tl.load(gy_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
        xhat = (x - mean) * rstd
        g = tl.where(xhat * w + b > 0, gy, gy * slope)
        a1 += g
        a2 += g * xhat
    out = part_ptr + (row * SPLITS + split) * 2
    tl.store(out, tl.sum(a1))
    tl.store(out + 1, tl.sum(a2))


@triton.jit
def _backward_dx_kernel(
    x_ptr,
    gy_ptr,
    gx_ptr,
    mean_ptr,
    rstd_ptr,
    w_ptr,
    b_ptr,
    sums_ptr,
    N,
    C,
    CHUNK,
    slope,
    AFFINE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """gx = rstd * w * (g - sum(g) / N - x_hat * sum(g * x_hat) / N) over one chunk of one row."""
    row = tl.program_id(0)
    start = tl.program_id(1) * CHUNK
    end = tl.minimum(start + CHUNK, N)
    mean = tl.load(mean_ptr + row)
    rstd = tl.load(rstd_ptr + row)
    w, b = _affine(row, C, w_ptr, b_ptr, AFFINE)
    c1 = tl.load(sums_ptr + row * 2) / N
    c2 = tl.load(sums_ptr + row * 2 + 1) / N
    scale = rstd * w
    base = row.to(tl.int64) * N
    offs = tl.arange(0, BLOCK)
    for off in range(start, end, BLOCK):
        idx = off + offs
        mask = idx < end
        x = tl.load(x_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
        gy = tl.load(gy_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
        xhat = (x - mean) * rstd
        g = tl.where(xhat * w + b > 0, gy, gy * slope)
        gx = scale * (g - c1 - xhat * c2)
        tl.store(gx_ptr + base + idx, gx.to(gx_ptr.dtype.element_ty), mask=mask)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _chunk(rows: int, n: int, device: torch.device, block: int, programs: int | None) -> tuple[int, int]:
    """(chunk, splits): chunks of whole tiles, enough (row, chunk) programs to fill the device."""
    if programs is None:
        sms = (
            _sm_count(device.index if device.index is not None else torch.cuda.current_device())
            if device.type == "cuda"
            else 4
        )
        programs = PROGRAMS_PER_SM * sms
    splits = max(1, min(triton.cdiv(programs, rows), triton.cdiv(n, block)))
    chunk = triton.cdiv(triton.cdiv(n, splits), block) * block
    return chunk, triton.cdiv(n, chunk)


def _rows(x: Tensor) -> tuple[int, int, int]:
    if x.dim() < 3 or not x.is_contiguous():
        raise ValueError(f"instance norm kernels take a contiguous [B, C, *spatial] map, got {tuple(x.shape)}")
    return x.shape[0] * x.shape[1], x.shape[1], x[0, 0].numel()


def forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    slope: float,
    block: int = BLOCK,
    programs: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, rstd): y = act(InstanceNorm(x) * weight + bias) in x's dtype; mean, rstd [B * C] in fp32."""
    rows, C, n = _rows(x)
    chunk, splits = _chunk(rows, n, x.device, block, programs)
    part = torch.empty(rows, splits, 3, device=x.device, dtype=torch.float32)
    _stats_kernel[(rows, splits)](x, part, n, chunk, splits, BLOCK=block)
    count, mean_i, m2_i = part.unbind(-1)  # [rows, splits] each
    mean = mean_i[:, 0] + (count * (mean_i - mean_i[:, :1])).sum(1) / n  # about the first chunk: no cancellation
    m2 = m2_i.sum(1) + (count * (mean_i - mean[:, None]).square()).sum(1)  # Chan's merge of the chunks
    rstd = torch.rsqrt(m2 / n + eps)
    y = torch.empty_like(x)
    affine = weight is not None
    _forward_kernel[(rows, splits)](
        x, y, mean, rstd, weight if affine else x, bias if affine else x, n, C, chunk, slope, AFFINE=affine, BLOCK=block
    )
    return y, mean, rstd


def backward(
    gy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    slope: float,
    block: int = BLOCK,
    programs: int | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(gx, gweight, gbias) of forward's y; the weight and bias gradients are None without affine."""
    rows, C, n = _rows(x)
    gy = gy.contiguous()
    chunk, splits = _chunk(rows, n, x.device, block, programs)
    affine = weight is not None
    w, b = (weight, bias) if affine else (x, x)
    part = torch.empty(rows, splits, 2, device=x.device, dtype=torch.float32)
    _backward_reduce_kernel[(rows, splits)](
        x, gy, mean, rstd, w, b, part, n, C, chunk, splits, slope, AFFINE=affine, BLOCK=block
    )
    sums = part.sum(1)  # [rows, 2]: sum g, sum g * x_hat
    gx = torch.empty_like(x)
    _backward_dx_kernel[(rows, splits)](
        x, gy, gx, mean, rstd, w, b, sums, n, C, chunk, slope, AFFINE=affine, BLOCK=block
    )
    if not affine:
        return gx, None, None
    per_channel = sums.view(-1, C, 2).sum(0)  # [C, 2]
    # copies, not views of per_channel: a custom op's outputs may not alias each other
    return gx, per_channel[:, 1].to(weight.dtype, copy=True), per_channel[:, 0].to(bias.dtype, copy=True)
