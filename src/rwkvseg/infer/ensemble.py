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
from collections.abc import Collection, Sequence
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


# the recorded inference defaults a command line can set for every member, and the option that does
INFERENCE_FLAGS = {
    "threshold": "--threshold",
    "postprocess": "--postprocess",
    "mirror_axes": "--mirror-axes",
    "overlap": "--overlap",
}


def _shared(meta: CheckpointMeta, overridden: Collection[str]) -> dict[str, object]:
    """What the members of an ensemble must agree on; the inference defaults in overridden are set for all."""
    preprocessing = dict(meta.preprocessing)
    if "inference" in preprocessing:
        preprocessing["inference"] = {k: v for k, v in preprocessing["inference"].items() if k not in overridden}
    shared: dict[str, object] = {
        "in_channels": meta.in_channels,
        "num_classes": meta.num_classes,
        "class_names": meta.class_names,
        "spacing": meta.spacing,
        "preprocessing": preprocessing,
    }
    if "threshold" not in overridden:  # a 2D checkpoint's cut
        shared["training.threshold"] = meta.training.get("threshold")
    return shared


def check_members(paths: Sequence[Path], overridden: Collection[str] = ()) -> CheckpointMeta:
    """The first member's metadata, after checking that every member is a checkpoint (its sidecar is there) and
    that all agree on _shared (but for the inference defaults in overridden, INFERENCE_FLAGS keys that the command
    line sets for every member); ValueError naming the member, the setting and both values otherwise."""
    for path in paths:
        _, sidecar = checkpoint_paths(path)
        if not sidecar.is_file():
            raise ValueError(
                f"{path} is not a checkpoint (no sidecar {sidecar}): an ensemble is CHECKPOINT [CHECKPOINT ...] "
                "INPUT, with one input last"
            )
    first = read_meta(paths[0])
    reference = _shared(first, overridden)
    for path in paths[1:]:
        other = _shared(read_meta(path), overridden)
        for key, value in reference.items():
            if other[key] != value:
                where, theirs, ours = _first_difference(other[key], value, key)
                setting = where.removeprefix("preprocessing.inference.").removeprefix("training.")
                fix = f", or give {INFERENCE_FLAGS[setting]} for all of them" if setting in INFERENCE_FLAGS else ""
                raise ValueError(
                    f"{path}: its {where} ({_short(theirs)}) differs from {paths[0]}'s ({_short(ours)}); the members "
                    "of an ensemble must predict the same classes from the same preprocessing, with the same recorded "
                    f"inference defaults{fix}"
                )
    return first


_ABSENT = object()


def _first_difference(a: object, b: object, where: str) -> tuple[str, object, object]:
    """The dotted path of the first setting in which two (nested) records differ, with both values."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(a.keys() | b.keys()):
            if a.get(key, _ABSENT) != b.get(key, _ABSENT):
                return _first_difference(a.get(key, _ABSENT), b.get(key, _ABSENT), f"{where}.{key}")
    return where, a, b


def _short(value: object, limit: int = 120) -> str:
    text = "not recorded" if value is _ABSENT else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_checkpoints(
    given: Given, device: str | torch.device = "cpu", overridden: Collection[str] = ()
) -> tuple[nn.Module, CheckpointMeta]:
    """load_checkpoint for one checkpoint; for several, their ProbabilityMean (in eval mode) and the first member's
    metadata, the members checked to agree (check_members; overridden: the inference defaults the caller sets for
    every member, which may differ between them)."""
    paths = checkpoint_list(given)
    if len(paths) == 1:
        return load_checkpoint(paths[0], device)
    meta = check_members(paths, overridden)
    members = [load_checkpoint(path, device)[0] for path in paths]
    return ProbabilityMean(members, activation_of(meta)).eval(), meta
