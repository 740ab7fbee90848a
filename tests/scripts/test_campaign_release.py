"""scripts/campaign.py and scripts/release_2d.py read a run's metrics.csv, also when it validated every N epochs."""

import json

import pytest

from rwkvseg.train.loop import _write_metrics_csv
from writers import load_script


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


def test_campaign_summary_of_a_run_not_yet_validated(run):
    (run / "metrics.csv").write_text("epoch,step,lr,train_loss,train_seconds,val_dice\n1,10,0.01,1.0,2.0,\n")
    assert load_script("campaign").summary(run) == {"run": "busi-urwkv", "planned": 6, "epochs": 1}


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


def test_release_card_rows_from_evaluations_where_measured(tmp_path):
    script = load_script("release_2d")
    scores = {k: {"mean": v} for k, v in zip(script.METRICS, (0.81234, 0.7, 0.9, 0.8, 0.99, 12.345), strict=True)}
    (tmp_path / "summary.json").write_text(json.dumps(scores))
    row = script.evaluation_row(tmp_path / "summary.json", "with flip TTA")
    assert row == "| with flip TTA | 0.8123 | 0.7000 | 0.9000 | 0.8000 | 0.9900 | 12.3 |"
    assert script.evaluation_row(tmp_path / "absent.json", "with flip TTA") == ""
