"""scripts/brats_device_call.sh: the last part of a BraTS device call (no training time left: the runs an earlier call
trained), evaluated, exported as int8 and packed into parts that unpack to what scripts/release_3d.py reads."""

import io
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from writers import write_phantoms_as

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "brats_device_call.sh"


def call(*args: str, **env: str) -> subprocess.CompletedProcess:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # python3 there: this environment's
    environment = {**os.environ, "PATH": path, "WHEELS": "no-wheels-here", **env}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=environment, capture_output=True, text=True)


def test_usage_errors_are_one_line_and_exit_2(tmp_path):
    result = call("a", "b")
    assert result.returncode == 2 and result.stderr.startswith("usage:")
    result = call(str(tmp_path / "missing"), str(tmp_path), str(tmp_path / "runs"), str(tmp_path), "600")
    assert result.returncode == 2 and result.stderr.strip().endswith("missing is not a folder")
    result = call(str(tmp_path), str(tmp_path), str(tmp_path / "runs"), str(tmp_path), "600", VARIANTS="dynunet unet")
    assert result.returncode == 2 and result.stderr.strip().endswith("VARIANTS: no configs/brats2018_unet.toml")
    result = call(str(tmp_path), str(tmp_path), str(tmp_path / "runs"), str(tmp_path), "600", RESERVE_MIB="some")
    assert result.returncode == 2
    assert result.stderr.strip().endswith("RESERVE_MIB=some: give a whole number (default 0)")
    assert not (tmp_path / "runs").exists()  # refused before anything ran


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("split") is None, reason="needs bash and coreutils")
def test_final_part_evaluates_exports_and_packs_a_trained_run(tmp_path):
    data = write_phantoms_as(tmp_path / "data", ["c1", "c2", "c3", "c4"], (32, 32, 32))
    runs = tmp_path / "runs"
    run = runs / "brats2018-mmsegrwkv_small"
    train = [sys.executable, "-m", "rwkvseg.cli", "train", str(ROOT / "configs" / "demo3d.toml"), "--data", str(data)]
    train += ["--out", str(run), "--set", "epochs=1", "--set", "infer.final_eval=false", "--no-progress"]
    subprocess.run(train, cwd=tmp_path, check=True, capture_output=True)
    val = tmp_path / "val"
    shutil.copytree(data / "c4", val / "c4")
    (runs / "cc").mkdir()
    (runs / "cc" / "urwkv.bin").write_bytes(b"a compile cache")
    out = tmp_path / "out"
    out.mkdir()

    variants = "mmsegrwkv_small dynunet"  # a subset of the four: only these are evaluated and exported
    result = call(str(data), str(val), str(runs), str(out), "100", FINAL_SECONDS="150", VARIANTS=variants)

    assert result.returncode == 0, result.stderr[-2000:]
    assert "campaign exit" not in result.stdout  # no time was left for training
    assert f"no {runs}/brats2018-dynunet/best.safetensors: not evaluated" in result.stdout
    assert "brats2018-mmsegrwkv/" not in result.stdout
    parts = sorted(out.glob("rel.tar.part*"))
    assert parts and all(p.stat().st_size <= 15 * 2**20 for p in parts)
    packed = tmp_path / "rel.tar"
    packed.write_bytes(b"".join(p.read_bytes() for p in parts))
    with tarfile.open(packed) as tar:
        tar.extractall(tmp_path / "back", filter="data")
    back = tmp_path / "back"
    assert (back / "evals" / "eval-mmsegrwkv_small" / "summary.json").is_file()
    assert {p.name for p in (back / "weights").iterdir()} == {
        "mmsegrwkv_small-brats2018.safetensors",
        "mmsegrwkv_small-brats2018.json",
    }
    with tarfile.open(back / "runs.tar") as tar:
        names = set(tar.getnames())
    assert {"./brats2018-mmsegrwkv_small/metrics.csv", "./brats2018-mmsegrwkv_small/best.json"} <= names
    with tarfile.open(fileobj=io.BytesIO(b"".join(p.read_bytes() for p in sorted(out.glob("cc.tar.part*"))))) as tar:
        assert tar.extractfile("cc/urwkv.bin").read() == b"a compile cache"  # the caches fit: they come back

    # room kept for what a caller adds after the script (RESERVE_FILES): the caches stay behind, said in one line
    out2 = tmp_path / "out2"
    out2.mkdir()
    result = call(
        str(data), str(val), str(runs), str(out2), "100", FINAL_SECONDS="150", VARIANTS="dynunet", RESERVE_FILES="7"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "left out: they do not fit beside the rest and the reserve" in result.stdout
    assert sorted(p.name for p in out2.iterdir()) == ["rel.tar.partaa"]
