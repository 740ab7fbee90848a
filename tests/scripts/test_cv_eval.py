"""scripts/cv_eval.py: each fold's checkpoint scored on its own validation cases, and every case once over all."""

import csv
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import nn

from rwkvseg.checkpoint import CheckpointMeta, save_checkpoint
from rwkvseg.data.preprocess3d import PreprocessConfig, preprocess_dataset
from rwkvseg.data.specs import dataset_spec
from rwkvseg.data.splits import make_split, write_split
from rwkvseg.records import inference_metadata
from writers import load_script, write_phantoms_as

CASES = ["c1", "c2", "c3", "c4", "c5"]


class Bright(nn.Module):
    """Region logits from FLAIR and T1ce intensities (z-scored): a fixed 1x1x1 convolution."""

    def __init__(self, gain: float = 4.0):
        super().__init__()
        self.mix = nn.Conv3d(4, 3, 1)
        with torch.no_grad():
            self.mix.weight.zero_()
            self.mix.weight[0, 3] = gain  # WT from FLAIR
            self.mix.weight[1, 1] = gain  # TC and ET from T1ce
            self.mix.weight[2, 1] = gain
            self.mix.bias.fill_(-gain)

    def forward(self, x):
        return self.mix(x)


@pytest.fixture
def campaign(tmp_path, monkeypatch):
    """DATA with five phantom cases and RUNS with two folds of one variant (a checkpoint, config and split each)."""
    data = write_phantoms_as(tmp_path / "data", CASES, (24, 24, 24))
    plans = preprocess_dataset(data, dataset_spec("brats"), tmp_path / "cache", PreprocessConfig())
    monkeypatch.setattr("rwkvseg.checkpoint.build_model", lambda meta: Bright())
    meta = CheckpointMeta(
        "bright3d", 4, 3, preprocessing=inference_metadata(plans, (16, 16, 16), target="regions"), spacing=(1.0,) * 3
    )
    split = make_split(CASES, folds=2, seed=0)
    runs = tmp_path / "runs"
    for fold, gain in ((0, 4.0), (1, 2.0)):
        folder = runs / f"brats2018-bright-fold{fold}"
        save_checkpoint(folder / "best", Bright(gain), meta)
        write_split(folder / "split.json", split)
        (folder / "config.json").write_text(json.dumps({"data": {"fold": fold}}))
    return runs, data, split


def test_cv_eval_scores_each_fold_and_every_case_once(campaign, tmp_path, capsys):
    runs, data, split = campaign
    script = load_script("cv_eval")
    out = tmp_path / "out"
    assert script.main([str(runs), str(data), str(out), "--device", "cpu", "--threshold", "0.3"]) == 0
    result = json.loads((out / "cv.json").read_text())
    model = result["models"]["brats2018-bright"]
    assert model["folds"] == [0, 1] and model["cases"] == len(CASES)
    assert result["settings"]["threshold"] == 0.3
    for fold in (0, 1):
        rows = list(csv.DictReader((out / "brats2018-bright" / f"fold{fold}" / "eval" / "per_case.csv").open()))
        assert sorted(r["case"] for r in rows) == split["folds"][fold]["val"]  # each fold scores its own cases
    rows = list(csv.DictReader((out / "brats2018-bright" / "all" / "eval" / "per_case.csv").open()))
    assert sorted(r["case"] for r in rows) == CASES  # every case once
    sizes = [len(split["folds"][k]["val"]) for k in (0, 1)]
    weighted = sum(n * model["per_fold"][str(k)]["dice"] for k, n in enumerate(sizes)) / sum(sizes)
    assert model["all"]["dice"] == pytest.approx(weighted)  # a mean over cases, not over folds
    assert model["per_fold"]["0"]["dice"] != model["per_fold"]["1"]["dice"]  # two different checkpoints
    assert "| brats2018-bright | 2 | 5 |" in capsys.readouterr().out


def test_cv_eval_applies_and_records_the_post_processing_given(campaign, tmp_path):
    runs, data, _ = campaign
    out = tmp_path / "out"
    args = [str(runs), str(data), str(out), "--device", "cpu", "--threshold", "0.02", "--postprocess", "largest"]
    assert load_script("cv_eval").main(args) == 0
    assert json.loads((out / "cv.json").read_text())["settings"]["postprocess"] == "largest"
    predictions = sorted((out / "brats2018-bright" / "all" / "pred").glob("*.nii.gz"))
    assert len(predictions) == len(CASES)
    for path in predictions:
        _, components = ndimage.label(np.asarray(nib.load(path).dataobj) > 0, structure=np.ones((3, 3, 3)))
        assert components == 1  # the largest foreground component alone


def test_cv_eval_refuses_a_bad_post_processing_spelling(campaign, tmp_path, capsys):
    runs, data, _ = campaign
    with pytest.raises(SystemExit) as exit_:
        load_script("cv_eval").main([str(runs), str(data), str(tmp_path / "out"), "--postprocess", "biggest"])
    assert exit_.value.code == 2 and "--postprocess" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["no checkpoint", "missing case", "fold mismatch", "out exists"])
def test_cv_eval_refuses_in_one_line_before_predicting(campaign, tmp_path, capsys, damage):
    runs, data, _ = campaign
    out = tmp_path / "out"
    fold1 = runs / "brats2018-bright-fold1"
    if damage == "no checkpoint":
        (fold1 / "best.safetensors").unlink()
        message = "best.safetensors not found"
    elif damage == "missing case":
        shutil.rmtree(data / "c3")
        message = "lacks the validation cases ['c3']"
    elif damage == "fold mismatch":
        (fold1 / "config.json").write_text(json.dumps({"data": {"fold": 0}}))
        message = "its config.json trained fold 0, its name says 1"
    else:
        out.mkdir()
        message = "exists; give a new folder"
    assert load_script("cv_eval").main([str(runs), str(data), str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not out.exists() or not any(out.iterdir())
