"""Conv / norm / activation helpers keyed on spatial_dims, padding of inputs to a multiple of the stride, and the
encoder and decoder walks that U-RWKV and CMUNeXt share."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Conv, Norm
from torch import Tensor, nn

ORDERS = ("conv-norm-act", "conv-act-norm")


def conv_nd(spatial_dims: int, *args, **kwargs) -> nn.Module:
    """nn.Conv{1,2,3}d(*args, **kwargs) picked by spatial_dims."""
    return Conv[Conv.CONV, spatial_dims](*args, **kwargs)


def batch_norm_nd(spatial_dims: int, channels: int) -> nn.Module:
    return Norm[Norm.BATCH, spatial_dims](channels)


class ConvNormAct(nn.Sequential):
    """Conv (same padding) + BatchNorm + activation, in either order of the last two.

    CMUNeXt-style blocks put the activation before the norm ("conv-act-norm"); the stem and the upsampling
    convs use "conv-norm-act". act is a module class (nn.GELU, nn.ReLU) or None.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        groups: int = 1,
        act: type[nn.Module] | None = nn.GELU,
        order: str = "conv-norm-act",
    ):
        if order not in ORDERS:
            raise ValueError(f"ConvNormAct: unknown order {order!r}; choose one of {ORDERS}")
        conv = conv_nd(spatial_dims, in_channels, out_channels, kernel_size, padding=kernel_size // 2, groups=groups)
        norm = batch_norm_nd(spatial_dims, out_channels)
        layers = [conv, norm] if order == "conv-norm-act" else [conv]
        if act is not None:
            layers.append(act())
        if order == "conv-act-norm":
            layers.append(norm)
        super().__init__(*layers)


def pad_to_multiple(x: Tensor, multiple: int) -> tuple[Tensor, tuple[int, ...]]:
    """Zero-pad the spatial dims of x [B, C, *spatial] at their far end up to multiples of `multiple`.

    Returns the padded tensor and the original spatial size, for crop_to. Padding at the far end (not centred)
    keeps the pad commuting with transposes and flips of the leading corner, and is a no-op on conforming sizes.
    """
    size = tuple(x.shape[2:])
    extra = [-s % multiple for s in size]
    if not any(extra):
        return x, size
    pad = []
    for e in reversed(extra):  # F.pad lists the last dim first
        pad += [0, e]
    return F.pad(x, pad), size


def crop_to(x: Tensor, size: tuple[int, ...]) -> Tensor:
    """Undo pad_to_multiple: keep the leading `size` elements of each spatial dim of x [B, C, *spatial]."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    return x[(slice(None), slice(None), *(slice(0, s) for s in size))]


class UpConv(nn.Sequential):
    """x2 upsampling (nearest or (bi/tri)linear) then ConvNormAct(3x3): the decoders' resolution step."""

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        mode: str = "nearest",
        act: type[nn.Module] = nn.GELU,
    ):
        if mode == "linear":
            mode = ("linear", "bilinear", "trilinear")[spatial_dims - 1]
        super().__init__(
            nn.Upsample(scale_factor=2, mode=mode),
            ConvNormAct(spatial_dims, in_channels, out_channels, 3, act=act),
        )


class ChannelFusion(nn.Sequential):
    """CMUNeXt's skip fusion (2C -> C): grouped 3x3 conv (groups 2: skip and upsampled halves kept apart),
    then an inverted bottleneck of 1x1 convs through expansion * C channels; each conv -> GELU -> BN."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, expansion: int = 4):
        hidden = expansion * out_channels
        super().__init__(
            ConvNormAct(spatial_dims, in_channels, in_channels, 3, groups=2, order="conv-act-norm"),
            ConvNormAct(spatial_dims, in_channels, hidden, 1, order="conv-act-norm"),
            ConvNormAct(spatial_dims, hidden, out_channels, 1, order="conv-act-norm"),
        )


def encode(x: Tensor, encoders: Iterable[nn.Module], pool: nn.Module) -> list[Tensor]:
    """Run the encoder stages, pooling x2 before every stage but the first; returns every stage's output."""
    skips = []
    for i, encoder in enumerate(encoders):
        x = encoder(x if i == 0 else pool(x))
        skips.append(x)
    return skips


def decode(x: Tensor, skips: Sequence[Tensor], ups: Iterable[nn.Module], fusions: Iterable[nn.Module]) -> Tensor:
    """The U-shaped decoder walk from the deepest map x: upsample, concatenate [skip, up], fuse, deepest skip first."""
    for up, fuse, skip in zip(ups, fusions, reversed(skips), strict=True):
        x = fuse(torch.cat([skip, up(x)], dim=1))  # [B, 2 C_i, *spatial] -> [B, C_i, *spatial]
    return x
