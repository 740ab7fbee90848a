import csv
import json
import math

import numpy as np
import pytest

from rwkvseg.eval.evaluate import evaluate_folders
from rwkvseg.eval.metrics import EmptyPolicy
from writers import save_png


def box(shape, r0, r1, c0, c1, value=255):
    m = np.zeros(shape, np.uint8)
    m[r0:r1, c0:c1] = value
    return m


@pytest.fixture
def folders(tmp_path):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    save_png(gt / "a_segmentation.png", box((20, 24), 2, 8, 2, 8, value=1))  # 0/1 mask with an ISIC-style suffix
    save_png(pred / "a.png", box((20, 24), 2, 8, 5, 11))  # half overlap: 18 of 36
    save_png(gt / "b.png", box((20, 24), 0, 0, 0, 0))  # empty ground truth
    save_png(pred / "b.png", box((20, 24), 0, 0, 0, 0))
    return pred, gt


def test_per_case_csv_and_summary(folders, tmp_path):
    pred, gt = folders
    summary = evaluate_folders(pred, gt, tmp_path / "ev", spacing=(0.5, 0.5))
    rows = list(csv.DictReader((tmp_path / "ev" / "per_case.csv").open()))
    assert [r["case"] for r in rows] == ["a", "b"]
    assert float(rows[0]["dice"]) == pytest.approx(0.5) and float(rows[0]["iou"]) == pytest.approx(1 / 3)
    assert float(rows[0]["hd95"]) == pytest.approx(1.5)  # 3 pixels at 0.5 mm
    assert float(rows[1]["dice"]) == 1.0 and rows[1]["empty_ground_truth"] == "True"
    on_disk = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert summary["dice"]["mean"] == pytest.approx(0.75) and summary["both_empty"] == 1
    assert summary["empty_policy"] == "perfect" and summary["hd95_units"] == "spacing units"
    strict = evaluate_folders(pred, gt, policy=EmptyPolicy.UNDEFINED)
    assert strict["dice"]["mean"] == pytest.approx(0.5) and strict["dice"]["undefined"] == 1
    with pytest.raises(FileExistsError, match="--overwrite"):
        evaluate_folders(pred, gt, tmp_path / "ev")


def test_missing_and_mismatched_predictions(folders, tmp_path):
    pred, gt = folders
    save_png(gt / "c.png", box((20, 24), 1, 5, 1, 5))
    with pytest.raises(ValueError, match=r"1 ground-truth case\(s\) have no prediction .*\['c'\].*--missing-as-empty"):
        evaluate_folders(pred, gt)
    summary = evaluate_folders(pred, gt, missing_as_empty=True)
    assert summary["missing_predictions"] == 1 and summary["cases"] == 3
    assert summary["dice"]["min"] == 0.0 and summary["hd95"]["max"] == pytest.approx(math.hypot(19, 23))
    save_png(pred / "c.png", box((10, 24), 1, 5, 1, 5))
    with pytest.raises(ValueError, match=r"c\.png is 24x10 but ground truth .*c\.png is 24x20"):
        evaluate_folders(pred, gt)


def test_dataset_folder_as_ground_truth_and_multiclass(tmp_path):
    root = tmp_path / "busi" / "data" / "benign"
    save_png(root / "images" / "x (1).png", np.zeros((12, 14), np.uint8))
    save_png(root / "mask" / "x (1)_mask.png", box((12, 14), 0, 4, 0, 4))
    save_png(root / "mask" / "x (1)_mask_1.png", box((12, 14), 8, 12, 8, 12))
    save_png(tmp_path / "pred" / "x (1).png", box((12, 14), 0, 4, 0, 4))
    summary = evaluate_folders(tmp_path / "pred", tmp_path / "busi", with_hd95=False)
    assert summary["dice"]["mean"] == pytest.approx(2 * 16 / (16 + 32))  # the union of both masks is the truth
    labels = np.zeros((12, 14), np.uint8)
    labels[0:4, 0:4], labels[6:12, 6:12] = 1, 2
    save_png(tmp_path / "mgt" / "m.png", labels)
    guess = labels.copy()
    guess[6:12, 6:12] = 1
    save_png(tmp_path / "mpred" / "m.png", guess)
    multi = evaluate_folders(tmp_path / "mpred", tmp_path / "mgt", num_classes=3, with_hd95=False)
    assert multi["per_class"]["1"]["dice"]["mean"] == pytest.approx(2 * 16 / (16 + 52))
    assert multi["per_class"]["2"]["dice"]["mean"] == 0.0


def test_3d_command_line_brats_hd95_and_safe_region_columns(tmp_path, capsys):
    """Region names with spaces become CSV-safe columns; --brats-hd95 scores a one-sided empty region 373.13 mm
    where the default is the diagonal of the grid."""
    from rwkvseg.cli import main
    from writers import save_nifti

    ref = np.zeros((12, 10, 8), np.uint8)
    ref[3:8, 3:7, 2:6] = 2
    ref[4:6, 4:6, 3:5] = 4
    pred = np.where(ref == 4, 2, ref).astype(np.uint8)  # the enhancing tumour is missed
    save_nifti(tmp_path / "gt" / "c1.nii.gz", ref)
    save_nifti(tmp_path / "pred" / "c1.nii.gz", pred)
    regions = ["--regions", "whole tumor=1,2,4;enhancing tumour=4"]
    base = ["evaluate", str(tmp_path / "pred"), str(tmp_path / "gt"), "--dataset", "brats", *regions]
    assert main([*base, "--out", str(tmp_path / "diag")]) == 0
    assert main([*base, "--out", str(tmp_path / "brats"), "--brats-hd95"]) == 0
    with open(tmp_path / "brats" / "per_case.csv") as handle:
        (row,) = list(csv.DictReader(handle))
    assert float(row["whole_tumor_dice"]) == 1.0
    assert float(row["enhancing_tumour_dice"]) == 0.0
    assert float(row["enhancing_tumour_hd95"]) == 373.13
    with open(tmp_path / "diag" / "per_case.csv") as handle:
        (row,) = list(csv.DictReader(handle))
    assert float(row["enhancing_tumour_hd95"]) == pytest.approx(math.sqrt(11**2 + 9**2 + 7**2))
    summary = json.loads((tmp_path / "brats" / "summary.json").read_text())
    assert "373.13" in summary["empty_policy_text"] and "MONAI" in summary["hd95_definition"]
