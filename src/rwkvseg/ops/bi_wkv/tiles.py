"""Tile policy of the Triton Bi-WKV kernels: sub-chunk length, super-chunk length and channel block per shape
(docs/kernel_design.md, "Tile policy"). Host arithmetic only; shared with the plain-PyTorch `tiled` path, which
walks the same tiles."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class TileConfig:
    """R tokens per sub-chunk (one register tile), G sub-chunks per program (a super-chunk of G * R tokens),
    BC channels per program (one warp: 32 channels one per lane, 16 channels with two lanes per channel sharing
    the R tokens); the super-chunk scans take [scan_rows, scan_BC] tiles. R is shared by forward and backward:
    the backward reads the states the forward stored per sub-chunk. G is capped at about 16 by accuracy: a
    super-chunk's walk composes its sub-chunk decays by products (error ~ G eps)."""

    R: int = 16
    G: int = 16
    BC: int = 32
    G_bwd: int = 16
    BC_bwd: int = 16
    scan_rows: int = 1024
    scan_BC: int = 2


# Programs per launch the walks ran fastest at on an H100 (132 SMs), forward and backward alike: fewer leave
# the SMs idle (a program is one warp on a dependent chain), more cost chunk-scan rows and launches
# (docs/kernel_design.md)
_PROGRAMS = 1024


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) on the host: triton.cdiv is a jit function, and calling it from Python costs microseconds."""
    return -(-a // b)


def _pick_tiles(B: int, T: int, C: int, R: int, widths: tuple[int, ...]) -> tuple[int, int]:
    """(G, BC) with G in {4, 8, 16}, BC in widths, whose program count B * cdiv(C, BC) * cdiv(T, G R) is nearest
    _PROGRAMS on a log scale; on a tie one super-chunk (one launch: host time counts at small shapes), then the
    wider channel block, then the longer super-chunk."""

    def rank(choice: tuple[int, int]):
        G, bc = choice
        n_sup = cdiv(T, G * R)
        distance = abs(math.log(B * cdiv(C, bc) * n_sup / _PROGRAMS))
        return round(distance, 6), n_sup > 1, -bc, -G

    return min(((G, bc) for G in (16, 8, 4) for bc in widths), key=rank)


@functools.lru_cache(maxsize=1024)  # a pure function of three ints, asked on every call
def tile_config(B: int, T: int, C: int) -> TileConfig:
    """The default tiles for B sequences of T tokens and C channels (chosen on an H100, docs/kernel_design.md).
    T is not capped: longer sequences get more super-chunks; a sequence of one super-chunk takes one launch
    forward and one backward. The backward runs 16-channel programs, which measured faster than 32."""
    R = 16
    G, bc = _pick_tiles(B, T, C, R, (32, 16) if C % 32 == 0 else (16,))  # 16: no idle lanes at C = 48, 80...
    G_bwd, _ = _pick_tiles(B, T, C, R, (16,))
    return TileConfig(R=R, G=G, BC=bc, G_bwd=G_bwd, BC_bwd=16)


def scan_launch(B: int, C: int, cfg: TileConfig, n_sup: int) -> tuple[tuple[int, int], int, int, int]:
    """(grid, channel blocks, rows per tile, warps) of a chunk-scan launch over n_sup super-chunk summaries."""
    rows = min(1 << (n_sup - 1).bit_length(), cfg.scan_rows)  # next power of two
    ncb = cdiv(C, cfg.scan_BC)
    warps = max(1, min(8, rows * cfg.scan_BC // 256))
    return (B * ncb, 2), ncb, rows, warps
