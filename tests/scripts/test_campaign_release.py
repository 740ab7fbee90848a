"""scripts/campaign.py (2D and 3D) and scripts/release_2d.py read a run's metrics.csv, also when it validated every N
epochs; the campaign's commands and its table."""

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch

from rwkvseg.train.config import load_config
from rwkvseg.train.loop import _write_metrics_csv
from writers import load_script, write_run_3d

ROOT = Path(__file__).resolve().parents[2]
BRATS_CONFIGS = [ROOT / "configs" / f"brats2018_{m}.toml" for m in ("mmsegrwkv", "mmsegrwkv_small", "segresnet")]


@pytest.fixture
def run(tmp_path):
    """A run folder that validated every 2 epochs and after its last (epoch 5): the loop's own metrics.csv."""
    folder = tmp_path / "busi-urwkv"
    folder.mkdir()
    history = []
    for epoch, dice in zip(range(1, 6), (None, 0.5, None, 0.75, 0.7), strict=True):
        row = {"epoch": epoch, "step": 10 * epoch, "lr": 0.01, "train_loss": 1.0 / epoch, "train_seconds": 2.0}
        if dice is not None:
            row |= {"val_dice": dice, "val_iou": dice - 0.1, "val_precision": 0.8, "val_recall": 0.7}
            row |= {"val_specificity": 0.9, "val_seconds": 1.0}
        history.append(row)
    _write_metrics_csv(folder / "metrics.csv", history)
    config = {"epochs": 6, "val_every": 2, "compile": "auto", "data": {"batch_size": 4}}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_campaign_summary_takes_the_best_and_last_validated_epochs(run):
    row = load_script("campaign").summary(run)
    assert (row["epochs"], row["planned"], row["best_epoch"]) == (5, 6, 4)
    assert (row["best_val_dice"], row["best_val_iou"], row["last_val_dice"]) == (0.75, 0.65, 0.7)
    assert row["median_epoch_s"] == 3.0  # 2 s without validation (epochs 1, 3), 3 s with it (2, 4, 5)
    assert row["late_gain"] == pytest.approx(0.7 - 0.75)  # the last third did not gain
    assert row["plateau"] == "unclear" and "late_rise" not in row  # 3 validations: too few to read against noise


def test_campaign_table_shows_the_median_data_wait_of_runs_that_record_it(run, tmp_path):
    """A run whose metrics.csv has data_wait_seconds gets its median over the steady epochs (the first, with the
    workers' start-up, left out) in its row and a column in the table; older runs without it get a '-' there."""
    script = load_script("campaign")
    assert "median_data_wait_s" not in script.summary(run)
    history = script.load_history(run).rows
    waits = (9.0, 0.5, 1.5, 0.25, 1.0)  # steady epochs 2-5: median of 0.5, 1.5, 0.25, 1.0 = 0.75
    newer = tmp_path / "busi-urwkv_s"
    newer.mkdir()
    rows = [r | {"data_wait_seconds": w} for r, w in zip(history, waits, strict=True)]
    _write_metrics_csv(newer / "metrics.csv", rows)
    (newer / "config.json").write_text((run / "config.json").read_text())
    row = script.summary(newer)
    assert row["median_data_wait_s"] == 0.75
    header, old_line, new_line = script.table([script.summary(run), row])
    assert header.split(" | ")[-2:] == ["median_epoch_s", "median_data_wait_s"]
    assert old_line.split(" | ")[-1] == "-" and new_line.split(" | ")[-1] == "0.7500"


def test_campaign_names_the_runs_that_waited_for_their_loaders(run, tmp_path):
    """A run whose median steady epoch waited a tenth of its time or more for batches gets a line under the table
    with its wait, its share and its loader workers; a run below that share, or without the column, none."""
    script = load_script("campaign")
    history = script.load_history(run).rows
    folders = {}
    for name, wait in (("busi-urwkv_s", 0.75), ("busi-unet", 0.25)):  # of a median 3 s epoch: 25 % and 8 %
        folders[name] = tmp_path / name
        folders[name].mkdir()
        _write_metrics_csv(folders[name] / "metrics.csv", [r | {"data_wait_seconds": wait} for r in history])
        config = json.loads((run / "config.json").read_text())
        config["data"]["num_workers"] = 2
        (folders[name] / "config.json").write_text(json.dumps(config))
    runs = [run, *folders.values()]
    histories = {r.name: script.load_history(r) for r in runs}
    rows = [script.summary(r, histories[r.name]) for r in runs]
    assert script.loader_notes(rows, histories) == [
        "busi-urwkv_s: waited 0.8 s of its 3.0 s epochs for batches (25%), its data loaders limited it: raise "
        "data.num_workers (it had 2) or run fewer runs at once"
    ]


def test_campaign_row_of_a_run_fitted_to_its_budget_gives_the_fitted_epochs(run, tmp_path):
    """A run fitted to its time budget (fit_schedule: summary.json's schedule_fit) has a row with the epochs it was
    fitted to beside the planned ones, and the table a fitted column ('-' for the runs that kept their plan)."""
    script = load_script("campaign")
    fit = {"planned": 6, "epochs": 5, "epoch": 2, "step": 20, "seconds_per_epoch": 2.0, "seconds_left": 7.0}
    folder = tmp_path / "busi-urwkv-fitted"
    shutil.copytree(run, folder)
    (folder / "summary.json").write_text(json.dumps({"status": "complete", "schedule_fit": fit}))
    row = script.summary(folder)
    assert (row["planned"], row["fitted"], row["epochs"]) == (6, 5, 5)
    assert "fitted" not in script.summary(run)
    header, plain, fitted = script.table([script.summary(run), row])
    keys = header.split(" | ")
    assert keys.index("planned") + 1 == keys.index("fitted")
    assert dict(zip(keys, fitted.split(" | "), strict=True))["fitted"] == "5"
    assert dict(zip(keys, plain.split(" | "), strict=True))["fitted"] == "-"
    assert "fitted" not in script.table([script.summary(run)])[0].split(" | ")


def test_campaign_summary_of_a_run_not_yet_validated(run):
    (run / "metrics.csv").write_text("epoch,step,lr,train_loss,train_seconds,val_dice\n1,10,0.01,1.0,2.0,\n")
    row = load_script("campaign").summary(run)
    timing = {"last_train_loss": 1.0, "median_epoch_s": 2.0, "first_epoch_s": 2.0}
    assert row == {"run": "busi-urwkv", "planned": 6, "epochs": 1, **timing}  # no best epoch yet


def test_campaign_row_of_a_train_all_run_has_its_loss_and_no_validation(run, tmp_path):
    """A run of --set train_all=true validates nothing: its row says so, with the epochs, the last training loss and
    the epoch times, and the table gives it a train_all column and '-' for the validation cells."""
    script = load_script("campaign")
    history = [{k: v for k, v in r.items() if not k.startswith("val_")} for r in script.load_history(run).rows]
    folder = tmp_path / "brats2018-mmsegrwkv-all"
    folder.mkdir()
    _write_metrics_csv(folder / "metrics.csv", history)
    (folder / "config.json").write_text(json.dumps({"epochs": 5, "val_every": 2, "train_all": True}))
    row = script.summary(folder)
    assert row["train_all"] is True and (row["epochs"], row["planned"]) == (5, 5)
    assert row["last_train_loss"] == pytest.approx(1 / 5) and row["median_epoch_s"] == 2.0
    assert not any(k.startswith(("best_", "last_val")) or k == "plateau" for k in row)
    header, plain, everything = script.table([script.summary(run), row])
    keys = header.split(" | ")
    cells = dict(zip(keys, everything.split(" | "), strict=True))
    assert cells["train_all"] == "yes" and cells["best_val_dice"] == "-" and cells["last_train_loss"] == "0.2000"
    assert dict(zip(keys, plain.split(" | "), strict=True))["train_all"] == "-"


def test_campaign_summary_3d_gives_each_region_at_the_best_epoch_and_the_plateau(tmp_path):
    script = load_script("campaign")
    levelled = write_run_3d(tmp_path / "brats2018-mmsegrwkv", [0.5, 0.7, 0.8, 0.85, 0.86, 0.852, 0.853, 0.84, 0.849])
    (levelled / "final_val.json").write_text(json.dumps({"dice": 0.77, "dice_WT": 0.87}))
    row = script.summary(levelled)
    assert (row["epochs"], row["planned"], row["best_epoch"]) == (90, 200, 50)
    assert row["best_val_dice"] == pytest.approx(0.86 - 0.1)  # the mean over WT, TC, ET
    regions = (row["best_val_dice_WT"], row["best_val_dice_TC"], row["best_val_dice_ET"])
    assert regions == pytest.approx((0.86, 0.76, 0.66))
    assert row["last_val_dice"] == pytest.approx(0.849 - 0.1) and row["tta_val_dice"] == 0.77
    # the last third (epochs 70-90) at best 0.853 against 0.86 before: levelled off
    assert row["late_gain"] == pytest.approx(0.853 - 0.86)
    # the line through the last half (0.86 ... 0.849) falls 0.0136; its one-sided 95 % upper bound rises 0.0032
    assert row["late_rise"] == pytest.approx(-0.0136) and row["plateau"] == "yes"
    assert row["trend"] == "declining"  # 0.007 under the earlier best: more than half a Dice point
    # steps 0.2, 0.1, 0.05, 0.01, 0.008, 0.001, 0.013, 0.009: the median change 0.0115 exceeds that loss
    assert row["val_noise"] == pytest.approx(0.0115)
    assert row["median_epoch_s"] == 4.0  # 9 of 90 epochs validated

    rising = script.summary(write_run_3d(tmp_path / "brats2018-segresnet", [0.3, 0.5, 0.6, 0.7, 0.75, 0.8]))
    assert rising["late_gain"] == pytest.approx(0.8 - 0.7) and rising["plateau"] == "no"
    assert rising["trend"] == "rising"
    early = script.summary(write_run_3d(tmp_path / "brats2018-dynunet", [0.3, 0.5]))
    assert "plateau" not in early and early["best_epoch"] == 20  # two validations say nothing about a plateau
    # session 26's MMSegRWKV: swings of 0.03-0.12 between validations hide whether the curve still rises
    noisy = script.summary(write_run_3d(tmp_path / "brats2018-mmsegrwkv_small", [0.59, 0.56, 0.50, 0.62, 0.56, 0.57]))
    assert noisy["trend"] == "declining" and noisy["plateau"] == "unclear"

    lines = script.table([{**row, "exit": 0}, {**rising, "exit": 0}, {**early, "exit": 130}, {**noisy, "exit": 0}])
    header = lines[0].split(" | ")
    assert header[4:9] == ["best_val_dice", "best_epoch", "best_val_dice_WT", "best_val_dice_TC", "best_val_dice_ET"]
    assert "tta_val_dice" in header
    cells = [dict(zip(header, line.split(" | "), strict=True)) for line in lines[1:]]
    assert [c["plateau"] for c in cells] == ["yes", "no", "-", "unclear"]
    assert [c["val_noise"] for c in cells] == ["0.0115", "0.1000", "-", "0.0600"]
    assert [c["late_rise"] for c in cells] == ["-0.0136", "0.1000", "-", "-0.0500"]
    assert (cells[0]["epochs"], cells[0]["best_val_dice_ET"], cells[2]["exit"]) == ("90", "0.6600", "130")


def sets(command: list[str]) -> list[str]:
    return [command[i + 1] for i, x in enumerate(command) if x == "--set"]


def test_campaign_3d_commands_new_and_resumed(tmp_path, monkeypatch):
    script = load_script("campaign")
    monkeypatch.setattr(script.os, "cpu_count", lambda: 16)
    runs, data, cc = tmp_path / "runs", tmp_path / "cache", tmp_path / "cc"
    (runs / "brats2018-segresnet").mkdir(parents=True)
    (runs / "brats2018-segresnet" / "state.pt").write_bytes(b"")  # a run of an earlier call
    argv = [str(data), str(runs), "--configs", *map(str, BRATS_CONFIGS), "--minutes", "9", "--compile-cache", str(cc)]
    commands = script.plan(script.parse_args([*argv, "--set", "amp=bf16"]))
    assert list(commands) == ["brats2018-mmsegrwkv", "brats2018-mmsegrwkv_small", "brats2018-segresnet"]

    new = commands["brats2018-mmsegrwkv_small"]
    assert new[1:5] == ["-m", "rwkvseg.cli", "train", str(BRATS_CONFIGS[1])]
    assert new[new.index("--data") + 1] == str(data)
    assert new[new.index("--out") + 1] == str(runs / "brats2018-mmsegrwkv_small")
    split = f"data.split={ROOT / 'splits' / 'brats2018_2mm.json'}"
    expected = [
        f"compile_cache={cc / 'mmsegrwkv_small.bin'}",
        split,
        "data.num_workers=4",
        "max_minutes=9.0",
        "amp=bf16",
    ]
    assert sets(new) == expected  # 16 cores, 3 runs: 4 loader workers each and a core for each run itself
    config = load_config(BRATS_CONFIGS[1], [*sets(new), f"data.root={data}", "out=x"])  # `rwkvseg train` takes them
    assert (config.epochs, config.data.num_workers, config.compile_cache) == (200, 4, str(cc / "mmsegrwkv_small.bin"))
    assert config.data.split == str(ROOT / "splits" / "brats2018_2mm.json")

    resumed = commands["brats2018-segresnet"]
    assert "--resume" in resumed and resumed[resumed.index("--out") + 1] == str(runs / "brats2018-segresnet")
    assert not any(x.endswith(".toml") for x in resumed) and "--data" not in resumed
    assert sets(resumed) == ["max_minutes=9.0", f"compile_cache={cc / 'segresnet.bin'}"]

    shorter = script.plan(
        script.parse_args([str(data), str(runs), "--configs", str(BRATS_CONFIGS[0]), "--epochs", "20"])
    )
    assert sets(shorter["brats2018-mmsegrwkv"])[-2:] == ["epochs=20", "max_minutes=0.0"]
    assert "data.num_workers=15" in sets(shorter["brats2018-mmsegrwkv"])  # one run alone: all cores but its own


def test_campaign_passes_fit_schedule_to_its_new_runs(tmp_path):
    """--set fit_schedule=true reaches `rwkvseg train` beside the --minutes budget it needs (resumed runs read it
    from their own config.json); without --minutes, train refuses it."""
    script = load_script("campaign")
    argv = [str(tmp_path), str(tmp_path / "runs"), "--configs", str(BRATS_CONFIGS[1]), "--set", "fit_schedule=true"]
    (new,) = script.plan(script.parse_args([*argv, "--minutes", "9"])).values()
    assert sets(new)[-2:] == ["max_minutes=9.0", "fit_schedule=true"]
    config = load_config(BRATS_CONFIGS[1], [*sets(new), f"data.root={tmp_path}", "out=x"])
    assert config.fit_schedule and config.max_minutes == 9.0
    (unbudgeted,) = script.plan(script.parse_args(argv)).values()
    with pytest.raises(ValueError, match="set max_minutes > 0, or fit_schedule = false"):
        load_config(BRATS_CONFIGS[1], [*sets(unbudgeted), f"data.root={tmp_path}", "out=x"])


def test_a_failed_run_resumes_with_its_own_compile_cache_as_a_resumed_call_does(tmp_path):
    script = load_script("campaign")
    runs, cc = tmp_path / "runs", tmp_path / "cc"
    argv = [str(tmp_path), str(runs), "--configs", str(BRATS_CONFIGS[1]), "--minutes", "9", "--compile-cache", str(cc)]
    (new,) = script.plan(script.parse_args(argv)).values()
    out = runs / "brats2018-mmsegrwkv_small"
    retry = script.retried_command(out, new, 2.5)
    assert retry[1:8] == ["-m", "rwkvseg.cli", "train", "--resume", "--out", str(out), "--no-progress"]
    assert sets(retry) == ["max_minutes=2.5", f"compile_cache={cc / 'mmsegrwkv_small.bin'}"]
    out.mkdir(parents=True)
    (out / "state.pt").write_bytes(b"")
    (resumed,) = script.plan(script.parse_args(argv)).values()  # the next call's command for the same run
    assert script.retried_command(out, resumed, 9.0) == resumed


def _history(*epoch_seconds):
    from rwkvseg.eval.report import RunHistory

    return RunHistory("r", [{"epoch": i + 1, "train_seconds": s} for i, s in enumerate(epoch_seconds)], {})


@pytest.mark.parametrize(
    ("code", "retried", "before", "history", "left", "why"),
    [
        (1, 0, 0, _history(100.0, 20.0), None, "exited with 1 after epoch 2 (it started at epoch 0)"),
        (-9, 0, 1, _history(100.0, 20.0), 2.0, "retry 1 of 2, 2.00 minutes of its budget left"),  # killed
        (0, 0, 0, _history(100.0), None, None),  # finished
        (130, 0, 0, _history(100.0), None, None),  # rwkvseg train stopped by Ctrl-C
        (-2, 0, 0, _history(100.0), None, None),  # SIGINT
        (-15, 0, 0, _history(100.0), None, None),  # SIGTERM
        (1, 2, 0, _history(100.0), None, None),  # its retries used
        (1, 1, 2, _history(100.0, 20.0), None, None),  # no epoch since its last start: the failure would repeat
        (1, 0, 0, _history(100.0, 20.0), 1.6, None),  # less budget left than its longest epoch (100 s)
    ],
)
def test_a_run_is_retried_only_after_a_failure_that_let_it_finish_an_epoch(code, retried, before, history, left, why):
    script = load_script("campaign")
    reason = script.retry_reason(code, retried, 2, before, history, left)
    assert reason is None if why is None else why in reason


FAKE_TRAIN = """
import csv, json, os, sys
from pathlib import Path
run, behaviour = Path(sys.argv[1]), sys.argv[2].split(",")
run.mkdir(parents=True, exist_ok=True)
(run / "config.json").write_text(json.dumps({"epochs": 3}))
metrics = run / "metrics.csv"
rows = list(csv.DictReader(metrics.open())) if metrics.is_file() else []
attempt = int((run / "attempts").read_text()) if (run / "attempts").is_file() else 0
(run / "attempts").write_text(str(attempt + 1))
epochs, code = behaviour[attempt].split(":")  # this attempt: epochs it finishes, then its exit code
for _ in range(int(epochs)):
    epoch = len(rows) + 1
    rows.append({"epoch": epoch, "step": 10 * epoch, "lr": 0.01, "train_loss": 0.5, "train_seconds": 0.1})
with metrics.open("w", newline="") as f:
    writer = csv.DictWriter(f, ["epoch", "step", "lr", "train_loss", "train_seconds"])
    writer.writeheader()
    writer.writerows(rows)
print(f"attempt {attempt + 1}: {len(rows)} epochs", flush=True)
if int(code) < 0:  # killed by that signal
    os.kill(os.getpid(), -int(code))
sys.exit(int(code))
"""


def test_a_campaign_resumes_a_run_that_failed_after_an_epoch_and_only_while_it_progresses(
    tmp_path, monkeypatch, capsys
):
    script = load_script("campaign")
    runs = tmp_path / "runs"
    behaviours = {  # per attempt: epochs finished, exit code
        "flaky": "1:-9,2:0",  # killed after epoch 1 (a worker's abort, the OOM killer), then runs to its end
        "broken": "0:2",  # fails before any epoch: not retried
        "stuck": "1:1,0:1,3:0",  # fails after epoch 1, then again at once: one retry, no second
        "stopped": "1:130",  # stopped with Ctrl-C: not retried
    }
    commands = {name: [sys.executable, "-c", FAKE_TRAIN, str(runs / name), b] for name, b in behaviours.items()}
    monkeypatch.setattr(script, "plan", lambda args: commands)
    monkeypatch.setattr(script, "retried_command", lambda out, command, minutes: command)
    monkeypatch.setattr(script, "POLL_SECONDS", 0.02)
    assert script.main(["D", str(runs), "--configs", "unused.toml", "--retries", "3"]) == 1
    rows = {r["run"]: r for r in json.loads((runs / "campaign.json").read_text())["runs"]}
    assert list(rows) == list(behaviours)  # the plan's order
    got = {name: (r["exit"], r["retries"], r["epochs"]) for name, r in rows.items()}
    assert got == {"flaky": (0, 1, 3), "broken": (2, 0, 0), "stuck": (1, 1, 1), "stopped": (130, 0, 1)}
    flaky = (runs / "logs" / "flaky.log").read_text()
    assert "attempt 1: 1 epochs" in flaky and "attempt 2: 3 epochs" in flaky
    assert "campaign: the run exited with -9 after epoch 1 (it started at epoch 0); resuming" in flaky
    assert "retry 1 of 3" in flaky
    assert "resuming" not in (runs / "logs" / "broken.log").read_text()
    out = capsys.readouterr()
    assert "flaky: the run exited with -9 after epoch 1" in out.out  # said as it happens, not only in the log
    with pytest.raises(SystemExit):
        script.parse_args(["D", str(runs), "--configs", "unused.toml", "--retries", "-1"])
    assert "--retries -1: give 0 (never) or more" in capsys.readouterr().err


SLOW_TO_STOP = """
import csv, json, shutil, signal, sys, time
from pathlib import Path
run = Path(sys.argv[1])
run.mkdir(parents=True, exist_ok=True)
(run / "config.json").write_text(json.dumps({"epochs": 3}))
with (run / "metrics.csv").open("w", newline="") as f:
    writer = csv.DictWriter(f, ["epoch", "step", "lr", "train_loss", "train_seconds"])
    writer.writeheader()
    writer.writerows({"epoch": e, "step": 10 * e, "lr": 0.01, "train_loss": 0.5, "train_seconds": 0.1} for e in (1, 2))
stop = []
signal.signal(signal.SIGINT, lambda *_: stop.append(1))
(run / "ready").write_text("")
alive = time.monotonic() + 60  # a campaign that fails before its Ctrl-C must not leave this run waiting forever
while not stop and time.monotonic() < alive:
    time.sleep(0.01)
# still stopping: keep what the campaign's table says now (it must not wait for this run to write it)
table = run.parent / "campaign.json"
deadline = time.monotonic() + 20
while not table.is_file() and time.monotonic() < deadline:
    time.sleep(0.01)
if table.is_file():
    shutil.copy(table, run / "table_while_stopping.json")
sys.exit(130)
"""


def test_a_stopped_campaign_writes_its_table_before_waiting_for_the_runs_to_stop(tmp_path, monkeypatch):
    script = load_script("campaign")
    runs = tmp_path / "runs"
    commands = {"slow": [sys.executable, "-c", SLOW_TO_STOP, str(runs / "slow")]}
    commands["done"] = [sys.executable, "-c", FAKE_TRAIN, str(runs / "done"), "3:0"]
    monkeypatch.setattr(script, "plan", lambda args: commands)
    ready, real_sleep = runs / "slow" / "ready", time.sleep  # script.time is this time module: keep its sleep
    launched = []

    class Recorded(subprocess.Popen):
        def __init__(self, command, **kwargs):
            super().__init__(command, **kwargs)
            launched.append((command[-2], self))

    monkeypatch.setattr(script.subprocess, "Popen", Recorded)

    def sleep(seconds):  # Ctrl-C once "slow" waits for it and "done" has ended and been polled
        ended = [job for name, job in launched if name.endswith("done") and job.returncode is not None]
        if ready.is_file() and ended and not hasattr(sleep, "sent"):
            sleep.sent = True
            raise KeyboardInterrupt
        real_sleep(0.02)

    monkeypatch.setattr(script.time, "sleep", sleep)
    assert script.main(["D", str(runs), "--configs", "unused.toml"]) == 1
    during = json.loads((runs / "slow" / "table_while_stopping.json").read_text())
    assert during["stopping"] == ["slow"]
    rows = {r["run"]: r for r in during["runs"]}
    assert list(rows) == ["slow", "done"]  # the plan's order
    assert (rows["slow"]["exit"], rows["slow"]["epochs"]) == (None, 2)  # its folder as it stood, no exit yet
    assert (rows["done"]["exit"], rows["done"]["epochs"]) == (0, 3)
    after = json.loads((runs / "campaign.json").read_text())
    assert "stopping" not in after
    assert {r["run"]: (r["exit"], r["epochs"]) for r in after["runs"]} == {"slow": (130, 2), "done": (0, 3)}


def test_campaign_3d_folds_run_each_config_on_folds_of_the_cross_validation_split(tmp_path, monkeypatch):
    script = load_script("campaign")
    monkeypatch.setattr(script.os, "cpu_count", lambda: 16)
    runs, data = tmp_path / "runs", tmp_path / "cache"
    argv = [str(data), str(runs), "--configs", *map(str, BRATS_CONFIGS[:2]), "--folds", "0", "4"]
    commands = script.plan(script.parse_args(argv))
    assert list(commands) == [
        "brats2018-mmsegrwkv-fold0",
        "brats2018-mmsegrwkv-fold4",
        "brats2018-mmsegrwkv_small-fold0",
        "brats2018-mmsegrwkv_small-fold4",
    ]
    command = commands["brats2018-mmsegrwkv_small-fold4"]
    assert command[command.index("--out") + 1] == str(runs / "brats2018-mmsegrwkv_small-fold4")
    folds_file = ROOT / "splits" / "brats2018_2mm_5fold.json"
    assert sets(command)[:3] == [f"data.split={folds_file}", "data.fold=4", "data.num_workers=3"]  # 16 cores, 4 runs
    config = load_config(BRATS_CONFIGS[1], [*sets(command), f"data.root={data}", "out=x"])
    assert (config.data.split, config.data.fold) == (str(folds_file), 4)
    fold4 = json.loads(folds_file.read_text())["folds"][4]
    assert len(fold4["val"]) == 3 and not set(fold4["val"]) & set(fold4["train"])
    for extra, message in [
        (["5"], r"--folds \[5\]: splits/brats2018_2mm_5fold.json has folds 0 to 4"),
        (["1", "1"], r"--folds \[1, 1\]: name each fold once"),
    ]:
        with pytest.raises(SystemExit, match=message):
            script.plan(
                script.parse_args([str(data), str(runs), "--configs", str(BRATS_CONFIGS[0]), "--folds", *extra])
            )
    with pytest.raises(SystemExit, match="use it with --configs"):
        script.plan(script.parse_args([str(data), str(runs), "--datasets", "ph2", "--folds", "0"]))


def test_campaign_tag_keeps_an_arm_apart_from_the_plain_runs(tmp_path, capsys):
    """--tag TAG: the runs, their folders and compile caches are named <...>-TAG, and cv_eval.py reads the tagged fold
    runs as a variant of their own."""
    script = load_script("campaign")
    runs, data, cc = tmp_path / "runs", tmp_path / "cache", tmp_path / "cc"
    argv = [str(data), str(runs), "--configs", str(BRATS_CONFIGS[0]), "--folds", "0", "--compile-cache", str(cc)]
    tagged = [*argv, "--tag", "stem2", "--set", "model.overrides.stem_stride=2"]
    plain, arm = (script.plan(script.parse_args(a)) for a in (argv, tagged))
    assert list(plain) == ["brats2018-mmsegrwkv-fold0"] and list(arm) == ["brats2018-mmsegrwkv-stem2-fold0"]
    command = arm["brats2018-mmsegrwkv-stem2-fold0"]
    assert command[command.index("--out") + 1] == str(runs / "brats2018-mmsegrwkv-stem2-fold0")
    assert sets(command)[0] == f"compile_cache={cc / 'mmsegrwkv-stem2.bin'}"  # not the plain model's graphs
    assert sets(command)[-1] == "model.overrides.stem_stride=2"
    match = load_script("cv_eval").FOLD_RUN.match("brats2018-mmsegrwkv-stem2-fold0")
    assert (match["variant"], match["fold"]) == ("brats2018-mmsegrwkv-stem2", "0")
    two_d = [str(data), str(runs), "--datasets", "ph2", "--models", "urwkv", "--tag", "ema"]
    assert list(script.plan(script.parse_args(two_d))) == ["ph2-urwkv-ema"]
    with pytest.raises(SystemExit):
        script.parse_args([*argv, "--tag", "stem-2"])
    assert "'stem-2': use letters, digits and underscores only" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--models", "unet"], "--models picks the models of --datasets"),
        (["--epochs", "brats2018=20"], "give one N for every run"),
        ([str(BRATS_CONFIGS[0])], "name each config once"),
    ],
)
def test_campaign_3d_refuses_what_it_cannot_run(tmp_path, extra, message):
    script = load_script("campaign")
    args = script.parse_args(["D", str(tmp_path), "--configs", str(BRATS_CONFIGS[0]), *extra])
    with pytest.raises(SystemExit, match=message):
        script.plan(args)


def test_campaign_3d_needs_a_dataset_with_a_committed_split(tmp_path):
    config = tmp_path / "lits_unet.toml"
    config.write_text("dims = 3\n")
    script = load_script("campaign")
    with pytest.raises(SystemExit, match=r"dataset one of \['brats2018'\]"):
        script.plan(script.parse_args(["D", str(tmp_path), "--configs", str(config)]))


def test_campaign_2d_command(tmp_path):
    script = load_script("campaign")
    args = script.parse_args([str(tmp_path / "data"), str(tmp_path / "runs"), "--datasets", "ph2", "--models", "urwkv"])
    (command,) = script.plan(args).values()
    assert command[4:6] == [str(ROOT / "configs" / "urwkv_ph2.toml"), "--data"]
    assert command[6] == str(tmp_path / "data" / "ph2")
    split = f"data.split={ROOT / 'splits' / 'ph2.json'}"
    assert sets(command) == ["model.name=urwkv", split, "epochs=280", "data.num_workers=1", "max_minutes=0.0"]


def test_campaign_2d_is_the_campaign_under_its_first_name():
    script = ROOT / "scripts" / "campaign_2d.py"
    out = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, check=True).stdout
    assert "--configs" in out and "--datasets" in out


def test_release_summary_and_curves_skip_the_epochs_without_validation(run, tmp_path):
    script = load_script("release_2d")
    info = script._run_summary(run)
    assert (info["ran"], info["best"], info["t_dice"], info["t_iou"]) == (5, 4, 0.75, 0.65)
    assert info["minutes"] == pytest.approx((5 * 2.0 + 3 * 1.0) / 60)
    assert info["schedule"].startswith("planned 6 epochs; stopped by the run's time limit after epoch 5")
    assert info["schedule"].endswith("validated every 2 epochs and after the last")
    pytest.importorskip("matplotlib")
    script._curves(info["rows"], "U-RWKV on BUSI", tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_release_card_names_what_the_run_read():
    script = load_script("release_2d")
    assert script.input_prep("ph2", 90).startswith("`rwkvseg compact2d ../shared/data/ph2 DATA/ph2 --quality 90`")
    assert "JPEG q90" in script.input_prep("ph2", 90)
    originals = script.input_prep("isic2017", 0)
    assert originals.startswith("none: the original files of `../shared/data/isic2017`")
    assert "compact2d" not in originals


def test_release_card_says_what_went_beyond_the_paper_recipe(run):
    script = load_script("release_2d")
    paper = {"optim": {"name": "sgd", "ema": 0.0, "ema_start": 0}, "data": {"extra_train": []}}
    assert script.beyond_recipe(paper) == ""
    ema = script.beyond_recipe({"optim": {"ema": 0.999, "ema_start": 0}})
    assert ema.startswith("; beyond the paper's recipe: an exponential moving average of the weights (decay 0.999)")
    assert "first 500 steps" in script.beyond_recipe({"optim": {"ema": 0.999, "ema_start": 500}})
    joint = script.beyond_recipe({"optim": {"ema": 0.999}, "data": {"extra_train": ["DATA/kvasir_seg"]}})
    assert "decay 0.999" in joint and "every image of `DATA/kvasir_seg` added to the training images" in joint
    tuned = script.beyond_recipe({"model": {"init": "urwkv_s-kvasir"}, "optim": {"ema": 0.0}})
    assert tuned == (
        "; beyond the paper's recipe: fine-tuned from `urwkv_s-kvasir` (model.init: its weights are the starting "
        "point) (the paper's-recipe row below is its own run)"
    )
    assert script.schedule_note(20, "urwkv_s-kvasir").startswith("Fine-tuned for 20 epochs from `urwkv_s-kvasir`")
    own_recipe = script.beyond_recipe({"model": {"init": "urwkv_s-busi"}}, "urwkv_s-busi")
    assert "fine-tuned from the earlier release of this name (model.init `urwkv_s-busi`" in own_recipe
    own = script.schedule_note(16, "urwkv_s-busi", "urwkv_s-busi")  # a release continued from its own earlier one
    assert own.startswith("Fine-tuned for 16 epochs from the earlier release of this name")
    assert "`urwkv_s-busi`" not in own
    assert script.schedule_note(280).startswith("The paper's full schedule")
    assert script._run_summary(run)["beyond"] == ""  # the fixture run trained with the paper's recipe
    assert script._run_summary(run)["init"] == ""
    assert script.precision_note({"amp": "auto", "device": "auto"}) == "bf16 autocast"  # the GPU campaigns
    assert script.precision_note({"amp": "auto", "device": "cpu"}) == "float32 (no autocast on the CPU)"
    assert script.precision_note({"amp": "fp16", "device": "cuda"}) == "fp16 autocast with loss scaling"
    assert script._run_summary(run)["overrides"] == "" and script.overrides_note({}) == ""
    released = script.overrides_note({"token_shift": "permutation", "dual_transpose_back": False})
    assert released == (
        ' with `dual_transpose_back=false`, `token_shift="permutation"` (the network of the authors\' released code)'
    )
    labels = dict(script.EXTRA_ROWS)
    assert labels["evalpaper"].startswith("the paper's recipe alone")


def test_release_card_rows_from_evaluations_where_measured(tmp_path):
    script = load_script("release_2d")
    scores = {k: {"mean": v} for k, v in zip(script.METRICS, (0.81234, 0.7, 0.9, 0.8, 0.99, 12.345), strict=True)}
    (tmp_path / "summary.json").write_text(json.dumps(scores))
    row = script.evaluation_row(tmp_path / "summary.json", "with flip TTA")
    assert row == "| with flip TTA | 0.8123 | 0.7000 | 0.9000 | 0.8000 | 0.9900 | 12.3 |"
    assert script.evaluation_row(tmp_path / "absent.json", "with flip TTA") == ""


TINY_3D = """dims = 3
epochs = 2
val_every = 1
max_steps_per_epoch = 1
device = "cpu"
amp = "off"
compile = "off"
[model]
name = "segresnet"
[model.overrides]
init_filters = 8
[data]
batch_size = 1
[data.patches]
patch_size = [24, 24, 24]  # the whole cached phantom (about 17 x 22 x 19): one window per case
samples_per_epoch = 2
[infer]
mirror_axes = [0]
sw_batch_size = 2
final_eval = {final_eval}
[optim]
name = "sgd"
lr = 0.01
"""


@pytest.fixture(scope="module")
def brats_split_cache(tmp_path_factory):
    """A preprocessed cache of tiny phantoms named as the cases of splits/brats2018_2mm.json."""
    from rwkvseg.data.preprocess3d import preprocess_dataset
    from rwkvseg.data.specs import dataset_spec
    from writers import write_phantoms_as

    (fold,) = json.loads((ROOT / "splits" / "brats2018_2mm.json").read_text())["folds"]
    raw = write_phantoms_as(tmp_path_factory.mktemp("raw"), [*fold["train"], *fold["val"]], (23, 27, 21), seed=1)
    cache = tmp_path_factory.mktemp("cache")
    preprocess_dataset(raw, dataset_spec("brats"), cache)
    return cache, fold


@pytest.mark.slow  # four `rwkvseg train` processes (two per call) on the CPU: one to two minutes on two cores
def test_campaign_3d_end_to_end_resumed_across_two_calls(tmp_path, brats_split_cache, capsys):
    cache, fold = brats_split_cache
    configs = {
        "brats2018_cnn.toml": TINY_3D.format(final_eval="true"),
        "brats2018_cnn_notta.toml": TINY_3D.format(final_eval="false"),
    }
    for name, text in configs.items():
        (tmp_path / name).write_text(text)
    runs, script = tmp_path / "runs", load_script("campaign")
    argv = [str(cache), str(runs), "--configs", *(str(tmp_path / n) for n in configs), "--set", "data.num_workers=0"]
    # a budget shorter than any epoch: each run stops after its first (validated) epoch, then the next call goes on
    assert script.main([*argv, "--minutes", "0.0001"]) == 0
    first = {r["run"]: r for r in json.loads((runs / "campaign.json").read_text())["runs"]}
    assert sorted(first) == ["brats2018-cnn", "brats2018-cnn_notta"]
    assert [(r["epochs"], r["planned"], r["exit"]) for r in first.values()] == [(1, 2, 0)] * 2
    assert script.main(argv) == 0
    table = capsys.readouterr().out
    rows = json.loads((runs / "campaign.json").read_text())["runs"]
    for row in rows:
        assert (row["epochs"], row["planned"], row["exit"]) == (2, 2, 0)
        assert {"best_val_dice_WT", "best_val_dice_TC", "best_val_dice_ET"} <= set(row)
        assert ("tta_val_dice" in row) == (row["run"] == "brats2018-cnn")  # final_val.json of infer.final_eval
        folder = runs / row["run"]
        assert json.loads((folder / "split.json").read_text())["folds"][0] == fold  # the committed split
        assert (runs / f"{row['run']}.curves.png").is_file() == (find_spec("matplotlib") is not None)
        assert "resuming" in (runs / "logs" / f"{row['run']}.log").read_text()
    headers = [line for line in table.splitlines() if line.startswith("run | ")]
    assert len(headers) == 2 and "best_val_dice_ET" in headers[-1]  # each call printed its table


def test_release_records_the_flips_chosen_on_validation_in_sidecar_and_card():
    script = load_script("release_2d")
    assert script.flips_row(None, "") == ""
    row = script.flips_row((0, 1), "Dice 0.8075 with, 0.7980 without")
    assert row.startswith("| test-time flips | the logits averaged over the flips of axes 0,1 by default (4 forward")
    assert row.endswith("chosen on validation: Dice 0.8075 with, 0.7980 without |\n")
    assert "| test-time flips | none by default" in script.flips_row((), "0.940 with, 0.941 without")
    sidecar = {"model": "urwkv", "preprocessing": {"size": [256, 256], "inference": {"postprocess": "largest"}}}
    recorded = script.with_flips(sidecar, (0, 1))
    assert recorded["preprocessing"]["inference"] == {"postprocess": "largest", "mirror_axes": [0, 1]}
    assert recorded["preprocessing"]["size"] == [256, 256] and "inference" in sidecar["preprocessing"]
    assert sidecar["preprocessing"]["inference"] == {"postprocess": "largest"}  # the given record is not changed
    assert "{beyond} |\n{flips_row}| schedule |" in script.CARD  # the row follows the recipe's


@pytest.mark.slow  # two short `rwkvseg train` runs and a resumed one on the CPU: about half a minute on two cores
def test_a_run_killed_mid_campaign_is_resumed_and_ends_as_the_uninterrupted_run(
    tmp_path, brats_split_cache, monkeypatch
):
    from safetensors.torch import load_file

    cache, _ = brats_split_cache
    config = tmp_path / "brats2018_cnn.toml"
    config.write_text(TINY_3D.format(final_eval="false").replace("epochs = 2", "epochs = 6"))
    script = load_script("campaign")
    argv = ["--configs", str(config), "--set", "data.num_workers=0"]
    assert script.main([str(cache), str(tmp_path / "whole"), *argv]) == 0

    started, popen = [], script.subprocess.Popen

    def recorded(*args, **kwargs):
        started.append(popen(*args, **kwargs))
        return started[-1]

    def kill_after_the_first_epoch():
        metrics = tmp_path / "killed" / "brats2018-cnn" / "metrics.csv"
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
            time.sleep(0.01)
        started[0].kill()  # as the OOM killer or an aborted worker's parent would end it: no clean stop

    monkeypatch.setattr(script.subprocess, "Popen", recorded)
    killer = threading.Thread(target=kill_after_the_first_epoch, daemon=True)
    killer.start()
    assert script.main([str(cache), str(tmp_path / "killed"), *argv]) == 0
    killer.join(timeout=1)
    (row,) = json.loads((tmp_path / "killed" / "campaign.json").read_text())["runs"]
    assert (row["exit"], row["retries"], row["epochs"], len(started)) == (0, 1, 6, 2)
    log = (tmp_path / "killed" / "logs" / "brats2018-cnn.log").read_text()
    assert f"the run exited with {-signal.SIGKILL} after epoch" in log and "retry 1 of 1" in log
    whole = load_file(tmp_path / "whole" / "brats2018-cnn" / "last.safetensors")
    resumed = load_file(tmp_path / "killed" / "brats2018-cnn" / "last.safetensors")
    assert whole.keys() == resumed.keys()
    for key, value in whole.items():
        assert torch.equal(resumed[key], value), key
