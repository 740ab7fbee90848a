"""train_all: the final model of a recipe trains on every case of the split's fold, validates none and keeps its
last epoch as `best` (3D and 2D), resumes exactly, stops on its time budget after any epoch, records what it did,
and is refused where a validation is needed (a federated site)."""

import json
import logging
import time

import pytest
import torch
from safetensors.torch import load_file

from rwkvseg.checkpoint import read_meta
from rwkvseg.cli import main
from rwkvseg.data.specs import dataset_spec
from rwkvseg.data.synthetic import write_synthetic_dataset
from rwkvseg.data.volumes import discover_cases
from rwkvseg.eval.report import read_run
from rwkvseg.federated.local import setup_site
from rwkvseg.infer.predict import PredictConfig
from rwkvseg.infer.predict3d import Predictor3D
from rwkvseg.train import loop as loop_module
from rwkvseg.train.config import OptimConfig, load_config
from rwkvseg.train.loop import LAST_EPOCH
from rwkvseg.train.optim import lr_factor
from rwkvseg.train.train import train
from rwkvseg.train.volumes import FINAL_FILE
from writers import assert_same_run

BASE_3D = [
    "dims=3",
    "device=cpu",
    "amp=off",
    "seed=5",
    "model.name=mmsegrwkv_test",
    "data.target=regions",
    "data.patches.patch_size=[15, 23, 21]",
    "data.patches.samples_per_epoch=2",
    "data.batch_size=1",
    "data.num_workers=0",
    "data.val_fraction=0.34",
    "infer.mirror_axes=[0]",
    "max_steps_per_epoch=1",
    "optim.momentum=0.99",
]


def config_3d(cache, out, *more):
    return load_config(None, [*BASE_3D, f"data.root={cache}", f"out={out}", *more])


def assert_best_is_last(run_dir, epoch):
    best, last = load_file(run_dir / "best.safetensors"), load_file(run_dir / "last.safetensors")
    assert best.keys() == last.keys() and all(torch.equal(best[k], last[k]) for k in best)
    record = read_meta(run_dir / "best").training
    assert record["best"] == {"epoch": epoch, "step": epoch, "selection": LAST_EPOCH}
    return record


def test_a_3d_run_trains_every_case_validates_none_and_keeps_its_last_epoch(tmp_path, raw, cache, capsys, caplog):
    run_dir = tmp_path / "run"
    argv = ["train", "--data", str(cache), "--out", str(run_dir), "--no-progress", "--train-all"]
    argv += [f"--set={s}" for s in [*BASE_3D, "epochs=2", "optim.ema=0.9"]]
    with caplog.at_level(logging.INFO, logger="rwkvseg"):
        assert main(argv) == 0
    out = capsys.readouterr().out
    assert "no validation: epoch 2 kept" in out and "best validation" not in out
    split = json.loads((run_dir / "split.json").read_text())["folds"][0]
    assert split["val"]  # the split has validation cases, and they trained
    assert "4 training and 0 validation cases" in caplog.text and "train_all" in caplog.text
    record = assert_best_is_last(run_dir, 2)
    assert record["train_all"] is True and record["train_cases"] == 4 and record["ema"]["decay"] == 0.9
    history = read_run(run_dir)
    assert history.ran == 2 and not history.validated  # no val_ columns in metrics.csv
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["complete"] and summary["best_epoch"] == 2 and summary["best_dice"] is None
    assert not (run_dir / FINAL_FILE).exists()  # nothing held out to score
    # the checkpoint predicts alone, as any other
    (case, *_) = discover_cases(raw, dataset_spec("brats"), require_label=False)
    written = Predictor3D.from_checkpoint(run_dir / "best", PredictConfig(mirror_axes=())).predict_to_file(
        case, tmp_path / "pred"
    )
    assert written.is_file()


def test_a_train_all_run_resumes_bit_for_bit(tmp_path, cache):
    train(config_3d(cache, tmp_path / "a", "epochs=3", "train_all=true"))
    stopped = config_3d(cache, tmp_path / "b", "epochs=3", "train_all=true")
    first = train(stopped, stop=lambda progress: progress.epoch == 1)
    assert first.epoch == 1 and first.best_epoch == 1
    assert_best_is_last(tmp_path / "b", 1)  # a stopped run already has its best checkpoint
    resumed = train(stopped, resume=True)
    assert resumed.epoch == 3 and resumed.best_epoch == 3
    assert_same_run(tmp_path / "a", tmp_path / "b")
    assert_best_is_last(tmp_path / "b", 3)


def test_the_time_budget_stops_a_train_all_run_after_any_epoch(tmp_path, cache):
    # with validation every 2 epochs a run would go on to epoch 2; without any, epoch 1 is a whole result
    progress = train(
        config_3d(cache, tmp_path / "run", "epochs=5", "val_every=2", "max_minutes=1e-6", "train_all=true")
    )
    assert progress.epoch == 1 and progress.best_epoch == 1
    assert_best_is_last(tmp_path / "run", 1)


@pytest.fixture
def epoch_clock(monkeypatch):
    """perf_counter on a fake clock that moves only in train_epoch: 100 s for a process's first epoch (as if it
    compiled), 10 s for each later one; validation and saving take no time."""
    clock = {"now": 1000.0, "epochs": 0}
    real = loop_module.train_epoch

    def timed(*args, **kwargs):
        clock["epochs"] += 1
        clock["now"] += 100.0 if clock["epochs"] == 1 else 10.0
        return real(*args, **kwargs)

    monkeypatch.setattr(time, "perf_counter", lambda: clock["now"])
    monkeypatch.setattr(loop_module, "train_epoch", timed)
    return clock


def test_a_train_all_run_fitted_to_its_budget_anneals_where_a_stopped_one_does_not(
    tmp_path, cache, epoch_clock, caplog
):
    """6 epochs of one step planned, 135 s of budget: after epoch 2 (110 s; the 100 s first epoch not taken as a
    measure) 10 s per epoch leave room for 2 more: fitted to 4, its poly schedule ends at 0 there. Without
    fit_schedule the budget stops the run after the same epoch 4 with the planned schedule's LR, as before."""
    budget = ["epochs=6", "train_all=true", "max_minutes=2.25"]
    with caplog.at_level(logging.INFO, logger="rwkvseg"):
        fitted = train(config_3d(cache, tmp_path / "fitted", *budget, "fit_schedule=true"))
    assert "schedule fitted to the budget: 6 -> 4 epochs (10.0 s per epoch, 25 s left)" in caplog.text
    assert fitted.epoch == 4 and fitted.history[-1]["lr"] == 0.0
    assert [row.get("fitted_epochs") for row in fitted.history] == [None, 4, None, None]
    summary = json.loads((tmp_path / "fitted" / "summary.json").read_text())
    assert summary["complete"] and summary["epochs"] == summary["epochs_done"] == 4
    assert assert_best_is_last(tmp_path / "fitted", 4)["schedule_fit"]["planned"] == 6
    assert "fitted to 4" in read_run(tmp_path / "fitted").schedule()

    epoch_clock["epochs"] = 0  # a new process
    stopped = train(config_3d(cache, tmp_path / "stopped", *budget))
    assert stopped.epoch == 4 and stopped.schedule_fit is None
    assert [row["lr"] for row in stopped.history] == [0.01 * lr_factor(s, 6, OptimConfig()) for s in (1, 2, 3, 4)]
    assert "fitted_epochs" not in stopped.history[1]
    assert "schedule_fit" not in json.loads((tmp_path / "stopped" / "summary.json").read_text())


def test_a_run_whose_epochs_all_fit_is_not_fitted(tmp_path, cache, epoch_clock, caplog):
    """20 minutes hold all 6 epochs: no fit, and the run is the plain run's bit for bit."""
    with caplog.at_level(logging.INFO, logger="rwkvseg"):
        train(config_3d(cache, tmp_path / "roomy", "epochs=6", "train_all=true", "max_minutes=20", "fit_schedule=true"))
    assert "the schedule fits the budget: all 6 epochs (10.0 s per epoch, 1090 s left)" in caplog.text
    epoch_clock["epochs"] = 0
    train(config_3d(cache, tmp_path / "plain", "epochs=6", "train_all=true"))
    assert_same_run(tmp_path / "roomy", tmp_path / "plain")


def test_a_2d_run_trains_on_the_validation_images_too(tmp_path, caplog):
    data = tmp_path / "syn"
    write_synthetic_dataset(data, n=6, shape=(37, 41), seed=4)
    overrides = [f"data.root={data}", f"out={tmp_path / 'run'}", "device=cpu", "epochs=2", "max_steps_per_epoch=1"]
    overrides += ["model.name=urwkv_test", "data.size=[32, 32]", "data.batch_size=2", "data.num_workers=0"]
    overrides += ["data.val_fraction=0.34", "train_all=true"]
    with caplog.at_level(logging.INFO, logger="rwkvseg"):
        progress = train(load_config(None, overrides))
    assert progress.best_epoch == 2 and progress.best_metric is None
    assert "6 training and 0 validation images" in caplog.text
    record = assert_best_is_last(tmp_path / "run", 2)
    assert record["train_all"] is True and record["train_cases"] == 6
    assert not read_run(tmp_path / "run").validated


def test_a_federated_site_refuses_train_all(tmp_path, cache):
    with pytest.raises(ValueError, match="train_all has no place in federated training"):
        setup_site(config_3d(cache, tmp_path / "site", "train_all=true"), torch.device("cpu"))
