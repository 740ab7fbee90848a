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
def test_warm_compiles_ahead_of_the_run_into_the_same_caches_and_the_run_times_alone(tmp_path):
    # a stand-in python3 records each bench's arguments, its compile caches and when it ran (the real warmers
    # compile: minutes); a warmer of side 64 takes 2 s, so the run would start before it ended if it did not wait
    bin_dir, state, out, calls = tmp_path / "bin", tmp_path / "state", tmp_path / "out", tmp_path / "calls"
    bin_dir.mkdir()
    out.mkdir()
    stub = bin_dir / "python3"
    stub.write_text(
        "#!/usr/bin/env bash\n"
        f'echo "start $(date +%s.%N) $TORCHINDUCTOR_CACHE_DIR $TRITON_HOME $*" >> {calls}\n'
        'case "$*" in *"--sides 64 --modes compiled"*) sleep 2 ;; esac\n'
        f'echo "end $(date +%s.%N) $*" >> {calls}\n'
        "echo ran $*\n"
    )
    stub.chmod(0o755)
    environment = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "WHEELS": "no-wheels-here"}
    run_args = [*BENCH, "--sides", "16", "64"]

    def device_call(warm: str, **extra: str) -> tuple[dict[str, tuple[float, float, str]], str]:
        """({the bench's JSON: (start, end, its recorded line)}, the script's output)"""
        calls.unlink(missing_ok=True)
        result = subprocess.run(
            ["bash", str(SCRIPT), str(state), str(out), "60", "b2", *run_args],
            cwd=ROOT,
            env={**environment, "WARM": warm, **extra},
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        benches: dict[str, list] = {}
        for line in calls.read_text().splitlines():
            when, at, rest = line.split(" ", 2)
            key = rest.split("--json ")[1].split()[0]
            benches.setdefault(key, [0.0, 0.0, ""])
            if when == "start":
                benches[key][0], benches[key][2] = float(at), rest
            else:
                benches[key][1] = float(at)
        return {key: tuple(value) for key, value in benches.items()}, result.stdout

    benches, said = device_call("--models unet_small  --sides 64; --sides 16")
    assert said.count("warmer exit 0") == 2 and "bench exit 0" in said
    run = benches.pop(f"{state}/b2.json")
    warmers = sorted(benches.items())
    assert len(warmers) == 2 and all(key.startswith(f"{state}/b2-warm-") for key, _ in warmers)  # a file per set
    assert run[0] >= max(end for _, (_, end, _) in warmers)  # the run starts once both warmers have ended
    caches = f"{(state / 'inductor').resolve()} {(state / 'triton-home').resolve()}"
    assert run[2].startswith(caches) and all(line.startswith(caches) for _, (_, _, line) in warmers)  # same caches
    lines = sorted(line for _, (_, _, line) in warmers)
    assert any(  # the run's options, then the set's, then compiled rows timed once, into their own JSON
        line.endswith(f"{' '.join(run_args)} --models unet_small --sides 64 --modes compiled --repeats 1 --json {key}")
        for key, line in ((k, v[2]) for k, v in warmers)
    ), lines
    assert run[2].endswith(f"{' '.join(run_args)} --json {state}/b2.json --png {state}/b2.png")  # the run as it was
    assert (out / "b2-warm.log").read_text().startswith("ran -m rwkvseg.cli bench models")  # their log comes back
    assert not (out / "b2.json").exists()  # the stand-in measured nothing, and nothing claims it did
    slow = next(key for key, (_, _, line) in warmers if "--sides 64 --modes" in line)
    Path(slow).write_text("{}")  # as if that warmer had measured rows: the same set next call resumes them
    benches, _ = device_call("--models unet_small --sides 64")
    assert benches[slow][2].endswith(f"--json {slow} --resume")
    benches, _ = device_call("--models unet --sides 64")  # other options: a file of their own, nothing to resume
    assert slow not in benches and len(benches) == 2
    benches, said = device_call("--models unet_small --sides 64", WARM_SECONDS="1")  # cut off after 1 s
    assert "warmer exit 124" in said and "bench exit 0" in said
    assert benches[f"{state}/b2.json"][0] - benches[slow][0] < 1.9  # the run did not wait out the 2 s warmer
