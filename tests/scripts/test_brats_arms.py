"""scripts/brats_arms.sh: the screening arms' device calls, with nvidia-smi stubbed and the GPU commands
(preprocess, campaign, cross-validation) recorded instead of run; scripts/detached_call.py runs for real."""

import os
import shlex
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "brats_arms.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")

# python3 as the script calls it: the GPU commands write their arguments to $RECORD (and a cross-validation its
# output folder), everything else (scripts/detached_call.py) runs in this environment's Python
STUB = """#!/usr/bin/env bash
case "$1 $2" in
  "-m rwkvseg.cli" | scripts/campaign.py* | scripts/cv_eval.py*)
    printf '%s\\n' "$*" >> "$RECORD"
    case "$1" in scripts/cv_eval.py) mkdir -p "$4" && echo cv > "$4/cv.json" ;; esac
    case "$1" in scripts/campaign.py) sleep "${{STUB_SECONDS:-0}}" ;; esac ;;
  *) exec {python} "$@" ;;
esac
"""


@pytest.fixture
def stubs(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(STUB.format(python=shlex.quote(sys.executable)))
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'name, memory.total [MiB]'\n")
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    return bin_dir


def call(stubs: Path, tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {
        **os.environ,
        "PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}",
        "WHEELS": "no-wheels-here",
        "WORK": str(tmp_path / "work"),
        "OUT": str(tmp_path / "out"),
        "RECORD": str(tmp_path / "record.txt"),
        **env,
    }
    (tmp_path / "out").mkdir(exist_ok=True)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=environment, capture_output=True, text=True)


def recorded(tmp_path: Path) -> list[str]:
    record = tmp_path / "record.txt"
    return record.read_text().splitlines() if record.exists() else []


def test_usage_and_missing_settings_are_one_line_and_non_zero(stubs, tmp_path):
    result = call(stubs, tmp_path)
    assert result.returncode == 2 and result.stderr.startswith("usage:")
    result = call(stubs, tmp_path, "final")
    assert result.returncode != 0 and "ARMS: set ARMS" in result.stderr
    result = call(stubs, tmp_path, "start", ARMS="L")
    assert result.returncode != 0 and "EPOCHS: set EPOCHS" in result.stderr
    result = call(stubs, tmp_path, "start", ARMS="X", EPOCHS="17", MINUTES="14", FOLLOW_SECONDS="0")
    assert result.returncode == 2 and "unknown arm X (B, L, H, N, F, M, W, R, A, S, G or V)" in result.stderr
    assert not any("campaign.py" in line for line in recorded(tmp_path))  # nothing started
    result = call(stubs, tmp_path, "one", ARMS="X", EPOCHS="17", MINUTES="14", FOLLOW_SECONDS="0", WAIT_SECONDS="0")
    assert result.returncode == 2 and "waited" not in result.stdout  # a failed start ends the call
    result = call(stubs, tmp_path, "final", ARMS="L")  # no arm L was started here: nothing to pack
    assert result.returncode == 1 and "packing failed" in result.stderr and "final done" not in result.stdout


def test_one_call_starts_each_arm_with_its_targets_and_cross_validates_labels_without_a_cut(stubs, tmp_path):
    settings = dict(ARMS="L H", EPOCHS="17", MINUTES="14", FOLLOW_SECONDS="5", WAIT_SECONDS="5")
    result = call(stubs, tmp_path, "one", **settings, WAIT_ARMS="L H", CV_SPECS="L:none H:0.5")

    assert result.returncode == 0, result.stderr[-2000:]
    lines = recorded(tmp_path)
    assert lines[0].endswith(f"preprocess .gpudata/brats18raw --out {tmp_path}/work/cache")
    campaigns = [line for line in lines if "scripts/campaign.py" in line]
    assert len(campaigns) == 2
    labels, half = campaigns
    for line in campaigns:
        assert "--epochs 17 --minutes 14" in line and "--folds 0 1 2 3 4" in line
        assert "model.overrides.deep_supervision=2" in line and "data.num_workers" not in line
    assert "data.target=labels --set loss.name=ce_dice" in labels and labels.endswith(
        f"--tag ds2_e17_labels --compile-cache {tmp_path}/work/cc-L"
    )
    assert "data.target=regions --set loss.name=bce_dice" in half and "half_res_width=32" in half
    cvs = [line for line in lines if "scripts/cv_eval.py" in line]
    assert "--threshold" not in cvs[0] and f"{tmp_path}/work/cv-L-none" in cvs[0]
    assert "--threshold 0.5 --postprocess largest" in cvs[1]
    # the recorded campaigns ended at once: both arms' states say so, and the one return packs their small files
    assert "L exit 0" in result.stdout and "H exit 0" in result.stdout
    with tarfile.open(tmp_path / "out" / "small.tgz") as tar:
        names = set(tar.getnames())
    assert {"state-L/exit", "state-H/exit", "cv-L-none/cv.json", "cv-H-0.5/cv.json"} <= names


def test_final_stops_what_still_runs_and_packs_without_weights(stubs, tmp_path):
    work = tmp_path / "work"
    run = work / "runs-L" / "brats2018-mmsegrwkv-ds2_e17_labels-fold0"
    run.mkdir(parents=True)
    (run / "metrics.csv").write_text("epoch,train_loss\n1,0.5\n")
    (run / "best.safetensors").write_bytes(b"weights")
    start = [sys.executable, "scripts/detached_call.py", "start", str(work / "state-L"), "--", "sleep", "60"]
    subprocess.run(start, cwd=ROOT, check=True, capture_output=True)

    result = call(stubs, tmp_path, "final", ARMS="L", WAIT_ARMS="L", WAIT_SECONDS="1")

    assert result.returncode == 0, result.stderr[-2000:]
    assert (work / "state-L" / "exit").is_file()  # stopped, and its end recorded
    assert "brats2018-mmsegrwkv-ds2_e17_labels-fold0 2 lines: 1,0.5" in result.stdout
    with tarfile.open(tmp_path / "out" / "small.tgz") as tar:
        names = set(tar.getnames())
    assert "runs-L/brats2018-mmsegrwkv-ds2_e17_labels-fold0/metrics.csv" in names
    assert not any(name.endswith(".safetensors") for name in names)


def test_the_final_models_train_on_every_case_and_come_back_as_int8_releases(stubs, tmp_path):
    """Arms A and S train MMSegRWKV and MMSegRWKV-small on all 18 cases of the single split (train_all, no folds)
    for ALL_EPOCHS, beside a five-fold arm (F) of EPOCHS; final with EXPORT writes each run's best checkpoint as its
    int8 release and returns them in rel.tar parts beside the small files."""
    from safetensors.torch import load_file

    from rwkvseg.checkpoint import CheckpointMeta, save_checkpoint
    from rwkvseg.models import create_model

    settings = dict(ARMS="A S F", EPOCHS="17", ALL_EPOCHS="34", MINUTES="20", FOLLOW_SECONDS="5", NOPACK="1")
    settings |= dict(WORKERS="2")  # seven runs at once: two loaders each, not the share of one arm's runs
    result = call(stubs, tmp_path, "start", **settings)
    assert result.returncode == 0, result.stderr[-2000:]
    full, small, fine = [line for line in recorded(tmp_path) if "scripts/campaign.py" in line]
    assert "half_res_width=32 --set model.overrides.fine_heads=true --folds 0 1 2 3 4" in fine  # arm F: five folds
    assert "--epochs 17 --minutes 20" in fine and "--tag ds2_e17_hrw32_fine" in fine and "train_all" not in fine
    for line, config in ((full, "mmsegrwkv"), (small, "mmsegrwkv_small")):
        assert f"--configs configs/brats2018_{config}.toml" in line and "--set train_all=true" in line
        assert "--folds" not in line and "data.target=regions" in line and "deep_supervision=2" in line
        assert "--epochs 34 --minutes 20" in line and "--tag ds2_e34_all" in line
        assert line.count("data.num_workers=2") == 1
        assert "fit_schedule" not in line  # FIT unset: the budget stops a run, as before

    work = tmp_path / "work"
    for arm, name in (("A", "brats2018-mmsegrwkv-ds2_e34_all"), ("S", "brats2018-mmsegrwkv_small-ds2_e34_all")):
        run = work / f"runs-{arm}" / name
        meta = CheckpointMeta(model="mmsegrwkv_test", in_channels=4, num_classes=3, training={"train_all": True})
        save_checkpoint(run / "best", create_model("mmsegrwkv_test", in_channels=4, num_classes=3), meta)
    export = "A:mmsegrwkv-brats2018 S:mmsegrwkv_small-brats2018"
    result = call(stubs, tmp_path, "final", ARMS="A S", EXPORT=export)
    assert result.returncode == 0, result.stderr[-2000:]
    parts = sorted((tmp_path / "out").glob("rel.tar.part*"))
    assert parts and all(p.stat().st_size <= 15 * 2**20 for p in parts)
    (tmp_path / "rel.tar").write_bytes(b"".join(p.read_bytes() for p in parts))
    with tarfile.open(tmp_path / "rel.tar") as tar:
        tar.extractall(tmp_path / "back", filter="data")
    for release in ("mmsegrwkv-brats2018", "mmsegrwkv_small-brats2018"):
        weights = tmp_path / "back" / "weights" / f"{release}.safetensors"
        assert any(t.dtype == torch.int8 for t in load_file(weights).values())
    with tarfile.open(tmp_path / "out" / "small.tgz") as tar:
        assert not any(n.endswith(".safetensors") for n in tar.getnames())  # the weights travel only as releases

    result = call(stubs, tmp_path, "final", ARMS="A", EXPORT="A:x B:y")  # an arm without a run: refused
    assert result.returncode == 1 and "EXPORT B:y: no single best checkpoint" in result.stderr


def test_start_packs_while_the_arms_train_on(stubs, tmp_path):
    """A start call returns while its campaigns still run (they train on between the calls of a lease): its pack
    of what they wrote so far is whole, not a failure."""
    settings = dict(ARMS="B", EPOCHS="17", MINUTES="14", FOLLOW_SECONDS="1", STUB_SECONDS="30")
    try:
        result = call(stubs, tmp_path, "start", **settings)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "still running" in result.stdout and "packing failed" not in result.stderr
        assert "start done" in result.stdout
        with tarfile.open(tmp_path / "out" / "small.tgz") as tar:
            assert "state-B/command.json" in tar.getnames()
    finally:
        stop = [sys.executable, "scripts/detached_call.py", "stop", str(tmp_path / "work" / "state-B"), "--grace", "1"]
        subprocess.run(stop, cwd=ROOT, capture_output=True)


def test_arm_epochs_and_the_int8_cross_validation_of_a_five_fold_arm(stubs, tmp_path):
    """ARM_EPOCHS gives one arm its own schedule (B at 34 beside M at 17, with ResFM's 8 channels per modality);
    final with INT8_CV exports every fold's best of the arm as int8 and cross-validates those exports beside the
    fp32 cross-validation; an arm without fold checkpoints is refused."""
    from safetensors.torch import load_file

    from rwkvseg.checkpoint import CheckpointMeta, save_checkpoint
    from rwkvseg.models import create_model

    settings = dict(ARMS="B M", EPOCHS="17", ARM_EPOCHS="B:34", MINUTES="30", FOLLOW_SECONDS="5", NOPACK="1")
    result = call(stubs, tmp_path, "start", **settings)
    assert result.returncode == 0, result.stderr[-2000:]
    base, fused = [line for line in recorded(tmp_path) if "scripts/campaign.py" in line]
    assert "--epochs 34 --minutes 30" in base and "--tag ds2_e34 " in base and "fm_channels" not in base
    assert "--epochs 17 --minutes 30" in fused and "--set model.overrides.fm_channels=8" in fused
    assert "--tag ds2_e17_fm8" in fused and "--folds 0 1 2 3 4" in fused

    result = call(stubs, tmp_path, "start", **{**settings, "ARMS": "M G W V", "EPOCHS": "34", "ALL_EPOCHS": "34"})
    assert result.returncode == 0, result.stderr[-2000:]
    folds, final, weighted, weighted_final = [line for line in recorded(tmp_path) if "scripts/campaign.py" in line][2:]
    assert "--set loss.region_weights=[1,2,1] --folds 0 1 2 3 4" in weighted and "--tag ds2_e34_tc2" in weighted
    assert "--set loss.region_weights=[1,2,1] --set train_all=true --tag ds2_e34_tc2_all" in weighted_final
    assert "--epochs 34" in weighted_final and "fm_channels" not in weighted_final
    assert "--epochs 34" in folds and "--tag ds2_e34_fm8" in folds and "--folds 0 1 2 3 4" in folds
    assert "--configs configs/brats2018_mmsegrwkv.toml" in final and "--set model.overrides.fm_channels=8" in final
    assert "--set train_all=true" in final and "--folds" not in final and "--tag ds2_e34_fm8_all" in final

    work = tmp_path / "work"
    names = [f"brats2018-mmsegrwkv-ds2_e34-fold{k}" for k in range(2)]
    for name in names:
        meta = CheckpointMeta(model="mmsegrwkv_test", in_channels=4, num_classes=3)
        save_checkpoint(work / "runs-B" / name / "best", create_model("mmsegrwkv_test", 4, 3), meta)
    result = call(stubs, tmp_path, "final", ARMS="B", CV_SPECS="B:0.5 B:0.5:last", INT8_CV="B:0.5")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "int8 cv B:0.5 (2 folds) ended with status 0" in result.stdout
    fp32, last, int8 = [line for line in recorded(tmp_path) if "scripts/cv_eval.py" in line]
    assert f"{work}/cv-B-0.5 " in fp32 and "--checkpoints-from" not in fp32 and "--checkpoint best" in fp32
    assert f"{work}/cv-B-0.5-last " in last and last.endswith("--postprocess largest --checkpoint last")
    assert f"{work}/cv-B-0.5-int8 --device cuda --threshold 0.5 --postprocess largest" in int8
    assert int8.endswith(f"--checkpoints-from {work}/int8-B")
    for name in names:
        weights = load_file(work / "int8-B" / f"{name}.safetensors")
        assert any(t.dtype == torch.int8 for t in weights.values())
        assert (work / "int8-B" / f"{name}.json").is_file()
    with tarfile.open(tmp_path / "out" / "small.tgz") as tar:
        packed = set(tar.getnames())
    assert {"cv-B-0.5/cv.json", "cv-B-0.5-last/cv.json", "cv-B-0.5-int8/cv.json"} <= packed
    assert not any(n.endswith(".safetensors") for n in packed)

    result = call(stubs, tmp_path, "final", ARMS="B", INT8_CV="M:0.5")
    assert result.returncode == 1 and "INT8_CV M:0.5: no fold run with a best checkpoint" in result.stderr


def test_final_sets_aside_a_cross_validation_an_earlier_call_cut_short(stubs, tmp_path):
    """A cv folder without its cv.json (the call that wrote it ended first) moves to cut-<folder>-<seconds>, kept
    but out of the pack, and the cross-validation runs again; a finished one stays where it is."""
    work = tmp_path / "work"
    (work / "runs-M" / "brats2018-mmsegrwkv-ds2_e17_fm8-fold0").mkdir(parents=True)
    cut = work / "cv-M-0.5" / "brats2018-mmsegrwkv-ds2_e17_fm8" / "fold0" / "eval"
    cut.mkdir(parents=True)
    (cut / "per_case.csv").write_text("case,WT_dice\n")
    finished = work / "cv-M-0.5-last"
    finished.mkdir()
    (finished / "cv.json").write_text("finished")
    start = [sys.executable, "scripts/detached_call.py", "start", str(work / "state-M"), "--", "true"]
    subprocess.run(start, cwd=ROOT, check=True, capture_output=True)

    result = call(stubs, tmp_path, "final", ARMS="M", CV_SPECS="M:0.5 M:0.5:last")

    assert result.returncode == 0, result.stderr[-2000:]
    aside = list(work.glob("cut-cv-M-0.5-*"))
    assert len(aside) == 1 and f"{work}/cv-M-0.5: cut short by an earlier call (no cv.json); moved to" in result.stdout
    assert (aside[0] / "brats2018-mmsegrwkv-ds2_e17_fm8" / "fold0" / "eval" / "per_case.csv").is_file()
    assert (work / "cv-M-0.5" / "cv.json").read_text() == "cv\n"  # written again by this call
    assert "cv-M-0.5-last: cut short" not in result.stdout and not list(work.glob("cut-cv-M-0.5-last*"))
    with tarfile.open(tmp_path / "out" / "small.tgz") as tar:
        packed = set(tar.getnames())
    assert "cv-M-0.5/cv.json" in packed and not any(name.startswith("cut-") for name in packed)


def test_fit_sets_every_run_to_fit_its_schedule_to_the_budget(stubs, tmp_path):
    """FIT=1 gives every run of every arm --set fit_schedule=true (with its MINUTES), once; arm R is the release
    recipe with the strong augmentation preset."""
    settings = dict(ARMS="R V", EPOCHS="34", MINUTES="20", FOLLOW_SECONDS="5", NOPACK="1", FIT="1")
    result = call(stubs, tmp_path, "start", **settings)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in recorded(tmp_path) if "scripts/campaign.py" in line]
    assert len(lines) == 2
    for line in lines:
        assert "--minutes 20" in line and line.count("--set fit_schedule=true") == 1
    strong = lines[0]  # arm R: the release recipe with the strong augmentation preset, five folds
    assert "--set data.patches.augment_preset=strong --folds 0 1 2 3 4" in strong and "--tag ds2_e34_strong" in strong
    assert "augment_preset" not in lines[1]
