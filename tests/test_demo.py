import pytest

from rwkvseg.cli import main


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--minutes-2d", "0.05", "--minutes-3d", "0.05"]) == 0
    report = (out / "report.html").read_text()
    assert "U-RWKV-s" in report and "WT" in report and "<svg" in report
    assert any((out / "pred2d" / "overlays").glob("*.png"))
    assert main(["demo", "--out", str(out), "--no-3d"]) == 2  # never replaces a folder without --overwrite
