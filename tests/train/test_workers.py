"""data.worker_start: how DataLoader workers start reaches every loader of a run (2D training and validation, 3D
patches), and since augmentation is seeded per item from (seed, epoch, index), a run trains the same whichever way
its workers start, and the same as without workers. Workers forked through start_workers never free the parent's
garbage (a pinned batch that went to the GPU, freed in a forked worker, aborts it)."""

import csv
import gc
import os

import pytest
import torch
from safetensors.torch import load_file

from rwkvseg.data.preprocess3d import preprocess_dataset
from rwkvseg.data.specs import dataset_spec
from rwkvseg.data.synthetic import write_synthetic_dataset
from rwkvseg.data.synthetic3d import write_synthetic_volumes
from rwkvseg.train import loop as loop_module
from rwkvseg.train import validate as validate_module
from rwkvseg.train.config import config_from_dict, load_config
from rwkvseg.train.loop import LoopConfig
from rwkvseg.train.train import train
from rwkvseg.train.workers import start_workers, worker_context


@pytest.fixture
def loaders(monkeypatch):
    """(loader, workers, start method or None for the platform default) of every DataLoader a run builds."""
    seen = []

    def spy(base):
        class Recorded(base):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                context = self.multiprocessing_context
                seen.append((self.num_workers, context.get_start_method() if context is not None else None))

        return Recorded

    monkeypatch.setattr(loop_module, "DataLoader", spy(loop_module.DataLoader))
    monkeypatch.setattr(validate_module, "DataLoader", spy(validate_module.DataLoader))
    return seen


def _outcome(run_dir):
    """The run's rows of metrics.csv (timings left out) and its last weights."""
    with (run_dir / "metrics.csv").open() as f:
        metrics = [{k: v for k, v in row.items() if "seconds" not in k} for row in csv.DictReader(f)]
    return metrics, load_file(run_dir / "last.safetensors")


def test_worker_start_is_a_checked_setting_of_both_data_configs():
    assert load_config(None, []).data.worker_start == "auto"
    assert load_config(None, ["dims=3"]).data.worker_start == "auto"
    assert load_config(None, ["data.worker_start=forkserver"]).data.worker_start == "forkserver"
    assert load_config(None, ["dims=3", "data.worker_start=spawn"]).data.worker_start == "spawn"
    for dims in ("2", "3"):
        with pytest.raises(
            ValueError, match=r"data\.worker_start = 'thread' is not valid; choose one of auto, fork, forkserver, spawn"
        ):
            load_config(None, [f"dims={dims}", "data.worker_start=thread"])
    with pytest.raises(ValueError, match=r"data\.worker_start = 'threads' is not valid; choose one of auto, fork"):
        LoopConfig(epochs=1, worker_start="threads")
    assert worker_context("auto", 2) is None and worker_context("spawn", 0) is None  # no workers: no context
    assert worker_context("spawn", 2).get_start_method() == "spawn"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    write_synthetic_dataset(root, n=8, shape=(29, 35), seed=2)
    return root


def _run_2d(root, out, workers, start):
    config = config_from_dict(
        {
            "epochs": 2,
            "seed": 3,
            "device": "cpu",
            "out": str(out),
            "model": {"name": "unet_test"},
            "data": {
                "root": str(root),
                "size": [24, 24],
                "batch_size": 2,
                "val_batch_size": 2,
                "num_workers": workers,
                "worker_start": start,
                "augment": {"affine": True, "intensity": True},
            },
        }
    )
    train(config)
    return _outcome(out)


def test_a_2d_run_trains_the_same_under_every_start_method(images, tmp_path, loaders):
    """forkserver and fork workers (training and validation loaders) and no workers give the same losses, scores and
    weights: bit for bit, as every augmented image comes from its own seed."""
    reference = _run_2d(images, tmp_path / "none", 0, "auto")
    assert loaders == [(0, None)] * 3  # validation's, then one training loader per epoch
    for start in ("forkserver", "fork"):
        loaders.clear()
        metrics, weights = _run_2d(images, tmp_path / start, 1, start)
        assert loaders == [(1, start)] * 3
        assert metrics == reference[0], start
        for key, value in reference[1].items():
            torch.testing.assert_close(weights[key], value, rtol=0, atol=0, msg=f"{start}: {key}")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    raw = tmp_path_factory.mktemp("phantoms")
    write_synthetic_volumes(raw, n=3, shape=(23, 27, 21), spacing=2.0, seed=1)
    out = tmp_path_factory.mktemp("cache")
    preprocess_dataset(raw, dataset_spec("brats"), out)
    return out


def _run_3d(cache, out, workers, start):
    config = config_from_dict(
        {
            "dims": 3,
            "epochs": 1,
            "seed": 5,
            "device": "cpu",
            "amp": "off",
            "out": str(out),
            "model": {"name": "mmsegrwkv_test"},
            "data": {
                "root": str(cache),
                "val_fraction": 0.34,
                "batch_size": 2,
                "num_workers": workers,
                "worker_start": start,
                "patches": {"patch_size": [15, 23, 21], "samples_per_epoch": 4},
            },
            "infer": {"final_eval": False},
        }
    )
    train(config)
    return _outcome(out)


def test_a_3d_run_trains_the_same_under_forkserver_and_spawn_as_without_workers(cache, tmp_path, loaders):
    """The patch dataset (cached volumes, MONAI's nnU-Net augmentation) pickles to forkserver and spawn workers;
    each patch and its augmentation come from their own seed, so the epoch is the one loaded in the training
    process, bit for bit."""
    metrics, weights = _run_3d(cache, tmp_path / "none", 0, "auto")
    for start in ("forkserver", "spawn"):
        loaders.clear()
        started = _run_3d(cache, tmp_path / start, 1, start)
        assert loaders == [(1, start)]
        assert started[0] == metrics, start
        for key, value in weights.items():
            torch.testing.assert_close(started[1][key], value, rtol=0, atol=0, msg=f"{start}: {key}")


class _Finalized:
    """Writes the id of the process that frees it to `path` (its __del__ runs where the collector frees it)."""

    def __init__(self, path):
        self.path, self.cycle = path, self  # a reference cycle: only the garbage collector frees it

    def __del__(self):
        with open(self.path, "a") as f:
            f.write(f"{os.getpid()}\n")


class _CollectingSet(torch.utils.data.Dataset):
    """Runs the collector in the worker that reads it, as a worker's own allocations eventually do."""

    def __len__(self):
        return 2

    def __getitem__(self, index):
        gc.collect()
        return torch.tensor(index)


def _read_leaving_garbage(make_garbage, iterate, old):
    """Leave a cycle of garbage made by make_garbage() (old: in the collector's oldest generation, else its
    youngest), then read a loader of one forked worker through iterate(loader); its batches."""
    loader = torch.utils.data.DataLoader(
        _CollectingSet(), num_workers=1, multiprocessing_context=worker_context("fork", 1)
    )
    gc.disable()  # the cycle is still garbage, not yet collected, when the worker forks
    try:
        garbage = make_garbage()
        if old:
            gc.collect()  # still referenced: it survives into the oldest generation
        del garbage
        return [int(b) for b in iterate(loader)]
    finally:
        gc.enable()
        gc.collect()


def _freed_in(path, iterate, old):
    """The ids of the processes that freed a _Finalized cycle (written to path) left while reading through
    iterate(loader)."""
    assert _read_leaving_garbage(lambda: _Finalized(path), iterate, old) == [0, 1]
    return [int(pid) for pid in path.read_text().split()] if path.exists() else []


@pytest.mark.parametrize("old", [False, True], ids=["young", "old"])
def test_forked_workers_never_free_the_parents_garbage(tmp_path, old):
    # a plain iter(loader): the worker's collector frees the parent's cycle (a pinned batch there aborts the worker)
    freed = _freed_in(tmp_path / "plain", iter, old)
    assert len(freed) == 2 and freed[1] == os.getpid() != freed[0]  # the worker's copy, then the parent's own
    # start_workers: young garbage freed in the parent first (gc.collect(1)), old garbage frozen while the worker
    # forks (gc.freeze): either way the worker has none of it to free, and the parent frees it
    assert _freed_in(tmp_path / "started", start_workers, old) == [os.getpid()]
    assert gc.get_freeze_count() == 0  # nothing of the parent's stays frozen after the fork


class _PinnedCycle:
    """What the training's loader leaves behind: a pinned batch (pin_memory=True) copied to the GPU with
    non_blocking=True, in a reference cycle. The copy records the GPU stream on the pinned block, so freeing it
    records a CUDA event there, under a device guard."""

    def __init__(self):
        self.tensor, self.cycle = torch.ones(1 << 20).pin_memory(), self
        self.tensor.to("cuda", non_blocking=True)
        torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("old", [False, True], ids=["young", "old"])
def test_forked_workers_survive_the_parents_pinned_garbage(old):
    """The session-41 abort on the GPU: a forked worker that frees the parent's pinned batch dies ("CUDA error:
    initialization error" from c10::cuda::ExchangeDevice in a TensorImpl destructor); started through
    start_workers it reads its items (passed on an H100 in session 43). (A plain CUDA tensor freed in a forked
    worker does not abort it: the caching allocator only marks its block free, without a CUDA call; session 42 on
    an H200.)"""

    def read(iterate):
        return _read_leaving_garbage(_PinnedCycle, iterate, old)

    with pytest.raises(RuntimeError, match=r"DataLoader worker .* exited unexpectedly"):
        read(iter)
    assert read(start_workers) == [0, 1]
