"""Optimizers and per-iteration learning-rate schedules (poly as in the paper, cosine with warmup), and the
compression of a schedule's remaining part onto fewer steps (a run fitted to its time budget)."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import OptimConfig


def build_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    fused = True if config.fused else None  # None: torch picks its foreach kernels
    if config.name == "sgd":
        return torch.optim.SGD(
            params,
            lr=config.lr,
            momentum=config.momentum,
            nesterov=config.nesterov,
            weight_decay=config.weight_decay,
            fused=fused,
        )
    return torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay, fused=fused)


def lr_factor(step: int, total_steps: int, config: OptimConfig) -> float:
    """Multiplier of the base LR after `step` optimizer steps (of total_steps)."""
    if config.warmup_steps and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    span = max(1, total_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = config.min_lr / config.lr
    if config.schedule == "poly":
        return floor + (1 - floor) * (1 - progress) ** config.power
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per iteration; its state_dict (the step count) is all a resume needs."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, config))


def compress_schedule(scheduler: torch.optim.lr_scheduler.LRScheduler, step: int, total: int, fitted: int) -> None:
    """From optimizer step `step` on, play the rest of a schedule planned over `total` steps in `fitted` steps
    (step < fitted < total): step s > `step` takes the factor of the planned step
    total - (fitted - s) (total - step) / (fitted - step), so the factor goes on from its value at `step` and
    reaches the planned end (poly, cosine: min_lr) at step `fitted`. For poly that is the same curve from the
    current factor down to the end, floor + (f - floor) (1 - q)^power over the remaining fraction q; cosine keeps
    the rest of its arc; warmup still ahead is shortened alike. No jump: the step that follows the switch trains
    at the learning rate the switch found. Rebuilt from the same numbers on resume, so a resume stays exact."""
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        raise TypeError(f"compress_schedule needs a LambdaLR (build_scheduler's), got {type(scheduler).__name__}")
    if not step < fitted < total:
        raise ValueError(f"compress_schedule needs step < fitted < total, got {step}, {fitted}, {total}")

    def compressed(factor):
        def at(s: int) -> float:
            return factor(s) if s <= step else factor(total - (fitted - s) * (total - step) / (fitted - step))

        return at

    scheduler.lr_lambdas = [compressed(factor) for factor in scheduler.lr_lambdas]
