import csv
import json
from functools import partial

import numpy as np
import pytest
import torch

from rwkvseg.data.preprocess3d import preprocess_dataset
from rwkvseg.data.regions import (
    classes_to_regions,
    classes_to_values,
    region_class_table,
    regions_to_values,
    values_to_regions,
)
from rwkvseg.data.specs import dataset_spec
from rwkvseg.eval.evaluate import evaluate_folders
from rwkvseg.eval.metrics import EmptyPolicy
from rwkvseg.eval.volumes import label_files, region_scores
from rwkvseg.train.validate import SlidingWindowValidator
from writers import save_nifti

BRATS = dataset_spec("brats")
SHAPE = (13, 11, 9)  # (i, j, k)
AFFINE = np.diag([1.0, 1.2, 2.5, 1.0])
save = partial(save_nifti, affine=AFFINE)


def seg(et: bool = True) -> np.ndarray:
    out = np.zeros(SHAPE, np.uint8)
    out[2:10, 2:9, 2:7] = 2
    out[4:8, 4:7, 3:6] = 1
    if et:
        out[5:7, 5:6, 4:5] = 4
    return out


def test_region_table_and_round_trips():
    np.testing.assert_array_equal(
        region_class_table(BRATS), [[False, True, True, True], [False, True, False, True], [False, False, False, True]]
    )
    values = seg()
    masks = values_to_regions(values, BRATS)
    assert [int(m.sum()) for m in masks.values()] == [280, 36, 2]
    stacked = np.stack(list(masks.values()))
    np.testing.assert_array_equal(regions_to_values(stacked, BRATS), values)
    classes = np.array([0, 1, 2, 0, 3])[values]
    np.testing.assert_array_equal(classes_to_values(classes, BRATS), values)
    np.testing.assert_array_equal(classes_to_regions(classes, BRATS), stacked)
    torch_regions = classes_to_regions(torch.from_numpy(classes), BRATS)
    assert torch_regions.dtype == torch.bool and torch.equal(torch_regions, torch.from_numpy(stacked))
    msd = dataset_spec("msd_task01")
    np.testing.assert_array_equal(
        regions_to_values(np.stack(list(values_to_regions(values // 2, msd).values())), msd), values // 2
    )


def test_region_scores_known_values():
    ref = seg()
    pred = ref.copy()
    pred[pred == 4] = 1  # ET missed, WT and TC unchanged
    scores = region_scores(pred, ref, BRATS, spacing=(1.0, 1.2, 2.5))  # seg() is in (i, j, k) order
    assert scores["WT"]["dice"] == 1.0 and scores["TC"]["dice"] == 1.0
    assert scores["ET"]["dice"] == 0.0 and scores["ET"]["empty_prediction"]
    assert scores["ET"]["hd95"] == pytest.approx(np.sqrt((12 * 1.0) ** 2 + (10 * 1.2) ** 2 + (8 * 2.5) ** 2))


def test_evaluate_folders_writes_csv_and_summary_at_true_spacing(tmp_path):
    refs, preds = tmp_path / "refs", tmp_path / "preds"
    save(refs / "a_seg.nii.gz", seg())
    save(preds / "a.nii.gz", seg())
    save(refs / "b_seg.nii.gz", seg())
    save(preds / "b.nii.gz", np.roll(seg(), 1, axis=2))  # one voxel along k, 2.5 mm
    save(refs / "c_seg.nii.gz", seg(et=False))
    save(preds / "c.nii.gz", seg(et=False))
    save(preds / "z.nii.gz", seg())  # a prediction without reference is ignored
    assert sorted(label_files(refs, BRATS)) == ["a", "b", "c"]
    summary = evaluate_folders(preds, refs, tmp_path / "out", spec=BRATS)
    assert summary["cases"] == 3 and summary["empty_policy"] == "perfect"
    with open(tmp_path / "out" / "per_case.csv") as handle:
        rows = {r["case"]: r for r in csv.DictReader(handle)}
    assert float(rows["a"]["WT_dice"]) == 1.0 and float(rows["a"]["WT_hd95"]) == 0.0
    assert float(rows["b"]["WT_hd95"]) == pytest.approx(2.5)
    assert float(rows["b"]["WT_dice"]) == pytest.approx(2 * 8 * 7 * 4 / (2 * 280))
    assert rows["c"]["ET_empty_reference"] == "True" and float(rows["c"]["ET_dice"]) == 1.0
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved["regions"]["ET"]["both_empty"] == 1
    assert saved["regions"]["WT"]["hd95"]["max"] == pytest.approx(2.5)
    undefined = evaluate_folders(preds, refs, tmp_path / "out2", spec=BRATS, policy=EmptyPolicy.UNDEFINED)
    assert undefined["regions"]["ET"]["dice"]["undefined"] == 1


def test_the_summary_and_the_cli_say_which_label_each_reference_label_came_out_as(tmp_path, capsys):
    from rwkvseg.cli import main

    refs, preds = tmp_path / "refs", tmp_path / "preds"
    ref = seg()
    n = {v: int((ref == v).sum()) for v in (0, 1, 2, 4)}
    assert n[1] == 34 and n[4] == 2  # the core seg() draws: 34 voxels of label 1 around 2 of ET
    called_edema = ref.copy()
    called_edema[ref == 1] = 2  # the whole non-enhancing core predicted as edema: WT still perfect
    save(refs / "a_seg.nii.gz", ref)
    save(preds / "a.nii.gz", called_edema)
    save(refs / "b_seg.nii.gz", ref)
    save(preds / "b.nii.gz", ref)
    summary = evaluate_folders(preds, refs, tmp_path / "out", spec=BRATS)
    assert summary["regions"]["WT"]["dice"]["mean"] == 1.0 and summary["regions"]["TC"]["dice"]["mean"] < 1.0
    confusion = summary["label_confusion"]
    assert confusion["labels"] == [0, 1, 2, 4]
    assert confusion["voxels"] == [  # rows: reference label; columns: predicted label; both cases summed
        [2 * n[0], 0, 0, 0],
        [0, n[1], n[1], 0],
        [0, 0, 2 * n[2], 0],
        [0, 0, 0, 2 * n[4]],
    ]
    assert confusion["share_of_reference"][1] == [0.0, 0.5, 0.5, 0.0]
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["label_confusion"] == confusion
    # a label that no reference holds has no share to give
    save(refs / "a_seg.nii.gz", seg(et=False))
    save(refs / "b_seg.nii.gz", seg(et=False))
    save(preds / "b.nii.gz", seg(et=False))
    save(preds / "a.nii.gz", ref)  # ET predicted where the references have none
    capsys.readouterr()
    assert main(["evaluate", str(preds), str(refs), "--out", str(tmp_path / "out2")]) == 0
    shares = json.loads((tmp_path / "out2" / "summary.json").read_text())["label_confusion"]["share_of_reference"]
    assert shares[3] is None and shares[1][3] == pytest.approx(2 / (2 * (n[1] + n[4])))
    printed = capsys.readouterr().out
    assert "reference label: share of its voxels predicted as 0 / 1 / 2 / 4" in printed
    assert f"  1: 0.000 / {1 - shares[1][3]:.3f} / 0.000 / {shares[1][3]:.3f}" in printed
    assert "  4:" not in printed


def test_evaluation_of_bad_inputs_names_the_files(tmp_path):
    refs, preds = tmp_path / "refs", tmp_path / "preds"
    save(refs / "a_seg.nii.gz", seg())
    save(refs / "b_seg.nii.gz", seg())
    save(preds / "a.nii.gz", seg())
    with pytest.raises(ValueError, match=r"1 reference case\(s\) have no prediction in .*: b"):
        evaluate_folders(preds, refs, tmp_path / "out", spec=BRATS)
    save_nifti(preds / "b.nii.gz", seg(), AFFINE @ np.diag([1, 1, 2, 1]))
    with pytest.raises(ValueError, match=r"prediction .*b.nii.gz .* is not on the grid of reference"):
        evaluate_folders(preds, refs, tmp_path / "out", spec=BRATS)
    save(preds / "b.nii.gz", seg() * 2)
    with pytest.raises(ValueError, match=r"b.nii.gz holds label values \[8\]"):
        evaluate_folders(preds, refs, tmp_path / "out", spec=BRATS)
    assert not (tmp_path / "out" / "summary.json").exists()


class OneHotReader(torch.nn.Module):
    """Logits = the z-scored input, channels reordered: input channel c is high exactly where class c is."""

    def __init__(self, order=(0, 1, 2, 3)):
        super().__init__()
        self.order = list(order)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.order]


def test_sliding_window_validator_scores_whole_cached_volumes(tmp_path):
    classes = np.array([0, 1, 2, 0, 3])[seg()]
    folder = tmp_path / "raw" / "v1"
    for channel, modality in enumerate(BRATS.modalities):
        save(folder / f"v1_{modality}.nii.gz", (10 + 100 * (classes == channel)).astype(np.int16))
    save(folder / "v1_seg.nii.gz", seg())
    preprocess_dataset(tmp_path / "raw", BRATS, tmp_path / "cache")
    validator = SlidingWindowValidator.from_cache(tmp_path / "cache", ["v1"], patch_size=(4, 6, 5))
    model = OneHotReader().train()
    scores = validator(model)
    assert scores == {"dice_WT": 1.0, "dice_TC": 1.0, "dice_ET": 1.0, "dice": 1.0}
    assert model.training
    flipped = validator(OneHotReader((0, 3, 2, 1)))  # necrosis and enhancing swapped
    assert flipped["dice_WT"] == 1.0 and flipped["dice_TC"] == 1.0 and flipped["dice_ET"] == 0.0
    assert validator.per_case(OneHotReader((0, 3, 2, 1))) == {"v1": {"dice_WT": 1.0, "dice_TC": 1.0, "dice_ET": 0.0}}
