import pytest

from rwkvseg.eval.report import html_table, plot_curves, read_metrics_csv, svg_curves, write_report


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
