"""2D baselines beside U-RWKV, behind the same interface: a U-Net (MONAI's BasicUNet) and CMUNeXt.

CMUNeXt (Tang et al. 2023, "CMUNeXt: An Efficient Medical Image Segmentation Network based on Large Kernel and
Skip Fusion") is U-RWKV's parent: a conv stem, five stages of large-kernel depthwise blocks each followed by a
3x3 conv that changes the width, and a decoder of bilinear upsampling + 3x3 conv and skip-fusion blocks.
Both pad inputs to a multiple of 16 and crop the logits back, so any H x W works.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial

import torch
from monai.networks.nets import BasicUNet
from torch import Tensor, nn

from rwkvseg.layers.conv import ChannelFusion, ConvNormAct, UpConv, conv_nd, crop_to, pad_to_multiple

SPATIAL_DIMS = 2
STRIDE = 16


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int
    num_classes: int
    features: tuple[int, ...] = (64, 128, 256, 512, 1024, 64)  # five encoder widths, then the last decoder's
    norm: str = "batch"
    act: str = "relu"
    dropout: float = 0.0
    upsample: str = "deconv"  # MONAI BasicUNet: "deconv", "pixelshuffle" or "nontrainable"

    def __post_init__(self):
        object.__setattr__(self, "features", tuple(self.features))
        if len(self.features) != 6:
            raise ValueError(f"UNetConfig.features must hold 6 widths (5 encoder + last decoder), got {self.features}")


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


UNET_VARIANTS = {
    # the classic U-Net widths (about 31 M parameters), BN + ReLU as in the papers' U-Net baselines
    "unet": dict(features=(64, 128, 256, 512, 1024, 64)),
    # MONAI's default BasicUNet widths (about 2 M parameters), near U-RWKV's size
    "unet_small": dict(features=(32, 32, 64, 128, 256, 32)),
    "unet_test": dict(features=(4, 4, 8, 8, 16, 4)),
}

CMUNEXT_VARIANTS = {
    "cmunext": dict(dims=(16, 32, 128, 160, 256), depths=(1, 1, 1, 3, 1), kernels=(3, 3, 7, 7, 7)),
    "cmunext_s": dict(dims=(8, 16, 32, 64, 128), depths=(1, 1, 1, 1, 1), kernels=(3, 3, 7, 7, 9)),
    "cmunext_l": dict(dims=(32, 64, 128, 256, 512), depths=(1, 1, 1, 6, 3), kernels=(3, 3, 7, 7, 7)),
    "cmunext_test": dict(dims=(4, 8, 8, 16, 16), depths=(1, 1, 1, 2, 1), kernels=(3, 3, 5, 5, 5), expansion=2),
}


class UNet(nn.Module):
    """MONAI BasicUNet (two conv-norm-act per level, transposed-conv upsampling) with the shared padding."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        self.net = BasicUNet(
            spatial_dims=SPATIAL_DIMS,
            in_channels=config.in_channels,
            out_channels=config.num_classes,
            features=config.features,
            norm=config.norm,
            act=config.act,
            dropout=config.dropout,
            upsample=config.upsample,
        )

    def forward(self, x: Tensor) -> Tensor:
        x, size = pad_to_multiple(x, STRIDE)
        if torch.compiler.is_compiling():  # MONAI's UpCat calls torch.jit.isinstance, which Dynamo skips otherwise
            with torch._dynamo.dont_skip_tracing():
                return crop_to(self.net(x), size)
        return crop_to(self.net(x), size)


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
        x = self.stem(x)
        skips = []
        for i, encoder in enumerate(self.encoders):
            x = encoder(x if i == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()  # [B, C5, H/16, W/16]
        for up, fuse, skip in zip(self.ups, self.fusions, reversed(skips), strict=True):
            x = fuse(torch.cat([skip, up(x)], dim=1))  # [B, 2 C_i, h, w] -> [B, C_i, h, w]
        return crop_to(self.head(x), size)


def _build(model_cls, config_cls, variants, variant: str, in_channels: int, num_classes: int, **overrides):
    fields = {f.name for f in dataclasses.fields(config_cls)} - {"in_channels", "num_classes"}
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(f"{variant}: unknown config fields {sorted(unknown)}; valid fields: {sorted(fields)}")
    return model_cls(config_cls(in_channels, num_classes, **{**variants[variant], **overrides}))


MODELS = {
    **{name: partial(_build, UNet, UNetConfig, UNET_VARIANTS, name) for name in UNET_VARIANTS},
    **{name: partial(_build, CMUNeXt, CMUNeXtConfig, CMUNEXT_VARIANTS, name) for name in CMUNEXT_VARIANTS},
}
