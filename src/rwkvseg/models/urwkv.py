"""U-RWKV and U-RWKV-s (Ye et al., MICCAI 2025): a CMUNeXt-style U-shaped CNN with one direction-adaptive RWKV
module (DARM: Dual-RWKV over QuadScan) at the 1/16 bottleneck. Spec: docs/urwkv.md.

Ablations are config fields, not subclasses:
`create_model("urwkv", 3, 1, dual=False, scan_orders=("rows",), deep_stage=False, token_shift="none")`.

Where the paper and its released code disagree, this follows the paper: Q-Shift is the real Vision-RWKV Q-Shift
(the code swaps in a fixed token permutation), the transposed Dual branch is transposed back (the code adds it
untransposed, right only for square maps), and the deep stage has no SE gate by default (the code has none
despite the name; deep_se adds one). Q-Shift runs on each scanned sequence's own grid (token_shift="q_shift");
"q_shift_map" takes it on the map for every order instead. The released network itself, the one behind the
paper's numbers, is `token_shift="permutation", dual_transpose_back=False` (square maps only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from monai.networks.blocks import ChannelSELayer
from torch import Tensor, nn

from rwkvseg.layers.conv import (
    ChannelFusion,
    ConvNormAct,
    UpConv,
    batch_norm_nd,
    conv_nd,
    crop_to,
    decode,
    encode,
    pad_to_multiple,
)
from rwkvseg.layers.gemm_conv import use_gemm_convs
from rwkvseg.layers.padded_conv import use_padded_thin_convs
from rwkvseg.layers.vrwkv import TOKEN_SHIFTS, QuadScanBlock
from rwkvseg.ops import QUAD_SCAN_ORDERS

from .registry import Family

SPATIAL_DIMS = 2
STRIDE = 16  # four 2x poolings: inputs are padded to a multiple of this


@dataclass(frozen=True)
class URWKVConfig:
    in_channels: int
    num_classes: int
    dims: tuple[int, ...] = (16, 32, 128, 160, 256)
    expansion: int = 4
    dual: bool = True  # DARM = Block(X) + Block(X^T)^T; False: Block(X)
    dual_transpose_back: bool = True  # False: Block(X) + Block(X^T), as the released code adds it (square maps)
    scan_orders: tuple[str, ...] = QUAD_SCAN_ORDERS
    deep_stage: bool = True  # SASE deep form in stage 5; False: shallow form there too
    token_shift: str = "q_shift"  # one of layers.vrwkv.TOKEN_SHIFTS
    deep_convs: int = 7  # depthwise cascade length of the deep form
    deep_se: bool = False  # squeeze-excitation gate on the deep form's output (absent from the released code)
    hidden_ratio: int = 4  # ChannelMix hidden width / C
    literal: bool = False  # DARM without the exact shortcuts: every order and dual branch run separately
    gemm_convs: bool = False  # 1x1 convolutions of channels-last maps as GEMMs (layers/gemm_conv.py); same weights
    pad_thin_convs: bool = False  # the 3-channel stem padded to 8 on channels-last maps (layers/padded_conv.py)

    def __post_init__(self):
        object.__setattr__(self, "dims", tuple(self.dims))
        object.__setattr__(self, "scan_orders", tuple(self.scan_orders))
        if len(self.dims) != 5:
            raise ValueError(f"URWKVConfig.dims must list 5 stage widths, got {self.dims}")
        if self.deep_stage and self.dims[4] % 16:
            raise ValueError(
                f"URWKVConfig: the deep form splits dims[4] / 8 in halves, so dims[4] must be a multiple of 16, "
                f"got {self.dims[4]}; change dims or set deep_stage=False"
            )
        if not self.scan_orders or any(o not in QUAD_SCAN_ORDERS for o in self.scan_orders):
            raise ValueError(
                f"URWKVConfig.scan_orders {self.scan_orders} must be a non-empty subset of {QUAD_SCAN_ORDERS}"
            )
        if self.token_shift not in TOKEN_SHIFTS:
            raise ValueError(f"URWKVConfig.token_shift {self.token_shift!r}: choose one of {TOKEN_SHIFTS}")


VARIANTS = {
    "urwkv": dict(dims=(16, 32, 128, 160, 256), expansion=4),
    "urwkv_s": dict(dims=(8, 16, 32, 64, 128), expansion=2),
    "urwkv_test": dict(dims=(4, 8, 8, 16, 32), expansion=2),
}


class SASEShallow(nn.Module):
    """High-resolution encoder stage: t = BN(GELU(DW3x3(x))); u = GELU(BN(1x1(x + t))) with e * C_in channels;
    y = GELU(BN(1x1(u))) with C_out channels, plus x when C_in == C_out."""

    def __init__(self, in_channels: int, out_channels: int, expansion: int):
        super().__init__()
        d = SPATIAL_DIMS
        self.depthwise = ConvNormAct(d, in_channels, in_channels, 3, groups=in_channels, order="conv-act-norm")
        self.expand = ConvNormAct(d, in_channels, expansion * in_channels, 1)
        self.project = ConvNormAct(d, expansion * in_channels, out_channels, 1)
        self.residual = in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        y = self.project(self.expand(x + self.depthwise(x)))
        return y + x if self.residual else y


class SASEDeep(nn.Module):
    """Compact deepest stage: z = BN(1x1(x)) with C_out / 8 channels split into halves a, b; a cascade of
    depthwise 3x3 convs b_j = DW_j(b_{j-1}) grows the receptive field; y = BN(1x1([a + b, b_1 .. b_n])),
    optionally gated by squeeze-excitation (MONAI's ChannelSELayer, reduction 16)."""

    def __init__(self, in_channels: int, out_channels: int, convs: int = 7, se: bool = False):
        super().__init__()
        d = SPATIAL_DIMS
        half = out_channels // 16
        self.reduce = nn.Sequential(conv_nd(d, in_channels, 2 * half, 1), batch_norm_nd(d, 2 * half))
        self.cascade = nn.ModuleList(conv_nd(d, half, half, 3, padding=1, groups=half) for _ in range(convs))
        self.expand = nn.Sequential(conv_nd(d, (convs + 1) * half, out_channels, 1), batch_norm_nd(d, out_channels))
        self.se = ChannelSELayer(d, out_channels, r=16) if se else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.reduce(x).chunk(2, dim=1)  # [B, C_in, h, w] -> 2 x [B, C_out / 16, h, w]
        parts = [a + b]
        for conv in self.cascade:
            b = conv(b)
            parts.append(b)
        return self.se(self.expand(torch.cat(parts, dim=1)))  # [B, (n + 1) C_out / 16, h, w] -> [B, C_out, h, w]


def _halves(t: Tensor) -> tuple[Tensor, Tensor]:
    """The two halves of a batch [2B, ...] -> 2 x [B, ...]; slices, which ONNX export keeps as Slice (chunk becomes
    a SplitToSequence that onnxscript's constant folding fails on when the batch is dynamic)."""
    half = t.shape[0] // 2
    return t[:half], t[half:]


class DARM(nn.Module):
    """Direction-adaptive RWKV module: Block(X) + Block(X^T)^T with one shared QuadScan block (dual), or
    Block(X) alone. The released code forgets the transpose back, which only works for square maps;
    transpose_back=False reproduces it (Block(X) + Block(X^T)).

    When the block's spatial mixing is transpose-equivariant (all four orders, or any set closed under
    rows <-> cols, with the scan-following Q-shift or none), the two branches share it exactly and differ only
    in the ChannelMix, whose Q-shift quarters swap left/up and right/down on the transposed map; the forward
    then mixes spatially once. literal=True evaluates both branches and every order separately, as the spec
    reads (same outputs up to rounding, the paper's MAC count).
    """

    def __init__(
        self,
        dim: int,
        dual: bool,
        orders: tuple[str, ...],
        token_shift: str,
        hidden_ratio: int,
        literal: bool,
        transpose_back: bool = True,
    ):
        super().__init__()
        self.dual = dual
        self.literal = literal
        self.transpose_back = transpose_back
        self.block = QuadScanBlock(dim, orders, token_shift, hidden_ratio)

    def forward(self, x: Tensor) -> Tensor:
        block = self.block
        if not self.dual:
            return block(x, per_order=self.literal)
        square = x.shape[2] == x.shape[3]
        if not self.transpose_back:
            if not square:
                raise ValueError(
                    f"DARM: dual_transpose_back=False adds the transposed branch as it is (the released code), "
                    f"which needs a square map, got {x.shape[2]} x {x.shape[3]}; give square inputs or set "
                    "dual_transpose_back=True"
                )
            if self.literal:
                return block(x, per_order=True) + block(x.transpose(2, 3), per_order=True)
            y, yt = _halves(block(torch.cat([x, x.transpose(2, 3)])))
            return y + yt  # the transposed branch not transposed back
        if self.literal:
            return block(x, per_order=True) + block(x.transpose(2, 3), per_order=True).transpose(2, 3)
        if block.spatial_transpose_equivariant:
            z = block.mix_spatial(x)
            zt = z.transpose(2, 3)
            if square:
                # both branches in one batched call: the block has no batch-coupled statistics
                y, yt = _halves(block.mix_channel(torch.cat([z, zt])))
            else:
                y, yt = block.mix_channel(z), block.mix_channel(zt)
        elif square:
            y, yt = _halves(block(torch.cat([x, x.transpose(2, 3)])))
        else:
            y, yt = block(x), block(x.transpose(2, 3))
        return y + yt.transpose(2, 3)


class URWKV(nn.Module):
    """[B, C_in, H, W] -> logits [B, num_classes, H, W] for any H, W (padded to a multiple of 16 inside)."""

    def __init__(self, config: URWKVConfig):
        super().__init__()
        self.config = config
        c, e, d = config.dims, config.expansion, SPATIAL_DIMS
        self.stem = ConvNormAct(d, config.in_channels, c[0], 3)
        self.encoders = nn.ModuleList(
            [SASEShallow(c[0], c[0], e)] + [SASEShallow(c[i - 1], c[i], e) for i in range(1, 4)]
        )
        self.deepest = (
            SASEDeep(c[3], c[4], config.deep_convs, config.deep_se) if config.deep_stage else SASEShallow(c[3], c[4], e)
        )
        self.pool = nn.MaxPool2d(2)
        self.darm = DARM(
            c[4],
            config.dual,
            config.scan_orders,
            config.token_shift,
            config.hidden_ratio,
            config.literal,
            config.dual_transpose_back,
        )
        self.ups = nn.ModuleList(UpConv(d, c[i + 1], c[i]) for i in reversed(range(4)))
        self.fusions = nn.ModuleList(ChannelFusion(d, 2 * c[i], c[i], e) for i in reversed(range(4)))
        self.head = conv_nd(d, c[0], config.num_classes, 1)
        if config.gemm_convs:
            use_gemm_convs(self)
        if config.pad_thin_convs:  # after the GEMM twins: a thin pointwise convolution stays a GEMM
            use_padded_thin_convs(self)

    @property
    def static_export(self) -> bool:
        """True when the forward needs square maps (the released code's Dual branch): ONNX export is static."""
        return self.config.dual and not self.config.dual_transpose_back

    def forward(self, x: Tensor) -> Tensor:
        x, size = pad_to_multiple(x, STRIDE)
        skips = encode(self.stem(x), self.encoders, self.pool)  # x1 .. x4 at H .. H/8
        x = self.darm(self.deepest(self.pool(skips[-1])))  # [B, C5, H/16, W/16]
        x = decode(x, skips, self.ups, self.fusions)
        return crop_to(self.head(x), size)


FAMILY = Family.of_config(URWKV, URWKVConfig, VARIANTS)
