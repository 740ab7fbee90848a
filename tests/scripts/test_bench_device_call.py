"""scripts/bench_device_call.sh: one device call of a `bench models` run that may need several; the same command
again continues the run (--resume) from the JSON the first call left in STATE, and OUT gets the rows so far."""

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "bench_device_call.sh"
BENCH = ["2", "--device", "cpu", "--models", "unet_test", "--modes", "eager", "--phases", "infer", "--repeats", "1"]


def call(*args: str) -> subprocess.CompletedProcess:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # python3 there: this environment's
    environment = {**os.environ, "PATH": path, "WHEELS": "no-wheels-here"}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=environment, capture_output=True, text=True)


def test_usage_errors_are_one_line_and_exit_2(tmp_path):
    result = call("a", "b")
    assert result.returncode == 2 and result.stderr.startswith("usage:")
    result = call(str(tmp_path / "state"), str(tmp_path / "missing"), "60", "b", *BENCH)
    assert result.returncode == 2 and result.stderr.strip().endswith("missing is not a folder")


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_a_second_call_continues_the_run_and_returns_its_files(tmp_path):
    state, out = tmp_path / "state", tmp_path / "out"
    out.mkdir()
    first = call(str(state), str(out), "300", "b2", *BENCH, "--sides", "16")
    assert first.returncode == 0, first.stdout + first.stderr
    assert len(json.loads((out / "b2.json").read_text())["rows"]) == 2  # batch 1 and 8 at side 16
    assert (state / "inductor").is_dir() and (state / "triton-home").is_dir()  # the caches a warm machine keeps
    with tarfile.open(out / "b2-kernels.tgz", "r:gz") as tar:  # Triton's cache of this project's kernels comes back
        assert tar.getnames()[0] == "triton-home"
    again = call(str(state), str(out), "300", "b2", *BENCH, "--sides", "16", "32")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "2 rows kept from" in again.stdout and "bench exit 0" in again.stdout
    result = json.loads((out / "b2.json").read_text())
    assert result["complete"] and [r["side"] for r in result["rows"]] == [16, 16, 32, 32]
    assert (out / "b2.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "b2.log").read_text().count("unet_test eager infer") == 4  # both calls' progress, appended
