"""3D baselines from MONAI behind the registry's interface, for side-by-side comparison with MMSegRWKV.

Each takes [B, M, T, H, W] and returns logits [B, K, T, H, W]. Their input-size rules differ; the wrapper checks
them up front and says which sizes work instead of failing deep inside the network:
- swinunetr, dynunet: every spatial size a multiple of 32 (five x2 downsamplings), and not all of them 32: the
  instance norm at the 1/32 bottleneck needs more than one voxel (e.g. 64 x 32 x 32 works, 32^3 does not).
- segresnet: multiples of 8.
- basicunet: any size whose 1/16 bottleneck (floor division) has more than one voxel, e.g. 33 x 34 x 35.
- unetr: exactly the `img_size` it was built for (learned position embeddings over 16^3 patches); pass
  `img_size=...` (a multiple of 16, default 128, the patch size of the BraTS recipes) to build for another size.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

import torch
from monai.networks import nets
from torch import Tensor, nn

# Variants are data: the MONAI class, its arguments, and the input-size rule.
VARIANTS: dict[str, dict] = {
    "swinunetr": dict(net="SwinUNETR", multiple=32, coarse=32, kwargs=dict(feature_size=48)),
    "unetr": dict(
        net="UNETR",
        fixed_size=True,
        kwargs=dict(
            img_size=128,
            feature_size=16,
            hidden_size=768,
            mlp_dim=3072,
            num_heads=12,
            proj_type="conv",
            norm_name="instance",
        ),
    ),
    "segresnet": dict(
        net="SegResNet", multiple=8, kwargs=dict(init_filters=16, blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1))
    ),
    "basicunet": dict(net="BasicUNet", coarse=16, kwargs=dict(features=(32, 32, 64, 128, 256, 32))),
    # nnU-Net's 3D full-resolution plan for 128^3 patches: 6 levels, 32..320 filters, instance norm, LeakyReLU
    "dynunet": dict(
        net="DynUNet",
        multiple=32,
        coarse=32,
        kwargs=dict(
            kernel_size=(3,) * 6,
            strides=(1, 2, 2, 2, 2, 2),
            upsample_kernel_size=(2,) * 5,
            filters=(32, 64, 128, 256, 320, 320),
            norm_name=("instance", {"affine": True}),
            act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
            res_block=False,
            deep_supervision=False,
        ),
    ),
}


def _triple(size: int | Sequence[int]) -> tuple[int, int, int]:
    size = (size,) * 3 if isinstance(size, int) else tuple(size)
    if len(size) != 3:
        raise ValueError(f"img_size must be an int or 3 ints, got {size}")
    return size


class SizeCheckedNet(nn.Module):
    """A MONAI network plus an up-front check of the spatial input size."""

    def __init__(
        self,
        name: str,
        net: nn.Module,
        multiple: int = 1,
        fixed_size: tuple[int, ...] | None = None,
        coarse: int | None = None,
    ):
        super().__init__()
        self.name = name
        self.net = net
        self.multiple = multiple
        self.fixed_size = fixed_size
        self.coarse = coarse  # downsampling of the instance-normed bottleneck, which needs > 1 voxel

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

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 5:
            raise ValueError(f"{self.name} expects [B, M, T, H, W], got shape {tuple(x.shape)}")
        self.check_size(x.shape[2:])
        if torch.compiler.is_compiling():  # MONAI's UpCat calls torch.jit.isinstance, which Dynamo skips otherwise
            with torch._dynamo.dont_skip_tracing():
                return self.net(x)
        return self.net(x)


def _builder(name: str):
    spec = VARIANTS[name]
    cls = getattr(nets, spec["net"])

    def build(in_channels: int, num_classes: int, **overrides) -> SizeCheckedNet:
        valid = set(inspect.signature(cls.__init__).parameters) - {"self", "in_channels", "out_channels"}
        unknown = overrides.keys() - valid
        if unknown:
            raise ValueError(f"{name} ({cls.__name__}): unknown overrides {sorted(unknown)}; valid: {sorted(valid)}")
        kwargs = {**spec["kwargs"], **overrides}
        fixed = None
        if spec.get("fixed_size"):
            fixed = _triple(kwargs["img_size"])
            if any(s % 16 for s in fixed):
                raise ValueError(f"{name}: img_size {fixed} must be multiples of 16 (its patch size)")
            kwargs["img_size"] = fixed
        if "spatial_dims" in valid:
            kwargs.setdefault("spatial_dims", 3)
        net = cls(in_channels=in_channels, out_channels=num_classes, **kwargs)
        return SizeCheckedNet(name, net, spec.get("multiple", 1), fixed, spec.get("coarse"))

    return build


MODELS = {name: _builder(name) for name in VARIANTS}
