"""scripts/cv_eval.py: each fold's checkpoint scored on its own validation cases, and every case once over all."""

import csv
import importlib.util
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from writers import load_script

CASES = ["c1", "c2", "c3", "c4", "c5"]  # the cases of the fold_campaign fixture (conftest.py)


def test_cv_eval_scores_each_fold_and_every_case_once(fold_campaign, tmp_path, capsys):
    runs, data, split = fold_campaign
    metrics = runs / "brats2018-bright-fold0" / "metrics.csv"
    metrics.write_text(metrics.read_text().replace(",0.45,", ",0.35,"))  # fold 0 best at epoch 2, fold 1 at 4
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
    every = json.loads((out / "brats2018-bright" / "all" / "eval" / "summary.json").read_text())
    assert model["label_confusion"] == every["label_confusion"]  # the counts over every case, as evaluate gives
    assert sum(map(sum, model["label_confusion"]["voxels"])) == sum(
        int(np.prod(nib.load(p).shape)) for p in (out / "brats2018-bright" / "all" / "pred").glob("*.nii.gz")
    )  # every voxel of every case counted once
    screen = capsys.readouterr().out
    assert "| brats2018-bright | 2 | 5 |" in screen
    assert (out / "brats2018-bright.folds.curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the fold curves
    curve = model["training_curve"]  # the runs' val_dice (conftest METRICS) at fixed epochs
    assert curve["folds"] == ["0", "1"] and curve["curve"] == pytest.approx({"2": 0.4, "4": 0.45})
    assert curve["per_fold_best"]["epochs"] == {"0": 2, "1": 4}
    assert curve["per_fold_best"]["mean"] == pytest.approx(0.475)  # each fold's own best: optimistic
    assert curve["per_fold_best"]["regions"] == pytest.approx({"WT": 0.55, "TC": 0.45, "ET": 0.35})
    assert curve["best_common_epoch"] == {
        "epoch": 4,
        "mean": pytest.approx(0.45),
        "regions": pytest.approx({"WT": 0.6, "TC": 0.5, "ET": 0.4}),
    }
    assert curve["last"]["epochs"] == {"0": 4, "1": 4} and curve["last"]["mean"] == pytest.approx(0.45)
    assert "| brats2018-bright | 2 (2-4) | 0.4750 | epoch 4: 0.4500 | epoch 4: 0.4500 |" in screen


def test_cv_eval_compares_each_variant_with_the_first_case_by_case(fold_campaign, tmp_path, capsys):
    """A second variant (the same runs with a higher intensity cut) is compared with the first over every case."""
    import torch

    from rwkvseg.checkpoint import load_checkpoint, save_checkpoint

    runs, data, _ = fold_campaign
    for fold in (0, 1):
        source = runs / f"brats2018-bright-fold{fold}"
        target = runs / f"brats2018-dim-fold{fold}"
        shutil.copytree(source, target)
        model, meta = load_checkpoint(source / "best.safetensors")
        with torch.no_grad():
            model.mix.bias.mul_(1.5)  # a higher intensity cut: smaller masks
        save_checkpoint(target / "best", model, meta, overwrite=True)
    out = tmp_path / "out"
    assert load_script("cv_eval").main([str(runs), str(data), str(out), "--device", "cpu", "--no-curves"]) == 0
    result = json.loads((out / "cv.json").read_text())
    rows = {r["column"]: r for r in result["comparisons"]["brats2018-dim - brats2018-bright"]}
    bright, dim = result["models"]["brats2018-bright"]["all"], result["models"]["brats2018-dim"]["all"]
    assert dim["dice"] != bright["dice"]  # two different models
    assert rows["mean dice"]["cases"] == len(CASES)
    assert rows["mean dice"]["mean_a"] == pytest.approx(bright["dice"])
    assert rows["mean dice"]["difference"] == pytest.approx(dim["dice"] - bright["dice"])
    assert rows["WT_dice"]["difference"] == pytest.approx(dim["dice_WT"] - bright["dice_WT"])
    assert "| mean dice | 5 |" in capsys.readouterr().out


def test_cv_eval_leaves_out_the_curves_when_asked(fold_campaign, tmp_path):
    runs, data, _ = fold_campaign
    out = tmp_path / "out"
    assert load_script("cv_eval").main([str(runs), str(data), str(out), "--device", "cpu", "--no-curves"]) == 0
    assert (out / "cv.json").is_file() and not list(out.glob("*.png"))


def test_cv_eval_applies_and_records_the_post_processing_given(fold_campaign, tmp_path):
    runs, data, _ = fold_campaign
    out = tmp_path / "out"
    args = [str(runs), str(data), str(out), "--device", "cpu", "--threshold", "0.02", "--postprocess", "largest"]
    assert load_script("cv_eval").main(args) == 0
    assert json.loads((out / "cv.json").read_text())["settings"]["postprocess"] == "largest"
    predictions = sorted((out / "brats2018-bright" / "all" / "pred").glob("*.nii.gz"))
    assert len(predictions) == len(CASES)
    for path in predictions:
        _, components = ndimage.label(np.asarray(nib.load(path).dataobj) > 0, structure=np.ones((3, 3, 3)))
        assert components == 1  # the largest foreground component alone


def test_cv_eval_refuses_a_bad_post_processing_spelling(fold_campaign, tmp_path, capsys):
    runs, data, _ = fold_campaign
    with pytest.raises(SystemExit) as exit_:
        load_script("cv_eval").main([str(runs), str(data), str(tmp_path / "out"), "--postprocess", "biggest"])
    assert exit_.value.code == 2 and "--postprocess" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "damage", ["no checkpoint", "missing case", "fold mismatch", "out exists", "no history", "no matplotlib"]
)
def test_cv_eval_refuses_in_one_line_before_predicting(fold_campaign, tmp_path, capsys, monkeypatch, damage):
    runs, data, _ = fold_campaign
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
    elif damage == "no history":
        (fold1 / "metrics.csv").unlink()
        message = "metrics.csv not found: give the folder of a training run"
    elif damage == "no matplotlib":
        find_spec = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "matplotlib" else find_spec(name))
        message = "the fold curves need matplotlib: pip install 'rwkvseg[plots]', or pass --no-curves"
    else:
        out.mkdir()
        message = "exists; give a new folder"
    assert load_script("cv_eval").main([str(runs), str(data), str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not out.exists() or not any(out.iterdir())


def exports_of(runs, folder):
    """Each fold's best copied to folder as export-fold<K> (what export_release writes where a campaign trained),
    and taken out of the runs: the checkpoints that did not travel."""
    folder.mkdir()
    for fold in (0, 1):
        for suffix in (".safetensors", ".json"):
            best = runs / f"brats2018-bright-fold{fold}" / f"best{suffix}"
            shutil.move(best, folder / f"export-fold{fold}{suffix}")
    return folder


def test_cv_eval_scores_the_checkpoints_given_per_fold_as_the_runs_best(fold_campaign, tmp_path):
    """--checkpoints-from: fold K's file in the folder predicts fold K's cases, with the runs' folds, cases and
    curves; the same scores as the same checkpoints as each run's best, and cv.json names the folder."""
    runs, data, _ = fold_campaign
    script = load_script("cv_eval")
    common = ["--device", "cpu", "--no-curves", "--threshold", "0.3"]
    assert script.main([str(runs), str(data), str(tmp_path / "best"), *common]) == 0
    exports = exports_of(runs, tmp_path / "exports")
    out = tmp_path / "out"
    assert script.main([str(runs), str(data), str(out), *common, "--checkpoints-from", str(exports)]) == 0
    given, best = (json.loads((d / "cv.json").read_text()) for d in (out, tmp_path / "best"))
    assert given["models"] == best["models"]
    assert given["settings"]["checkpoints_from"] == str(exports) and best["settings"]["checkpoints_from"] is None
    assert given["models"]["brats2018-bright"]["per_fold"]["0"] != given["models"]["brats2018-bright"]["per_fold"]["1"]


@pytest.mark.parametrize("damage", ["no export for a fold", "another model", "two variants"])
def test_cv_eval_refuses_checkpoints_that_are_not_the_runs(fold_campaign, tmp_path, capsys, damage):
    runs, data, _ = fold_campaign
    exports = exports_of(runs, tmp_path / "exports")
    if damage == "no export for a fold":
        (exports / "export-fold1.safetensors").unlink()
        message = "--checkpoints-from " + str(exports) + ": 0 files end in fold1.safetensors"
    elif damage == "another model":
        config = runs / "brats2018-bright-fold1" / "config.json"
        record = json.loads(config.read_text())
        config.write_text(json.dumps(record | {"model": {"name": "bright3d", "overrides": {"gain": 2.0}}}))
        message = "but " + str(runs / "brats2018-bright-fold1") + " trained bright3d {'gain': 2.0}"
    else:
        for fold in (0, 1):
            shutil.copytree(runs / f"brats2018-bright-fold{fold}", runs / f"brats2018-dim-fold{fold}")
        message = "has 2 variants (brats2018-bright, brats2018-dim)"
    out = tmp_path / "out"
    args = [str(runs), str(data), str(out), "--device", "cpu", "--checkpoints-from", str(exports)]
    assert load_script("cv_eval").main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not out.exists()


def test_cv_eval_scores_each_runs_last_epoch_when_asked(fold_campaign, tmp_path, capsys):
    """--checkpoint last: each fold run's last.safetensors predicts its cases (the rule of a train_all model), and
    cv.json says so; a run without one, or with --checkpoints-from, is refused in one line."""
    runs, data, _ = fold_campaign
    script = load_script("cv_eval")
    common = ["--device", "cpu", "--no-curves", "--threshold", "0.3"]
    for fold, other in ((0, 1), (1, 0)):  # each fold's last epoch is the other fold's best: a different model
        for suffix in (".safetensors", ".json"):
            source = runs / f"brats2018-bright-fold{other}" / f"best{suffix}"
            shutil.copy(source, runs / f"brats2018-bright-fold{fold}" / f"last{suffix}")
    assert script.main([str(runs), str(data), str(tmp_path / "best"), *common]) == 0
    assert script.main([str(runs), str(data), str(tmp_path / "last"), *common, "--checkpoint", "last"]) == 0
    best, last = (json.loads((tmp_path / d / "cv.json").read_text()) for d in ("best", "last"))
    assert best["settings"]["checkpoint"] == "best" and last["settings"]["checkpoint"] == "last"
    per_best = best["models"]["brats2018-bright"]["per_fold"]
    per_last = last["models"]["brats2018-bright"]["per_fold"]
    assert per_last["0"] != per_best["0"] and per_last["1"] != per_best["1"]
    assert script.settings_text(last["settings"]).endswith("; each fold's last-epoch checkpoint")
    assert "last" not in script.settings_text(best["settings"])

    exports = exports_of(runs, tmp_path / "exports")
    capsys.readouterr()
    args = [str(runs), str(data), str(tmp_path / "x"), *common, "--checkpoint", "last", "--checkpoints-from"]
    assert script.main([*args, str(exports)]) == 2
    assert "--checkpoint last scores each run's own last epoch" in capsys.readouterr().err
    (runs / "brats2018-bright-fold1" / "last.safetensors").unlink()
    assert script.main([str(runs), str(data), str(tmp_path / "y"), *common, "--checkpoint", "last"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "last.safetensors not found: the run has not finished an epoch" in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_cv_eval_leaves_out_a_training_curve_the_folds_do_not_share(fold_campaign, caplog):
    """Folds validated on different epochs: no training_curve (null, a warning), which the scores do not need."""
    runs, data, _ = fold_campaign
    script = load_script("cv_eval")
    found = script.fold_runs(runs, data)["brats2018-bright"]
    shifted = found[1].history.rows
    for row in shifted:
        row["epoch"] += 1  # fold 1 validated at 3 and 5
    assert script.training_curve("brats2018-bright", found) is None
    assert "brats2018-bright: no training_curve in cv.json: no epoch is validated by every fold" in caplog.text
    results = {"brats2018-bright": {"training_curve": None}}
    assert script.curve_table(results)[-1] == "| brats2018-bright | none | - | - | - |"
