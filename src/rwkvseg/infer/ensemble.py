"""Several checkpoints of one task predicting as one model: `rwkvseg predict A B ... INPUT`.

The usual ensemble of the field (nnU-Net's over its cross-validation folds) averages the members' probabilities.
ProbabilityMean does that per forward pass and hands the mean back as logits of the same activation (log of the
mean softmax; logit of the mean sigmoid), so everything downstream (the sliding window's weighted sum, test-time
flips, the threshold, post-processing) treats the ensemble as one model. Within a window or an image that is the
exact mean of the members' probabilities; the sliding window then blends overlapping windows' logits, as it does
for a single model.

Members must agree on what they predict and how they read the input: the channels, the classes and their names,
the spacing, the whole preprocessing record (which holds the recorded inference defaults: threshold, flips,
post-processing) and a 2D checkpoint's decision threshold. The architectures may differ.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import CheckpointMeta, checkpoint_paths, load_checkpoint, read_meta

ACTIVATIONS = ("sigmoid", "softmax")


class ProbabilityMean(nn.Module):
    """The members' mean probability, as logits: softmax (over dim 1) or sigmoid of the output is that mean."""

    def __init__(self, members: Sequence[nn.Module], activation: str):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation {activation!r} unknown; choose one of {', '.join(ACTIVATIONS)}")
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {len(members)}")
        self.members = nn.ModuleList(members)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.stack([member(x).float() for member in self.members])  # [N, B, K, *S]
        log_n = math.log(len(self.members))
        if self.activation == "softmax":  # log of the mean probability: its softmax is the mean itself
            return torch.logsumexp(torch.log_softmax(logits, dim=2), dim=0) - log_n  # [B, K, *S]
        log_p = torch.logsumexp(F.logsigmoid(logits), dim=0) - log_n  # log mean(sigmoid)
        log_q = torch.logsumexp(F.logsigmoid(-logits), dim=0) - log_n  # log (1 - mean(sigmoid))
        return log_p - log_q  # [B, K, *S]: the logit of the mean


Given = str | Path | Sequence[str | Path]  # one checkpoint, or the members of an ensemble


def checkpoint_list(given: Given) -> list[Path]:
    """The checkpoints given: one path, or several."""
    paths = [Path(given)] if isinstance(given, (str, Path)) else [Path(p) for p in given]
    if not paths:
        raise ValueError("give at least one checkpoint")
    return paths


def activation_of(meta: CheckpointMeta) -> str:
    """The output activation prediction applies: 3D softmax over labels or sigmoid per region; 2D sigmoid for one
    channel, else softmax."""
    if meta.preprocessing.get("dims") == 3:
        return "sigmoid" if meta.preprocessing.get("target") == "regions" else "softmax"
    return "sigmoid" if meta.num_classes == 1 else "softmax"


def _shared(meta: CheckpointMeta) -> dict[str, object]:
    """What the members of an ensemble must agree on."""
    return {
        "in_channels": meta.in_channels,
        "num_classes": meta.num_classes,
        "class_names": meta.class_names,
        "spacing": meta.spacing,
        "preprocessing": meta.preprocessing,
        "training threshold": meta.training.get("threshold"),
    }


def check_members(paths: Sequence[Path]) -> CheckpointMeta:
    """The first member's metadata, after checking that every member is a checkpoint (its sidecar is there) and
    that all agree on _shared; ValueError naming the member, the setting and both values otherwise."""
    for path in paths:
        _, sidecar = checkpoint_paths(path)
        if len(paths) > 1 and not sidecar.is_file():
            raise ValueError(
                f"{path} is not a checkpoint (no sidecar {sidecar}): an ensemble is CHECKPOINT [CHECKPOINT ...] "
                "INPUT, with one input last"
            )
    first = read_meta(paths[0])
    reference = _shared(first)
    for path in paths[1:]:
        other = _shared(read_meta(path))
        for key, value in reference.items():
            if other[key] != value:
                raise ValueError(
                    f"{path}: its {key} ({_short(other[key])}) differs from {paths[0]}'s ({_short(value)}); "
                    "the members of an ensemble must predict the same classes from the same preprocessing, with the "
                    "same recorded inference defaults"
                )
    return first


def _short(value: object, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_checkpoints(given: Given, device: str | torch.device = "cpu") -> tuple[nn.Module, CheckpointMeta]:
    """load_checkpoint for one checkpoint; for several, their ProbabilityMean (in eval mode) and the first member's
    metadata, the members checked to agree (check_members)."""
    paths = checkpoint_list(given)
    if len(paths) == 1:
        return load_checkpoint(paths[0], device)
    meta = check_members(paths)
    members = [load_checkpoint(path, device)[0] for path in paths]
    return ProbabilityMean(members, activation_of(meta)).eval(), meta
