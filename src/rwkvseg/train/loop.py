"""The training loop, shared by 2D and 3D: a model, a training dataset, a loss and a `validate(model)` callable.

Per epoch: a seeded shuffle, optimizer steps (mixed precision on GPU), validation, then the run folder is
brought up to date: `best` checkpoint (chosen on validation only), `last` checkpoint, the full training state
for --resume, and metrics.csv. A run without validation (validate None: train_all) keeps its last epoch as
`best`. Every file is written atomically, so an interrupted run loses at most the
epoch in progress and never a file it had written. A run fitted to its time budget (fit's fit_schedule,
TrainConfig.fit_schedule) ends after its fitted epochs, its schedule compressed onto them, and keeps that fit
when resumed. With an average of the weights (LoopConfig.ema,
rwkvseg.train.ema) validation scores the average and both checkpoints hold it; state.pt holds it beside the raw
weights, which keep training.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..checkpoint import CheckpointMeta, save_checkpoint
from ..compiling import check_compile, compile_callable, synchronize
from ..devices import cpu_has_native_bf16
from ..files import atomic_write_text, write_json
from ..memory_format import check_memory_format, torch_layout
from . import distributed
from .compile_cache import load_compile_cache, save_compile_cache
from .ema import WeightEma
from .optim import compress_schedule
from .state import Progress, ScheduleFit, load_state, save_state
from .workers import check_worker_start, forks, start_workers, worker_context

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
METRICS_FILE = "metrics.csv"
SUMMARY_FILE = "summary.json"
Validate = Callable[[nn.Module], dict[str, float]]
Stop = Callable[[Progress], bool]
FitSchedule = Callable[[Progress], ScheduleFit | None]
# training.best.selection of a run without validation (train_all): its `best` is the last epoch
LAST_EPOCH = "last epoch (train_all: no validation cases)"


@dataclass(frozen=True)
class LoopConfig:
    """amp: "bf16" | "fp16" | "off" (already resolved for the device); select_mode: "max" or "min".

    compile: "off" or the torch.compile mode of the training step (model forward + loss; already resolved for the
    device), with compile_backend; compile_fallback: run eagerly (with a warning) when compiling fails;
    compile_cache: a file the compiled step's artifacts are loaded from before it compiles and written to after
    its first call (rwkvseg.train.compile_cache; "" for none).
    sync_every: the loss stays on the device and is read (and checked for NaN / inf) every sync_every steps and at
    the end of the epoch, so the host never waits for the GPU inside a step.
    ema, ema_start: optim.ema and optim.ema_start (0: no average of the weights; rwkvseg.train.ema).
    num_workers, worker_start: the DataLoader's worker processes and how they start (data.worker_start:
    "auto" | "fork" | "forkserver" | "spawn"; rwkvseg.train.workers).
    memory_format: the layout each training batch's input takes on the device, "contiguous" or "channels_last"
    (the model's parameters are converted by whoever builds it: rwkvseg.train.run.training_setup).
    """

    epochs: int
    batch_size: int = 4
    seed: int = 0
    val_every: int = 1
    amp: str = "off"
    grad_clip: float = 0.0
    max_steps_per_epoch: int = 0
    select_metric: str = "dice"
    select_mode: str = "max"
    num_workers: int = 0
    worker_start: str = "auto"
    logger: str = "csv"
    progress: bool = False
    compile: str = "off"
    compile_backend: str = "inductor"
    compile_fallback: bool = False
    compile_cache: str = ""
    sync_every: int = 50
    ema: float = 0.0
    ema_start: int = 0
    memory_format: str = "contiguous"

    def __post_init__(self) -> None:
        check_compile(self.compile, self.compile_backend)
        check_memory_format(self.memory_format)
        if self.compile in ("auto", "on"):
            raise ValueError("LoopConfig.compile takes a resolved mode (or off); resolve it with compile_mode()")
        if self.sync_every < 1:
            raise ValueError(f"sync_every must be >= 1, got {self.sync_every}")
        check_worker_start(self.worker_start)


def resolve_amp(amp: str, device: torch.device) -> str:
    """auto: bf16 autocast on GPUs that support it, fp16 (with loss scaling) on older GPUs, off on CPU. bf16 asked
    for on a CPU with native bfloat16 (AVX512-BF16, AMX) is bf16 autocast there too: about 2.8x faster 3D steps
    (docs/speed.md, "Predicting in bfloat16"); elsewhere the CPU trains in float32, with a warning."""
    if device.type != "cuda":
        if amp == "bf16" and device.type == "cpu" and cpu_has_native_bf16():
            return "bf16"
        if amp in ("bf16", "fp16"):
            needs = "a CPU with native bfloat16 (AVX512-BF16 or AMX)" if amp == "bf16" else "CUDA"
            log.warning("mixed precision %s needs %s; training in float32 on %s", amp, needs, device)
        return "off"
    if amp == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return amp


def steps_per_epoch(n_train: int, batch_size: int, max_steps: int = 0) -> int:
    """Optimizer steps per epoch: full batches only (a last batch of 1 breaks BatchNorm), at least one."""
    steps = max(1, n_train // batch_size)
    return min(steps, max_steps) if max_steps else steps


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


class _BatchWait:
    """The seconds a training epoch spends waiting for its next batch: near zero while the loader keeps ahead of
    the steps, most of train_seconds when the loader (workers, augmentation) is what limits the run."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def over(self, batches: Iterator[Any]) -> Iterator[Any]:
        """The batches of an iterator, each next() timed (its workers' start-up counts in the first)."""
        while True:
            start = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                return
            finally:
                self.seconds += time.perf_counter() - start
            yield batch


def _write_metrics_csv(path: Path, history: list[dict[str, Any]]) -> None:
    keys = list(dict.fromkeys(k for row in history for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(path, buf.getvalue())


class _TensorBoard:
    def __init__(self, run_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError("logger = tensorboard needs the tensorboard package: pip install tensorboard") from None
        self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, row: dict[str, Any], step: int) -> None:
        for k, v in row.items():
            if isinstance(v, (int, float)) and k not in ("epoch", "step", "ema"):
                self.writer.add_scalar(k, v, step)
        self.writer.flush()


@contextlib.contextmanager
def _plain_worker_errors(worker_start: str = "auto") -> Iterator[None]:
    """DataLoader workers wrap a reader's error in a traceback dump; keep just its message (it names the file).
    A worker that died (killed, out of memory, or aborted) is a ChildProcessError that says what to do."""
    try:
        yield
    except RuntimeError as err:
        text = " ".join(str(err).split())
        if "DataLoader worker" not in text or not ("exited unexpectedly" in text or "killed by signal" in text):
            raise
        aborted = (
            "; if it aborted (a library's check failure in the log, e.g. gRPC's: forked workers inherit a copy of "
            "the state of the parent's threads), set data.worker_start = forkserver"
            if forks(worker_start)
            else ""
        )
        raise ChildProcessError(
            f"a data loading worker process died ({text}); the run stopped incomplete. If it was killed for memory, "
            f"lower data.num_workers (0 loads in the main process) or data.batch_size{aborted}; then continue with "
            "--resume"
        ) from None
    except (ValueError, FileNotFoundError) as err:
        text = str(err)
        if "DataLoader worker" not in text:
            raise
        last = [line for line in text.strip().splitlines() if line.strip()][-1]
        message = last.split(": ", 1)[1] if last.startswith(type(err).__name__ + ":") else last
        raise type(err)(message) from None


@contextlib.contextmanager
def _progress_bar(enabled: bool, total: int, description: str) -> Iterator[Callable[[str], None]]:
    if not enabled:
        yield lambda _text: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, TextColumn("{task.fields[info]}"), transient=True) as bar:
        task = bar.add_task(description, total=total, info="")
        yield lambda text: bar.update(task, advance=1, info=text)


@dataclass(frozen=True)
class Run:
    """What one run trains: the model with its optimizer and per-step scheduler, the data and the loss,
    validate(model), the checkpoint record (its training field is filled in per epoch) and where it all goes.
    validate None: no validation cases (train_all); the last epoch is the `best` checkpoint.
    train_set may have set_epoch(epoch) (reseeds augmentation); batches are {"image": x, "mask": y}.
    step_model: what the training step calls (fit sets it: the DDP wrapper of model under torchrun).
    ema: the average of model's weights that is validated and checkpointed (fit sets it when LoopConfig.ema > 0)."""

    model: nn.Module
    train_set: Dataset
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    validate: Validate | None
    meta: CheckpointMeta
    run_dir: Path
    device: torch.device | str = "cpu"
    step_model: nn.Module | None = None
    ema: WeightEma | None = None

    @property
    def eval_model(self) -> nn.Module:
        """What validation scores and the checkpoints hold: the average of the weights, or the model itself."""
        return self.model if self.ema is None else self.ema.module

    def weights_record(self) -> dict[str, Any]:
        """The checkpoint sidecar's note of an averaged model (none for the raw weights)."""
        return {} if self.ema is None else {"ema": self.ema.record()}


@dataclass
class _Precision:
    """Autocast dtype (None: float32) and the fp16 loss scaler of a loop."""

    dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None

    @classmethod
    def of(cls, amp: str) -> _Precision:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        return cls(dtype, torch.amp.GradScaler("cuda") if amp == "fp16" else None)

    def autocast(self, device: torch.device) -> torch.autocast:
        return torch.autocast(device.type, dtype=self.dtype, enabled=self.dtype is not None)


class _ForwardLoss:
    """loss_fn(model(x), y), compiled as the loop says: the part of a step that torch.compile traces (the backward
    is AOTAutograd's joint graph; the optimizer stays eager). The first call's time (with its backward, measured
    by the loop) is the compile time."""

    def __init__(self, run: Run, loop: LoopConfig) -> None:
        # the DDP wrapper when there is one: its forward arms the gradient all-reduce of the backward
        self.model = run.model if run.step_model is None else run.step_model
        self.loss_fn = run.loss_fn
        self.compiled = None
        if loop.compile != "off":
            if loop.compile_cache:
                load_compile_cache(loop.compile_cache)
            self.compiled = compile_callable(self.eager, loop.compile, loop.compile_backend)
        self.fallback = loop.compile_fallback
        self.compile_seconds: float | None = None

    def eager(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self.model(x), y)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.compiled is None:
            return self.eager(x, y)
        if self.compile_seconds is not None or not self.fallback:
            return self.compiled(x, y)
        try:
            return self.compiled(x, y)
        except Exception as err:  # compile = auto: a compiler failure falls back to eager rather than stopping
            log.warning("compiling the training step failed (%s: %s); training eagerly", type(err).__name__, err)
            self.compiled = None
            return self.eager(x, y)


def fit(
    run: Run,
    loop: LoopConfig,
    *,
    resume: bool = False,
    stop: Stop | None = None,
    fit_schedule: FitSchedule | None = None,
) -> Progress:
    """Train for loop.epochs epochs (or until stop(progress) is true after an epoch); returns the progress.

    Each epoch: train_epoch, validate_epoch (every loop.val_every epochs and the last), save_epoch. With resume,
    everything continues from run_dir/state.pt. Under torchrun (distributed.process_group) every rank calls
    fit; loop.batch_size is the global batch; rank 0 validates and writes the run folder; rank 0 asks stop and
    fit_schedule, and every rank follows its answer.

    fit_schedule(progress), asked after each epoch (before it is saved) until the run has a fit: a ScheduleFit
    to end the run after fewer epochs than loop.epochs, or None. From then on the run trains to the fitted
    epochs with run.scheduler (build_scheduler's, over loop.epochs) compressed onto them (compress_schedule);
    the fit is saved with the epoch, and a resumed run keeps it (it is never asked again).
    """
    run_dir, device = Path(run.run_dir), torch.device(run.device)
    state_path = run_dir / STATE_FILE
    if not resume and state_path.exists():
        raise FileExistsError(
            f"{run_dir} already holds a training run ({STATE_FILE}); pass --resume to continue it, "
            "or choose another output folder"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    run.model.to(device)
    precision = _Precision.of(loop.amp)
    ema = WeightEma(run.model, loop.ema, loop.ema_start) if loop.ema else None
    if resume:
        progress = load_state(state_path, run.model, run.optimizer, run.scheduler, precision.scaler, ema)
        log.info("resuming %s after epoch %d (step %d)", run_dir, progress.epoch, progress.step)
    else:
        progress = Progress()
    fitted = progress.schedule_fit
    if fitted is not None:
        if fitted.planned != loop.epochs:
            raise ValueError(
                f"{run_dir} was fitted to its time budget from {fitted.planned} to {fitted.epochs} epochs and the "
                f"config plans {loop.epochs}; resume with epochs = {fitted.planned} (it still ends after "
                f"{fitted.epochs}) or start a new run"
            )
        log.info("its schedule was fitted to the budget after epoch %d: %s", fitted.epoch, fitted.describe())
    if ema is not None:
        log.info(
            "validating and checkpointing the average of the weights (decay %g after step %d)", ema.decay, ema.start
        )
    run = replace(run, step_model=distributed.data_parallel(run.model, device), ema=ema)
    main = distributed.is_main()
    if main:  # until the last line of the run, the folder says it is not complete (kill -9 included)
        _write_summary(run_dir, progress, loop, "running")
    try:
        with _deferred_interrupt() as check_interrupt:
            _epochs(run, loop, progress, precision, stop, fit_schedule, main, check_interrupt)
    except BaseException as err:
        if main:
            status = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
            with contextlib.suppress(OSError):  # a full disk: the summary says "running", still not complete
                _write_summary(run_dir, progress, loop, status, " ".join(str(err).split()) or type(err).__name__)
        raise
    if main:
        _write_summary(run_dir, progress, loop, "complete")
    return progress


def _epochs(
    run: Run,
    loop: LoopConfig,
    progress: Progress,
    precision: _Precision,
    stop: Stop | None,
    fit_schedule: FitSchedule | None,
    main: bool,
    check_interrupt: Callable[[], None],
) -> None:
    run_dir = Path(run.run_dir)
    tensorboard = _TensorBoard(run_dir) if loop.logger == "tensorboard" and main else None
    forward_loss = _ForwardLoss(run, loop)
    if progress.schedule_fit is not None:
        loop = _fitted_loop(run, loop, progress.schedule_fit)
    epoch = progress.epoch
    while epoch < loop.epochs:  # loop.epochs: the fitted epochs once the run is fitted to its budget
        epoch += 1
        row = train_epoch(run, loop, epoch, progress, precision, forward_loss, check_interrupt)
        if run.validate is None:
            progress.best_epoch = epoch  # nothing to choose on: the last epoch is kept (save_epoch)
        elif epoch % loop.val_every == 0 or epoch == loop.epochs:
            row.update(_validate_on_main(run, loop, epoch, progress, precision))
        progress.epoch = epoch
        progress.history.append(row)
        if fit_schedule is not None and progress.schedule_fit is None:
            # decided before the epoch is saved: the state a resume starts from holds the fit
            fitted = distributed.on_main(lambda: fit_schedule(progress))  # one decision for all ranks
            if fitted is not None:
                progress.schedule_fit, row["fitted_epochs"] = fitted, fitted.epochs
                loop = _fitted_loop(run, loop, fitted)
                log.info("schedule fitted to the budget: %s", fitted.describe())
        if main:
            save_epoch(run, loop, progress, precision)
        distributed.barrier()  # the run folder is up to date before any rank goes on
        check_interrupt()  # after the epoch is saved: an interrupt here loses nothing
        if tensorboard is not None:
            tensorboard.log(row, progress.step)
        if run.validate is None:
            log.info("epoch %d/%d  loss %.4f  (no validation: kept as best)", epoch, loop.epochs, row["train_loss"])
        else:
            log.info(
                "epoch %d/%d  loss %.4f  %s  (best %s %.4f at epoch %s)",
                epoch,
                loop.epochs,
                row["train_loss"],
                "  ".join(f"{k} {v:.4f}" for k, v in row.items() if k.startswith("val_") and k != "val_seconds"),
                loop.select_metric,
                progress.best_metric if progress.best_metric is not None else math.nan,
                progress.best_epoch,
            )
        if stop is not None and distributed.on_main(lambda: stop(progress)):  # one decision for all ranks
            log.info("stopping after epoch %d", epoch)
            break


def _fitted_loop(run: Run, loop: LoopConfig, fitted: ScheduleFit) -> LoopConfig:
    """The loop of a run fitted to its budget: it ends after fitted.epochs, and run.scheduler (planned over
    loop.epochs) plays the rest of its schedule from fitted.step on over them."""
    n_steps = steps_per_epoch(len(run.train_set), loop.batch_size, loop.max_steps_per_epoch)
    compress_schedule(run.scheduler, fitted.step, loop.epochs * n_steps, fitted.epochs * n_steps)
    return replace(loop, epochs=fitted.epochs)


def _fit_record(progress: Progress) -> dict[str, Any]:
    """What the checkpoints and summary.json add for a run fitted to its budget (nothing otherwise)."""
    return {} if progress.schedule_fit is None else {"schedule_fit": progress.schedule_fit.record()}


@contextlib.contextmanager
def _deferred_interrupt() -> Iterator[Callable[[], None]]:
    """Ctrl-C (SIGINT, also `timeout -s INT`) during fit only sets a flag, and the loop raises KeyboardInterrupt at
    its next check (before a step, after an epoch is saved). Python raises a KeyboardInterrupt wherever the main
    thread is; when that is a finalizer, e.g. a DataLoader iterator's __del__ joining its workers, the exception is
    printed as "Exception ignored" and the run trains on. A second SIGINT interrupts at once. Installed only in
    the main thread over Python's own handler: a handler of the caller's, or an ignored SIGINT, is kept."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield lambda: None
        return
    requested = threading.Event()

    def request(_signum: int, _frame: object) -> None:
        requested.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)  # the second one interrupts at once

    def check() -> None:
        if requested.is_set():
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, request)
    try:
        yield check
        check()  # a request that came after the last check (the loop ended) still ends the run as interrupted
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _write_summary(run_dir: Path, progress: Progress, loop: LoopConfig, status: str, error: str = "") -> None:
    """summary.json: status "running" while the run writes the folder, then "complete", or "interrupted" /
    "failed" (with the error); complete is true only for a run that ended as configured (or stopped by its
    budget). The checkpoints of an incomplete run hold its last finished epoch; --resume continues it. epochs: the
    epochs the run trains for, of a run fitted to its budget the fitted ones (schedule_fit: the fit)."""
    summary = {
        "complete": status == "complete",
        "status": status,
        **({"error": error} if error else {}),
        "epochs_done": progress.epoch,
        "epochs": loop.epochs if progress.schedule_fit is None else progress.schedule_fit.epochs,
        "steps": progress.step,
        "best_epoch": progress.best_epoch,
        f"best_{loop.select_metric}": progress.best_metric,
        **({"ema": {"weights": "ema", "decay": loop.ema, "start": loop.ema_start}} if loop.ema else {}),
        "last": progress.history[-1] if progress.history else None,
        **_fit_record(progress),
    }
    write_json(run_dir / SUMMARY_FILE, summary)


def _validate_on_main(
    run: Run, loop: LoopConfig, epoch: int, progress: Progress, precision: _Precision
) -> dict[str, float]:
    """validate_epoch on rank 0; its scores and the best epoch are broadcast to every rank."""

    def validate() -> tuple[dict[str, float], float | None, int | None]:
        row = validate_epoch(run, loop, epoch, progress, precision)
        return row, progress.best_metric, progress.best_epoch

    row, progress.best_metric, progress.best_epoch = distributed.on_main(validate)
    return row


def _check_losses(losses: torch.Tensor, seen: int, epoch: int, first_step: int) -> float:
    """The mean of the first `seen` step losses (one host sync), or a clear error naming the first bad step."""
    done = losses[:seen]
    finite = torch.isfinite(done)
    if not bool(finite.all()):
        bad = int((~finite).nonzero()[0, 0])
        raise FloatingPointError(
            f"training loss is {done[bad].item()} at epoch {epoch}, step {first_step + bad} (the first non-finite "
            "step of the epoch); lower optim.lr, set amp=off, or check the data for broken images"
        )
    return float(done.mean())


def train_epoch(
    run: Run,
    loop: LoopConfig,
    epoch: int,
    progress: Progress,
    precision: _Precision,
    forward_loss: _ForwardLoss | None = None,
    check_interrupt: Callable[[], None] = lambda: None,
) -> dict[str, Any]:
    """One epoch of optimizer steps in a seeded order; returns its row of metrics.csv (loss, lr, time, and the part
    of that time spent waiting for batches: data_wait_seconds).
    check_interrupt() runs before every step (fit's deferred Ctrl-C: it raises KeyboardInterrupt there).

    The step losses stay on the device and are read every loop.sync_every steps (no host sync per step). A train
    set with device_batches(order, batch_size) (data already on the device, augmented there) hands its batches
    itself; others go through a DataLoader.
    """
    device, train_set, scaler = torch.device(run.device), run.train_set, precision.scaler
    forward_loss = forward_loss or _ForwardLoss(run, replace(loop, compile="off"))
    n_steps = steps_per_epoch(len(train_set), loop.batch_size, loop.max_steps_per_epoch)
    if hasattr(train_set, "set_epoch"):
        train_set.set_epoch(epoch)
    order, ranks = _epoch_order(len(train_set), loop.seed, epoch), distributed.world_size()
    if ranks > 1:  # this rank's part of each step's global batch (the same samples per step as one process)
        order = distributed.shard_order(order, n_steps, loop.batch_size, distributed.rank(), ranks)
    batch_size = distributed.rank_batch(loop.batch_size, ranks)
    if hasattr(train_set, "device_batches"):
        loader = train_set.device_batches(order, batch_size)
    else:
        loader = DataLoader(
            train_set,
            batch_size=batch_size,
            sampler=order,
            drop_last=len(train_set) >= loop.batch_size,
            num_workers=loop.num_workers,
            multiprocessing_context=worker_context(loop.worker_start, loop.num_workers, [type(train_set).__module__]),
            pin_memory=device.type == "cuda",
        )
    run.model.train()
    start, seen, first_step, mean_loss, info = time.perf_counter(), 0, progress.step + 1, math.nan, ""
    waited = _BatchWait()
    losses = torch.zeros(n_steps, device=device)  # [n_steps] float32, read every sync_every steps
    with (
        _plain_worker_errors(loop.worker_start),
        _progress_bar(loop.progress, n_steps, f"epoch {epoch}/{loop.epochs}") as advance,
    ):
        for batch in waited.over(start_workers(loader)):
            check_interrupt()
            if seen == n_steps:
                break
            timing = forward_loss.compiled is not None and forward_loss.compile_seconds is None
            step_start = time.perf_counter()
            image = batch["image"]  # [B, C, *spatial]: one copy to the device, into the run's layout
            x = image.to(device, non_blocking=True, memory_format=torch_layout(loop.memory_format, image.dim()))
            y = batch["mask"].to(device, non_blocking=True)
            with precision.autocast(device):
                loss = forward_loss(x, y)
            run.optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(run.optimizer)
            else:
                loss.backward()
            if loop.grad_clip:
                nn.utils.clip_grad_norm_(run.model.parameters(), loop.grad_clip)
            if scaler is not None:
                scaler.step(run.optimizer)
                scaler.update()
            else:
                run.optimizer.step()
            run.scheduler.step()
            losses[seen] = loss.detach().float()
            progress.step += 1
            if run.ema is not None:
                run.ema.update(progress.step)
            seen += 1
            if timing and forward_loss.compiled is not None:
                synchronize(device)
                forward_loss.compile_seconds = time.perf_counter() - step_start
                log.info("compiled the training step in %.1f s (its first step)", forward_loss.compile_seconds)
                if loop.compile_cache and distributed.is_main():
                    save_compile_cache(loop.compile_cache)
            if seen % loop.sync_every == 0 or seen == n_steps:
                mean_loss = _check_losses(losses, seen, epoch, first_step)
                info = f"loss {mean_loss:.4f}"
            advance(info)
    if seen and seen % loop.sync_every and seen != n_steps:  # a loader shorter than n_steps
        mean_loss = _check_losses(losses, seen, epoch, first_step)
    return {
        "epoch": epoch,
        "step": progress.step,
        "lr": run.optimizer.param_groups[0]["lr"],
        "train_loss": distributed.mean_over_ranks(mean_loss if seen else 0.0),
        "train_seconds": round(time.perf_counter() - start, 3),
        "data_wait_seconds": round(waited.seconds, 3),
    }


def validate_epoch(
    run: Run, loop: LoopConfig, epoch: int, progress: Progress, precision: _Precision
) -> dict[str, float]:
    """Validate (the average of the weights when there is one), and save the `best` checkpoint when the selected
    metric improved; returns the val_ columns (and `ema`, the decay of the average scored, when there is one)."""
    device, model = torch.device(run.device), run.eval_model
    start = time.perf_counter()
    model.eval()
    with _plain_worker_errors(loop.worker_start), torch.no_grad(), precision.autocast(device):
        scores = run.validate(model)
    row = {f"val_{k}": v for k, v in scores.items()}
    row["val_seconds"] = round(time.perf_counter() - start, 3)
    if run.ema is not None:
        row["ema"] = run.ema.decay
    if loop.select_metric not in scores:
        raise ValueError(f"select_metric {loop.select_metric!r} is not among the validation scores {sorted(scores)}")
    score = float(scores[loop.select_metric])
    better = (lambda a, b: a > b) if loop.select_mode == "max" else (lambda a, b: a < b)
    if not math.isnan(score) and (progress.best_metric is None or better(score, progress.best_metric)):
        progress.best_metric, progress.best_epoch = score, epoch
        summary = {"epoch": epoch, "step": progress.step, **{f"val_{k}": float(v) for k, v in scores.items()}}
        record = {**run.meta.training, "best": summary, **run.weights_record(), **_fit_record(progress)}
        save_checkpoint(Path(run.run_dir) / "best", model, replace(run.meta, training=record), overwrite=True)
    return row


def save_epoch(run: Run, loop: LoopConfig, progress: Progress, precision: _Precision) -> None:
    """Bring the run folder up to date: `last` checkpoint (the average of the weights when there is one; without
    validation `best` too, recorded as chosen by none), the state for --resume, metrics.csv."""
    run_dir = Path(run.run_dir)
    fit = _fit_record(progress)
    training = {**run.meta.training, "epoch": progress.epoch, "step": progress.step, **run.weights_record(), **fit}
    save_checkpoint(run_dir / "last", run.eval_model, replace(run.meta, training=training), overwrite=True)
    if run.validate is None:
        best = {"epoch": progress.epoch, "step": progress.step, "selection": LAST_EPOCH}
        best_meta = replace(run.meta, training={**run.meta.training, "best": best, **run.weights_record(), **fit})
        save_checkpoint(run_dir / "best", run.eval_model, best_meta, overwrite=True)
    save_state(run_dir / STATE_FILE, run.model, run.optimizer, run.scheduler, precision.scaler, progress, run.ema)
    _write_metrics_csv(run_dir / METRICS_FILE, progress.history)


def loop_precision(amp: str) -> _Precision:
    """The autocast dtype and fp16 loss scaler of an (already resolved) amp mode, for callers that run
    train_epoch / validate_epoch outside fit (federated sites train a few epochs per round)."""
    return _Precision.of(amp)
