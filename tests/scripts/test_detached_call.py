"""scripts/detached_call.py: a command started detached keeps running after start returns, follow reports it and
sends back what fits the device's return limits, stop ends it through SIGINT."""

import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "detached_call.py"
MiB = 2**20

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="process groups and SIGINT are POSIX")


def call(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def wait_for(path: Path, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert path.exists(), f"{path} did not appear"


# the detached command: writes what a run would, says so, then waits for SIGINT as rwkvseg train does
WORKER = """
import pathlib, sys, time
runs = pathlib.Path("runs/a")
runs.mkdir(parents=True)
(runs / "metrics.csv").write_text("epoch,val_dice\\n1,0.5\\n")
print("epoch 1 done", flush=True)
(runs / "best.safetensors").write_bytes(b"w" * 1000)  # written last: the test waits for it
try:
    time.sleep(60)
except KeyboardInterrupt:
    print("stopped after epoch 1", flush=True)
    sys.exit(130)
"""


def test_start_follow_stop_a_detached_command(tmp_path):
    started = call(tmp_path, "start", "state", "--", sys.executable, "-c", WORKER)
    assert started.returncode == 0, started.stderr
    wait_for(tmp_path / "runs" / "a" / "best.safetensors")  # running after start returned

    again = call(tmp_path, "start", "state", "--", sys.executable, "-c", "pass")
    assert again.returncode == 2 and "its command is still running" in again.stderr
    assert len(again.stderr.splitlines()) == 1

    out = tmp_path / "out"
    out.mkdir()
    args = ["--seconds", "1", "--poll", "0.2", "--out", "out", "--send", "runs/a/best.safetensors", "--pack", "runs"]
    followed = call(tmp_path, "follow", "state", *args, "--exclude", "*.safetensors")
    assert followed.returncode == 3 and "state: still running" in followed.stdout and "epoch 1 done" in followed.stdout
    assert (out / "runs__a__best.safetensors").read_bytes() == b"w" * 1000
    with tarfile.open(out / "small.tgz") as tar:
        assert tar.getnames() == ["runs/a/metrics.csv"]  # the checkpoint excluded from the pack

    stopped = call(tmp_path, "stop", "state", "--grace", "30")
    assert stopped.returncode == 0 and "ended, exit status 130" in stopped.stdout
    followed = call(tmp_path, "follow", "state", "--seconds", "0")
    assert followed.returncode == 0 and "stopped after epoch 1" in followed.stdout
    quiet = call(tmp_path, "follow", "state", "--seconds", "0", "--lines", "0")  # where it stands, no log lines
    assert quiet.returncode == 0 and "ended" in quiet.stdout and "epoch 1" not in quiet.stdout
    assert (tmp_path / "state" / "exit").read_text().strip() == "130"

    # ended: the same STATE starts a new command, whose exit status is recorded when it ends
    assert call(tmp_path, "start", "state", "--", sys.executable, "-c", "raise SystemExit(4)").returncode == 0
    wait_for(tmp_path / "state" / "exit")
    assert "ended, exit status 4" in call(tmp_path, "follow", "state", "--seconds", "0").stdout


def test_send_keeps_within_the_return_limits(tmp_path):
    (tmp_path / "state").mkdir()
    assert call(tmp_path, "start", "state", "--", sys.executable, "-c", "pass").returncode == 0
    wait_for(tmp_path / "state" / "exit")
    files = tmp_path / "files"
    files.mkdir()
    for i in range(9):
        (files / f"f{i}.bin").write_bytes(os.urandom(1000 + i))  # f0 smallest
    with open(files / "big.bin", "wb") as f:  # over 16 MiB: never sent (sparse, no disk)
        f.truncate(17 * MiB)
    out = tmp_path / "out"
    out.mkdir()
    (out / "campaign.json").write_text("{}")  # what the caller put there already takes a slot

    names = [str(p.relative_to(tmp_path)) for p in sorted(files.iterdir())]
    followed = call(tmp_path, "follow", "state", "--seconds", "0", "--out", "out", "--send", *names)

    assert followed.returncode == 0
    sent = sorted(p.name for p in out.iterdir())
    assert sent == ["campaign.json", *(f"files__f{i}.bin" for i in range(7))]  # 8 files, the smallest first
    assert "left out files/big.bin: 17.0 MiB, over the 16 MiB a file may be" in followed.stdout
    assert "left out files/f7.bin: no room" in followed.stdout and "left out files/f8.bin: no room" in followed.stdout

    out2 = tmp_path / "out2"
    out2.mkdir()
    followed = call(
        tmp_path, "follow", "state", "--seconds", "0", "--out", "out2", "--reserve-files", "6", "--send", *names
    )
    assert sorted(p.name for p in out2.iterdir()) == ["files__f0.bin", "files__f1.bin"]  # 6 of 8 kept for the caller

    # a name OUT holds already is never replaced
    (out2 / "files__f2.bin").write_bytes(b"the caller's")
    followed = call(tmp_path, "follow", "state", "--seconds", "0", "--out", "out2", "--send", "files/f2.bin")
    assert "left out files/f2.bin: out2/files__f2.bin is there already" in followed.stdout
    assert (out2 / "files__f2.bin").read_bytes() == b"the caller's"

    # an absolute path with characters the device tool refuses in a returned name comes back under a plain name
    odd = tmp_path / "dp+out" / "rel tar.partaa"
    odd.parent.mkdir()
    odd.write_bytes(b"part")
    out3 = tmp_path / "out3"
    out3.mkdir()
    assert call(tmp_path, "follow", "state", "--seconds", "0", "--out", "out3", "--send", str(odd)).returncode == 0
    (name,) = [p.name for p in out3.iterdir()]
    assert re.fullmatch(r"[A-Za-z0-9._-]+", name) and name.endswith("__dp_out__rel_tar.partaa"), name
    assert (out3 / name).read_bytes() == b"part"


def test_usage_errors_are_one_line_and_exit_2(tmp_path):
    result = call(tmp_path, "follow", "nothing-here", "--seconds", "0")
    assert result.returncode == 2 and "no command was started there" in result.stderr
    assert len(result.stderr.splitlines()) == 1
    result = call(tmp_path, "start", "state")
    assert result.returncode == 2 and "give the command after --" in result.stderr
    result = call(tmp_path, "follow", "state", "--send", "missing.bin", "--out", ".")
    assert result.returncode == 2 and "missing.bin: not found" in result.stderr
    result = call(tmp_path, "follow", "state", "--send", "x")
    assert result.returncode == 2 and "--send and --pack need --out" in result.stderr
    result = call(tmp_path, "follow", "state", "--lines", "-1")
    assert result.returncode == 2 and "--lines -1: give 0 (no log lines) or more" in result.stderr


def test_stop_kills_a_command_that_ignores_sigint(tmp_path):
    stubborn = "import pathlib, signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
    stubborn += "pathlib.Path('up').touch(); time.sleep(60)"
    assert call(tmp_path, "start", "state", "--", sys.executable, "-c", stubborn).returncode == 0
    wait_for(tmp_path / "up")
    stopped = call(tmp_path, "stop", "state", "--grace", "0.5")
    assert stopped.returncode == 0 and "killed after 0.5 s (SIGINT did not end it)" in stopped.stdout
    if Path("/proc/self/stat").exists():  # what was left, named before the kill: the stubborn Python
        header, *left = (tmp_path / "state" / "killed.txt").read_text().splitlines()
        assert header == "pid state wchan command" and len(left) == 2  # the leader that records the exit, and it
        (leader,) = [line for line in left if "detached_call.py _lead" in line]
        (command,) = [line for line in left if line is not leader]
        assert " -c import pathlib, signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN)" in command
        assert command.split()[1] in ("R", "S", "D") and leader.split()[1] in ("R", "S", "D")
        assert "2 processes were left:" in stopped.stdout and "time.sleep(60)" in stopped.stdout
    assert "ended, exit status 137" in call(tmp_path, "follow", "state", "--seconds", "0").stdout
