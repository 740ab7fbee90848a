"""What a run does around `fit` in 2D and 3D alike: open the run folder, save the resolved config, build the
optimiser, schedule and loop settings from the config, and report the result."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ..checkpoint import CheckpointMeta
from ..compiling import compile_mode
from ..files import write_json
from ..memory_format import module_to
from . import distributed
from .config import TrainConfig, config_from_dict, to_dict
from .loop import LoopConfig, Progress, Validate, resolve_amp, steps_per_epoch
from .optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class RunData:
    """What the 2D or 3D setup hands to the shared run: the training set, validate(model) (None: train_all), the
    loss, the record the checkpoints carry (the model is built from it), and what to do after training (3D: a final
    TTA score)."""

    train_set: Dataset
    validate: Validate | None
    loss: nn.Module
    meta: CheckpointMeta
    finish: Callable[[Progress], None] | None = None


def fold_cases(
    train: tuple[str, ...], val: tuple[str, ...], train_all: bool
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(training cases, validation cases) of a fold: as split, or with train_all every case trained, none validated."""
    return ((*train, *val), ()) if train_all else (train, val)


def train_all_record(train_all: bool, train_cases: tuple[str, ...]) -> dict[str, Any]:
    """What a train_all checkpoint adds to its training record: that the split's validation cases trained too, and
    how many cases trained (a run with validation records nothing here)."""
    return {"train_all": True, "train_cases": len(train_cases)} if train_all else {}


def open_run_dir(config: TrainConfig, resume: bool) -> Path:
    """The run folder of config.out, refusing to start over a run unless resuming; seeds the global RNGs."""
    run_dir = Path(config.out)
    if not resume and (run_dir / "state.pt").exists():
        raise FileExistsError(
            f"{run_dir} already holds a training run; pass --resume to continue it, "
            "or choose another output folder (--out or --set out=...)"
        )
    if resume:
        saved = run_dir / CONFIG_FILE
        if saved.is_file():
            changed = changed_settings(config_from_dict(json.loads(saved.read_text())), config)
            if changed:
                log.warning(
                    "the config differs from the one saved in %s (%s); resuming with the new one",
                    saved,
                    ", ".join(changed),
                )
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed % 2**32)  # noqa: NPY002  (for third-party code that uses the global RNG)
    return run_dir


def changed_settings(saved: TrainConfig, config: TrainConfig) -> list[str]:
    """The dotted names of the settings that differ between two configs, `out` left aside: a run folder that
    moved (copied, or carried to another machine by rwkvseg pack / unpack) is still the same run."""

    def flat(node: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(node, dict):
            return {prefix[:-1]: node}
        return {k: v for key, value in node.items() for k, v in flat(value, f"{prefix}{key}.").items()}

    a, b = flat(to_dict(saved)), flat(to_dict(config))
    return [key for key in dict.fromkeys([*a, *b]) if key != "out" and a.get(key) != b.get(key)]


def save_config(config: TrainConfig, run_dir: Path) -> None:
    """The resolved config as <run_dir>/config.json (what --resume reads back)."""
    write_json(run_dir / CONFIG_FILE, to_dict(config))


def auto_compile_mode(world_size: int) -> str:
    """The torch.compile mode of the training step when compile = "auto" on CUDA. One process: CUDA graphs
    ("reduce-overhead"); measured on one H200 (2026-12-03): the 2D paper-recipe epoch (U-RWKV, Kvasir-SEG, batch 4)
    took 4.25 s in the default mode and 1.68 s under CUDA graphs (`rwkvseg bench epoch`); the 3D recipe's step
    (MMSegRWKV-small, batch 2, 64^3) took 18 ms in `rwkvseg train` under CUDA graphs, beside another run, where
    `rwkvseg bench models` measured 55 ms for it compiled in the default mode. These steps are bound by kernel
    launches, which a graph replay removes. Under DDP, the default mode: CUDA graphs around DDP's gradient
    communication have not been measured here."""
    return "reduce-overhead" if world_size == 1 else "default"


def training_setup(
    model: nn.Module, config: TrainConfig, n_train: int, device: torch.device, progress_bar: bool
) -> tuple[torch.optim.Optimizer, Any, LoopConfig]:
    """Optimiser, per-step schedule over the whole run, and loop settings from config (and config.data). With
    memory_format = channels_last the model's parameters are converted first, in place: the optimizer's state,
    the compiled step and DDP's buckets then take their layout."""
    d = config.data
    if config.memory_format != "contiguous":
        check_channels_last_batch(min(n_train, distributed.rank_batch(d.batch_size)), device)
        module_to(model, config.memory_format, config.dims)
    optimizer = build_optimizer(model, config.optim)
    total = config.epochs * steps_per_epoch(n_train, d.batch_size, config.max_steps_per_epoch)
    scheduler = build_scheduler(optimizer, config.optim, total)
    loop = LoopConfig(
        epochs=config.epochs,
        batch_size=d.batch_size,
        seed=config.seed,
        val_every=config.val_every,
        amp=resolve_amp(config.amp, device),
        grad_clip=config.optim.grad_clip,
        max_steps_per_epoch=config.max_steps_per_epoch,
        select_metric=config.select_metric,
        num_workers=d.num_workers,
        worker_start=d.worker_start,
        logger=config.logger,
        progress=progress_bar,
        compile=compile_mode(config.compile, device, auto=auto_compile_mode(distributed.world_size())) or "off",
        compile_backend=config.compile_backend,
        compile_fallback=config.compile == "auto",
        compile_cache=config.compile_cache,
        ema=config.optim.ema,
        ema_start=config.optim.ema_start,
        memory_format=config.memory_format,
    )
    return optimizer, scheduler, loop


def check_channels_last_batch(per_process: int, device: torch.device) -> None:
    """Refuse channels-last training where torch computes wrong gradients: on the CPU, F.instance_norm's backward
    under a channels-last gradient at batch 1 (seen with torch 2.13; tests/test_memory_format.py keeps the case
    visible)."""
    if device.type == "cpu" and per_process == 1:
        raise ValueError(
            "memory_format = channels_last trains one sample per process on the CPU, where torch's instance norm "
            "computes a wrong input gradient in that layout; set data.batch_size >= 2 per process, or "
            "memory_format = contiguous"
        )


def log_done(progress: Progress, select_metric: str, start: float, run_dir: Path) -> None:
    if progress.best_metric is None and progress.best_epoch is not None:  # train_all: nothing validated
        seconds = time.perf_counter() - start
        log.info(
            "done in %.1f s: no validation, the last epoch %d kept; checkpoint %s",
            seconds,
            progress.epoch,
            run_dir / "best",
        )
        return
    best = progress.best_metric if progress.best_metric is not None else float("nan")
    log.info(
        "done in %.1f s: best val %s %.4f at epoch %s; checkpoint %s",
        time.perf_counter() - start,
        select_metric,
        best,
        progress.best_epoch,
        run_dir / "best",
    )
