"""infer.postprocess: exact behaviour on small generated label maps, and through predict / the command line."""

import math

import numpy as np
import pytest
from PIL import Image

from rwkvseg.checkpoint import CheckpointMeta, save_checkpoint
from rwkvseg.data.specs import dataset_spec
from rwkvseg.infer.postprocess import (
    PostProcess,
    check_postprocess,
    et_min_voxels_at,
    fill_holes,
    keep_largest_foreground,
    largest_component,
    postprocess,
)
from rwkvseg.infer.predict import PredictConfig, predict
from rwkvseg.models import registry
from rwkvseg.records import Preprocessing2D
from writers import Bright, save_png

BRATS = dataset_spec("brats")


def test_parse_spellings_and_bad_values():
    assert PostProcess.parse("none") == PostProcess.parse("") == PostProcess.parse(None) == PostProcess()
    assert PostProcess.parse("largest") == PostProcess(largest=True)
    assert PostProcess.parse(" Largest , fill-holes ") == PostProcess(largest=True, fill_holes=True)
    assert PostProcess.parse("et-min-voxels=100,largest") == PostProcess(largest=True, et_min_voxels=100)
    assert PostProcess(largest=True, fill_holes=True, et_min_voxels=50).spelling() == (
        "largest,fill-holes,et-min-voxels=50"
    )
    assert PostProcess().spelling() == "none" and not PostProcess().active
    assert PostProcess.parse("LARGEST,Et-Min-Voxels=7") == PostProcess(largest=True, et_min_voxels=7)
    for bad in ("biggest", "largest=2", "fill_holes", "None=1"):
        with pytest.raises(ValueError, match=r"--postprocess .* is not an option; give none, largest, fill-holes"):
            PostProcess.parse(bad)
    with pytest.raises(ValueError) as err:
        PostProcess.parse("Largest,Fill_Holes")
    assert str(err.value) == (  # the user's spelling, not a lowercased one
        "--postprocess 'Largest,Fill_Holes': 'Fill_Holes' is not an option; give none, largest, fill-holes, "
        "et-min-voxels=N, et-min-mm3=V, or several joined by commas (largest,fill-holes)"
    )
    for bad in ("Et-Min-Voxels=1.5", "et-min-voxels=abc", "et-min-voxels=-3", "et-min-voxels=", "et-min-voxels"):
        with pytest.raises(ValueError) as err:
            PostProcess.parse(f"largest,{bad}")
        value = bad.partition("=")[2]
        assert str(err.value) == (
            f"--postprocess 'largest,{bad}': et-min-voxels={value} must be a whole number of voxels >= 0, "
            "e.g. et-min-voxels=100 (et-min-mm3=V gives the threshold as a volume)"
        )
    with pytest.raises(ValueError, match=r"et-min-voxels=² must be a whole number"):
        PostProcess.parse("et-min-voxels=²")  # a digit to str.isdigit, not to int()
    for bad in (-1, 1.5, True, "100"):  # built in code: the field's name, the value and a good one
        with pytest.raises(ValueError) as err:
            PostProcess(et_min_voxels=bad)
        assert str(err.value) == (
            f"PostProcess et_min_voxels={bad!r} must be a whole number of voxels >= 0, e.g. et_min_voxels=100 "
            "(et_min_mm3=V gives the threshold as a volume)"
        )


def test_parse_the_volume_spelling_and_its_errors():
    assert PostProcess.parse("largest,et-min-mm3=800") == PostProcess(largest=True, et_min_mm3=800.0)
    assert PostProcess.parse("ET-MIN-MM3=62.5").et_min_mm3 == 62.5 and PostProcess.parse("et-min-mm3=1e3").active
    assert not PostProcess.parse("et-min-mm3=0").active  # 0: off, as et-min-voxels=0
    for config in (
        PostProcess(largest=True, et_min_mm3=800),
        PostProcess(et_min_mm3=62.5),
        PostProcess(et_min_mm3=1e-3),
    ):
        assert PostProcess.parse(config.spelling()) == config  # a release's sidecar records the spelling
    assert PostProcess(et_min_mm3=800).spelling() == "et-min-mm3=800"
    for bad in ("et-min-mm3", "et-min-mm3=", "Et-Min-MM3=Big", "et-min-mm3=-8", "et-min-mm3=nan", "et-min-mm3=inf"):
        with pytest.raises(ValueError) as err:
            PostProcess.parse(f"largest,{bad}")
        message = str(err.value)
        value = bad.partition("=")[2]  # as given: "Big" stays "Big"
        assert message.startswith(f"--postprocess 'largest,{bad}': et-min-mm3={value} is not a volume")
        assert "\n" not in message
        assert "is not a volume; give cubic millimetres >= 0, e.g. et-min-mm3=800" in message
    with pytest.raises(
        ValueError, match=r"et-min-voxels=100 and et-min-mm3=800 set the same threshold twice; give one"
    ):
        PostProcess.parse("et-min-voxels=100,et-min-mm3=800")
    for bad in (-1, True, math.nan, "800"):
        with pytest.raises(ValueError) as err:
            PostProcess(et_min_mm3=bad)
        assert str(err.value) == (
            f"PostProcess et_min_mm3={bad!r} is not a volume; give cubic millimetres >= 0, e.g. et_min_mm3=800 "
            "(100 voxels of 2 mm, 800 of 1 mm)"
        )


def test_a_volume_becomes_8x_the_voxels_at_half_the_spacing():
    config = PostProcess(et_min_mm3=800)
    assert et_min_voxels_at(config, (2.0, 2.0, 2.0)) == 100
    assert et_min_voxels_at(config, (1.0, 1.0, 1.0)) == 800
    assert et_min_voxels_at(config, (2.5, 1.0, 0.5)) == pytest.approx(640)  # anisotropic: the voxel's volume
    assert (
        et_min_voxels_at(PostProcess(et_min_mm3=100), (2.0, 2.0, 2.0)) == 12.5
    )  # no rounding: 12 voxels are < 100 mm3, 13 are not
    voxels = PostProcess(et_min_voxels=100)  # a count stays a count, whatever the spacing: the trap et-min-mm3 avoids
    assert et_min_voxels_at(voxels, (1.0, 1.0, 1.0)) == et_min_voxels_at(voxels, (2.0, 2.0, 2.0)) == 100
    assert et_min_voxels_at(PostProcess(largest=True), None) == 0
    for spacing in (None, (1.0, 1.0), (1.0, 0.0, 1.0), (1.0, float("nan"), 1.0)):
        with pytest.raises(ValueError, match="et-min-mm3 needs the voxel spacing"):
            et_min_voxels_at(config, spacing)


def test_largest_component_keeps_the_biggest_with_full_connectivity():
    mask = np.zeros((7, 9), bool)
    mask[0:2, 0:2] = True  # 4 pixels
    mask[4:7, 4:6] = True  # 6 pixels
    mask[3, 3] = True  # touches the 6 only diagonally: one 8-connected component of 7
    kept = largest_component(mask)
    expected = np.zeros_like(mask)
    expected[4:7, 4:6] = True
    expected[3, 3] = True
    np.testing.assert_array_equal(kept, expected)
    # 3D: 26-connectivity joins voxels that meet only at a corner
    volume = np.zeros((5, 5, 5), bool)
    volume[0, 0, 0] = volume[1, 1, 1] = volume[2, 2, 2] = True
    volume[4, 4, 3:5] = True
    np.testing.assert_array_equal(largest_component(volume), volume & (np.indices(volume.shape).sum(0) <= 6))
    assert largest_component(volume).sum() == 3


def test_largest_component_ties_empty_and_single():
    mask = np.zeros((5, 5), bool)
    mask[0, 3:5] = True  # met first in C order (row 0)
    mask[4, 0:2] = True  # same size
    np.testing.assert_array_equal(largest_component(mask), np.pad(np.ones((1, 2), bool), ((0, 4), (3, 0))))
    empty = np.zeros((4, 6), bool)
    assert not largest_component(empty).any() and largest_component(empty).shape == (4, 6)
    one = np.eye(4, dtype=bool)  # a diagonal: one 8-connected component
    np.testing.assert_array_equal(largest_component(one), one)


def test_fill_holes_fills_enclosed_background_only():
    ring = np.zeros((7, 7), bool)
    ring[1:6, 1:6] = True
    ring[2:5, 2:5] = False  # a 3x3 hole
    cup = np.zeros((7, 7), bool)
    cup[1:6, 1:6] = True
    cup[2:6, 3] = False  # open to the border at the bottom: not a hole
    filled = fill_holes(ring)
    assert filled[1:6, 1:6].all() and filled.sum() == 25
    np.testing.assert_array_equal(fill_holes(cup), cup)
    assert not fill_holes(np.zeros((3, 3), bool)).any()
    # a background pixel touching the outside only diagonally is a hole (foreground 8-connected, background 4)
    diagonal = np.ones((3, 3), bool)
    diagonal[1, 1] = False
    diagonal[0, 0] = False
    assert fill_holes(diagonal)[1, 1] and not fill_holes(diagonal)[0, 0]


def test_postprocess_binary_masks_keeps_dtype_and_values():
    labels = np.zeros((8, 8), np.uint8)
    labels[0, 0] = 1
    labels[2:7, 2:7] = 1
    labels[4, 4] = 0
    out = postprocess(labels, PostProcess(largest=True, fill_holes=True))
    assert out.dtype == np.uint8 and out[0, 0] == 0 and out[2:7, 2:7].all() and out.sum() == 25
    np.testing.assert_array_equal(postprocess(labels, PostProcess()), labels)
    assert not postprocess(np.zeros((4, 4), np.uint8), PostProcess(largest=True, fill_holes=True)).any()
    with pytest.raises(ValueError, match=r"fill-holes fills binary masks; this one holds labels \[1, 2\]"):
        postprocess(np.array([[1, 2]], np.uint8), PostProcess(fill_holes=True))


def test_keep_largest_foreground_keeps_each_label_inside_the_whole_tumour():
    values = np.zeros((6, 6, 6), np.uint8)
    values[1:4, 1:4, 1:4] = 2
    values[2, 2, 2] = 4
    values[2, 2, 3] = 1
    values[5, 5, 5] = 4  # a stray ET voxel away from the tumour
    kept = keep_largest_foreground(values)
    expected = values.copy()
    expected[5, 5, 5] = 0
    np.testing.assert_array_equal(kept, expected)


@pytest.mark.parametrize(
    ("spacing", "et_voxels", "relabelled"), [(2.0, 99, True), (2.0, 100, False), (1.0, 100, True), (1.0, 800, False)]
)
def test_a_small_volume_of_enhancing_tumour_becomes_necrosis_at_each_spacing(spacing, et_voxels, relabelled):
    values = np.full((10, 10, 10), 2, np.uint8)
    values.reshape(-1)[:et_voxels] = 4
    out = postprocess(values, PostProcess(et_min_mm3=800), BRATS, (spacing,) * 3)  # 100 voxels of 2 mm, 800 of 1 mm
    assert (out == 4).sum() == (0 if relabelled else et_voxels)
    assert (out == 1).sum() == (et_voxels if relabelled else 0)
    with pytest.raises(ValueError, match="et-min-mm3 needs the voxel spacing"):
        postprocess(values, PostProcess(et_min_mm3=800), BRATS)


@pytest.mark.parametrize(("et_voxels", "relabelled"), [(99, True), (100, False), (101, False)])
def test_small_enhancing_tumour_becomes_necrosis_below_the_threshold(et_voxels, relabelled):
    values = np.full((10, 10, 10), 2, np.uint8)
    values.reshape(-1)[:et_voxels] = 4
    values[9, 9, 9] = 0
    out = postprocess(values, PostProcess(et_min_voxels=100), BRATS)
    assert (out == 4).sum() == (0 if relabelled else et_voxels)
    assert (out == 1).sum() == (et_voxels if relabelled else 0)
    assert (out == 2).sum() == (values == 2).sum() and out[9, 9, 9] == 0
    no_et = np.where(values == 4, 2, values).astype(np.uint8)
    np.testing.assert_array_equal(postprocess(no_et, PostProcess(et_min_voxels=100), BRATS), no_et)


def test_enhancing_labels_follow_the_spec():
    msd = dataset_spec("msd_task01")  # ET 3, TC (2, 3): small ET becomes 2 (non-enhancing)
    values = np.array([[[0, 1, 3]]], np.uint8)
    np.testing.assert_array_equal(postprocess(values, PostProcess(et_min_voxels=2), msd), [[[0, 1, 2]]])
    brats2023 = dataset_spec("brats2023")  # ET 3, TC (1, 3)
    np.testing.assert_array_equal(postprocess(values, PostProcess(et_min_voxels=2), brats2023), [[[0, 1, 1]]])


def test_check_refuses_options_that_do_not_fit_the_model():
    check_postprocess(PostProcess(largest=True, fill_holes=True), 1)
    check_postprocess(PostProcess(largest=True, et_min_voxels=10), 3, BRATS)
    with pytest.raises(ValueError, match="fill-holes fills binary masks, and this model predicts 3 foreground"):
        check_postprocess(PostProcess(fill_holes=True), 3, BRATS)
    with pytest.raises(ValueError, match="et-min-voxels applies to 3D BraTS-style models"):
        check_postprocess(PostProcess(et_min_voxels=10), 1)
    spleen = dataset_spec("brats", regions=(), label_values=(0, 1))
    with pytest.raises(ValueError, match=r"needs a model whose dataset has TC and ET regions.*drop et-min-voxels"):
        check_postprocess(PostProcess(et_min_voxels=10), 1, spleen)
    check_postprocess(PostProcess(largest=True, et_min_mm3=800), 3, BRATS)
    with pytest.raises(ValueError, match="--postprocess et-min-mm3 applies to 3D BraTS-style models"):
        check_postprocess(PostProcess(et_min_mm3=800), 1)
    with pytest.raises(
        ValueError, match=r"et-min-mm3 needs a model whose dataset has TC and ET regions.*drop et-min-mm3"
    ):
        check_postprocess(PostProcess(et_min_mm3=800), 1, spleen)


@pytest.fixture
def bright_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "_builders", lambda: {"bright": Bright})
    pre = Preprocessing2D(1, (16, 16), "crop", "dtype")  # crop: whole images, no resizing, masks exact
    meta = CheckpointMeta("bright", 1, 1, preprocessing=pre.to_dict())
    return save_checkpoint(tmp_path / "ck", Bright(1, 1), meta)[0]


def _blobs_with_a_hole() -> np.ndarray:
    image = np.zeros((24, 24), np.uint8)
    image[2:14, 2:14] = 255  # the big blob, with a 2x2 hole
    image[6:8, 6:8] = 0
    image[18:21, 18:21] = 255  # a small blob
    return image


def test_predict_writes_post_processed_masks_and_raw_probabilities(tmp_path, bright_checkpoint):
    save_png(tmp_path / "in" / "a.png", _blobs_with_a_hole())
    config = PredictConfig(probabilities=True, postprocess=PostProcess.parse("largest,fill-holes"))
    predict(bright_checkpoint, [tmp_path / "in"], tmp_path / "pp", config)
    predict(bright_checkpoint, [tmp_path / "in"], tmp_path / "raw", PredictConfig(probabilities=True))
    raw = np.asarray(Image.open(tmp_path / "raw" / "a.png"))
    np.testing.assert_array_equal(raw, _blobs_with_a_hole())  # the model sees exactly the bright pixels
    expected = np.zeros((24, 24), np.uint8)
    expected[2:14, 2:14] = 255
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "pp" / "a.png")), expected)
    for folder in ("pp", "raw"):  # probabilities: the model's, with the hole and the small blob
        prob = np.asarray(Image.open(tmp_path / folder / "probabilities" / "a.png"))
        assert prob[19, 19] > 250 and prob[6, 6] < 5


def test_command_line_postprocess_and_its_errors(tmp_path, bright_checkpoint, capsys):
    from rwkvseg.cli import main

    save_png(tmp_path / "in" / "a.png", _blobs_with_a_hole())
    args = ["predict", str(bright_checkpoint), str(tmp_path / "in"), "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "out"), "--postprocess", "largest"]) == 0
    mask = np.asarray(Image.open(tmp_path / "out" / "a.png"))
    assert mask[19, 19] == 0 and mask[6, 6] == 0 and mask[3, 3] == 255
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "bad"), "--postprocess", "largest,holes"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rwkvseg: error: --postprocess 'largest,holes': 'holes' is not an option; give none,")
    assert len(err.splitlines()) == 1
    assert main([*args, "--out", str(tmp_path / "bad"), "--postprocess", "et-min-voxels=50"]) == 2
    assert "et-min-voxels applies to 3D BraTS-style models" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "bad"), "--postprocess", "et-min-mm3=400"]) == 2
    assert "et-min-mm3 applies to 3D BraTS-style models" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "bad"), "--postprocess", "et-min-mm3=4OO"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rwkvseg: error: --postprocess 'et-min-mm3=4OO': et-min-mm3=4OO is not a volume")
    assert len(err.splitlines()) == 1
    assert main([*args, "--out", str(tmp_path / "bad"), "--postprocess", "et-min-voxels=1.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rwkvseg: error: --postprocess 'et-min-voxels=1.5': et-min-voxels=1.5 must be a whole number")
    assert len(err.splitlines()) == 1
    assert main([*args, "--out", str(tmp_path / "bad"), "--postprocess", "et-min-voxels=5,et-min-mm3=40"]) == 2
    err = capsys.readouterr().err.strip()
    assert "set the same threshold twice" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "bad").exists()
