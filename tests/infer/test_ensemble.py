"""Several checkpoints predicting as one ensemble (`rwkvseg predict A B ... INPUT`): the mean of the members'
probabilities, checked against the plain mean, and the members' agreement."""

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from rwkvseg.checkpoint import CheckpointMeta, save_checkpoint
from rwkvseg.cli import main
from rwkvseg.infer.ensemble import ProbabilityMean, load_checkpoints
from rwkvseg.infer.postprocess import PostProcess
from rwkvseg.infer.predict import PredictConfig, predict
from rwkvseg.models import registry
from rwkvseg.records import Preprocessing2D, inference_metadata
from writers import Bright, save_png


class Scaled(nn.Module):
    def __init__(self, scale: float, shift: float = 0.0):
        super().__init__()
        self.scale, self.shift = scale, shift

    def forward(self, x):
        return self.scale * x + self.shift


@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
def test_the_ensemble_outputs_logits_of_the_mean_probability(activation):
    torch.manual_seed(0)
    members = [Scaled(1.0), Scaled(3.0, 1.0), Scaled(-2.0)]
    x = torch.randn(2, 3, 5, 4) * 20  # logits up to about +-200: saturated members
    x[0, 0, 0, 0] = 500.0
    out = ProbabilityMean(members, activation)(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    if activation == "softmax":
        expected = torch.stack([torch.softmax(m(x), dim=1) for m in members]).mean(0)
        torch.testing.assert_close(torch.softmax(out, dim=1), expected, atol=1e-6, rtol=0)
    else:
        expected = torch.stack([torch.sigmoid(m(x)) for m in members]).mean(0)
        torch.testing.assert_close(torch.sigmoid(out), expected, atol=1e-6, rtol=0)


def test_an_ensemble_needs_two_members_and_a_known_activation():
    with pytest.raises(ValueError, match="at least 2 members"):
        ProbabilityMean([Scaled(1.0)], "sigmoid")
    with pytest.raises(ValueError, match="activation 'relu' unknown"):
        ProbabilityMean([Scaled(1.0), Scaled(2.0)], "relu")


class ShiftedBright(Bright):
    """Bright with its decision point moved: logit = 40 * (mean channel - 0.5) + shift."""

    def __init__(self, in_channels, num_classes, shift=0.0):
        super().__init__(in_channels, num_classes)
        with torch.no_grad():
            self.mix.bias.add_(shift)


@pytest.fixture
def checkpoints(tmp_path, monkeypatch):
    """Bright checkpoints of one task; shift moves the decision point, size and channels change the task."""
    monkeypatch.setattr(registry, "_builders", lambda: {"bright": Bright})

    def make(name, shift=0.0, size=(16, 16), channels=1, inference=None, threshold=None):
        preprocessing = Preprocessing2D(channels, size, "resize", "dtype").to_dict()
        if inference is not None:
            preprocessing["inference"] = inference
        training = {} if threshold is None else {"threshold": threshold}
        meta = CheckpointMeta("bright", channels, 1, preprocessing=preprocessing, training=training)
        return save_checkpoint(tmp_path / name, ShiftedBright(channels, 1, shift), meta)[0]

    return make


def gradient_image(path):
    """16 x 16, gray levels rising along the width from 0 to 255."""
    return save_png(path, np.tile(np.linspace(0, 255, 16).round().astype(np.uint8), (16, 1)))


def test_a_2d_ensemble_thresholds_the_mean_probability(tmp_path, checkpoints):
    a, b = checkpoints("a"), checkpoints("b", shift=-7.0)  # bright above 0.5 (a), above 0.675 (b)
    gradient_image(tmp_path / "in" / "g.png")
    predict([a, b], [tmp_path / "in"], tmp_path / "ab", PredictConfig(threshold=0.5))
    mask = np.asarray(Image.open(tmp_path / "ab" / "g.png")) > 0
    v = torch.from_numpy(np.linspace(0, 255, 16).round() / 255)
    mean = (torch.sigmoid(40 * (v - 0.5)) + torch.sigmoid(40 * (v - 0.5) - 7)) / 2  # no level within 0.01 of 0.5
    assert (mask == (mean > 0.5).numpy()[None, :]).all()
    alone = [
        np.asarray(Image.open(predict([c], [tmp_path / "in"], tmp_path / n)[0])) > 0 for c, n in ((a, "a"), (b, "b"))
    ]
    assert (alone[0] | mask).sum() == alone[0].sum() and mask.sum() > alone[1].sum()  # between the members
    # the same checkpoint twice predicts as itself
    predict([a, a], [tmp_path / "in"], tmp_path / "aa")
    assert (np.asarray(Image.open(tmp_path / "aa" / "g.png")) > 0).tolist() == alone[0].tolist()


def test_the_members_must_share_the_task_and_each_must_be_a_checkpoint(tmp_path, checkpoints):
    a = checkpoints("a")
    for other, key in [
        (checkpoints("c", channels=3), "in_channels"),
        (checkpoints("s", size=(8, 8)), "preprocessing.size"),
    ]:
        with pytest.raises(ValueError, match=rf"^{other}: its {key} \(.*\) differs from {a}'s .*must predict the same"):
            load_checkpoints([a, other])
    image = gradient_image(tmp_path / "in" / "g.png")
    with pytest.raises(ValueError, match=r"g\.png is not a checkpoint \(no sidecar .*g\.json\): an ensemble is"):
        load_checkpoints([a, image])


def test_recorded_inference_defaults_must_agree_unless_the_command_line_sets_them(tmp_path, checkpoints):
    a = checkpoints("a", inference={"postprocess": "largest"})
    b = checkpoints("b", inference={"postprocess": "none"}, shift=-7.0)
    c = checkpoints("c", inference={"postprocess": "largest"}, threshold=0.3)
    gradient_image(tmp_path / "in" / "g.png")
    for other, setting, flag, values in [
        (b, "preprocessing.inference.postprocess", "--postprocess", r"'none'\) differs from .*'s \('largest'"),
        (c, "training.threshold", "--threshold", r"0\.3\) differs from .*'s \(None"),
    ]:
        with pytest.raises(ValueError, match=rf"its {setting} \({values}\).*defaults, or give {flag} for all of them$"):
            predict([a, other], [tmp_path / "in"], tmp_path / "refused")
        assert not (tmp_path / "refused").exists()
    # given for every member, the records may differ: the options apply to the whole ensemble
    config = PredictConfig(postprocess=PostProcess.parse("none"), threshold=0.5)
    (mask,) = predict([a, b, c], [tmp_path / "in"], tmp_path / "abc", config)
    assert (np.asarray(Image.open(mask)) > 0).any()


def test_the_command_line_takes_several_checkpoints_before_the_input(tmp_path, checkpoints, capsys):
    a, b = checkpoints("a"), checkpoints("b", shift=-7.0)
    gradient_image(tmp_path / "in" / "g.png")
    assert main(["predict", str(a), str(b), str(tmp_path / "in"), "--out", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.endswith(f"wrote 1 masks to {tmp_path / 'out'} (an ensemble of 2 checkpoints)\n")
    # one input after the checkpoints: a second input reads as a member and is named
    argv = ["predict", str(a), str(tmp_path / "in" / "g.png"), str(tmp_path / "in"), "--out", str(tmp_path / "o2")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "g.png is not a checkpoint" in err and not (tmp_path / "o2").exists()
    argv = ["predict", str(a), str(b), str(tmp_path / "in"), "--out", str(tmp_path / "o3"), "--runtime", "onnx"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--runtime onnx runs one exported file, got 2" in err


@pytest.mark.parametrize("target, activation", [("regions", "sigmoid"), ("labels", "softmax")])
def test_a_3d_ensemble_averages_in_its_target_s_activation(tmp_path, monkeypatch, target, activation):
    from test_predict3d import BRATS, Threshold, write_1mm_case

    from rwkvseg.data.preprocess3d import PreprocessConfig, preprocess_dataset

    write_1mm_case(tmp_path / "raw", "t1")
    plans = preprocess_dataset(tmp_path / "raw", BRATS, tmp_path / "cache", PreprocessConfig(target_spacing=(2.0,) * 3))
    folder, _ = write_1mm_case(tmp_path / "in")
    monkeypatch.setattr("rwkvseg.checkpoint.build_model", lambda meta: Threshold(target))
    meta = CheckpointMeta(
        model="threshold",
        in_channels=4,
        num_classes=3 if target == "regions" else 4,
        preprocessing=inference_metadata(plans, patch_size=(16, 16, 16), target=target),
        spacing=(2.0, 2.0, 2.0),
    )
    path = save_checkpoint(tmp_path / "ck", Threshold(target), meta)[0]
    ensemble, _ = load_checkpoints([path, path])
    assert isinstance(ensemble, ProbabilityMean) and ensemble.activation == activation and not ensemble.training
    config = PredictConfig(mirror_axes=())
    (single,) = predict([path], [folder], tmp_path / "one", config)
    (twice,) = predict([path, path], [folder], tmp_path / "twice", config)
    labels = np.asarray(nib.load(twice).dataobj)
    assert np.array_equal(labels, np.asarray(nib.load(single).dataobj)) and (labels > 0).sum() > 0
