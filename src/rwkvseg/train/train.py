"""One run, any dimension: `train(config)` opens the run folder, lets the 2D or 3D setup assemble the data, then
builds the model from the checkpoint record and runs the shared loop under one time-budget rule."""

from __future__ import annotations

import time
from collections.abc import Callable

from ..checkpoint import build_model
from ..files import folder_lock
from .config import TrainConfig
from .loop import Progress, Run, fit, resolve_device
from .run import log_done, open_run_dir, training_setup

Stop = Callable[[Progress], bool]


def train(config: TrainConfig, resume: bool = False, progress_bar: bool = False, stop: Stop | None = None) -> Progress:
    """Train a registered model as the config says (2D or 3D by config.dims); returns the progress.

    stop(progress) is asked after every epoch (besides config.max_minutes); resume continues the run in
    config.out exactly. The run folder is locked while the run writes it (a second run there is refused).
    """
    with folder_lock(config.out):
        return _train(config, resume, progress_bar, stop)


def _train(config: TrainConfig, resume: bool, progress_bar: bool, stop: Stop | None) -> Progress:
    if not config.data.root:
        raise ValueError(
            "data.root is empty; set it in the config or pass --data (a dataset folder, or for 3D a preprocessed cache)"
        )
    run_dir = open_run_dir(config, resume)
    device = resolve_device(config.device)
    if config.dims == 3:
        from .volumes import setup_volumes as setup
    else:
        from .images import setup_images as setup
    data = setup(config, run_dir, device)
    model = build_model(data.meta).to(device)
    optimizer, scheduler, loop = training_setup(model, config, len(data.train_set), device, progress_bar)
    start = time.perf_counter()
    run = Run(model, data.train_set, data.loss, optimizer, scheduler, data.validate, data.meta, run_dir, device)
    progress = fit(run, loop, resume=resume, stop=budget_stop(config, start, stop))
    log_done(progress, config.select_metric, start, run_dir)
    if data.finish is not None:
        data.finish(progress)
    return progress


def budget_stop(config: TrainConfig, start: float, stop: Stop | None) -> Stop | None:
    """stop, or with config.max_minutes > 0 also: stop after a validated epoch whose next validation would end
    past the budget (measured from start), so a stopped run always has a best checkpoint."""
    if config.max_minutes <= 0:
        return stop
    epochs_run = 0

    def over_budget(progress: Progress) -> bool:
        nonlocal epochs_run
        epochs_run += 1
        elapsed = time.perf_counter() - start
        validated = f"val_{config.select_metric}" in progress.history[-1]
        over = validated and elapsed * (1 + config.val_every / epochs_run) > 60 * config.max_minutes
        return over or (stop is not None and stop(progress))

    return over_budget
