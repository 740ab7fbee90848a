"""What one site does in a round, with the training code of `rwkvseg train` (no Flower here).

A site's data is set up exactly as a centralized run's (train.images / train.volumes) from the site's own split
file, in the site's folder. Local training continues the run-wide LR schedule where the round starts (the
schedule spans rounds x local_epochs epochs of this site's steps), with a fresh optimizer each round, or with
keep_optimizer the site's optimizer state of its previous round (optimizer-round<N>.pt in the site's folder: it
never leaves the site; the last two rounds' files are kept, so a run resumed at a round whose aggregation did not
finish finds the state that round started from). Seeded per (seed, round, site), so a resumed run repeats the
uninterrupted one. FedProx adds mu/2 ||w - w_global||^2 to the local loss.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.splits import SPLIT_FILE, SPLIT_FORMAT, write_split
from ..devices import placed
from ..files import atomic_write
from ..train.config import TrainConfig
from ..train.loop import Run, loop_precision, steps_per_epoch, train_epoch
from ..train.optim import lr_factor
from ..train.run import RunData, training_setup
from ..train.state import Progress
from ..train.workers import forks
from .sites import Site


class ProximalLoss(nn.Module):
    """loss(logits, target) + mu/2 * ||w - w_global||^2 over the model's trainable parameters, with w_global the
    weights the round started from (FedProx, Li et al. 2020)."""

    def __init__(self, loss: nn.Module, model: nn.Module, mu: float) -> None:
        super().__init__()
        self.loss, self.mu = loss, mu
        self.model = [model]  # a list: not registered as a submodule of the loss
        self.anchor = [p.detach().clone() for p in model.parameters() if p.requires_grad]

    def proximal(self) -> torch.Tensor:
        params = [p for p in self.model[0].parameters() if p.requires_grad]
        return sum(((p - a).pow(2).sum() for p, a in zip(params, self.anchor, strict=True)), torch.zeros(()))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss(logits, target) + 0.5 * self.mu * self.proximal().to(logits.device)


def site_config(
    config: TrainConfig, site_dir: Path, data_root: str, patches_per_case: int = 0, train_cases: int = 0
) -> TrainConfig:
    """The training config of one site: its own split file and folder, the shared (preprocessed) data root; with
    patches_per_case (3D), an epoch of that many patches per training case (at least one batch); loader workers
    started by forkserver, not fork, unless the config names a start method."""
    data = replace(config.data, root=data_root, split=str(site_dir / SPLIT_FILE))
    if data.worker_start == "auto" and forks("auto"):
        # A site trains inside a Flower process that runs gRPC threads: a deployed ClientApp's channel to its
        # SuperNode (with a heartbeat thread), a simulated site's Ray worker. Forking a process with live gRPC
        # threads is unsafe (grpc/grpc#32758; gRPC's fork support covers only some cases): on an H200 with grpcio
        # 1.85.3 a forked DataLoader worker aborted in ev_epoll1_linux.cc ("Check failed: next_worker->state ==
        # KICKED") and the federation stopped after round 1. A forkserver is started by exec, without those
        # threads, and forks the workers (rwkvseg.train.workers). Where auto does not fork (macOS, Windows, Python
        # 3.14 on Linux) it is kept.
        data = replace(data, worker_start="forkserver")
    if patches_per_case:
        samples = max(data.batch_size, patches_per_case * train_cases)
        data = replace(data, patches=replace(data.patches, samples_per_epoch=samples))
    return replace(config, out=str(site_dir), data=data)


def write_site_split(site: Site, site_dir: Path, seed: int) -> Path:
    """The site's train/val lists as a split file in its folder (what the data setup reads)."""
    doc = {
        "format": SPLIT_FORMAT,
        "method": "site",
        "site": site.name,
        "seed": seed,
        "n_cases": len(site.train) + len(site.val),
        "folds": [{"train": list(site.train), "val": list(site.val)}],
        "test": [],
    }
    site_dir.mkdir(parents=True, exist_ok=True)
    return write_split(site_dir / SPLIT_FILE, doc, overwrite=True)


def setup_site(config: TrainConfig, device: torch.device) -> RunData:
    """Datasets, validator, loss and checkpoint record of one site (config from site_config)."""
    if config.train_all:  # the federation chooses its rounds on the sites' validation scores
        raise ValueError(
            "train_all has no place in federated training (the server chooses rounds on the sites' validation); "
            "leave it out of the site config"
        )
    if config.dims == 3:
        from ..train.volumes import setup_volumes as setup
    else:
        from ..train.images import setup_images as setup
    return setup(config, Path(config.out), device)


def site_seed(seed: int, round_: int, site_index: int) -> int:
    return (seed * 1_000_003 + round_ * 7919 + site_index) % 2**63


def train_site(
    config: TrainConfig,
    data: RunData,
    model: nn.Module,
    *,
    round_: int,
    local_epochs: int,
    mu: float,
    site_index: int,
    device: torch.device,
    keep_optimizer: bool = False,
) -> dict[str, Any]:
    """local_epochs epochs of round round_ (from 1) on the site's training cases; the model is updated in place.
    Returns the metrics that leave the site: mean training loss, steps, examples, seconds."""
    torch.manual_seed(site_seed(config.seed, round_, site_index))
    placed(model, device).train()
    optimizer, scheduler, loop = training_setup(model, config, len(data.train_set), device, progress_bar=False)
    site_dir = Path(config.out)
    if keep_optimizer and round_ > 1:
        optimizer.load_state_dict(_load_optimizer_state(site_dir, round_ - 1, device))
    per_epoch = steps_per_epoch(len(data.train_set), loop.batch_size, loop.max_steps_per_epoch)
    total, start_step = config.epochs * per_epoch, (round_ - 1) * local_epochs * per_epoch
    scheduler.last_epoch = start_step  # continue the run-wide schedule where this round starts
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lr_factor(start_step, total, config.optim)
    loss = ProximalLoss(data.loss, model, mu) if mu > 0 else data.loss
    run = Run(model, data.train_set, loss, optimizer, scheduler, data.validate, data.meta, Path(config.out), device)
    precision, progress = loop_precision(loop.amp), Progress(step=start_step)
    start, losses = time.perf_counter(), []
    for e in range(local_epochs):
        row = train_epoch(run, loop, (round_ - 1) * local_epochs + e + 1, progress, precision)
        losses.append(row["train_loss"])
    if keep_optimizer:
        atomic_write(_optimizer_file(site_dir, round_), lambda tmp: torch.save(optimizer.state_dict(), tmp))
        _optimizer_file(site_dir, round_ - 2).unlink(missing_ok=True)
    out = {
        "train_loss": float(sum(losses) / len(losses)),
        "lr": float(optimizer.param_groups[0]["lr"]),
        "steps": progress.step - start_step,
        "train_seconds": round(time.perf_counter() - start, 3),
    }
    if mu > 0:
        out["proximal"] = float(loss.proximal().item())
    return out


def _optimizer_file(site_dir: Path, round_: int) -> Path:
    return site_dir / f"optimizer-round{round_}.pt"


def _load_optimizer_state(site_dir: Path, round_: int, device: torch.device) -> dict[str, Any]:
    path = _optimizer_file(site_dir, round_)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: federated.site_optimizer = keep needs this site's optimizer state of round {round_}; "
            "restore the site's folder, or set federated.site_optimizer = fresh"
        )
    return torch.load(path, map_location=device, weights_only=True)


def validate_site(config: TrainConfig, data: RunData, model: nn.Module, device: torch.device) -> dict[str, float]:
    """The validation scores of the site's validation cases (means over its cases), as `rwkvseg train` scores."""
    from ..train.loop import resolve_amp

    precision = loop_precision(resolve_amp(config.amp, device))
    placed(model, device).eval()
    start = time.perf_counter()
    with torch.no_grad(), precision.autocast(device):
        scores = data.validate(model)
    return {**{k: float(v) for k, v in scores.items()}, "val_seconds": round(time.perf_counter() - start, 3)}
