"""`rwkvseg bench epoch` (scripts/time_2d_epoch.py): real training runs per setting, timed per epoch."""

import json
import subprocess
import sys
from pathlib import Path

from rwkvseg.data.synthetic import write_synthetic_dataset

ROOT = Path(__file__).resolve().parents[2]


def test_epoch_table_from_the_script(tmp_path):
    write_synthetic_dataset(tmp_path / "d", n=8, shape=(20, 24), seed=1)
    argv = [sys.executable, str(ROOT / "scripts" / "time_2d_epoch.py"), str(tmp_path / "d"), "--epochs", "2"]
    argv += ["--compile", "off", "--resident", "off", "on", "--json", str(tmp_path / "e.json")]
    for setting in ("model.name=urwkv_test", "data.size=[16,16]", "data.num_workers=0", "data.batch_size=2"):
        argv += ["--set", setting]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "first epoch s" in done.stdout and "epoch s" in done.stdout
    rows = json.loads((tmp_path / "e.json").read_text())["rows"]
    assert [(r["compile"], r["gpu_resident"]) for r in rows] == [("off", "off"), ("off", "on")]
    for r in rows:
        assert r["steps_per_epoch"] == 3 and len(r["epochs"]) == 2 and r["epoch_s"] > 0  # 6 of 8 images train
    assert "6 training images on cpu" in done.stderr  # the resident variant really held the data
