"""MMSegRWKV: 3D multimodal MRI segmentation with a windowed Dual-View RWKV encoder and a UNETR-style decoder.

Input [B, M, T, H, W] (M modalities, T the slice axis), output logits [B, K, T, H, W]. Any spatial size works:
the volume is zero-padded at the far end of each axis to a multiple of the total stride (4 * 2^(stages-1) = 32,
or 16 with stem_stride=2; one more stride on the last axis when the bottleneck would otherwise hold a single voxel)
and the logits are cropped back. See docs/mmsegrwkv.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn.functional as F
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrUpBlock
from torch import Tensor, nn

from rwkvseg.layers.dualview import WindowedDualViewStage
from rwkvseg.layers.gemm_conv import use_gemm_convs
from rwkvseg.layers.norm import LayerNormChannelsFirst, use_fast_instance_norm, use_fused_instance_norm
from rwkvseg.layers.padded_conv import use_padded_thin_convs
from rwkvseg.layers.resfm import ChannelResFM, ModalResFM
from rwkvseg.layers.s2d_conv import use_s2d_convs

from .registry import Family

RESFM_MODES = ("modal", "stage", "none")


@dataclass(frozen=True)
class MMSegRWKVConfig:
    in_channels: int
    num_classes: int
    widths: tuple[int, ...] = (32, 64, 128, 256)
    depths: tuple[int, ...] = (2, 2, 2, 2)
    windows: tuple[int, ...] = (8, 8, 4, 4)  # slices per window, per stage
    decoder_hidden: int = 768  # bottleneck width of the decoder
    full_res_width: int = 32  # width of the three full-resolution conv blocks (most of the compute)
    resfm: str = "modal"
    fm_channels: int = 2  # ResFM embedding channels per modality ("modal")
    hidden_ratio: int = 4  # ChannelMix hidden width / C
    skip_mlp_ratio: int = 2
    norm_name: str = "instance"
    # CUDA instance norms through split reductions: measured on one H100 at 1 x 4 x 128^3 (bf16 autocast) 59.0 ->
    # 32.8 ms inference but 1.16 -> 1.67 GB peak memory (fp32 temporaries); off by default so the decoder's
    # numbers stay comparable with MONAI baselines using the same stock norm
    fast_norm: bool = False
    # the decoder's instance norms as fused Triton ops on CUDA (layers/norm.py), each res block's first norm with
    # its LeakyReLU: fp32 statistics, split reductions, no fp32 temporaries; the CPU runs the stock ops either way
    fused_norm: bool = False
    # 1x1x1 convolutions of channels-last maps and the kernel == stride transposed convolutions as GEMMs
    # (layers/gemm_conv.py): on an H200 cuDNN ran the full-resolution ones at 0.4-33 TFLOP/s (scripts/conv_rates.py);
    # same parameters and values, so released weights load either way
    gemm_convs: bool = False
    # convolutions of fewer than 8 (or not a multiple of 8) input channels, on channels-last maps, padded to a
    # multiple of 8 (the grouped ModalResFM embedding as its dense block-diagonal weight; layers/padded_conv.py):
    # cuDNN ran the 4-channel ones at 1.1-22 TFLOP/s on an H200; same parameters and values
    pad_thin_convs: bool = False
    # the 7x7x7 stride-2 stem as a 4x4x4 stride-1 convolution over the space-to-depth map (layers/s2d_conv.py):
    # cuDNN ran it at 46 TFLOP/s on an H200; same parameters and values
    s2d_convs: bool = False
    # stochastic depth of the encoder's Dual-View blocks, beyond the paper (0: off, as published): the rate rises
    # linearly from 0 at the first block to drop_path at the last (layers/dualview.py); no parameters, so released
    # weights load either way. A lever against overfitting small training sets: on 13 BraTS cases MMSegRWKV's
    # validation peaked within the first epochs while DynUNet kept rising (session 34)
    drop_path: float = 0.0
    # deep supervision, beyond the paper (0: off, as published): in training the model also returns logits from
    # its decoder maps at stage 1's (1) and stage 2's (2) resolution (1/4 and 1/8 with the paper's stem), each
    # through its own 1x1x1 head and upsampled trilinearly to the input size (train/losses.py weights them 1/2, 1/4
    # of the main output's loss); in eval only the main logits. The heads are parameters, so a checkpoint loads
    # into a model with the same setting
    deep_supervision: int = 0
    # the stem's total stride, beyond the paper for 2 (4: as published). The paper's 128^3 patches at 1 mm reach
    # stage 1 at 4 mm per token; at 2 mm a stride-4 stem gives 8 mm tokens and a 16^3 stage-1 grid for a 64^3
    # patch. stem_stride=2 keeps the k7 stride-2 convolution and its LayerNorm and turns the k2 stride-2 patch
    # convolution into a 1x1x1 one, so stage 1 runs at 1/2 (4 mm at 2 mm), every stage twice as fine, the total
    # stride 16 and the decoder's last up block x2; the paper's other sizes are unchanged
    stem_stride: int = 4
    # a decoder level at 1/2, beyond the paper (0: off, as published). The paper's last up block goes from stage
    # 1's 1/4 map straight to full resolution (x4) beside enc1, the raw input's own block, while DynUNet, which
    # leads MMSegRWKV on the tumour core at 2 mm (docs/campaigns/s44/), keeps a convolution block at every level.
    # With a width h, enc1's map goes through a stride-2 residual block (enc_half, h channels) as a 1/2 skip, and
    # the last up block becomes two: 1/4 -> 1/2 (dec1, + enc_half) and 1/2 -> full (dec_half, + enc1). New
    # parameters, so a checkpoint loads into a model with the same setting. Needs the paper's stem (stem_stride 4)
    half_res_width: int = 0
    # the deep-supervision heads one level finer, beyond the paper (False: on the 1/4 and 1/8 maps). DynUNet's two
    # heads sit on its 1/2 and 1/4 decoder maps and lifted its tumour-core Dice by 0.095 (session 43), MMSegRWKV's
    # on 1/4 and 1/8 by 0.019. With half_res_width the heads take the 1/2 map (dec1's output, half_res_width
    # channels) and the 1/4 map instead; needs half_res_width and deep_supervision
    fine_heads: bool = False

    def __post_init__(self) -> None:
        n = len(self.widths)
        if len(self.depths) != n or len(self.windows) != n:
            raise ValueError(
                f"widths {self.widths}, depths {self.depths} and windows {self.windows} need one entry per stage"
            )
        if self.fast_norm and self.fused_norm:
            raise ValueError("fast_norm and fused_norm replace the same instance norms; set at most one of them")
        if self.resfm not in RESFM_MODES:
            raise ValueError(f"unknown resfm mode {self.resfm!r}; choose one of {RESFM_MODES}")
        if min(self.windows) < 1 or min(self.depths) < 1 or min(self.widths) < 1:
            raise ValueError(f"windows, depths and widths must all be >= 1, got {self}")
        if not 0 <= self.drop_path < 1:
            raise ValueError(f"drop_path = {self.drop_path!r} must be in [0, 1) (0: off, the paper's model)")
        if self.deep_supervision not in (0, 1, 2):
            raise ValueError(
                f"deep_supervision = {self.deep_supervision!r}: 0 (off, the paper's model), 1 (the decoder map at "
                "stage 1's resolution) or 2 (at stage 1's and stage 2's)"
            )
        if self.stem_stride not in (2, 4):
            raise ValueError(
                f"stem_stride = {self.stem_stride!r}: 4 (the paper's stem, stage 1 at 1/4) or 2 (stage 1 at 1/2, "
                "for volumes at twice the paper's voxel size)"
            )
        if self.half_res_width < 0:
            raise ValueError(f"half_res_width = {self.half_res_width!r}: 0 (off, the paper's decoder) or a width >= 1")
        if self.fine_heads and not (self.half_res_width and self.deep_supervision):
            raise ValueError(
                "fine_heads puts the deep-supervision heads on the 1/2 decoder level: set half_res_width (e.g. 32) "
                f"and deep_supervision (1 or 2) too, got {self.half_res_width} and {self.deep_supervision}"
            )
        if self.half_res_width and self.stem_stride != 4:
            raise ValueError(
                f"half_res_width = {self.half_res_width} needs stem_stride = 4: with stem_stride = "
                f"{self.stem_stride} stage 1 is already at 1/2; set one of them"
            )

    @property
    def stride(self) -> int:
        """Total downsampling of the encoder: the stem (stride 4, or 2), then x2 per further stage."""
        return self.stem_stride * 2 ** (len(self.widths) - 1)


VARIANTS: dict[str, dict] = {
    "mmsegrwkv": {},
    "mmsegrwkv_lite": dict(decoder_hidden=384, full_res_width=16),
    "mmsegrwkv_test": dict(
        widths=(8, 16, 16, 24), depths=(1, 1, 1, 1), windows=(3, 2, 2, 1), decoder_hidden=32, full_res_width=8
    ),
}


class SkipMlp(nn.Module):
    """x + fc2(gelu(fc1(x))) with 1x1x1 convs, on [B, C, T, H, W]."""

    def __init__(self, dim: int, ratio: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv3d(dim, ratio * dim, 1)
        self.fc2 = nn.Conv3d(ratio * dim, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(F.gelu(self.fc1(x)))


class MMSegRWKVEncoder(nn.Module):
    """Stem + windowed Dual-View stages; returns one skip feature per stage, at 1/s, 1/2s, 1/4s, 1/8s for the stem
    stride s (4: the paper's 1/4 ... 1/32)."""

    def __init__(self, cfg: MMSegRWKVConfig) -> None:
        super().__init__()
        w = cfg.widths
        self.modal_fm = ModalResFM(cfg.in_channels, cfg.fm_channels) if cfg.resfm == "modal" else None
        stem_in = self.modal_fm.out_channels if self.modal_fm is not None else cfg.in_channels
        self.downsample = nn.ModuleList(
            [
                nn.Sequential(
                    nn.Conv3d(stem_in, w[0], 7, stride=2, padding=3),
                    LayerNormChannelsFirst(w[0]),
                    nn.Conv3d(w[0], w[0], 2, stride=2) if cfg.stem_stride == 4 else nn.Conv3d(w[0], w[0], 1),
                )
            ]
            + [
                nn.Sequential(LayerNormChannelsFirst(w[i]), nn.Conv3d(w[i], w[i + 1], 2, stride=2))
                for i in range(len(w) - 1)
            ]
        )
        self.stage_fm = nn.ModuleList(ChannelResFM(c) for c in w) if cfg.resfm == "stage" else None
        # "fancy" init ratios run over all blocks of the encoder, so decay grows steadily with depth
        n_layer = sum(cfg.depths)
        firsts = [sum(cfg.depths[:i]) for i in range(len(w))]
        rates = [cfg.drop_path * i / max(n_layer - 1, 1) for i in range(n_layer)]  # 0 -> drop_path over the blocks
        self.stages = nn.ModuleList(
            WindowedDualViewStage(c, d, win, first, n_layer, cfg.hidden_ratio, tuple(rates[first : first + d]))
            for c, d, win, first in zip(w, cfg.depths, cfg.windows, firsts, strict=True)
        )
        self.out_norms = nn.ModuleList(LayerNormChannelsFirst(c) for c in w)
        self.skip_mlps = nn.ModuleList(SkipMlp(c, cfg.skip_mlp_ratio) for c in w)

    def forward(self, x: Tensor) -> list[Tensor]:
        if self.modal_fm is not None:
            x = self.modal_fm(x)  # [B, M, T, H, W] -> [B, M*k, T, H, W]
        skips = []
        for i, stage in enumerate(self.stages):
            x = self.downsample[i](x)  # stage 0: [B, *, T, H, W] -> [B, C0, T/s, H/s, W/s] (stem stride s); then /2
            if self.stage_fm is not None:
                x = self.stage_fm[i](x)
            x = stage(x)
            skips.append(self.skip_mlps[i](self.out_norms[i](x)))
        return skips


class MMSegRWKV(nn.Module):
    """[B, M, T, H, W] -> logits [B, K, T, H, W] for any T, H, W (padded to a multiple of cfg.stride inside)."""

    def __init__(self, cfg: MMSegRWKVConfig) -> None:
        super().__init__()
        if len(cfg.widths) != 4:
            raise ValueError(f"the UNETR-style decoder expects 4 encoder stages, got widths {cfg.widths}")
        self.cfg = cfg
        w, norm, fr = cfg.widths, cfg.norm_name, cfg.full_res_width

        def basic(cin: int, cout: int) -> UnetrBasicBlock:
            return UnetrBasicBlock(3, cin, cout, kernel_size=3, stride=1, norm_name=norm, res_block=True)

        def up(cin: int, cout: int, factor: int) -> UnetrUpBlock:
            return UnetrUpBlock(
                3, cin, cout, kernel_size=3, upsample_kernel_size=factor, norm_name=norm, res_block=True
            )

        self.encoder = MMSegRWKVEncoder(cfg)
        self.enc1 = basic(cfg.in_channels, fr)  # raw input at full resolution
        self.enc2, self.enc3, self.enc4 = basic(w[0], w[1]), basic(w[1], w[2]), basic(w[2], w[3])
        self.bottleneck = basic(w[3], cfg.decoder_hidden)
        self.dec4 = up(cfg.decoder_hidden, w[3], 2)
        self.dec3 = up(w[3], w[2], 2)
        self.dec2 = up(w[2], w[1], 2)
        hr = cfg.half_res_width
        if hr:  # 1/4 -> 1/2 (+ enc_half: enc1's map, stride 2) -> full resolution (+ enc1)
            self.enc_half = UnetrBasicBlock(3, fr, hr, kernel_size=3, stride=2, norm_name=norm, res_block=True)
            self.dec1 = up(w[1], hr, 2)
            self.dec_half = up(hr, fr, 2)
        else:
            self.enc_half = self.dec_half = None
            self.dec1 = up(w[1], fr, cfg.stem_stride)  # 1/s -> full resolution, + enc1
        self.dec0 = basic(fr, fr)
        self.head = UnetOutBlock(3, fr, cfg.num_classes)
        # deep supervision: heads on the 1/s (dec2: w[1] channels) and 1/2s (dec3: w[2]) decoder maps, stem stride s;
        # fine_heads: on the 1/2 (dec1: half_res_width) and 1/4 maps
        aux_widths = ((hr, w[1]) if cfg.fine_heads else (w[1], w[2]))[: cfg.deep_supervision]
        self.aux_heads = nn.ModuleList(UnetOutBlock(3, c, cfg.num_classes) for c in aux_widths)
        if cfg.fast_norm:
            use_fast_instance_norm(self)
        if cfg.fused_norm:
            use_fused_instance_norm(self)
        if cfg.gemm_convs:
            use_gemm_convs(self)
        if cfg.s2d_convs:
            use_s2d_convs(self)
        if cfg.pad_thin_convs:  # last: a thin pointwise convolution stays a GEMM, a thin strided one s2d (wide)
            use_padded_thin_convs(self)

    def padded_size(self, size: tuple[int, ...]) -> tuple[int, ...]:
        """Each axis up to a multiple of the stride; if that leaves a single voxel at the 1/stride bottleneck
        (whose instance norm needs more than one), the last axis gets one more stride."""
        s = self.cfg.stride
        padded = [-(-d // s) * s for d in size]
        if math.prod(padded) == s ** len(padded):
            padded[-1] += s
        return tuple(padded)

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, ...]:
        """Logits [B, K, T, H, W]; in training with deep supervision also one [B, K, T, H, W] per auxiliary head
        (main first)."""
        if x.dim() != 5 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(
                f"MMSegRWKV expects [B, {self.cfg.in_channels}, T, H, W] (modalities as channels), got {tuple(x.shape)}"
            )
        size = x.shape[2:]
        padded = self.padded_size(size)
        if padded != tuple(size):
            pad = [p for d, q in zip(reversed(size), reversed(padded), strict=True) for p in (0, q - d)]
            x = F.pad(x, pad)  # far-end zero padding
        s1, s2, s3, s4 = self.encoder(x)
        enc1 = self.enc1(x)
        y = self.dec4(self.bottleneck(s4), self.enc4(s3))  # 1/8s -> 1/4s (stem stride s: 4, or 2)
        y8 = self.dec3(y, self.enc3(s2))  # -> 1/2s
        y4 = self.dec2(y8, self.enc2(s1))  # -> 1/s
        y2 = None
        if self.dec_half is None:
            y = self.dec0(self.dec1(y4, enc1))  # -> full resolution
        else:
            y2 = self.dec1(y4, self.enc_half(enc1))  # 1/4 -> 1/2: [B, half_res_width, T/2, H/2, W/2]
            y = self.dec0(self.dec_half(y2, enc1))  # -> full resolution
        y = self.head(y)[:, :, : size[0], : size[1], : size[2]]
        if not (self.training and self.aux_heads):
            return y
        maps = (y2, y4) if self.cfg.fine_heads else (y4, y8)  # the 1/2 and 1/4 maps, or the 1/4 and 1/8
        aux = [  # each [B, K, T/f, H/f, W/f] -> [B, K, T, H, W]
            F.interpolate(head(m), size=padded, mode="trilinear")[:, :, : size[0], : size[1], : size[2]]
            for head, m in zip(self.aux_heads, maps, strict=False)
        ]
        return (y, *aux)


FAMILY = Family.of_config(MMSegRWKV, MMSegRWKVConfig, VARIANTS)
