"""Token shifts: Vision-RWKV's Q-Shift on a 2D grid and MMSegRWKV's Bi-Shift along a sequence."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def q_shift(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Q-Shift of tokens x [B, H*W, C] (row-major over size = (H, W)); returns [B, H*W, C].

    Channel quarters take the left, right, upper and lower neighbour (zero at the borders). When C is not a
    multiple of 4 the last group takes the remainder, so every channel is shifted.
    """
    B, N, C = x.shape
    H, W = size
    if H * W != N:
        raise ValueError(f"q_shift: {N} tokens do not form a {H} x {W} grid")
    grid = x.reshape(B, H, W, C)  # [B, H*W, C] -> [B, H, W, C]
    q = C // 4
    left, right, up, down = torch.split(grid, [q, q, q, C - 3 * q], dim=3)
    shifted = torch.cat(
        [
            F.pad(left[:, :, :-1], (0, 0, 1, 0)),  # column j takes column j - 1
            F.pad(right[:, :, 1:], (0, 0, 0, 1)),  # column j takes column j + 1
            F.pad(up[:, :-1], (0, 0, 0, 0, 1, 0)),  # row i takes row i - 1
            F.pad(down[:, 1:], (0, 0, 0, 0, 0, 1)),  # row i takes row i + 1
        ],
        dim=3,
    )
    return shifted.reshape(B, N, C)


def bi_shift(x: Tensor) -> Tensor:
    """Bi-Shift of a sequence x [B, T, C]: the first C // 4 channels take the preceding token, the rest the
    succeeding one, zero at the ends; returns [B, T, C]."""
    q = x.shape[2] // 4
    before = F.pad(x[:, :-1, :q], (0, 0, 1, 0))
    after = F.pad(x[:, 1:, q:], (0, 0, 0, 1))
    return torch.cat([before, after], dim=2)
