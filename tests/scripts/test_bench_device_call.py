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


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_warm_starts_a_compiled_bench_beside_the_run_into_the_same_caches(tmp_path):
    # a stand-in python3 records each bench's arguments and its compile caches (the real warmer compiles: minutes)
    bin_dir, state, out, calls = tmp_path / "bin", tmp_path / "state", tmp_path / "out", tmp_path / "calls"
    bin_dir.mkdir()
    out.mkdir()
    stub = bin_dir / "python3"
    stub.write_text(f'#!/usr/bin/env bash\necho "$TORCHINDUCTOR_CACHE_DIR $TRITON_HOME $*" >> {calls}\necho ran $*\n')
    stub.chmod(0o755)
    environment = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "WHEELS": "no-wheels-here"}
    run_args = [*BENCH, "--sides", "16", "64"]

    def device_call(warm: str) -> tuple[str, str]:  # (the run's, the warmer's) recorded command line
        calls.unlink(missing_ok=True)
        result = subprocess.run(
            ["bash", str(SCRIPT), str(state), str(out), "60", "b2", *run_args],
            cwd=ROOT,
            env={**environment, "WARM": warm},
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0 and "warmer exit 0" in result.stdout, result.stdout + result.stderr
        run, warmer = sorted(calls.read_text().splitlines(), key=lambda line: "b2-warm-" in line)
        return run, warmer

    run, warm = device_call("--models unet_small  --sides 64")
    caches = f"{(state / 'inductor').resolve()} {(state / 'triton-home').resolve()}"
    assert run.startswith(caches) and warm.startswith(caches)  # the same Inductor and Triton caches
    warm_json = warm.split("--json ")[1]  # one file per WARM: a later call with other options starts its own
    assert warm_json.startswith(f"{state}/b2-warm-") and warm_json.endswith(".json")
    assert warm.endswith(  # the run's options, then WARM's, then compiled rows timed once, into their own JSON
        f"{' '.join(run_args)} --models unet_small --sides 64 --modes compiled --repeats 1 --json {warm_json}"
    )
    assert run.endswith(f"{' '.join(run_args)} --json {state}/b2.json --png {state}/b2.png")  # the run as it was
    assert (out / "b2-warm.log").read_text().startswith("ran -m rwkvseg.cli bench models")  # its log comes back
    assert not (out / "b2.json").exists()  # the stand-in measured nothing, and nothing claims it did
    Path(warm_json).write_text("{}")  # as if the warmer had measured rows: the same WARM next call resumes them
    assert device_call("--models unet_small --sides 64")[1].endswith(f"--json {warm_json} --resume")
    other = device_call("--models unet --sides 64")[1]  # other options: a file of their own, nothing to resume
    assert f"--json {warm_json}" not in other and other.endswith(".json")
