"""Data-parallel training under torchrun: the process group, rank helpers, the sharded epoch order and a
BatchNorm that sees the global batch.

`torchrun --nproc-per-node N -m rwkvseg.cli train CONFIG` starts N processes with RANK, WORLD_SIZE and
LOCAL_RANK in their environment; `process_group` joins them (NCCL on GPUs, gloo on CPUs) and leaves the group
on exit. The process group lives in torch.distributed, so the helpers here ask torch (no state of their own);
without torchrun, or with one process, they answer as rank 0 of 1 and do nothing.

Equivalence with one process at the same global batch B: step k of epoch e uses the samples
order[k*B : (k+1)*B] of the seeded epoch order in both cases; under N ranks rank r takes the r-th of the N equal
parts of that slice (B / N samples), DDP averages the gradients, and BatchNorm layers are synchronised
(`sync_batchnorm`), so each step sees the same batch statistics and the same mean gradient as one process.
Augmentation is seeded per (seed, epoch, sample index), never per rank.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import logging
import os
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 1800.0
T = TypeVar("T")


@dataclass(frozen=True)
class Launch:
    """Where this process stands in a torchrun launch (rank 0 of 1 without one)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Launch:
        """RANK, WORLD_SIZE and LOCAL_RANK as torchrun sets them; all absent: one process."""
        env = dict(os.environ) if env is None else env
        names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
        present = [n for n in names if n in env]
        if not present:
            return cls()
        if len(present) != len(names):
            raise ValueError(
                f"{', '.join(present)} set without {', '.join(n for n in names if n not in env)}; "
                "start data-parallel training with torchrun (which sets all three), or unset them"
            )
        try:
            launch = cls(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"]))
        except ValueError:
            raise ValueError(
                f"RANK, WORLD_SIZE and LOCAL_RANK must be integers, got {[env[n] for n in names]}"
            ) from None
        if not 0 <= launch.rank < launch.world_size:
            raise ValueError(f"RANK {launch.rank} is outside WORLD_SIZE {launch.world_size}")
        return launch


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that logs and writes the run folder."""
    return rank() == 0


def launch_device(device: torch.device, launch: Launch) -> torch.device:
    """The device of this rank: cuda:LOCAL_RANK for a CUDA run under torchrun, else device unchanged."""
    if device.type != "cuda" or not launch.distributed:
        return device
    if device.index not in (None, launch.local_rank):
        raise ValueError(
            f"device {device} was asked for, but under torchrun each rank uses cuda:LOCAL_RANK; use device=cuda or auto"
        )
    if launch.local_rank >= torch.cuda.device_count():
        raise ValueError(
            f"LOCAL_RANK {launch.local_rank} but only {torch.cuda.device_count()} GPUs are visible; "
            "start at most that many processes per node (--nproc-per-node)"
        )
    torch.cuda.set_device(launch.local_rank)
    return torch.device("cuda", launch.local_rank)


@contextlib.contextmanager
def process_group(device: torch.device, launch: Launch, timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[None]:
    """Join the torchrun process group for the body (NCCL for CUDA devices, gloo otherwise) and leave it after.

    Every collective waits at most timeout_s, so a rank that dies or hangs ends the others with an error
    instead of a hang (torchrun also stops the remaining ranks when one exits with an error). An error in the
    body is logged with the rank it happened on before it propagates. Leaving destroys the backend itself, so
    its threads are stopped before the caller goes on (`_leave`). One process: does nothing.
    """
    if not launch.distributed:
        yield
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    # torch.distributed.nn.functional binds group.WORLD as a default argument of its functions when it is first
    # imported, and DDP imports it (through torch._dynamo): imported after init_process_group, it would hold the
    # group past destroy_process_group, until the interpreter's exit (see _leave). Imported before, it binds None
    import torch.distributed.nn.functional  # noqa: F401

    dist.init_process_group(
        backend,
        rank=launch.rank,
        world_size=launch.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        device_id=device if device.type == "cuda" else None,
    )
    try:
        yield
    except BaseException as err:
        if isinstance(err, Exception):
            _log_failure(err, launch, timeout_s)
        # the traceback's frames (fit's, the training step's) hold the DDP wrapper, whose reducer holds the group.
        # Left so, the group would go with the exception, later: at the interpreter's exit (see _leave), or when
        # the reducer goes, whose destructor holds the GIL while gloo's waits for threads that may wait for it (a
        # hang). Only the frames' local variables go; the traceback itself is kept
        _clear_frames(err)
        raise
    finally:
        _leave()


def _log_failure(err: Exception, launch: Launch, timeout_s: float) -> None:
    if not _in_collective(err):
        log.error("rank %d of %d failed: %s: %s", launch.rank, launch.world_size, type(err).__name__, err)
        return
    log.error(
        "rank %d of %d stopped: a collective operation failed, so another rank failed or did not answer within "
        "%.0f s (its own message names it): %s",
        launch.rank,
        launch.world_size,
        timeout_s,
        str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__,
    )


def _clear_frames(err: BaseException) -> None:
    """The local variables of the finished frames in the tracebacks of err and of the exceptions chained to it."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        traceback.clear_frames(e.__traceback__)  # skips the frames still running (this one and its callers)
        todo += [e.__cause__, e.__context__]


def _leave() -> None:
    """Destroy the process group while the interpreter is fully alive, and with it the backend and its threads.

    gloo's worker threads drop each finished operation after the rank that waited for it has gone on; the
    operation (or a later barrier, through its list of prior operations) holds the tensors it sent, and a
    tensor made in Python needs the GIL to go. Past the start of the interpreter's exit, a thread that asks for
    the GIL is ended by Python (pthread_exit) in the middle of a C++ destructor, and the process aborts with
    "terminate called without an active exception" (SIGABRT), after a run that completed. The backend's
    destructor waits for those threads, so destroying it here closes that window; destroy_process_group
    destroys it only if nothing else holds the group: the DDP wrapper (fit's, gone when fit returned or, after
    an error, with the cleared frames; collected here if a reference cycle holds it) and
    torch.distributed.nn.functional (imported before init_process_group above)."""
    gc.collect()
    dist.destroy_process_group()


def _in_collective(err: BaseException) -> bool:
    """Whether err came out of a torch.distributed operation (a peer died or timed out), not this rank's own work."""
    if isinstance(err, dist.DistError):
        return True
    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and f"torch{os.sep}distributed{os.sep}" in frames[-1].filename


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the body first (it may write files: split, config, cache), the other ranks after it."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def on_main(fn: Callable[[], T]) -> T:
    """fn() run on rank 0 only, its (picklable) result broadcast to every rank."""
    if world_size() == 1:
        return fn()
    box: list[Any] = [fn() if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_over_ranks(value: float) -> float:
    """The mean of a float over all ranks (e.g. the per-rank mean losses of equal-sized shards)."""
    if world_size() == 1:
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / world_size()


def rank_batch(global_batch: int, ranks: int | None = None) -> int:
    """Samples per rank and step: the global batch split evenly over the ranks."""
    ranks = world_size() if ranks is None else ranks
    if global_batch % ranks:
        raise ValueError(
            f"data.batch_size {global_batch} (the global batch) does not divide over {ranks} processes; "
            f"choose a multiple of {ranks} or another --nproc-per-node"
        )
    return global_batch // ranks


def shard_order(order: Sequence[int], steps: int, global_batch: int, rank_: int, ranks: int) -> list[int]:
    """The indices rank rank_ of ranks loads, in its step order: of step k's global batch
    order[k*B : (k+1)*B], the rank_-th of ranks equal parts."""
    per_rank = rank_batch(global_batch, ranks)
    if ranks > 1 and len(order) < steps * global_batch:
        raise ValueError(
            f"{len(order)} training samples cannot fill {steps} step(s) of the global batch {global_batch}; "
            "lower data.batch_size or max_steps_per_epoch"
        )
    return [
        i
        for k in range(steps)
        for i in order[k * global_batch + rank_ * per_rank : k * global_batch + (rank_ + 1) * per_rank]
    ]


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks with autograd: each rank's input gets the sum of the ranks' output gradients."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class CpuSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch on CPU ranks (gloo), where torch's SyncBatchNorm refuses to run:
    per-channel sums all-reduced across the ranks with autograd, two passes (mean, then centred squares).
    Same parameters and buffers as nn.BatchNorm*d, so checkpoints load into the plain model."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"BatchNorm expects [B, C, ...] input, got shape {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or world_size() == 1:
            return super().forward(x)
        all_reduce = _AllReduceSum.apply
        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)  # broadcast [C] over [B, C, *spatial]
        count = torch.full((1,), x.numel() // x.shape[1], dtype=x.dtype, device=x.device)
        sums = all_reduce(torch.cat([x.sum(dims), count]))
        total = sums[-1]
        mean = sums[:-1] / total
        centred = x - mean.view(shape)
        var = all_reduce((centred * centred).sum(dims)) / total
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(var.detach() * total / (total - 1).clamp(min=1), momentum)
        return y


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """model with every BatchNorm*d synchronised over the ranks, sharing its parameters and buffers (in place
    where model is not itself a BatchNorm): torch's nn.SyncBatchNorm on GPUs, CpuSyncBatchNorm otherwise."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if isinstance(model, nn.modules.batchnorm._BatchNorm) and not isinstance(model, CpuSyncBatchNorm):
        sync = CpuSyncBatchNorm(model.num_features, model.eps, model.momentum, model.affine, model.track_running_stats)
        if model.affine:
            sync.weight, sync.bias = model.weight, model.bias
        sync.running_mean, sync.running_var = model.running_mean, model.running_var
        sync.num_batches_tracked = model.num_batches_tracked
        sync.train(model.training)
        return sync
    for name, child in model.named_children():
        model.add_module(name, sync_batchnorm(child, device))
    return model


def data_parallel(model: nn.Module, device: torch.device) -> nn.Module:
    """The DDP wrapper the training step calls (model itself in one process). Its construction broadcasts rank
    0's weights and buffers. Buffers are not re-broadcast per step: synchronised BatchNorm keeps them equal."""
    if world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)
