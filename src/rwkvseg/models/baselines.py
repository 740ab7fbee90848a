"""MONAI baselines behind the registry's interface, 2D and 3D alike (keyed on spatial_dims), for side-by-side
comparison with U-RWKV and MMSegRWKV.

Each takes [B, C, *spatial] and returns logits [B, K, *spatial]. Their input-size rules differ; the wrapper pads
where the 2D recipes did (the U-Nets, to a multiple of 16, logits cropped back) and otherwise checks the size up
front and says which sizes work instead of failing deep inside the network:
- swinunetr, dynunet: every spatial size a multiple of 32 (five x2 downsamplings), and not all of them 32: the
  instance norm at the 1/32 bottleneck needs more than one voxel (e.g. 64 x 32 x 32 works, 32^3 does not).
- segresnet: multiples of 8.
- basicunet: any size whose 1/16 bottleneck (floor division) has more than one voxel, e.g. 33 x 34 x 35.
- unetr: exactly the `img_size` it was built for (learned position embeddings over 16^3 patches); pass
  `img_size=...` (a multiple of 16, default 128, the patch size of the BraTS recipes) to build for another size.
`static_export` marks a network whose ONNX export is static in space even when dynamic axes are asked (swinunetr:
torch.export's symbolic shapes of its window padding did not finish in 50 CPU minutes).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

import torch
from monai.networks import nets
from torch import Tensor, nn

from rwkvseg.layers.conv import crop_to, pad_to_multiple

from .registry import Family

# Values that set up the wrapper rather than the MONAI network: the network class, the input-size rule, and
# whether the export is static in space (read by export/onnx.py).
WRAPPER_KEYS = ("net", "pad_multiple", "multiple", "coarse", "fixed_size", "static_export")

# MONAI networks whose forward calls helpers Dynamo skips, traced through under torch.compile: BasicUNet's UpCat
# calls torch.jit.isinstance. Only those: under dont_skip_tracing SwinUNETR's numpy size check does not break the
# graph as it should but stops Dynamo (an AssertionError in its trace rules, torch 2.13).
TRACED_THROUGH = (nets.BasicUNet,)

# Variants are data: the MONAI class, the size rule, and the class's arguments (any of which overrides may change).
VARIANTS: dict[str, dict] = {
    # the classic U-Net widths (about 31 M parameters), BN + ReLU as in the papers' U-Net baselines
    "unet": dict(
        net="BasicUNet",
        pad_multiple=16,
        spatial_dims=2,
        features=(64, 128, 256, 512, 1024, 64),
        norm="batch",
        act="relu",
        dropout=0.0,
        upsample="deconv",
    ),
    # MONAI's default BasicUNet widths (about 2 M parameters), near U-RWKV's size
    "unet_small": dict(
        net="BasicUNet", pad_multiple=16, spatial_dims=2, features=(32, 32, 64, 128, 256, 32), norm="batch", act="relu"
    ),
    "unet_test": dict(
        net="BasicUNet", pad_multiple=16, spatial_dims=2, features=(4, 4, 8, 8, 16, 4), norm="batch", act="relu"
    ),
    "swinunetr": dict(net="SwinUNETR", multiple=32, coarse=32, static_export=True, spatial_dims=3, feature_size=48),
    "unetr": dict(
        net="UNETR",
        fixed_size=True,
        spatial_dims=3,
        img_size=128,
        feature_size=16,
        hidden_size=768,
        mlp_dim=3072,
        num_heads=12,
        proj_type="conv",
        norm_name="instance",
    ),
    "segresnet": dict(
        net="SegResNet", multiple=8, spatial_dims=3, init_filters=16, blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1)
    ),
    "basicunet": dict(net="BasicUNet", coarse=16, spatial_dims=3, features=(32, 32, 64, 128, 256, 32)),
    # nnU-Net's 3D full-resolution plan for 128^3 patches: 6 levels, 32..320 filters, instance norm, LeakyReLU
    "dynunet": dict(
        net="DynUNet",
        multiple=32,
        coarse=32,
        spatial_dims=3,
        kernel_size=(3,) * 6,
        strides=(1, 2, 2, 2, 2, 2),
        upsample_kernel_size=(2,) * 5,
        filters=(32, 64, 128, 256, 320, 320),
        norm_name=("instance", {"affine": True}),
        act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
        res_block=False,
        deep_supervision=False,
    ),
}


class MonaiBaseline(nn.Module):
    """A MONAI network plus its input-size rule: pad to `pad_multiple` and crop back, or check the size up front."""

    def __init__(
        self,
        name: str,
        net: nn.Module,
        spatial_dims: int,
        pad_multiple: int = 1,
        multiple: int = 1,
        fixed_size: tuple[int, ...] | None = None,
        coarse: int | None = None,
        static_export: bool = False,
    ):
        super().__init__()
        self.name = name
        self.net = net
        self.spatial_dims = spatial_dims
        self.pad_multiple = pad_multiple
        self.multiple = multiple
        self.fixed_size = fixed_size
        self.coarse = coarse  # downsampling of the instance-normed bottleneck, which needs > 1 voxel
        self.static_export = static_export

    def check_size(self, size: Sequence[int]) -> None:
        size = tuple(size)
        if self.fixed_size is not None and size != self.fixed_size:
            raise ValueError(
                f"{self.name} was built for inputs of exactly {self.fixed_size}, got {size}; rebuild with "
                f"img_size={size} (multiples of 16) or crop/pad the input (e.g. sliding-window inference)"
            )
        if any(s % self.multiple for s in size):
            fit = tuple(-(-s // self.multiple) * self.multiple for s in size)
            raise ValueError(
                f"{self.name} needs every spatial size to be a multiple of {self.multiple}, got {size}; pad to {fit}"
            )
        if self.coarse is not None and math.prod([s // self.coarse for s in size]) < 2:  # a list: Dynamo can trace it
            raise ValueError(
                f"{self.name} needs more than one voxel at 1/{self.coarse} resolution (its bottleneck instance "
                f"norm), got {size}; use at least {2 * self.coarse} along one axis"
            )

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, ...]:
        """Logits [B, K, *S]; a net with deep supervision (DynUNet's deep_supervision=True) in training also
        returns its upsampled auxiliary logits, main first, as a tuple."""
        if x.dim() != 2 + self.spatial_dims:
            axes = ("H, W", "T, H, W")[self.spatial_dims - 2]
            raise ValueError(f"{self.name} expects [B, C, {axes}], got shape {tuple(x.shape)}")
        self.check_size(x.shape[2:])
        x, size = pad_to_multiple(x, self.pad_multiple)
        if torch.compiler.is_compiling() and isinstance(self.net, TRACED_THROUGH):
            with torch._dynamo.dont_skip_tracing():
                out = self.net(x)
        else:
            out = self.net(x)
        if out.dim() == 3 + self.spatial_dims:  # DynUNet in training: [B, 1 + heads, K, *S] -> main, *auxiliary
            return tuple(crop_to(o, size) for o in out.unbind(1))
        return crop_to(out, size)


def _net_class(name: str) -> type[nn.Module]:
    return getattr(nets, VARIANTS[name]["net"])


def _fields(name: str) -> frozenset[str]:
    return frozenset(inspect.signature(_net_class(name).__init__).parameters) - {"self", "in_channels", "out_channels"}


def _make(name: str, in_channels: int, num_classes: int, **values) -> MonaiBaseline:
    rule = {k: values.pop(k) for k in WRAPPER_KEYS if k in values}
    cls = getattr(nets, rule.pop("net"))
    if rule.pop("fixed_size", False):
        size = values["img_size"]
        size = (size,) * values["spatial_dims"] if isinstance(size, int) else tuple(size)
        if len(size) != values["spatial_dims"] or any(s % 16 for s in size):
            raise ValueError(
                f"{name}: img_size {size} must be {values['spatial_dims']} multiples of 16 (its patch size)"
            )
        values["img_size"] = rule["fixed_size"] = size
    net = cls(in_channels=in_channels, out_channels=num_classes, **values)
    return MonaiBaseline(name, net, values["spatial_dims"], **rule)


FAMILY = Family(VARIANTS, _make, _fields)
