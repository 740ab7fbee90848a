"""Issue 18, wrong results with exit 0: each case is now refused (exit 2, the file or setting named) or warned."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from hardening.helpers import Bright, bright_checkpoint, cli, square
from rwkvseg.data.images2d import read_image, read_mask
from rwkvseg.data.preprocess3d import prepare_for_model, subtract_background
from rwkvseg.data.specs import dataset_spec
from rwkvseg.data.splits import read_split
from rwkvseg.data.volumes import brats_case, load_case, read_volume
from rwkvseg.models import registry
from rwkvseg.train.state import Progress, load_state, save_state
from writers import save_nifti, save_png, write_brats_case


@pytest.fixture
def bright(monkeypatch):
    monkeypatch.setattr(registry, "_builders", lambda: {"bright": Bright})


def test_nan_pixel_refused_naming_the_file(tmp_path, capsys, bright):
    ck = bright_checkpoint(tmp_path)
    image = np.full((20, 20), 0.2, np.float32)
    image[3, 4] = np.nan
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(image, mode="F").save(src / "scan.tif")
    code, err = cli(capsys, "predict", ck, src, "--out", tmp_path / "out")
    assert code == 2 and "scan.tif" in err and "NaN" in err
    assert not list((tmp_path / "out").glob("*.png"))
    image[3, 4] = np.inf
    Image.fromarray(image, mode="F").save(src / "scan.tif")
    with pytest.raises(ValueError, match=r"scan\.tif holds 1 NaN / infinite"):
        read_image(src / "scan.tif")


def test_nan_voxels_refused_naming_the_file(tmp_path):
    vol = np.ones((6, 6, 6), np.float32)
    vol[1, 2, 3] = np.inf
    path = save_nifti(tmp_path / "t1.nii.gz", vol)
    with pytest.raises(ValueError, match=r"t1\.nii\.gz holds 1 NaN/Inf voxels"):
        read_volume(path)


def _brats(root, images, seg=None):
    seg = np.zeros((8, 8, 8), np.uint8) if seg is None else seg
    return write_brats_case(root, "c1", images, seg)


def test_all_zero_scan_refused_by_preprocess(tmp_path, capsys):
    zeros = np.zeros((8, 8, 8), np.float32)
    _brats(tmp_path / "raw", [zeros] * 4)
    code, err = cli(capsys, "preprocess", tmp_path / "raw", "--out", tmp_path / "cache")
    assert code == 2 and "every image is all zero" in err and "c1_t1.nii.gz" in err
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").glob("*.npz"))


def test_constant_modality_warned(tmp_path, caplog):
    from rwkvseg.data.volumes import load_case

    rng = np.random.default_rng(0)
    images = [rng.random((8, 8, 8)).astype(np.float32) for _ in range(3)] + [np.full((8, 8, 8), 5, np.float32)]
    folder = _brats(tmp_path, images)
    spec = dataset_spec("brats")
    with caplog.at_level(logging.WARNING):
        load_case(brats_case(folder, spec), spec)
    assert "c1_flair.nii.gz is constant" in caplog.text


def test_background_offset_is_preprocessed_as_a_zero_background(tmp_path, caplog):
    rng = np.random.default_rng(0)
    brain = (slice(2, 9), slice(3, 10), slice(1, 8))
    images = []
    for m in range(4):
        image = np.zeros((12, 13, 10), np.float32)
        image[brain] = rng.random((7, 7, 7)) * 300 + 50 * m + 20
        images.append(image)
    seg = np.zeros((12, 13, 10), np.uint8)
    spec = dataset_spec("brats")
    plans = {"preprocess": {}, "target_spacing": [1.5, 1.0, 1.0]}
    zero = load_case(brats_case(_brats(tmp_path / "zero", images, seg), spec), spec)
    offset = load_case(brats_case(_brats(tmp_path / "offset", [i + 100 for i in images], seg), spec), spec)
    with caplog.at_level(logging.INFO):
        expected, zero_props = prepare_for_model(zero, plans)
        assert "background" not in caplog.text
        got, offset_props = prepare_for_model(offset, plans)
    assert "c1: modality 0 has a background of 100" in caplog.text
    assert offset_props["crop_lo"] == zero_props["crop_lo"] == [1, 3, 2]  # (k, j, i) order
    np.testing.assert_allclose(got, expected, atol=1e-5)  # the model sees the same input
    # zero-background scans and negative floors (CT air) are not touched: the very same array comes back
    assert subtract_background(zero.image) is zero.image
    ct = np.full((1, 6, 6, 6), -1024, np.float32)
    ct[0, 2:4, 2:4, 2:4] = 40
    assert subtract_background(ct) is ct


def test_two_files_for_one_modality_refused(tmp_path):
    rng = np.random.default_rng(0)
    folder = _brats(tmp_path, [rng.random((8, 8, 8)).astype(np.float32) for _ in range(4)])
    save_nifti(folder / "c1_t1.nii", np.ones((8, 8, 8), np.float32))
    with pytest.raises(ValueError, match=r"2 files for c1_t1: c1_t1\.nii\.gz, c1_t1\.nii"):
        brats_case(folder, dataset_spec("brats"))


@pytest.mark.parametrize(
    "setting",
    [
        "threshold=1.5",
        "threshold=-0.1",
        "optim.grad_clip=-1",
        "max_steps_per_epoch=-5",
        "data.batch_size=0",
        "data.val_batch_size=0",
        "seed=-1",
        "data.num_classes=0",
        "loss.dice_weight=-1",
        "loss.ce_weight=-0.5",
    ],
)
def test_every_numeric_setting_checked(tmp_path, capsys, setting):
    out = tmp_path / "run"
    code, err = cli(capsys, "train", "--data", tmp_path, "--out", out, "--set", setting)
    name = setting.split("=")[0]
    assert code == 2 and name in err and err.count("\n") == 1
    assert not out.exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--threshold", "2"], "--threshold 2.0 must be in [0, 1]"),
        (["--batch-size", "-1"], "--batch-size -1"),
        (["--batch-size", "0"], "--batch-size 0"),
        (["--device", "bogus"], "--device 'bogus' is not a device"),
    ],
)
def test_predict_options_checked(tmp_path, capsys, bright, args, message):
    ck = bright_checkpoint(tmp_path)
    save_png(tmp_path / "in" / "a.png", square())
    code, err = cli(capsys, "predict", ck, tmp_path / "in", "--out", tmp_path / "out", *args)
    assert code == 2 and message in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "gpus, device, message",
    [
        (0, "cuda", "--device cuda: torch sees no CUDA device (no GPU, or a CPU build of torch); use cpu"),
        (1, "cuda:1", "--device cuda:1: torch sees 1 CUDA device(s), cuda:0 to cuda:0"),
    ],
)
def test_predict_and_serve_refuse_a_gpu_torch_does_not_see(
    tmp_path, capsys, bright, monkeypatch, gpus, device, message
):
    """Said up front in one line (it used to surface at loading as a pinned-memory error about the weights)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    ck = bright_checkpoint(tmp_path)
    code, err = cli(capsys, "predict", ck, tmp_path / "in", "--out", tmp_path / "out", "--device", device)
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
    code, err = cli(capsys, "serve", "--device", device, ck)
    assert code == 2 and message in err and err.count("\n") == 1


@pytest.mark.parametrize("gpu", [False, True])
def test_predict_runs_on_the_gpu_by_default_where_there_is_one(tmp_path, capsys, bright, monkeypatch, gpu):
    """No --device: the GPU when torch sees one (a script on a GPU machine that forgot --device ran on the CPU)."""
    import rwkvseg.infer.predict as predict_module

    seen = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    monkeypatch.setattr(predict_module, "predict", lambda ck, ins, out, config: seen.update(device=config.device) or [])
    code, err = cli(capsys, "predict", bright_checkpoint(tmp_path), tmp_path / "in", "--out", tmp_path / "out")
    assert code == 0, err
    assert seen == {"device": "cuda" if gpu else "cpu"}


def test_threshold_abc_is_a_usage_error(tmp_path, capsys, bright):
    with pytest.raises(SystemExit) as exit_:
        cli(capsys, "predict", "ck", "in", "--out", "out", "--threshold", "abc")
    assert exit_.value.code == 2 and "--threshold: invalid float value: 'abc'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["training"].update(threshold=7), "holds threshold 7, not a number in [0, 1]"),
        (lambda d: d["preprocessing"].update(resize="bogus"), "resize 'bogus' is not one of resize, crop"),
        (lambda d: d["preprocessing"].update(size=[60000, 60000]), "size [60000, 60000] out of range"),
    ],
)
def test_sidecar_settings_checked(tmp_path, capsys, bright, edit, message):
    ck = bright_checkpoint(tmp_path)
    sidecar = ck.with_suffix(".json")
    data = json.loads(sidecar.read_text())
    edit(data)
    sidecar.write_text(json.dumps(data))
    save_png(tmp_path / "in" / "a.png", square())
    code, err = cli(capsys, "predict", ck, tmp_path / "in", "--out", tmp_path / "out")
    assert code == 2 and message in err
    assert not list((tmp_path / "out").glob("*.png"))


def test_masks_16bit_alpha_only_overlay_and_exif(tmp_path):
    m = np.zeros((20, 30), np.uint16)
    m[2:9, 3:12] = 1000
    path = tmp_path / "m16.png"
    Image.fromarray(m).save(path)
    assert read_mask(path).sum() == 7 * 9
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[2:9, 3:12, 3] = 255  # the lesion only in the alpha channel
    save_png(tmp_path / "alpha.png", rgba, "RGBA")
    assert read_mask(tmp_path / "alpha.png").sum() == 7 * 9
    overlay = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)  # a photo with a red outline
    overlay[2, 3:12] = (255, 0, 0)
    save_png(tmp_path / "overlay.png", overlay)
    with pytest.raises(ValueError, match=r"overlay\.png looks like a picture or an overlay"):
        read_mask(tmp_path / "overlay.png")
    # EXIF orientation 6 (rotate 90 degrees clockwise to display): read as displayed
    raw = np.zeros((20, 30), np.uint8)
    raw[0, 0] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(raw).save(tmp_path / "rot.jpg", exif=exif, quality=100)
    shown = read_image(tmp_path / "rot.jpg")
    assert shown.shape[:2] == (30, 20) and shown[0, -1, 0] > 0.5


@pytest.mark.parametrize(
    "doc, message",
    [
        ({"format": 1, "folds": [{"train": ["a", "a"], "val": ["b"]}]}, "lists case(s) ['a'] twice in 'train'"),
        ({"format": 1, "folds": [{"train": ["a"], "val": ["b"]}], "test": ["b"]}, "in both test and val: ['b']"),
        ({"format": 1, "folds": [{"train": "a", "val": ["b"]}]}, "'train' must be a list of case ids"),
        ({"format": 1, "folds": [["a"]]}, "'train' must be a list of case ids"),
        ([1, 2], "is not an rwkvseg split"),
    ],
)
def test_split_files_checked(tmp_path, doc, message):
    path = tmp_path / "split.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"split\.json") as err:
        read_split(path)
    assert message in str(err.value)


def test_evaluate_spacing_zero_refused(tmp_path, capsys):
    save_png(tmp_path / "pred" / "a.png", square())
    save_png(tmp_path / "gt" / "a.png", square())
    code, err = cli(capsys, "evaluate", tmp_path / "pred", tmp_path / "gt", "--spacing", "0,0")
    assert code == 2 and "--spacing '0,0' must be positive" in err


def test_bit_flipped_weights_refused(tmp_path, capsys, bright):
    ck = bright_checkpoint(tmp_path)
    data = bytearray(ck.read_bytes())
    data[-2] ^= 0x40  # one bit of the last weight
    ck.write_bytes(bytes(data))
    save_png(tmp_path / "in" / "a.png", square())
    code, err = cli(capsys, "predict", ck, tmp_path / "in", "--out", tmp_path / "out")
    assert code == 2 and "ck.safetensors is damaged or was replaced" in err
    assert not list((tmp_path / "out").glob("*.png"))


def test_released_sidecars_hold_the_digest_of_their_weights():
    from rwkvseg.files import file_sha256
    from rwkvseg.released import released_checkpoints, released_models

    for model in released_models():
        for path in released_checkpoints(model.name):  # one, or an ensemble's members
            sidecar = json.loads(path.with_suffix(".json").read_text())
            assert len(sidecar["training"]["weights_sha256"]) == 64
            assert file_sha256(path) == sidecar["training"]["weights_sha256"]


def test_damaged_training_state_refused(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    path = tmp_path / "state.pt"
    save_state(path, model, opt, sched, None, Progress(epoch=2))
    state = torch.load(path, weights_only=True)
    state["model"]["weight"][0, 0] = 1.5e29  # what a bit flip in the file did
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"state\.pt is damaged"):
        load_state(path, model, opt, sched, None)
    save_state(path, model, opt, sched, None, Progress(epoch=2))
    assert load_state(path, model, opt, sched, None).epoch == 2
    other = torch.nn.Linear(4, 2)  # resume with another architecture
    with pytest.raises(ValueError, match="another architecture"):
        load_state(path, other, torch.optim.SGD(other.parameters(), lr=0.1), sched, None)


def test_two_files_for_one_prediction_refused(tmp_path, capsys):
    save_png(tmp_path / "pred" / "a.png", square())
    save_png(tmp_path / "pred" / "a.jpg", square())
    save_png(tmp_path / "gt" / "a.png", square())
    code, err = cli(capsys, "evaluate", tmp_path / "pred", tmp_path / "gt", "--out", tmp_path / "ev")
    assert code == 2 and "a.jpg and " in err and "a.png are both predictions of a" in err
    assert not (tmp_path / "ev").exists()
    from rwkvseg.eval.volumes import label_files

    vol = np.zeros((4, 4, 4), np.uint8)
    save_nifti(tmp_path / "p3" / "c1.nii", vol)
    save_nifti(tmp_path / "p3" / "c1.nii.gz", vol)
    with pytest.raises(ValueError, match=r"c1\.nii.* and .*c1\.nii.* are both case c1"):
        label_files(tmp_path / "p3", dataset_spec("brats"))


def test_mirror_tta_default_is_off_on_the_cpu_and_the_checkpoints_on_a_gpu(caplog):
    from rwkvseg.infer.predict3d import default_mirror_axes, log_mirror_off

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)  # only compared, never used
    recorded = {"mirror_axes": [0, 2]}
    with caplog.at_level(logging.INFO):
        assert default_mirror_axes(None, recorded, cpu) == ()
        assert caplog.text == ""  # resolving only: prediction says it once (log_mirror_off)
        log_mirror_off(None, recorded, cpu)
        assert "pass --mirror-axes 0,2 to use it" in caplog.text
        caplog.clear()
        for given, device in ((None, gpu), ((0,), cpu)):
            log_mirror_off(given, recorded, device)
        log_mirror_off(None, {"mirror_axes": []}, cpu)
    assert caplog.text == ""  # flips on, given, or none recorded: nothing to say
    assert default_mirror_axes(None, recorded, gpu) == (0, 2)
    assert default_mirror_axes(None, {}, gpu) == (0, 1, 2)  # checkpoints that recorded none: all three
    assert default_mirror_axes((0, 1, 2), recorded, cpu) == (0, 1, 2)  # an explicit choice is kept
    assert default_mirror_axes((), recorded, gpu) == ()


def test_empty_prediction_folder_names_the_missing_cases(tmp_path, capsys):
    (tmp_path / "pred").mkdir()
    save_png(tmp_path / "gt" / "a.png", square())
    code, err = cli(capsys, "evaluate", tmp_path / "pred", tmp_path / "gt", "--out", tmp_path / "ev")
    assert code == 2 and err.count("\n") == 1
    assert f"{tmp_path / 'pred'} holds no images (.png," in err and "point to the folder with them" in err
    assert not (tmp_path / "ev").exists()
    save_png(tmp_path / "pred" / "b.png", square())  # predictions, but not of the ground truth's cases
    code, err = cli(capsys, "evaluate", tmp_path / "pred", tmp_path / "gt", "--out", tmp_path / "ev")
    assert code == 2 and "1 ground-truth case(s) have no prediction in" in err and "--missing-as-empty" in err
    assert not (tmp_path / "ev").exists()
