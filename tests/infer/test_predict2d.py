import numpy as np
import pytest
import torch
from PIL import Image

from rwkvseg.checkpoint import CheckpointMeta, save_checkpoint
from rwkvseg.infer.outputs2d import overlay
from rwkvseg.infer.postprocess import PostProcess
from rwkvseg.infer.predict2d import default_batch_size, predict_2d
from rwkvseg.models import registry
from rwkvseg.records import Preprocessing2D
from writers import Bright, save_png


@pytest.fixture
def checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "_builders", lambda: {"bright": Bright})

    def make(channels=3, size=(16, 16), resize="resize"):
        pre = Preprocessing2D(channels, size, resize, "dtype")
        meta = CheckpointMeta("bright", channels, 1, preprocessing=pre.to_dict())
        return save_checkpoint(tmp_path / f"ck_{channels}_{resize}", Bright(channels, 1), meta)[0]

    return make


def _square(shape, box, channels=3):
    img = np.zeros((*shape, channels), np.uint8)
    img[box[0] : box[1], box[2] : box[3]] = 255
    return img if channels > 1 else img[..., 0]


@pytest.mark.parametrize("resize", ["resize", "crop"])
def test_masks_at_original_size_with_overlays_and_probabilities(tmp_path, checkpoint, resize):
    ck = checkpoint(resize=resize)
    src = tmp_path / "in"
    save_png(src / "a.png", _square((40, 50), (10, 30, 5, 45)))
    save_png(src / "b.jpg", _square((33, 21), (0, 16, 0, 21), channels=1))  # gray into a 3-channel model
    out = tmp_path / "out"
    written = predict_2d(ck, src, out, overlays=True, save_probabilities=True, batch_size=2)
    assert sorted(p.name for p in written) == ["a.png", "b.png"]
    a = np.asarray(Image.open(out / "a.png"))
    assert a.shape == (40, 50) and set(np.unique(a)) == {0, 255}
    truth = _square((40, 50), (10, 30, 5, 45), channels=1) > 0
    assert ((a > 0) != truth).mean() < 0.05
    b = np.asarray(Image.open(out / "b.png"))
    assert b.shape == (33, 21) and (b[:12] == 255).all() and (b[20:] == 0).all()
    assert np.asarray(Image.open(out / "overlays" / "a.png")).shape == (40, 50, 3)
    prob = np.asarray(Image.open(out / "probabilities" / "a.png"))
    assert prob.dtype == np.uint8 and prob[20, 25] > 250 and prob[2, 2] < 5


def test_never_overwrites_and_bad_inputs(tmp_path, checkpoint):
    ck = checkpoint(channels=1)
    src = tmp_path / "in"
    save_png(src / "a.png", _square((20, 20), (2, 9, 2, 9), channels=1))
    out = tmp_path / "out"
    predict_2d(ck, src, out)
    (out / "a.png").write_bytes(b"user data")
    with pytest.raises(FileExistsError, match=r"a\.png.*--overwrite"):
        predict_2d(ck, src, out)
    assert (out / "a.png").read_bytes() == b"user data"
    colour = np.zeros((20, 20, 3), np.uint8)
    colour[..., 0] = 200
    save_png(src / "c.png", colour)
    with pytest.raises(ValueError, match=r"c\.png has 3 channels, the model expects 1"):
        predict_2d(ck, src, tmp_path / "out2")
    (src / "c.png").unlink()
    (src / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"notes\.txt.*--skip-non-images"):
        predict_2d(ck, src, tmp_path / "out3")
    assert len(predict_2d(ck, src, tmp_path / "out3", skip_non_images=True)) == 1
    broken = src / "z.png"
    broken.write_bytes((src / "a.png").read_bytes()[:50])
    with pytest.raises(ValueError, match=r"cannot read image .*z\.png"):
        predict_2d(ck, src, tmp_path / "out4", skip_non_images=True, batch_size=1)
    assert (tmp_path / "out4" / "a.png").exists()  # what was written before the bad file stays


def test_cpu_predicts_one_image_per_pass_unless_asked(tmp_path, checkpoint, monkeypatch):
    """On the CPU larger batches run slower per image (caches), so the default is one image per forward pass; a
    GPU batches 8; an explicit batch_size wins and the masks do not depend on it."""
    assert default_batch_size("cpu") == 1 and default_batch_size(torch.device("cuda", 1)) == 8
    ck = checkpoint()
    src = tmp_path / "in"
    for i in range(3):
        save_png(src / f"{i}.png", _square((20, 24), (2, 9 + i, 3, 12)))
    batches = []
    forward = Bright.forward
    monkeypatch.setattr(Bright, "forward", lambda self, x: batches.append(x.shape[0]) or forward(self, x))
    predict_2d(ck, src, tmp_path / "one", mirror_axes=())
    assert batches == [1, 1, 1]
    batches.clear()
    predict_2d(ck, src, tmp_path / "three", mirror_axes=(), batch_size=3)
    assert batches == [3]
    for i in range(3):
        one, three = (np.asarray(Image.open(tmp_path / d / f"{i}.png")) for d in ("one", "three"))
        assert np.array_equal(one, three)


def test_overlay_marks_border():
    image = np.zeros((9, 9, 1), np.float32)
    labels = np.zeros((9, 9), np.uint8)
    labels[2:7, 2:7] = 1
    out = overlay(image, labels)
    assert out.shape == (9, 9, 3) and tuple(out[2, 4]) == (255, 64, 64) and out[4, 4, 0] < 255
    assert tuple(out[0, 0]) == (0, 0, 0)


class _Ramp(Bright):
    """Bright plus a logit ramp across the width (+-5 at the edges): not symmetric under a left-right flip."""

    def forward(self, x):
        ramp = torch.linspace(-5.0, 5.0, x.shape[-1], device=x.device)  # [W]
        return super().forward(x) + ramp


def test_mirror_tta_averages_flipped_logits(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "_builders", lambda: {"ramp": _Ramp})
    pre = Preprocessing2D(3, (16, 16), "resize", "dtype")
    ck = save_checkpoint(tmp_path / "ck", _Ramp(3, 1), CheckpointMeta("ramp", 3, 1, preprocessing=pre.to_dict()))[0]
    src = tmp_path / "in"
    save_png(src / "gray.png", np.full((24, 32, 3), 120, np.uint8))  # logit 40 * (120/255 - 0.5) = -1.18 + ramp

    def probs(out, **kw):
        predict_2d(ck, src, tmp_path / out, save_probabilities=True, **kw)
        return np.asarray(Image.open(tmp_path / out / "probabilities" / "gray.png")).astype(int)

    plain = probs("plain")
    assert plain[:, 0].max() < 5 and plain[:, -1].min() > 240  # the ramp decides: right foreground, left not
    assert (probs("height", mirror_axes=(0,)) == plain).all()  # flipping rows leaves a width ramp as it is
    expected = round(255 / (1 + np.exp(40 * (0.5 - 120 / 255))))  # the ramp cancels: sigmoid(-1.18) everywhere
    for axes in [(1,), (0, 1)]:
        tta = probs(f"tta{len(axes)}", mirror_axes=axes)
        assert np.abs(tta - expected).max() <= 1
        assert not np.asarray(Image.open(tmp_path / f"tta{len(axes)}" / "gray.png")).any()  # no foreground left
    with pytest.raises(ValueError, match=r"--mirror-axes \[2\] must name each image axis"):
        predict_2d(ck, src, tmp_path / "bad", mirror_axes=(2,))
    assert not (tmp_path / "bad").exists()


def _recording_checkpoint(tmp_path, inference):
    """A _Ramp checkpoint whose sidecar records inference defaults (as a release chosen on validation does)."""
    pre = Preprocessing2D(3, (16, 16), "resize", "dtype").to_dict() | {"inference": inference}
    return save_checkpoint(tmp_path / "ck", _Ramp(3, 1), CheckpointMeta("ramp", 3, 1, preprocessing=pre))[0]


def test_recorded_flips_apply_by_default_and_an_empty_option_turns_them_off(tmp_path, monkeypatch):
    from rwkvseg.infer.predict import PredictConfig, predict

    monkeypatch.setattr(registry, "_builders", lambda: {"ramp": _Ramp})
    ck = _recording_checkpoint(tmp_path, {"mirror_axes": [0, 1]})
    src = tmp_path / "in"
    save_png(src / "gray.png", np.full((24, 32, 3), 120, np.uint8))

    def probs(out, **kw):
        predict(ck, [src], tmp_path / out, PredictConfig(probabilities=True, **kw))
        return np.asarray(Image.open(tmp_path / out / "probabilities" / "gray.png")).astype(int)

    expected = round(255 / (1 + np.exp(40 * (0.5 - 120 / 255))))  # flips over the width cancel the ramp
    assert np.abs(probs("default") - expected).max() <= 1
    plain = probs("off", mirror_axes=())
    assert plain[:, 0].max() < 5 and plain[:, -1].min() > 240  # '' (no flips): the ramp decides
    assert (probs("height", mirror_axes=(0,)) == plain).all()  # given axes replace the recorded ones


def test_recorded_post_processing_applies_by_default(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "_builders", lambda: {"bright": Bright})
    pre = Preprocessing2D(3, (32, 32), "resize", "dtype").to_dict() | {"inference": {"postprocess": "largest"}}
    ck = save_checkpoint(tmp_path / "ck", Bright(3, 1), CheckpointMeta("bright", 3, 1, preprocessing=pre))[0]
    image = _square((32, 32), (2, 14, 2, 14))  # a 12x12 square and a 4x4 one apart from it
    image[24:28, 24:28] = 255
    save_png(tmp_path / "in" / "two.png", image)
    predict_2d(ck, tmp_path / "in", tmp_path / "default")
    predict_2d(ck, tmp_path / "in", tmp_path / "none", postprocess=PostProcess())
    kept = np.asarray(Image.open(tmp_path / "default" / "two.png")) > 0
    both = np.asarray(Image.open(tmp_path / "none" / "two.png")) > 0
    assert kept[2:14, 2:14].all() and not kept[20:].any()  # the small square dropped
    assert both[25:27, 25:27].all()  # kept without post-processing


@pytest.mark.parametrize(
    ("inference", "match"),
    [
        ({"mirror_axes": [2]}, r"records inference\.mirror_axes \[2\], which is not valid .*--mirror-axes"),
        ({"mirror_axes": "0,1"}, r"records inference\.mirror_axes '0,1'"),
        ({"postprocess": "biggest"}, r"records inference\.postprocess 'biggest'.*--postprocess"),
    ],
)
def test_a_bad_recorded_default_is_one_error_naming_the_sidecar(tmp_path, monkeypatch, inference, match):
    monkeypatch.setattr(registry, "_builders", lambda: {"ramp": _Ramp})
    ck = _recording_checkpoint(tmp_path, inference)
    save_png(tmp_path / "in" / "a.png", np.full((8, 8, 3), 120, np.uint8))
    with pytest.raises(ValueError, match=match) as err:
        predict_2d(ck, tmp_path / "in", tmp_path / "out")
    assert "sidecar of" in str(err.value) and str(ck) in str(err.value)
    assert not (tmp_path / "out").exists()
    given = {"postprocess": PostProcess()} if "postprocess" in inference else {"mirror_axes": ()}
    assert len(predict_2d(ck, tmp_path / "in", tmp_path / "given", **given)) == 1  # the option wins over the record


def test_progress_is_logged_at_the_end_not_per_image(tmp_path, checkpoint, caplog):
    ck = checkpoint()
    src = tmp_path / "in"
    for i in range(5):
        save_png(src / f"{i}.png", _square((12, 12), (2, 6, 2, 6)))
    with caplog.at_level("INFO", logger="rwkvseg.infer.predict2d"):
        predict_2d(ck, src, tmp_path / "out", mirror_axes=())  # one image per pass on the CPU
    assert [r.getMessage() for r in caplog.records if "predicted" in r.getMessage()] == ["predicted 5/5 images"]


@pytest.mark.parametrize(
    ("extra", "names"),
    [
        (["--overlap", "0.25"], "--overlap"),
        (["--sw-batch-size", "4", "--modalities", "a,b,c"], "--sw-batch-size, --modalities"),
        (["--out-format", "dicom-seg"], "--out-format"),
        (["--more-modalities", "x.nii.gz"], "--more-modalities x.nii.gz"),
    ],
)
def test_3d_options_are_refused_for_a_2d_checkpoint_with_one_line_and_nothing_written(
    tmp_path, checkpoint, capsys, extra, names
):
    from rwkvseg.cli import main

    ck = checkpoint()
    save_png(tmp_path / "in" / "a.png", _square((20, 20), (2, 9, 2, 9)))
    assert main(["predict", str(ck), str(tmp_path / "in"), "--out", str(tmp_path / "out"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and names in err and "this one is 2D: drop" in err, err
    assert not (tmp_path / "out").exists()
