"""How DataLoader worker processes start (data.worker_start): "auto" (the platform's default: fork on Linux),
"fork", "forkserver" or "spawn".

fork copies the parent's memory but only the thread that forked: when other threads of the parent hold library
state, e.g. gRPC's pollers in a Flower ClientApp (grpc/grpc#32758), a worker can abort as it starts. forkserver
forks each worker from a server process that is started once, by exec, so it has none of the parent's threads;
spawn starts a fresh interpreter per worker. Both pickle the dataset to every worker.

A fresh worker imports torch, MONAI and the dataset's module before it reads anything: about 3.5 s each on a busy
2-core machine, at every epoch (the training loader's workers are not persistent, so they see the new epoch). The
forkserver imports them once, when it starts (worker_context's preload), so its workers then start about as fast
as forked ones (2 workers, 8 small images, 2 busy cores: 18 s per epoch without the preload, 0.5 s with it, 0.4 s
under fork). spawn has no such server: every worker of every epoch pays the imports.

A forked worker also inherits the parent's garbage: reference cycles not yet collected when it forked. When the
worker's own garbage collector frees them and one holds a pinned batch that was copied to the GPU with
non_blocking=True (what the training loader's pin_memory and the step's copy make), freeing it records a CUDA event
under a device guard (torch's CachingHostAllocator.free), a call into a CUDA context that a forked child cannot use,
and the worker aborts ("CUDA error: initialization error" from c10::cuda::ExchangeDevice in a TensorImpl destructor;
it killed 2 of 5 BraTS runs in session 41). A plain CUDA tensor is freed without a CUDA call (the caching allocator
marks its block free), so on its own it does not abort the worker (session 42, on an H200), nor does a pinned tensor
that was never copied; a CUDA tensor used on a side stream (record_stream) and a recorded CUDA event do (session 43,
on an H100, one forked worker per kind). start_workers freezes every object the parent tracks just while the
workers fork (gc.freeze: a forked child's collector never looks at those objects), then unfreezes them into the
oldest generation. It first collects the young generations (gc.collect(1), well under a millisecond; a full
collection takes 0.13-0.25 s on 2 cores with torch and MONAI loaded), so that young garbage, which may hold GPU
memory, is freed now rather than promoted to the rarely collected oldest generation every epoch.
"""

from __future__ import annotations

import gc
import multiprocessing
from collections.abc import Iterable, Iterator, Sequence
from multiprocessing.context import BaseContext
from typing import TypeVar

T = TypeVar("T")

WORKER_START = ("auto", "fork", "forkserver", "spawn")
FORKSERVER_PRELOAD = ("torch", "monai.transforms")  # with the dataset's own module: what a worker unpickles


def check_worker_start(worker_start: str) -> None:
    if worker_start not in WORKER_START:
        raise ValueError(f"data.worker_start = {worker_start!r} is not valid; choose one of {', '.join(WORKER_START)}")


def worker_context(worker_start: str, num_workers: int, preload: Sequence[str] = ()) -> BaseContext | None:
    """The multiprocessing context of a DataLoader's workers (None: the platform default, or no workers).

    For forkserver the server imports FORKSERVER_PRELOAD and `preload` (the dataset's module) when it starts, once
    per process; a server that is already running keeps what it imported."""
    check_worker_start(worker_start)
    if worker_start == "auto" or num_workers == 0:
        return None
    available = multiprocessing.get_all_start_methods()
    if worker_start not in available:
        raise ValueError(
            f"data.worker_start = {worker_start!r} is not available on this platform; choose auto or one of "
            f"{', '.join(available)}"
        )
    context = multiprocessing.get_context(worker_start)
    if worker_start == "forkserver":  # "__main__": multiprocessing's own default preload, kept
        context.set_forkserver_preload(list(dict.fromkeys(["__main__", *FORKSERVER_PRELOAD, *preload])))
    return context


def forks(worker_start: str) -> bool:
    """Whether workers started as worker_start are forked from the training process itself (auto: as the start
    method set for this process says, else the platform's default, the first of get_all_start_methods)."""
    if worker_start != "auto":
        return worker_start == "fork"
    return (multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_all_start_methods()[0]) == "fork"


def start_workers(loader: Iterable[T]) -> Iterator[T]:
    """iter(loader): a DataLoader starts its worker processes here (its num_workers, as its multiprocessing_context
    says; any other iterable has none). When they fork, the parent's objects are frozen while they do, so no
    worker's collector frees an object of the parent's (a pinned batch in a cycle aborts the worker; see the
    module's notes)."""
    context = getattr(loader, "multiprocessing_context", None)
    method = "auto" if context is None else context.get_start_method()
    if getattr(loader, "num_workers", 0) == 0 or not forks(method):
        return iter(loader)
    gc.collect(1)
    gc.freeze()
    try:
        return iter(loader)
    finally:
        gc.unfreeze()
