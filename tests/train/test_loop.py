import csv
import json
import signal
import time

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from rwkvseg.checkpoint import CheckpointMeta
from rwkvseg.data.dataset2d import SegDataset2D
from rwkvseg.data.images2d import discover_pairs
from rwkvseg.data.synthetic import write_synthetic_dataset
from rwkvseg.data.transforms2d import AugmentConfig, eval_transform, train_transform
from rwkvseg.devices import cpu_has_native_bf16
from rwkvseg.records import Preprocessing2D
from rwkvseg.train.config import OptimConfig
from rwkvseg.train.loop import LoopConfig, Run, fit, steps_per_epoch
from rwkvseg.train.losses import SegmentationLoss
from rwkvseg.train.optim import build_optimizer, build_scheduler, lr_factor
from rwkvseg.train.state import ScheduleFit
from rwkvseg.train.validate import validator_2d


class TinySeg(nn.Module):
    """Conv + BatchNorm + Dropout: exercises running stats and the torch RNG across a resume."""

    def __init__(self, in_channels=3, num_classes=1):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 6, 3, padding=1),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.Dropout2d(0.2),
            nn.Conv2d(6, num_classes, 3, padding=1),
        )

    def forward(self, x):
        return self.body(x)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    write_synthetic_dataset(root, n=10, shape=(29, 35), seed=2)
    samples = discover_pairs(root)
    pre = Preprocessing2D(3, (24, 24))
    aug = AugmentConfig(affine=True, intensity=True)
    train = SegDataset2D(samples[:7], 3, transform=train_transform(pre.size, "resize", aug), seed=3)
    val = SegDataset2D(samples[7:], 3, transform=eval_transform(pre.size, "resize"))
    return train, val, pre


def _run(data, run_dir, epochs=4, stop_after=None, resume=False, stop=None, amp="off", val_every=1, fit_schedule=None):
    train, val, pre = data
    torch.manual_seed(0)
    model = TinySeg()
    optim = OptimConfig(lr=0.05)
    optimizer = build_optimizer(model, optim)
    scheduler = build_scheduler(optimizer, optim, epochs * steps_per_epoch(len(train), 3))
    loop = LoopConfig(epochs=epochs, batch_size=3, seed=1, amp=amp, val_every=val_every)
    validate = validator_2d(val, pre, 1, torch.device("cpu"), batch_size=2)
    stop = stop or ((lambda p: p.epoch >= stop_after) if stop_after else None)
    meta = CheckpointMeta("tiny", 3, 1, preprocessing=pre.to_dict())
    run = Run(model, train, SegmentationLoss(1), optimizer, scheduler, validate, meta, run_dir)
    progress = fit(run, loop, resume=resume, stop=stop, fit_schedule=fit_schedule)
    return model, progress


def test_resume_is_bit_identical(data, tmp_path):
    straight, p_straight = _run(data, tmp_path / "a")
    _, p_half = _run(data, tmp_path / "b", stop_after=2)
    assert p_half.epoch == 2
    resumed, p_resumed = _run(data, tmp_path / "b", resume=True)
    assert p_resumed.epoch == 4 and p_resumed.step == p_straight.step == 8
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    strip = lambda h: [{k: v for k, v in r.items() if "seconds" not in k} for r in h]  # noqa: E731
    assert strip(p_resumed.history) == strip(p_straight.history)
    assert (tmp_path / "a" / "best.safetensors").read_bytes() == (tmp_path / "b" / "best.safetensors").read_bytes()


def _fit_at(epoch, epochs, planned=6, asked=None):
    """A fit_schedule that fits a run of `planned` epochs to `epochs` after `epoch`; notes each epoch it is asked at."""

    def fit_schedule(progress):
        if asked is not None:
            asked.append(progress.epoch)
        if progress.epoch != epoch:
            return None
        return ScheduleFit(planned, epochs, epoch, progress.step, seconds_per_epoch=27.3, seconds_left=912.0)

    return fit_schedule


def _never_asked(progress):
    raise AssertionError(f"fit_schedule asked after epoch {progress.epoch}: the run was fitted already")


def test_a_fitted_run_ends_after_its_fitted_epochs_with_its_schedule_annealed(data, tmp_path, caplog):
    """6 epochs of 2 steps planned, fitted to 3 after epoch 2: the rest of the poly schedule over 2 more steps,
    its end (0) after epoch 3, validated there (the last epoch), and the fit recorded everywhere."""
    asked = []
    with caplog.at_level("INFO", logger="rwkvseg"):
        _, progress = _run(data, tmp_path, epochs=6, val_every=4, fit_schedule=_fit_at(2, 3, asked=asked))
    assert "schedule fitted to the budget: 6 -> 3 epochs (27.3 s per epoch, 912 s left)" in caplog.text
    assert (progress.epoch, progress.step, asked) == (3, 6, [1, 2])  # asked until the run was fitted
    planned = OptimConfig()  # poly 0.9 over 12 steps: before the fit, the planned factors
    lrs = [row["lr"] for row in progress.history]
    assert lrs[:2] == [pytest.approx(0.05 * lr_factor(s, 12, planned), rel=1e-12) for s in (2, 4)]
    assert lrs[2] == 0.0  # the fitted last epoch ends the schedule
    assert ["val_dice" in row for row in progress.history] == [False, False, True]
    assert [row.get("fitted_epochs") for row in progress.history] == [None, 3, None]
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [r["fitted_epochs"] for r in rows] == ["", "3", ""]
    record = {"planned": 6, "epochs": 3, "epoch": 2, "step": 4, "seconds_per_epoch": 27.3, "seconds_left": 912.0}
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["complete"], summary["epochs_done"], summary["epochs"]) == (True, 3, 3)
    assert summary["schedule_fit"] == record
    for name in ("last", "best"):
        assert json.loads((tmp_path / f"{name}.json").read_text())["training"]["schedule_fit"] == record


def test_a_fitted_run_resumes_exactly_and_is_never_fitted_again(data, tmp_path):
    """Fitted after epoch 2 and stopped there, resumed: the same weights, LR sequence and best checkpoint as the
    uninterrupted fitted run; the resumed run keeps the fit of its state and is never asked for another."""
    straight, p_straight = _run(data, tmp_path / "a", epochs=6, fit_schedule=_fit_at(2, 4))
    _, p_half = _run(data, tmp_path / "b", epochs=6, fit_schedule=_fit_at(2, 4), stop_after=2)
    assert p_half.epoch == 2 and p_half.schedule_fit.epochs == 4
    with pytest.raises(ValueError, match="fitted to its time budget from 6 to 4 epochs and the config plans 8"):
        _run(data, tmp_path / "b", epochs=8, resume=True)
    resumed, p_resumed = _run(data, tmp_path / "b", epochs=6, resume=True, fit_schedule=_never_asked)
    assert p_resumed.epoch == p_straight.epoch == 4 and p_resumed.step == p_straight.step == 8
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    strip = lambda h: [{k: v for k, v in r.items() if "seconds" not in k} for r in h]  # noqa: E731
    assert strip(p_resumed.history) == strip(p_straight.history)
    assert p_resumed.history[-1]["lr"] == 0.0
    assert (tmp_path / "a" / "best.safetensors").read_bytes() == (tmp_path / "b" / "best.safetensors").read_bytes()
    assert p_resumed.schedule_fit == p_straight.schedule_fit


def test_a_fit_schedule_that_never_fits_changes_nothing(data, tmp_path):
    plain, p_plain = _run(data, tmp_path / "a", epochs=3)
    asked, p_asked = _run(data, tmp_path / "b", epochs=3, fit_schedule=lambda progress: None)
    for (name, a), b in zip(plain.state_dict().items(), asked.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    strip = lambda h: [{k: v for k, v in r.items() if "seconds" not in k} for r in h]  # noqa: E731
    assert strip(p_asked.history) == strip(p_plain.history) and p_asked.schedule_fit is None
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert "schedule_fit" not in summary and summary["epochs"] == 3
    assert (tmp_path / "a" / "best.safetensors").read_bytes() == (tmp_path / "b" / "best.safetensors").read_bytes()


class _SignalsWhenCollected:
    """Sends this process SIGINT from its __del__: where a DataLoader iterator's __del__ (joining its workers)
    is when `timeout -s INT` arrives, and Python's KeyboardInterrupt is printed as "Exception ignored"."""

    def __del__(self):
        signal.raise_signal(signal.SIGINT)


class SlowItems(torch.utils.data.Dataset):
    """A train set whose items take `delay` seconds each: a loader that limits the run."""

    def __init__(self, items, delay):
        self.items, self.delay = items, delay

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        time.sleep(self.delay)
        return self.items[index]


def test_each_epoch_records_the_time_it_waited_for_batches(data, tmp_path):
    """metrics.csv's data_wait_seconds: the part of train_seconds spent in the loader's next(); a loader that sleeps
    0.05 s per item puts at least its sleep there, a fast one next to none of it."""
    train, val, pre = data
    fast = [train[i] for i in range(len(train))]  # [3, 24, 24] images, decoded once
    rows = {}
    for name, delay in (("fast", 0.0), ("slow", 0.05)):
        torch.manual_seed(0)
        model = TinySeg()
        optim = OptimConfig(lr=0.05)
        optimizer = build_optimizer(model, optim)
        scheduler = build_scheduler(optimizer, optim, 2 * steps_per_epoch(len(fast), 3))
        run = Run(
            model,
            SlowItems(fast, delay),
            SegmentationLoss(1),
            optimizer,
            scheduler,
            validator_2d(val, pre, 1, torch.device("cpu"), batch_size=2),
            CheckpointMeta("tiny", 3, 1, preprocessing=pre.to_dict()),
            tmp_path / name,
        )
        rows[name] = fit(run, LoopConfig(epochs=2, batch_size=3, seed=1)).history
    for row in rows["slow"]:  # 7 items, batches of 3: two steps, the last 1 item dropped
        assert 6 * 0.05 <= row["data_wait_seconds"] <= row["train_seconds"]
    for fast_row, slow_row in zip(rows["fast"], rows["slow"], strict=True):
        assert fast_row["data_wait_seconds"] < slow_row["data_wait_seconds"] - 0.2
    with (tmp_path / "slow" / "metrics.csv").open(newline="") as f:
        written = list(csv.DictReader(f))
    assert [float(r["data_wait_seconds"]) for r in written] == [r["data_wait_seconds"] for r in rows["slow"]]


def test_an_interrupt_during_a_finalizer_still_stops_the_run(data, tmp_path):
    def stop(progress):
        if progress.epoch == 1:
            _SignalsWhenCollected()  # collected at once: SIGINT arrives inside its __del__
        return False

    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with pytest.raises(KeyboardInterrupt):
        _run(data, tmp_path, epochs=3, stop=stop)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["status"], summary["epochs_done"]) == ("interrupted", 1)  # not trained on to epoch 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # fit put Python's handler back
    _, progress = _run(data, tmp_path, epochs=3, resume=True)
    assert progress.epoch == 3


def test_run_folder_contents_and_refusal_to_clobber(data, tmp_path):
    _, progress = _run(data, tmp_path, epochs=2)
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2] and "val_dice" in rows[0]
    dices = [float(r["val_dice"]) for r in rows]
    assert progress.best_metric == max(dices) and progress.best_epoch == 1 + dices.index(max(dices))
    best = json.loads((tmp_path / "best.json").read_text())
    assert best["training"]["best"]["epoch"] == progress.best_epoch
    assert best["preprocessing"]["size"] == [24, 24]
    assert json.loads((tmp_path / "summary.json").read_text())["best_epoch"] == progress.best_epoch
    before = (tmp_path / "state.pt").read_bytes()
    with pytest.raises(FileExistsError, match="pass --resume"):
        _run(data, tmp_path, epochs=2)
    assert (tmp_path / "state.pt").read_bytes() == before
    with pytest.raises(FileNotFoundError, match="start without --resume"):
        _run(data, tmp_path / "empty", resume=True)


def test_multiclass_training_and_validation(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(5):
        labels = np.zeros((20, 22), np.uint8)
        labels[2:8, 3:9], labels[11:18, 10:20] = 1, 2
        image = (labels[..., None] * 100 + rng.integers(0, 40, (20, 22, 3))).astype(np.uint8)
        for folder, array in (("images", image), ("masks", labels)):
            (tmp_path / "d" / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(tmp_path / "d" / folder / f"x{i}.png")
    samples = discover_pairs(tmp_path / "d")
    pre = Preprocessing2D(3, (16, 16))
    train = SegDataset2D(samples[:3], 3, 3, train_transform(pre.size))
    val = SegDataset2D(samples[3:], 3, 3, eval_transform(pre.size))
    assert set(val[0]["mask"].unique().tolist()) == {0.0, 1.0, 2.0}
    torch.manual_seed(0)
    model = TinySeg(3, 3)
    optim = OptimConfig(name="adamw", lr=0.01, schedule="cosine")
    optimizer = build_optimizer(model, optim)
    run = Run(
        model,
        train,
        SegmentationLoss(3),
        optimizer,
        build_scheduler(optimizer, optim, 3),
        validator_2d(val, pre, 3, torch.device("cpu")),
        CheckpointMeta("tiny", 3, 3, preprocessing=pre.to_dict()),
        tmp_path / "run",
    )
    progress = fit(run, LoopConfig(epochs=3, batch_size=2))
    assert progress.step == 3 and 0.0 <= progress.best_metric <= 1.0
    assert {"val_dice", "val_iou", "val_specificity"} <= progress.history[-1].keys()


def test_cpu_trains_in_bf16_only_where_asked_and_native(monkeypatch, caplog):
    """amp = "bf16" on a CPU with native bfloat16 is autocast there (about 2.8x faster 3D steps); "auto" stays
    float32 on the CPU, and a CPU without native bf16 trains in float32 with a warning that says why."""
    import rwkvseg.train.loop as loop_module
    from rwkvseg.train.loop import resolve_amp

    cpu = torch.device("cpu")
    assert resolve_amp("auto", cpu) == "off" and resolve_amp("off", cpu) == "off"
    monkeypatch.setattr(loop_module, "cpu_has_native_bf16", lambda: True)
    assert resolve_amp("bf16", cpu) == "bf16"
    monkeypatch.setattr(loop_module, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level("WARNING"):
        assert resolve_amp("bf16", cpu) == "off"
    assert "needs a CPU with native bfloat16 (AVX512-BF16 or AMX); training in float32 on cpu" in caplog.text
    with caplog.at_level("WARNING"):
        assert resolve_amp("fp16", cpu) == "off"
    assert "mixed precision fp16 needs CUDA" in caplog.text


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bfloat16")
def test_a_bf16_cpu_run_trains_in_bf16_and_resumes_bit_identically(data, tmp_path, monkeypatch):
    seen, conv_forward = [], nn.Conv2d.forward

    def spied(self, x):  # the autocast dtype each convolution of the run sees (None: float32)
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return conv_forward(self, x)

    monkeypatch.setattr(nn.Conv2d, "forward", spied)
    straight, p_straight = _run(data, tmp_path / "a", amp="bf16")
    assert torch.bfloat16 in seen  # the training steps ran under bf16 autocast
    assert all(np.isfinite(r["train_loss"]) for r in p_straight.history)
    assert p_straight.history[-1]["train_loss"] < p_straight.history[0]["train_loss"]
    _run(data, tmp_path / "b", stop_after=2, amp="bf16")
    resumed, p_resumed = _run(data, tmp_path / "b", resume=True, amp="bf16")
    assert p_resumed.epoch == 4 and p_resumed.step == p_straight.step
    strip = lambda h: [{k: v for k, v in r.items() if "seconds" not in k} for r in h]  # noqa: E731
    assert strip(p_resumed.history) == strip(p_straight.history)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
