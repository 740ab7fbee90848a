"""scripts/fold_curves.py: fold runs' metrics.csv files read at fixed epochs, per arm, on screen and in --json."""

import csv
import json

import pytest

from writers import load_script, write_run_3d

COLUMNS = ["epoch", "train_loss", "val_dice_WT", "val_dice_TC", "val_dice_ET", "val_dice", "val_seconds"]


def write_metrics(path, dice: dict[int, float], epochs: int):
    """A metrics.csv as the training loop writes it: every epoch a row, the validation cells empty where it did not
    validate; WT 0.125 above the mean, ET 0.125 below it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for epoch in range(1, epochs + 1):
            d = dice.get(epoch)
            validated = [d + 0.125, d, d - 0.125, d, 1.5] if d is not None else [""] * 5
            writer.writerow([epoch, 1.0 / epoch, *validated])
    return path


@pytest.fixture
def arms(tmp_path):
    """Arm a: fold 0 peaks at 2, fold 1 at 6; arm b: val_every 2 against 3 (common epochs 6 and 12)."""
    folder = tmp_path / "campaign"
    write_metrics(folder / "a-fold0.metrics.csv", {2: 0.75, 4: 0.5, 6: 0.5}, 6)
    write_metrics(folder / "a-fold1.metrics.csv", {2: 0.25, 4: 0.5, 6: 0.625}, 6)
    write_metrics(folder / "b-fold0.metrics.csv", {e: e / 100 for e in range(2, 15, 2)}, 14)
    write_metrics(folder / "b-fold1.metrics.csv", {e: e / 50 for e in range(3, 13, 3)}, 13)
    return {"a": str(folder / "a-fold*.metrics.csv"), "b": str(folder / "b-fold*.metrics.csv")}


def test_fold_curves_prints_each_arms_readings_and_writes_them(arms, tmp_path, capsys):
    out = tmp_path / "curves.json"
    assert load_script("fold_curves").main([f"a={arms['a']}", f"b={arms['b']}", "--json", str(out)]) == 0
    screen = capsys.readouterr().out
    assert "a: 2 folds (0, 1), val_dice validated by all at 3 epochs: 2-6 every 2" in screen
    assert "| a | epoch | val_dice | WT / TC / ET |" in screen
    assert "| per-fold best (optimistic: each fold's epoch chosen on its own cases) | 2, 6 | 0.6875 |" in screen
    assert "| best common epoch | 6 | 0.5625 | 0.6875 / 0.5625 / 0.4375 |" in screen
    assert "| last validated epoch | 6 | 0.5625 |" in screen
    assert "curve (epoch, mean val_dice): 2 0.500, 4 0.500, 6 0.562" in screen
    assert "b: 2 folds (0, 1), val_dice validated by all at 2 epochs: 6, 12" in screen
    assert "| last validated epoch | 14, 12 | 0.1900 |" in screen  # each fold's own last
    record = json.loads(out.read_text())
    a, b = record["arms"]["a"], record["arms"]["b"]
    assert record["metric"] == "val_dice" and a["glob"] == arms["a"] and len(a["files"]) == 2
    assert a["folds"] == ["0", "1"] and a["curve"] == {"2": 0.5, "4": 0.5, "6": 0.5625}
    assert a["per_fold_best"] == {
        "epochs": {"0": 2, "1": 6},
        "mean": 0.6875,
        "regions": {"WT": 0.8125, "TC": 0.6875, "ET": 0.5625},
    }
    assert a["best_common_epoch"]["epoch"] == 6 and a["best_common_epoch"]["mean"] == 0.5625
    assert a["per_fold_best"]["mean"] > a["best_common_epoch"]["mean"] >= a["last"]["mean"]
    assert b["curve"] == pytest.approx({"6": 0.09, "12": 0.18})
    assert b["last"]["epochs"] == {"0": 14, "1": 12} and b["last"]["mean"] == pytest.approx(0.19)


def test_fold_curves_reads_a_region_and_run_folders(tmp_path, capsys):
    """--metric val_dice_WT: a region's column, without region means; run folders name their folds."""
    for fold, wt in ((0, [0.5, 0.7, 0.6]), (1, [0.6, 0.6, 0.9])):
        write_run_3d(tmp_path / f"runs/brats2018-x-fold{fold}", wt, val_every=2)
    out = tmp_path / "wt.json"
    args = [f"x={tmp_path}/runs/*-fold*/metrics.csv", "--metric", "val_dice_WT", "--json", str(out)]
    assert load_script("fold_curves").main(args) == 0
    assert "| x | epoch | val_dice_WT |\n|---|---|---|\n| per-fold best" in capsys.readouterr().out
    x = json.loads(out.read_text())["arms"]["x"]
    assert x["folds"] == ["0", "1"] and x["per_fold_best"]["epochs"] == {"0": 4, "1": 6}
    assert x["best_common_epoch"] == {"epoch": 6, "mean": pytest.approx(0.75), "regions": {}}
    assert x["per_fold_best"]["mean"] == pytest.approx(0.8)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("no equals sign", "'a' is not NAME=GLOB"),
        ("no name", "is not NAME=GLOB"),
        ("no glob", "'a=' is not NAME=GLOB"),
        ("one arm twice", "arms ['a'] are named twice"),
        ("nothing matched", "matches no file; give a glob of each fold's metrics.csv"),
        ("one fold", "alone; a cross-validation needs 2 or more folds"),
        ("json exists", "exists; give a new file (nothing is overwritten)"),
        ("no common epoch", "c: no epoch is validated by every fold (fold 0: 2-2, fold 1: 3-3)"),
        ("no such metric", "a: fold 0 has no epoch with val_iou; choose one of val_dice, val_dice_ET"),
        ("not a metrics.csv", "has no epoch column; give the metrics.csv of a training run"),
    ],
)
def test_fold_curves_refuses_in_one_line(arms, tmp_path, capsys, damage, message):
    out = tmp_path / "curves.json"
    args = [f"a={arms['a']}", "--json", str(out)]
    if damage == "no equals sign":
        args[0] = "a"
    elif damage == "no name":
        args[0] = "=" + arms["a"]
    elif damage == "no glob":
        args[0] = "a="
    elif damage == "one arm twice":
        args.insert(1, f"a={arms['b']}")
    elif damage == "nothing matched":
        args[0] = f"a={tmp_path}/none-fold*.metrics.csv"
    elif damage == "one fold":
        args[0] = "a=" + arms["a"].replace("*", "0")
    elif damage == "json exists":
        out.write_text("kept")
    elif damage == "no common epoch":
        write_metrics(tmp_path / "c-fold0.metrics.csv", {2: 0.5}, 2)
        write_metrics(tmp_path / "c-fold1.metrics.csv", {3: 0.5}, 3)
        args.insert(1, f"c={tmp_path}/c-fold*.metrics.csv")
    elif damage == "no such metric":
        args += ["--metric", "val_iou"]
    else:
        (tmp_path / "campaign" / "a-fold2.metrics.csv").write_text("step,dice\n250,0.5\n")
    assert load_script("fold_curves").main(args) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("fold_curves.py: error: ") and captured.err.count("\n") == 1
    assert message in captured.err and captured.out == ""
    assert out.read_text() == "kept" if damage == "json exists" else not out.exists()
