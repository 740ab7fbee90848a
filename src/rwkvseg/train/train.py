"""One run, any dimension: `train(config)` opens the run folder, lets the 2D or 3D setup assemble the data, then
builds the model from the checkpoint record (with model.init, from those weights: rwkvseg.train.finetune) and runs
the shared loop under one time-budget rule (and with fit_schedule, the fit of the run to that budget). Under
torchrun every process calls train: data-parallel training (train/distributed.py, docs/distributed.md)."""

from __future__ import annotations

import logging
import math
import time

import torch

from ..devices import placed, resolve_device
from ..files import folder_lock
from . import distributed
from .config import TrainConfig
from .finetune import initial_model
from .loop import FitSchedule, Progress, Run, Stop, fit
from .run import log_done, open_run_dir, training_setup
from .state import ScheduleFit

log = logging.getLogger(__name__)


def train(
    config: TrainConfig,
    resume: bool = False,
    progress_bar: bool = False,
    stop: Stop | None = None,
    dist_timeout_s: float = distributed.DEFAULT_TIMEOUT_S,
) -> Progress:
    """Train a registered model as the config says (2D or 3D by config.dims); returns the progress.

    stop(progress) is asked after every epoch (besides config.max_minutes); resume continues the run in
    config.out exactly. The run folder is locked while the run writes it (a second run there is refused; under
    torchrun rank 0 holds the lock). Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK set) every process calls train:
    data.batch_size is the global batch, split evenly over the processes, and a collective that waits longer
    than dist_timeout_s (a rank failed or hangs) ends the run with an error.
    """
    if distributed.Launch.from_env().rank != 0:
        return _launch(config, resume, progress_bar, stop, dist_timeout_s)
    with folder_lock(config.out):
        return _launch(config, resume, progress_bar, stop, dist_timeout_s)


def _launch(config: TrainConfig, resume: bool, progress_bar: bool, stop: Stop | None, dist_timeout_s: float):
    if not config.data.root:
        raise ValueError(
            "data.root is empty; set it in the config or pass --data (a dataset folder, or for 3D a preprocessed cache)"
        )
    launch = distributed.Launch.from_env()
    distributed.rank_batch(config.data.batch_size, launch.world_size)  # refuse an uneven split before any work
    device = distributed.launch_device(resolve_device(config.device), launch)
    with distributed.process_group(device, launch, dist_timeout_s):
        return _train(config, resume, progress_bar and launch.rank == 0, stop, device)


def _train(config: TrainConfig, resume: bool, progress_bar: bool, stop: Stop | None, device: torch.device) -> Progress:
    with distributed.main_first():  # rank 0 writes the split, config and (3D) cache; the others then read them
        run_dir = open_run_dir(config, resume)
        if config.dims == 3:
            from .volumes import setup_volumes as setup
        else:
            from .images import setup_images as setup
        data = setup(config, run_dir, device)
    model, meta = initial_model(data.meta, config.model.init, run_dir if resume else None)
    ranks = distributed.world_size()
    if ranks > 1:  # batch statistics over the global batch, as in one process (U-RWKV and the CNNs use BatchNorm)
        model = distributed.sync_batchnorm(model, device)
    model = placed(model, device)  # on the CPU its batch-1 calls (validation windows) off the slow 3-D path
    optimizer, scheduler, loop = training_setup(model, config, len(data.train_set), device, progress_bar)
    if distributed.is_main():
        log.info(
            "global batch %d (%d per process x %d processes); learning rate %g (%s, %s schedule)",
            loop.batch_size,
            loop.batch_size // ranks,
            ranks,
            config.optim.lr,
            config.optim.name,
            config.optim.schedule,
        )
    start = time.perf_counter()
    run = Run(model, data.train_set, data.loss, optimizer, scheduler, data.validate, meta, run_dir, device)
    fit_schedule = budget_fit(config, start)
    progress = fit(run, loop, resume=resume, stop=budget_stop(config, start, stop), fit_schedule=fit_schedule)
    if distributed.is_main():
        log_done(progress, config.select_metric, start, run_dir)
        if data.finish is not None:
            data.finish(progress)
    return progress


def budget_stop(config: TrainConfig, start: float, stop: Stop | None) -> Stop | None:
    """stop, or with config.max_minutes > 0 also a wall-clock budget (measured from start), checked only after a
    validated epoch so a stopped run always has a best checkpoint (after every epoch with train_all, whose every
    epoch is its best). After the first epoch of this process it stops only if the elapsed time alone is past the
    budget: that epoch may hold torch.compile of the training step, far longer than the epochs after it. After a
    later epoch it stops if elapsed + val_every (train_all: 1) x that epoch's own duration (the time since the
    previous call), the estimated end of the next validation (or epoch), is past the budget; where the run's last
    epoch (of a run fitted to its budget, its fitted last) comes sooner, that many epochs instead."""
    if config.max_minutes <= 0:
        return stop
    budget = 60 * config.max_minutes
    every = 1 if config.train_all else config.val_every  # epochs from one checkpoint choice to the next
    epochs_run, last = 0, start

    def over_budget(progress: Progress) -> bool:
        nonlocal epochs_run, last
        now = time.perf_counter()
        epoch_seconds, last = now - last, now
        epochs_run += 1
        elapsed = now - start
        # the next validation: `every` epochs on, or the run's last epoch (validated) if that comes first
        end = config.epochs if progress.schedule_fit is None else progress.schedule_fit.epochs
        ahead = 0.0 if epochs_run == 1 else min(every, end - progress.epoch) * epoch_seconds
        validated = config.train_all or f"val_{config.select_metric}" in progress.history[-1]
        over = validated and elapsed + ahead > budget
        return over or (stop is not None and stop(progress))

    return over_budget


def budget_fit(config: TrainConfig, start: float) -> FitSchedule | None:
    """With config.fit_schedule, fit's fit_schedule: the run fitted to its wall-clock budget (config.max_minutes,
    measured from start), decided once in this process. Asked after every epoch (until the run is fitted); after
    this process's first epoch (which may hold torch.compile) it only notes the time. After a later epoch, once
    a validation has been timed (this process's or an earlier one's, in progress.history; train_all validates
    none), it estimates the seconds per epoch: that epoch's own duration without its validation, plus the last
    validation's seconds / val_every. fitted_epochs gives the epochs that fit in the time left less val_every - 1
    validations (budget_stop's estimate of the next validation counts that many more, and would otherwise end a
    run fitted to the second a validation early); fewer than config.epochs is a ScheduleFit, else the run keeps
    its plan (logged, and not asked again in this process)."""
    if not config.fit_schedule:
        return None
    budget = 60 * config.max_minutes
    epochs_run, last, decided = 0, start, False

    def fit_to_budget(progress: Progress) -> ScheduleFit | None:
        nonlocal epochs_run, last, decided
        now = time.perf_counter()
        epoch_seconds, last = now - last, now
        epochs_run += 1
        if decided or epochs_run == 1:
            return None
        # the run's last timed validation (this process's or an earlier one's); None before its first
        val_seconds = next((row["val_seconds"] for row in reversed(progress.history) if "val_seconds" in row), None)
        if val_seconds is None and not config.train_all:
            return None
        decided = True
        row = progress.history[-1]
        per_epoch = epoch_seconds - row.get("val_seconds", 0.0)
        if not config.train_all:
            per_epoch += val_seconds / config.val_every
        left = budget - (now - start)
        # budget_stop reckons val_every whole epochs, each with a validation, ahead of a validated epoch: val_every - 1
        # validations more than these epochs take, kept aside so that it does not end the fitted run a validation early
        aside = 0.0 if config.train_all else (config.val_every - 1) * val_seconds
        epochs = fitted_epochs(progress.epoch, left - aside, per_epoch, config.epochs)
        seconds = f"{per_epoch:.1f} s per epoch, {left:.0f} s left"
        if epochs == config.epochs:
            log.info("the schedule fits the budget: all %d epochs (%s)", config.epochs, seconds)
            return None
        return ScheduleFit(config.epochs, epochs, progress.epoch, progress.step, round(per_epoch, 3), round(left, 3))

    return fit_to_budget


def fitted_epochs(done: int, seconds_left: float, seconds_per_epoch: float, planned: int) -> int:
    """The epochs a run fits in its budget: the `done` ones + those seconds_left holds at seconds_per_epoch, at
    least one more than done (the epoch that ends the run), at most the planned ones."""
    ahead = math.floor(seconds_left / seconds_per_epoch) if seconds_per_epoch > 0 else planned
    return min(planned, max(done + 1, done + ahead))
