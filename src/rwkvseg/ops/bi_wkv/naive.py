"""O(T^2) float64 brute force of the Bi-WKV formula: the ground truth every fast path is tested against."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def _row_block(w: Tensor, u: Tensor, k: Tensor, v: Tensor, start: int, stop: int) -> Tensor:
    T = k.shape[1]
    pos = torch.arange(T, device=k.device, dtype=torch.float64)
    rows = pos[start:stop]
    gap = (rows[:, None] - pos[None, :]).abs() - 1  # [R, T]
    logits = -gap[None, :, :, None] * w + k[:, None, :, :]  # [B, R, T, C]
    diagonal = torch.arange(stop - start, device=k.device)
    own = u + k[:, start:stop, :]  # [B, R, C]
    logits = logits.clone()
    logits[:, diagonal, diagonal + start, :] = own
    # softmax over i is the formula's ratio with max-subtraction built in
    weights = torch.softmax(logits, dim=2)
    return (weights * v[:, None, :, :]).sum(2)  # [B, R, C]


def bi_wkv_reference(w: Tensor, u: Tensor, k: Tensor, v: Tensor, block: int = 256) -> Tensor:
    """y[b, t, c] of `bi_wkv.md` by brute force in float64; differentiable.

    Rows of t are computed in checkpointed blocks so T = 8192 fits in memory, forward and backward.
    Returns float64 whatever the input dtype.
    """
    w, u, k, v = (x.to(torch.float64) for x in (w, u, k, v))
    T = k.shape[1]
    blocks = [
        checkpoint(_row_block, w, u, k, v, start, min(start + block, T), use_reentrant=False)
        for start in range(0, T, block)
    ]
    return torch.cat(blocks, dim=1)
