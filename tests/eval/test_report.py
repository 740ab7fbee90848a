import json
import re

import pytest

from rwkvseg.eval.report import (
    fold_curve,
    html_table,
    plot_curves,
    plot_fold_curves,
    read_metrics_csv,
    read_run,
    svg_curves,
    write_report,
    write_run_curves,
)
from writers import write_run_3d


def test_curves_and_tables_render(tmp_path):
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text("epoch,train_loss,val_dice\n1,1.0,\n2,0.5,0.6\n3,0.25,0.8\n")
    history = read_metrics_csv(csv_path)
    assert history[0] == {"epoch": 1.0, "train_loss": 1.0}  # empty cells are dropped, not NaN
    svg = svg_curves(history, ["train_loss", "val_dice", "missing"], "curves")
    assert svg.count("<polyline") == 2 and "missing" not in svg
    assert "no data" in svg_curves(history, ["missing"], "none")
    table = html_table([{"name": "a<b", "dice": 0.5}], ["name", "dice", "iou"])
    assert "a&lt;b" in table and "0.5000" in table and "<td>-</td>" in table
    report = write_report(tmp_path / "r.html", "t", [("s", svg + table)])
    assert report.read_text().startswith("<!doctype html>")


def test_plot_curves_skips_what_the_history_lacks(tmp_path):
    pytest.importorskip("matplotlib")
    history = [{"epoch": 1.0, "train_loss": 1.2}, {"epoch": 2.0, "train_loss": 0.6, "val_dice": 0.4}]
    drawn = plot_curves(history, tmp_path / "c.png", "t", {"val_dice": "Dice", "val_iou": "IoU"}, mark_epoch=2)
    assert drawn == ["Dice", "training loss"] and (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="no training loss or val_dice"):
        plot_curves([{"epoch": 1.0}], tmp_path / "none.png", "t", {"val_dice": "Dice"})
    assert not (tmp_path / "none.png").exists()


def test_run_curves_draw_each_region(tmp_path):
    pytest.importorskip("matplotlib")
    run = read_run(write_run_3d(tmp_path / "brats2018-mmsegrwkv", [0.5, 0.7, 0.8]))
    drawn = write_run_curves(run, tmp_path / "brats2018-mmsegrwkv.curves.png")
    regions = [f"validation Dice {r}" for r in ("WT", "TC", "ET")]
    assert drawn == ["validation Dice (mean)", *regions, "training loss (ce)"]
    assert (tmp_path / "brats2018-mmsegrwkv.curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fold_curves_average_the_folds_where_every_fold_validated(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    folds = {
        1: read_run(
            write_run_3d(tmp_path / "b-fold1", [0.6, 0.8, 0.9], val_every=2, config={"loss": {"name": "dice"}})
        ),
        0: read_run(write_run_3d(tmp_path / "b-fold0", [0.5, 0.7], val_every=2)),  # stopped two epochs earlier
    }
    drawn = plot_fold_curves(folds, tmp_path / "b.folds.png", "b: 2 folds")
    assert drawn == [
        "validation Dice, mean over the 2 folds",
        "fold 0",
        "fold 1",
        "training loss (ce, dice), mean over the folds",
    ]
    assert (tmp_path / "b.folds.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    seen = {}
    monkeypatch.setattr("rwkvseg.eval.report.plot_curves", lambda history, *args: seen.setdefault("rows", history))
    plot_fold_curves(folds, tmp_path / "again.png", "b")
    rows = {int(r["epoch"]): r for r in seen["rows"]}
    assert sorted(rows) == list(range(1, 7))
    dice = {k: {int(r["epoch"]): r["val_dice"] for r in run.validated} for k, run in folds.items()}
    assert rows[2]["mean"] == pytest.approx((dice[0][2] + dice[1][2]) / 2) and rows[4]["fold0"] == dice[0][4]
    assert "mean" not in rows[6] and rows[6]["fold1"] == dice[1][6]  # fold 0 never reached epoch 6
    assert "mean" not in rows[1] and "fold0" not in rows[1]  # no validation at epoch 1
    loss = {k: {int(r["epoch"]): r["train_loss"] for r in run.rows} for k, run in folds.items()}
    assert rows[3]["train_loss"] == pytest.approx((loss[0][3] + loss[1][3]) / 2) and rows[5]["train_loss"] == loss[1][5]


def history(dice: dict[int, float], epochs: int, regions: bool = False) -> list[dict[str, float]]:
    """metrics.csv rows (read_metrics_csv) of epochs 1..epochs, validated where dice has a value; with regions, WT
    0.1 above the mean and ET 0.1 below it."""
    rows = []
    for epoch in range(1, epochs + 1):
        row = {"epoch": float(epoch), "train_loss": 1.0 / epoch}
        if epoch in dice:
            row["val_dice"] = dice[epoch]
            if regions:
                row |= {
                    "val_dice_WT": dice[epoch] + 0.125,
                    "val_dice_TC": dice[epoch],
                    "val_dice_ET": dice[epoch] - 0.125,
                }
        rows.append(row)
    return rows


def test_fold_curve_reads_the_folds_at_fixed_epochs():
    """Fold 0 peaks early, fold 1 late: each fold's own best is above the best common epoch, itself above the last."""
    folds = {
        0: history({2: 0.75, 4: 0.5, 6: 0.5}, 6, regions=True),
        1: history({2: 0.25, 4: 0.5, 6: 0.625}, 6, regions=True),
    }
    curve = fold_curve(folds)
    assert curve.folds == (0, 1) and curve.epochs == (2, 4, 6) and curve.regions == ("WT", "TC", "ET")
    assert curve.mean == pytest.approx((0.5, 0.5, 0.5625))
    assert curve.per_fold_best_epochs == {0: 2, 1: 6} and curve.per_fold_best == pytest.approx((0.75 + 0.625) / 2)
    assert curve.best_epoch == 6 and curve.best == pytest.approx(0.5625)
    assert curve.last_epochs == {0: 6, 1: 6} and curve.last == pytest.approx(0.5625)
    assert curve.per_fold_best > curve.best >= curve.last >= min(curve.mean)
    assert curve.per_fold_best_regions == pytest.approx({"WT": 0.6875 + 0.125, "TC": 0.6875, "ET": 0.6875 - 0.125})
    assert curve.best_regions["WT"] == pytest.approx(0.5625 + 0.125) and curve.last_regions["ET"] == pytest.approx(
        0.5625 - 0.125
    )
    wt = fold_curve(folds, "val_dice_WT")  # a region's column as the metric: no regions of its own
    assert wt.regions == () and wt.best == pytest.approx(0.5625 + 0.125) and wt.per_fold_best_regions == {}


def test_fold_curve_keeps_the_earliest_of_tied_epochs():
    folds = {"a": history({1: 0.5, 2: 0.75, 3: 0.75}, 3), "b": history({1: 0.5, 2: 0.25, 3: 0.25}, 3)}
    curve = fold_curve(folds)
    assert curve.mean == (0.5, 0.5, 0.5) and curve.best_epoch == 1  # all tied: the first
    assert curve.per_fold_best_epochs == {"a": 2, "b": 1}  # a's 0.75 first reached at 2, as the loop keeps it
    assert curve.per_fold_best == 0.625 and curve.last == 0.5


def test_fold_curve_averages_only_the_epochs_every_fold_validated():
    """val_every 2 against 3, and a fold that stopped early: only 6 and 12 are common; each fold's last is its own."""
    folds = {
        0: history({e: e / 100 for e in range(2, 15, 2)}, 14),  # 2, 4, ..., 14
        1: history({e: e / 50 for e in range(3, 13, 3)}, 13),  # 3, 6, 9, 12 and no validation at 13
    }
    curve = fold_curve(folds)
    assert curve.epochs == (6, 12) and curve.mean == pytest.approx((0.09, 0.18))
    assert curve.best_epoch == 12 and curve.best == pytest.approx(0.18)
    assert curve.last_epochs == {0: 14, 1: 12} and curve.last == pytest.approx((0.14 + 0.24) / 2)
    assert curve.per_fold_best_epochs == {0: 14, 1: 12} and curve.regions == ()


@pytest.mark.parametrize(
    ("folds", "metric", "message"),
    [
        ({0: history({2: 0.5}, 2), 1: history({}, 2)}, "val_dice", "fold 1 has no epoch with val_dice; give runs that"),
        (
            {0: history({2: 0.5}, 2, True)},
            "val_dice_XX",
            "no epoch with val_dice_XX; choose one of val_dice, val_dice_ET",
        ),
        ({0: history({2: 0.5}, 2), 1: history({3: 0.5}, 3)}, "val_dice", "no epoch is validated by every fold (fold 0"),
        ({}, "val_dice", "no fold histories given"),
    ],
)
def test_fold_curve_refuses_folds_it_cannot_read(folds, metric, message):
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        fold_curve(folds, metric)
    assert "\n" not in str(err.value)


def test_run_history_states_why_a_run_stopped_early(tmp_path):
    run = write_run_3d(tmp_path / "brats2018-segresnet", [0.5, 0.7, 0.6], val_every=5, planned=40)
    history = read_run(run)
    assert (history.ran, history.best["epoch"], history.minutes) == (15, 10, (15 * 4.0 + 3 * 6.0) / 60)
    stopped = "planned 40 epochs; stopped by the run's time limit after epoch 15 (poly schedule not finished)"
    every = "validated every 5 epochs and after the last"
    assert history.schedule() == f"{stopped}, {every}"
    assert history.epochs_text() == "15 of 40"
    (run / "summary.json").write_text('{"status": "interrupted"}')
    assert read_run(run).schedule().startswith("planned 40 epochs; interrupted after epoch 15,")
    fit = {"planned": 40, "epochs": 15, "epoch": 2, "step": 500, "seconds_per_epoch": 27.3, "seconds_left": 912.0}
    (run / "summary.json").write_text(json.dumps({"status": "complete", "schedule_fit": fit}))
    fitted = "planned 40 epochs, fitted to 15 after epoch 2 by the run's time limit"
    assert read_run(run).schedule() == f"{fitted} (poly schedule compressed onto them), all run, " + every
    assert read_run(run).epochs_text() == "15 of 15 fitted (40 planned)"
    (run / "summary.json").write_text(json.dumps({"status": "complete", "schedule_fit": {**fit, "epochs": 20}}))
    fitted = fitted.replace("to 15", "to 20")
    expected = f"{fitted}; stopped by the run's time limit after epoch 15 (poly schedule not finished), " + every
    assert read_run(run).schedule() == expected
    (run / "metrics.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"metrics\.csv not found: give the folder of a training run"):
        read_run(run)
