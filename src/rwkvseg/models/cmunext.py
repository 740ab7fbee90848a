"""CMUNeXt (Tang et al. 2023, "CMUNeXt: An Efficient Medical Image Segmentation Network based on Large Kernel and
Skip Fusion"), the 2D baseline written by hand: U-RWKV's parent, so it shares U-RWKV's blocks.

A conv stem, five stages of large-kernel depthwise blocks each followed by a 3x3 conv that changes the width, and a
decoder of bilinear upsampling + 3x3 conv and skip-fusion blocks. Inputs are padded to a multiple of 16 and the
logits cropped back, so any H x W works.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from rwkvseg.layers.conv import ChannelFusion, ConvNormAct, UpConv, conv_nd, crop_to, decode, encode, pad_to_multiple

from .registry import Family

SPATIAL_DIMS = 2
STRIDE = 16


@dataclass(frozen=True)
class CMUNeXtConfig:
    in_channels: int
    num_classes: int
    dims: tuple[int, ...] = (16, 32, 128, 160, 256)
    depths: tuple[int, ...] = (1, 1, 1, 3, 1)  # CMUNeXt blocks per stage
    kernels: tuple[int, ...] = (3, 3, 7, 7, 7)  # depthwise kernel per stage
    expansion: int = 4  # inverted-bottleneck width of the blocks and of the skip fusion

    def __post_init__(self):
        for name in ("dims", "depths", "kernels"):
            value = tuple(getattr(self, name))
            object.__setattr__(self, name, value)
            if len(value) != 5:
                raise ValueError(f"CMUNeXtConfig.{name} must list 5 stages, got {value}")


VARIANTS = {
    "cmunext": dict(dims=(16, 32, 128, 160, 256), depths=(1, 1, 1, 3, 1), kernels=(3, 3, 7, 7, 7)),
    "cmunext_s": dict(dims=(8, 16, 32, 64, 128), depths=(1, 1, 1, 1, 1), kernels=(3, 3, 7, 7, 9)),
    "cmunext_l": dict(dims=(32, 64, 128, 256, 512), depths=(1, 1, 1, 6, 3), kernels=(3, 3, 7, 7, 7)),
    "cmunext_test": dict(dims=(4, 8, 8, 16, 16), depths=(1, 1, 1, 2, 1), kernels=(3, 3, 5, 5, 5), expansion=2),
}


class CMUNeXtBlock(nn.Module):
    """depth x [x + BN(GELU(DWConv_kxk(x))); 1x1 expand -> GELU -> BN; 1x1 reduce -> GELU -> BN], then a
    3x3 conv + BN + ReLU to the stage's output width."""

    def __init__(self, in_channels: int, out_channels: int, depth: int, kernel: int, expansion: int):
        super().__init__()
        d, c = SPATIAL_DIMS, in_channels
        self.depthwise = nn.ModuleList(
            ConvNormAct(d, c, c, kernel, groups=c, order="conv-act-norm") for _ in range(depth)
        )
        self.mlps = nn.ModuleList(
            nn.Sequential(
                ConvNormAct(d, c, expansion * c, 1, order="conv-act-norm"),
                ConvNormAct(d, expansion * c, c, 1, order="conv-act-norm"),
            )
            for _ in range(depth)
        )
        self.up = ConvNormAct(d, c, out_channels, 3, act=nn.ReLU)

    def forward(self, x: Tensor) -> Tensor:
        for depthwise, mlp in zip(self.depthwise, self.mlps, strict=True):
            x = mlp(x + depthwise(x))
        return self.up(x)


class CMUNeXt(nn.Module):
    """[B, C_in, H, W] -> logits [B, num_classes, H, W]."""

    def __init__(self, config: CMUNeXtConfig):
        super().__init__()
        self.config = config
        c, d, e = config.dims, SPATIAL_DIMS, config.expansion
        self.stem = ConvNormAct(d, config.in_channels, c[0], 3, act=nn.ReLU)
        widths_in = (c[0], *c[:4])
        self.encoders = nn.ModuleList(
            CMUNeXtBlock(widths_in[i], c[i], config.depths[i], config.kernels[i], e) for i in range(5)
        )
        self.pool = nn.MaxPool2d(2)
        self.ups = nn.ModuleList(UpConv(d, c[i + 1], c[i], mode="linear", act=nn.ReLU) for i in reversed(range(4)))
        self.fusions = nn.ModuleList(ChannelFusion(d, 2 * c[i], c[i], e) for i in reversed(range(4)))
        self.head = conv_nd(d, c[0], config.num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        x, size = pad_to_multiple(x, STRIDE)
        *skips, x = encode(self.stem(x), self.encoders, self.pool)  # skips at H .. H/8, x [B, C5, H/16, W/16]
        x = decode(x, skips, self.ups, self.fusions)
        return crop_to(self.head(x), size)


FAMILY = Family.of_config(CMUNeXt, CMUNeXtConfig, VARIANTS)
