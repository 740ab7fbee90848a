import math

import numpy as np
import pytest
import torch

from rwkvseg.eval.metrics import (
    EmptyPolicy,
    MetricAccumulator,
    case_scores,
    confusion_counts,
    hd95,
    image_diagonal,
    overlap_scores,
)


def test_counts_and_scores_by_hand():
    pred = np.zeros((5, 7), bool)
    target = np.zeros((5, 7), bool)
    pred[1:3, 1:4] = True  # 6 pixels
    target[1:4, 2:4] = True  # 6 pixels, overlap 4
    c = confusion_counts(pred, target)
    assert (c.tp, c.fp, c.fn, c.tn) == (4, 2, 2, 27)
    s = overlap_scores(c)
    assert s["dice"] == pytest.approx(8 / 12)
    assert s["iou"] == pytest.approx(4 / 8)
    assert s["precision"] == pytest.approx(4 / 6)
    assert s["recall"] == pytest.approx(4 / 6)
    assert s["specificity"] == pytest.approx(27 / 29)
    assert s["dice"] == pytest.approx(2 * s["iou"] / (1 + s["iou"]))


def test_torch_batched_counts_match_numpy_per_case():
    g = torch.Generator().manual_seed(0)
    pred = torch.rand(3, 9, 11, 5, generator=g) > 0.5
    target = torch.rand(3, 9, 11, 5, generator=g) > 0.6
    batched = confusion_counts(pred, target, batch_dims=1)
    for i in range(3):
        one = confusion_counts(pred[i].numpy(), target[i].numpy())
        assert (batched.tp[i], batched.fp[i], batched.fn[i], batched.tn[i]) == (
            one.tp,
            one.fp,
            one.fn,
            one.tn,
        )


def test_hd95_in_pixels_and_spacing():
    a = np.zeros((33, 35), bool)
    b = np.zeros((33, 35), bool)
    a[5:20, 5:20] = True
    b[7:22, 5:20] = True  # shifted 2 rows
    assert hd95(a, b) == pytest.approx(2.0)
    assert hd95(a, b, spacing=(2.0, 1.0)) == pytest.approx(4.0)
    assert hd95(a, a) == 0.0
    vol = np.zeros((9, 10, 11), bool)
    vol[2:5, 2:5, 2:5] = True
    shifted = np.roll(vol, 3, axis=2)
    assert hd95(vol, shifted, spacing=(1.0, 1.0, 0.5)) == pytest.approx(1.5)


def test_empty_policy_is_explicit():
    empty = np.zeros((6, 8), bool)
    full = np.zeros((6, 8), bool)
    full[2:4, 2:4] = True
    both = case_scores(empty, empty)
    assert both["dice"] == both["iou"] == both["precision"] == both["recall"] == 1.0 and both["hd95"] == 0.0
    und = case_scores(empty, empty, policy=EmptyPolicy.UNDEFINED)
    assert math.isnan(und["dice"]) and math.isnan(und["hd95"]) and und["specificity"] == 1.0
    missed = case_scores(empty, full)
    assert missed["dice"] == 0 and missed["precision"] == 0 and missed["recall"] == 0
    assert missed["hd95"] == pytest.approx(image_diagonal((6, 8))) == pytest.approx(math.hypot(5, 7))
    false_alarm = case_scores(full, empty, spacing=(2.0, 1.0))
    assert false_alarm["dice"] == 0 and false_alarm["recall"] == 0 and false_alarm["precision"] == 0
    assert false_alarm["hd95"] == pytest.approx(math.hypot(10, 7))
    assert false_alarm["empty_ground_truth"] and not false_alarm["empty_prediction"]


def test_accumulator_counts_undefined_instead_of_dropping():
    acc = MetricAccumulator(policy=EmptyPolicy.UNDEFINED)
    empty = np.zeros((6, 8), bool)
    full = np.zeros((6, 8), bool)
    full[1:5, 1:5] = True
    acc.update(full, full, case="good")
    acc.update(empty, empty, case="nothing")
    acc.update(empty, full, case="missed")
    s = acc.summary()
    assert s["cases"] == 3 and s["both_empty"] == 1 and s["empty_prediction"] == 2
    assert s["dice"]["undefined"] == 1 and s["dice"]["mean"] == pytest.approx(0.5)
    assert acc.mean("dice") == pytest.approx(0.5)
    assert s["empty_policy"] == "undefined"
    perfect = MetricAccumulator(with_hd95=False)
    perfect.update_batch(
        torch.stack([torch.from_numpy(full), torch.from_numpy(empty)]),
        torch.stack([torch.from_numpy(full), torch.from_numpy(empty)]),
        cases=["a", "b"],
    )
    assert perfect.summary()["dice"]["mean"] == 1.0 and "hd95" not in perfect.summary()


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differs"):
        confusion_counts(np.zeros((3, 4)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="spacing"):
        hd95(np.ones((3, 4)), np.ones((3, 4)), spacing=(1.0,))


def test_hd95_is_monais_larger_directed_percentile_not_the_pooled_one():
    """Prediction {0}, reference {0, 10} on a line: directed 95th percentiles 0 and 9.5, MONAI takes the larger
    (9.5); medpy pools the three distances [0, 0, 10] into one 95th percentile (9.0)."""
    pred, ref = np.zeros((3, 20), bool), np.zeros((3, 20), bool)
    pred[1, 0] = True
    ref[1, [0, 10]] = True
    assert hd95(pred, ref) == pytest.approx(9.5)
    assert hd95(ref, pred) == pytest.approx(9.5)
    assert np.percentile([0.0, 0.0, 10.0], 95) == pytest.approx(9.0)  # the pooled convention, for contrast


def test_hd95_of_one_empty_mask_is_the_grid_diagonal_or_the_value_given():
    from rwkvseg.eval.metrics import BRATS_EMPTY_HD95

    empty, lesion = np.zeros((4, 5, 6), bool), np.zeros((4, 5, 6), bool)
    lesion[1:3, 2, 2] = True
    assert hd95(empty, lesion, spacing=(2.0, 1.0, 1.0)) == pytest.approx(math.sqrt(6**2 + 4**2 + 5**2))
    assert hd95(lesion, empty, empty_hd95=BRATS_EMPTY_HD95) == BRATS_EMPTY_HD95 == 373.13
    assert case_scores(empty, lesion, empty_hd95=373.13)["hd95"] == 373.13
    assert hd95(lesion, lesion, empty_hd95=373.13) == 0.0  # only a one-sided empty case takes the fixed value
