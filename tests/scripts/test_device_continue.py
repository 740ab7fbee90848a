"""scripts/device_continue.py: a run chained over calls on machines that forget it, carried in parts that arrive over
several transfers, ends as the uninterrupted run; and the SIGINT it stops training with keeps the run whole."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rwkvseg.train.config import load_config
from rwkvseg.train.state import read_state
from rwkvseg.train.train import train
from rwkvseg.train.travel import read_manifest
from writers import load_script, write_tiny_2d_run_config

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    return write_tiny_2d_run_config(tmp_path_factory.mktemp("chain"), epochs=2)


def _history(run):
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    return [{k: v for k, v in row.items() if "seconds" not in k} for row in rows]


def test_a_run_chained_over_forgetful_calls_ends_as_the_uninterrupted_run(config, tmp_path, capsys):
    script = load_script("device_continue")
    straight = tmp_path / "straight"
    train(load_config(config, [f"out={straight}"]))
    machine = tmp_path / "machine"  # what a device call has; removed between calls (a cold machine)
    run = machine / "runs" / "r"
    # one epoch per call (the run's time budget stops it after its first epoch); 0.05 MiB parts: two transfers
    common = ["--run", str(run), "--part-mib", "0.05", "--set", "max_minutes=0.00001"]
    first = tmp_path / "out1"
    assert script.main([*common, "--config", str(config), "--out", str(first)]) == script.EXIT_MORE
    assert "epoch 1 of 2, sent transfer 1 of 2" in capsys.readouterr().out
    second = tmp_path / "out2"
    assert script.main(["--run", str(run), "--send", "1", "--out", str(second)]) == 0
    manifest, _ = read_manifest(first)
    sent = sorted(p.name for p in (*first.iterdir(), *second.iterdir()) if p.suffix != ".json")
    assert sent == [p["name"] for p in manifest["parts"]] and len(os.listdir(first)) <= script.MAX_FILES

    shutil.rmtree(machine)
    assert script.main([*common, "--parts", str(first), "--out", str(tmp_path / "out3")]) == script.EXIT_MISSING
    assert f"carry in: {len(os.listdir(first)) - 1} (" in capsys.readouterr().out
    assert not run.exists() and not (tmp_path / "out3").exists()
    status = script.main([*common, "--parts", str(second), "--out", str(tmp_path / "out3")])
    assert status in (0, script.EXIT_MORE)
    assert "unpacked r (epoch 1)" in capsys.readouterr().out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["epochs_done"] == 2
    assert _history(run) == _history(straight)
    for name in ("best.safetensors", "last.safetensors"):
        assert (run / name).read_bytes() == (straight / name).read_bytes(), name


def test_sigint_stops_training_with_the_run_whole_and_resumable(config, tmp_path):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "rwkvseg.cli", "train", str(config), "--out", str(run), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen(
        [*command, "--set", "epochs=100000"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        # started as a shell script's background job is: SIGINT ignored (rwkvseg listens to it anyway)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    try:
        deadline = time.monotonic() + 120
        while not (run / "state.pt").is_file() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (run / "state.pt").is_file(), "no epoch finished in time"
        child.send_signal(signal.SIGINT)  # what `timeout -s INT` sends at the call's deadline
        _, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 130 and "rwkvseg: interrupted" in err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and not (run / ".rwkvseg.lock").exists()
    state = read_state(run / "state.pt")  # whole: its digest checks
    assert state["progress"]["epoch"] == summary["epochs_done"] >= 1
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []  # no temporary file left
