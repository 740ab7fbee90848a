"""ResFM: a residual factorization machine that adds second-order interactions between feature fields.

FM term over fields f with embeddings z_f: 0.5 * ((sum_f z_f)^2 - sum_f z_f^2) = sum_{f<g} z_f * z_g, computed in
O(F) per voxel and embedding channel.

Two placements (MMSegRWKV's `resfm` switch):
- ModalResFM ("modal", the paper's abstract): fields = MRI modalities, each embedded separately; the FM term is
  lifted by a 1x1 conv and added to the concatenated modality embeddings that enter the stem.
- ChannelResFM ("stage", the released code's ResFMLayer after each downsampling): fields = the channels of a
  feature map after a depthwise conv and a channel LayerNorm. At initialisation that LayerNorm centres the fields,
  so sum_f z_f = 0 and the term is the constant -C/2 until the norm's affine weights move away from 1 and 0.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .norm import LayerNormChannelsFirst
from .twins import is_channels_last

_CONVS = {2: nn.Conv2d, 3: nn.Conv3d}


def _conv(spatial_dims: int) -> type[nn.Module]:
    if spatial_dims not in _CONVS:
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    return _CONVS[spatial_dims]


def fm_interaction(z: Tensor, dim: int = 1) -> Tensor:
    """Second-order FM term across the fields on axis `dim` of z; that axis is summed out."""
    return 0.5 * (z.sum(dim).square() - z.square().sum(dim))


class ModalResFM(nn.Module):
    """[B, M, *spatial] -> [B, M*k, *spatial]: per-modality embeddings plus the lifted cross-modal FM term.

    Embedding: grouped kxk conv (groups = M), k = `channels` per modality, channel f*k + j is channel j of
    modality f. The FM term is taken per voxel and per embedding channel across the M fields, without centring
    (so it is not constant at initialisation). With M = 1 there are no pairs and the term is zero.
    """

    def __init__(self, modalities: int, channels: int, spatial_dims: int = 3, kernel_size: int = 3) -> None:
        super().__init__()
        if modalities < 1 or channels < 1:
            raise ValueError(f"ModalResFM needs modalities >= 1 and channels >= 1, got {modalities}, {channels}")
        conv = _conv(spatial_dims)
        self.modalities = modalities
        self.channels = channels
        self.embed = conv(modalities, modalities * channels, kernel_size, padding=kernel_size // 2, groups=modalities)
        self.lift = conv(channels, modalities * channels, 1)

    @property
    def out_channels(self) -> int:
        return self.modalities * self.channels

    def fm_term(self, z: Tensor) -> Tensor:
        """FM term of embeddings z [B, M*k, *spatial] -> [B, k, *spatial], in z's layout (contiguous or
        channels-last: a channels-first term would make the lift below transpose it)."""
        if is_channels_last(z):
            fields = z.movedim(1, -1).unflatten(-1, (self.modalities, self.channels))  # [B, *S, M, k] (a view)
            return fm_interaction(fields, dim=-2).movedim(-1, 1)  # [B, *S, k] -> [B, k, *S] channels-last
        return fm_interaction(z.unflatten(1, (self.modalities, self.channels)), dim=1)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] != self.modalities:
            raise ValueError(
                f"ModalResFM was built for {self.modalities} modalities, got an input with {x.shape[1]} channels"
            )
        z = self.embed(x)  # [B, M, *S] -> [B, M*k, *S]
        return z + self.lift(self.fm_term(z))


class ChannelResFM(nn.Module):
    """The released code's ResFMLayer: x + alpha * relu(LN(conv(FM over the channels of LN(dwconv(x))))).

    [B, C, *spatial] -> [B, C, *spatial].
    """

    def __init__(self, channels: int, spatial_dims: int = 3) -> None:
        super().__init__()
        conv = _conv(spatial_dims)
        self.fm_conv = conv(channels, channels, 3, padding=1, groups=channels)
        self.pre_norm = LayerNormChannelsFirst(channels)
        self.conv = conv(1, channels, 3, padding=1)
        self.post_norm = LayerNormChannelsFirst(channels)
        self.alpha = nn.Parameter(torch.ones(channels))
        nn.init.kaiming_uniform_(self.fm_conv.weight)
        nn.init.kaiming_uniform_(self.conv.weight)

    def fm_term(self, x: Tensor) -> Tensor:
        """[B, C, *spatial] -> [B, 1, *spatial]."""
        return fm_interaction(self.pre_norm(self.fm_conv(x)), dim=1).unsqueeze(1)

    def forward(self, x: Tensor) -> Tensor:
        cross = torch.relu(self.post_norm(self.conv(self.fm_term(x))))  # [B, 1, *S] -> [B, C, *S]
        return x + cross * self.alpha.view(-1, *([1] * (x.dim() - 2)))
