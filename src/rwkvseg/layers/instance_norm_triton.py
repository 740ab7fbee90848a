"""Triton kernels of the fused instance norm + activation (forward and backward), for contiguous (channels-first)
and channels-last maps.

Channels-first [B, C, *spatial]: every (sample, channel) row is one contiguous run of N values. PyTorch's CUDA
instance norm reduces a row with one thread block, which leaves most of the GPU idle when B * C is small (32 rows
for MMSegRWKV's full-resolution blocks). Here each row is cut into chunks, one program per (row, chunk): the
statistics come back as partial (count, mean, M2) per chunk and are merged with Chan's formula on the host side in
fp32, so no program waits on another and no fp32 copy of the map is made. The backward recomputes x_hat from x and
the saved statistics instead of storing it.

Channels-last (4-D `torch.channels_last`, 5-D `torch.channels_last_3d`, and not also plain contiguous): each sample
is an [N, C] matrix with C innermost. One program per (sample, chunk of positions, block of channels) walks
[BLOCK_N, BLOCK_C] tiles (contiguous along C) and leaves the same partial (count, mean, M2) per (sample, channel,
chunk), merged by the same host code; the backward's partial sums likewise. y and gx come back channels-last (gy is
converted to x's layout), so a channels-last network keeps its layout through the norm. Both paths share the chunk
policy (`_chunk`: enough programs to fill the device, PROGRAMS_PER_SM per SM). The channels-last kernels have not
yet run on a GPU: their speed (and MAX_BLOCK_C, the tile shape) is not measured; they are checked against float64
under TRITON_INTERPRET=1 on the CPU.

act(z) = z for z > 0, slope * z otherwise: slope 0.01 is MONAI's LeakyReLU, 0 a ReLU, 1 no activation.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from .layouts import empty_in_layout, instance_norm_layout

BLOCK = 1024  # elements per tile
PROGRAMS_PER_SM = 8
MAX_BLOCK_C = 64  # channels per channels-last tile: 128 bytes of bf16 per position


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
def _act(z, slope):
    """act(z) = z for z > 0, slope * z otherwise (every kernel's activation)."""
    return tl.where(z > 0, z, z * slope)


@triton.jit
def _act_grad(x, gy, mean, rstd, w, b, slope):
    """(g, x_hat): g = gy * act'(z), the gradient at z = x_hat * w + b, with x_hat = (x - mean) * rstd."""
    xhat = (x - mean) * rstd
    return tl.where(xhat * w + b > 0, gy, gy * slope), xhat


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
        y = _act((x - mean) * scale + b, slope)
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
        g, xhat = _act_grad(x, gy, mean, rstd, w, b, slope)
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
        g, xhat = _act_grad(x, gy, mean, rstd, w, b, slope)
        gx = scale * (g - c1 - xhat * c2)
        tl.store(gx_ptr + base + idx, gx.to(gx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _cl_tile(x_base, off, end, cols, cmask, C, BLOCK_N: tl.constexpr):
    """Offsets [BLOCK_N, BLOCK_C] of the positions off.. of a channels-last sample at x_base, and their mask."""
    pos = off + tl.arange(0, BLOCK_N)
    idx = x_base + pos.to(tl.int64)[:, None] * C + cols[None, :]  # int64: N * C of one sample may pass 2^31
    return idx, (pos < end)[:, None] & cmask[None, :]


@triton.jit
def _cl_affine(cols, cmask, w_ptr, b_ptr, AFFINE: tl.constexpr):
    """(w, b) as [1, BLOCK_C] rows against a tile, or the scalars 1, 0 without affine."""
    if AFFINE:
        w = tl.load(w_ptr + cols, mask=cmask, other=1.0).to(tl.float32)[None, :]
        b = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    else:
        w = 1.0
        b = 0.0
    return w, b


@triton.jit
def _cl_stats_kernel(x_ptr, part_ptr, N, C, CHUNK, SPLITS, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """part[sample * C + c, split] = (count, mean, M2) of channel c over positions split * CHUNK .. of one sample of a
    channels-last map [B, N, C], in fp32; shifted by each channel's mean over the chunk's first tile (no
    cancellation), as in _stats_kernel."""
    sample = tl.program_id(0)
    split = tl.program_id(1)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, N)
    base = sample.to(tl.int64) * N * C
    idx, mask = _cl_tile(base, start, end, cols, cmask, C, BLOCK_N)
    x0 = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    shift = tl.sum(x0, axis=0) / tl.minimum(end - start, BLOCK_N).to(tl.float32)  # [BLOCK_C]
    s1 = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
    for off in range(start, end, BLOCK_N):
        idx, mask = _cl_tile(base, off, end, cols, cmask, C, BLOCK_N)
        d = tl.where(mask, tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32) - shift[None, :], 0.0)
        s1 += d
        s2 += d * d
    n = (end - start).to(tl.float32)
    t1 = tl.sum(s1, axis=0)
    out = part_ptr + ((sample * C + cols) * SPLITS + split) * 3
    tl.store(out, tl.zeros([BLOCK_C], dtype=tl.float32) + n, mask=cmask)
    tl.store(out + 1, shift + t1 / n, mask=cmask)
    tl.store(out + 2, tl.sum(s2, axis=0) - t1 * t1 / n, mask=cmask)


@triton.jit
def _cl_forward_kernel(
    x_ptr,
    y_ptr,
    mean_ptr,
    rstd_ptr,
    w_ptr,
    b_ptr,
    N,
    C,
    CHUNK,
    slope,
    AFFINE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """y = act((x - mean) * rstd * w + b) over one chunk of positions and one block of channels of a sample."""
    sample = tl.program_id(0)
    start = tl.program_id(1) * CHUNK
    end = tl.minimum(start + CHUNK, N)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mean = tl.load(mean_ptr + sample * C + cols, mask=cmask, other=0.0)[None, :]
    rstd = tl.load(rstd_ptr + sample * C + cols, mask=cmask, other=0.0)[None, :]
    w, b = _cl_affine(cols, cmask, w_ptr, b_ptr, AFFINE)
    scale = rstd * w
    base = sample.to(tl.int64) * N * C
    for off in range(start, end, BLOCK_N):
        idx, mask = _cl_tile(base, off, end, cols, cmask, C, BLOCK_N)
        x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        y = _act((x - mean) * scale + b, slope)
        tl.store(y_ptr + idx, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _cl_backward_reduce_kernel(
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
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """part[sample * C + c, split] = (sum g, sum g * x_hat) of channel c over one chunk of positions of a sample."""
    sample = tl.program_id(0)
    split = tl.program_id(1)
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, N)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mean = tl.load(mean_ptr + sample * C + cols, mask=cmask, other=0.0)[None, :]
    rstd = tl.load(rstd_ptr + sample * C + cols, mask=cmask, other=0.0)[None, :]
    w, b = _cl_affine(cols, cmask, w_ptr, b_ptr, AFFINE)
    base = sample.to(tl.int64) * N * C
    a1 = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
    a2 = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
    for off in range(start, end, BLOCK_N):
        idx, mask = _cl_tile(base, off, end, cols, cmask, C, BLOCK_N)
        x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        gy = tl.load(gy_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        g, xhat = _act_grad(x, gy, mean, rstd, w, b, slope)
        a1 += g
        a2 += g * xhat
    out = part_ptr + ((sample * C + cols) * SPLITS + split) * 2
    tl.store(out, tl.sum(a1, axis=0), mask=cmask)
    tl.store(out + 1, tl.sum(a2, axis=0), mask=cmask)


@triton.jit
def _cl_backward_dx_kernel(
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
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """gx = rstd * w * (g - sum(g) / N - x_hat * sum(g * x_hat) / N) over one chunk and channel block of a sample."""
    sample = tl.program_id(0)
    start = tl.program_id(1) * CHUNK
    end = tl.minimum(start + CHUNK, N)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    rows = sample * C + cols
    mean = tl.load(mean_ptr + rows, mask=cmask, other=0.0)[None, :]
    rstd = tl.load(rstd_ptr + rows, mask=cmask, other=0.0)[None, :]
    w, b = _cl_affine(cols, cmask, w_ptr, b_ptr, AFFINE)
    c1 = (tl.load(sums_ptr + rows * 2, mask=cmask, other=0.0) / N)[None, :]
    c2 = (tl.load(sums_ptr + rows * 2 + 1, mask=cmask, other=0.0) / N)[None, :]
    scale = rstd * w
    base = sample.to(tl.int64) * N * C
    for off in range(start, end, BLOCK_N):
        idx, mask = _cl_tile(base, off, end, cols, cmask, C, BLOCK_N)
        x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        gy = tl.load(gy_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        g, xhat = _act_grad(x, gy, mean, rstd, w, b, slope)
        gx = scale * (g - c1 - xhat * c2)
        tl.store(gx_ptr + idx, gx.to(gx_ptr.dtype.element_ty), mask=mask)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _chunk(rows: int, n: int, device: torch.device, block: int, programs: int | None) -> tuple[int, int]:
    """(chunk, splits) of n positions: chunks of whole tiles of block positions, enough (row, chunk) programs to fill
    the device; a row is a (sample, channel) of a contiguous map or a (sample, channel block) of a channels-last one."""
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


def _merge(part: Tensor, n: int, eps: float) -> tuple[Tensor, Tensor]:
    """(mean, rstd) [rows] from part [rows, splits, 3] = (count, mean, M2) per chunk, merged in fp32."""
    count, mean_i, m2_i = part.unbind(-1)  # [rows, splits] each
    mean = mean_i[:, 0] + (count * (mean_i - mean_i[:, :1])).sum(1) / n  # about the first chunk: no cancellation
    m2 = m2_i.sum(1) + (count * (mean_i - mean[:, None]).square()).sum(1)  # Chan's merge of the chunks
    return mean, torch.rsqrt(m2 / n + eps)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """How the kernels cover a map: a contiguous one by (row, chunk) programs, row = (sample, channel); a
    channels-last one by (sample, chunk, channel block) programs over [BLOCK_N, BLOCK_C] tiles."""

    layout: torch.memory_format
    grid: tuple[int, ...]
    chunk: int
    splits: int
    meta: dict[str, int]  # the kernels' tile sizes: BLOCK, or BLOCK_N and BLOCK_C

    @property
    def channels_last(self) -> bool:
        return self.layout != torch.contiguous_format


def _layout(x: Tensor) -> torch.memory_format:
    """layouts.instance_norm_layout(x), the layout the op hands the kernels; any other strides are refused."""
    layout = instance_norm_layout(x)
    if x.dim() < 3 or not x.is_contiguous(memory_format=layout):
        raise ValueError(
            f"instance norm kernels take a [B, C, *spatial] map that is contiguous or channels-last (4-D or 5-D), "
            f"got shape {tuple(x.shape)} with strides {x.stride()}: call .contiguous() first"
        )
    return layout


def _plan(x: Tensor, block: int, programs: int | None, block_c: int | None) -> _Plan:
    """The grid of x's layout: channels-last tiles of block elements, block_c (default: C's next power of 2, at most
    MAX_BLOCK_C) channels wide; the chunk policy (_chunk) counts a (sample, channel block) as a row."""
    layout = _layout(x)
    B, C, n = x.shape[0], x.shape[1], x[0, 0].numel()
    if layout == torch.contiguous_format:
        chunk, splits = _chunk(B * C, n, x.device, block, programs)
        return _Plan(layout, (B * C, splits), chunk, splits, {"BLOCK": block})
    block_c = block_c or min(triton.next_power_of_2(C), MAX_BLOCK_C, block)
    if block_c & (block_c - 1) or block % block_c:
        raise ValueError(f"block_c={block_c} must be a power of 2 that divides block={block}")
    block_n = block // block_c
    cblocks = triton.cdiv(C, block_c)
    chunk, splits = _chunk(B * cblocks, n, x.device, block_n, programs)
    return _Plan(layout, (B, splits, cblocks), chunk, splits, {"BLOCK_N": block_n, "BLOCK_C": block_c})


def forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    slope: float,
    block: int = BLOCK,
    programs: int | None = None,
    block_c: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, rstd): y = act(InstanceNorm(x) * weight + bias) in x's dtype and layout (contiguous or
    channels-last); mean, rstd [B * C] in fp32. block: elements per tile; block_c: channels per channels-last tile
    (a power of 2 dividing block; by default C's next power of 2, at most MAX_BLOCK_C)."""
    plan = _plan(x, block, programs, block_c)
    C, n = x.shape[1], x[0, 0].numel()
    affine = weight is not None
    w, b = (weight, bias) if affine else (x, x)
    part = torch.empty(x.shape[0] * C, plan.splits, 3, device=x.device, dtype=torch.float32)
    if plan.channels_last:
        _cl_stats_kernel[plan.grid](x, part, n, C, plan.chunk, plan.splits, **plan.meta)
    else:
        _stats_kernel[plan.grid](x, part, n, plan.chunk, plan.splits, **plan.meta)
    mean, rstd = _merge(part, n, eps)
    y = empty_in_layout(x, plan.layout)
    kernel = _cl_forward_kernel if plan.channels_last else _forward_kernel
    kernel[plan.grid](x, y, mean, rstd, w, b, n, C, plan.chunk, slope, AFFINE=affine, **plan.meta)
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
    block_c: int | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(gx, gweight, gbias) of forward's y, gx in x's layout (gy is converted to it); the weight and bias gradients
    are None without affine."""
    plan = _plan(x, block, programs, block_c)
    C, n = x.shape[1], x[0, 0].numel()
    gy = gy.contiguous(memory_format=plan.layout)
    affine = weight is not None
    w, b = (weight, bias) if affine else (x, x)
    part = torch.empty(x.shape[0] * C, plan.splits, 2, device=x.device, dtype=torch.float32)
    reduce = _cl_backward_reduce_kernel if plan.channels_last else _backward_reduce_kernel
    reduce[plan.grid](x, gy, mean, rstd, w, b, part, n, C, plan.chunk, plan.splits, slope, AFFINE=affine, **plan.meta)
    sums = part.sum(1)  # [B * C, 2]: sum g, sum g * x_hat
    gx = empty_in_layout(x, plan.layout)
    dx = _cl_backward_dx_kernel if plan.channels_last else _backward_dx_kernel
    dx[plan.grid](x, gy, gx, mean, rstd, w, b, sums, n, C, plan.chunk, slope, AFFINE=affine, **plan.meta)
    if not affine:
        return gx, None, None
    per_channel = sums.view(-1, C, 2).sum(0)  # [C, 2]
    # copies, not views of per_channel: a custom op's outputs may not alias each other
    return gx, per_channel[:, 1].to(weight.dtype, copy=True), per_channel[:, 0].to(bias.dtype, copy=True)
