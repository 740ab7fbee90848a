import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from rwkvseg.checkpoint import CheckpointMeta, save_checkpoint
from rwkvseg.data.preprocess3d import PreprocessConfig, preprocess_dataset
from rwkvseg.data.specs import dataset_spec
from rwkvseg.data.volumes import discover_cases
from rwkvseg.infer.postprocess import PostProcess
from rwkvseg.infer.predict import PredictConfig
from rwkvseg.infer.predict3d import Predictor3D, predict_paths, probabilities_to_values
from rwkvseg.infer.sliding_window import SlidingWindowConfig, mirror_subsets, predict_logits
from rwkvseg.records import inference_metadata

BRATS = dataset_spec("brats")
SHAPE_1MM = (47, 41, 35)  # (i, j, k)
# an oblique, flipped 1 mm grid: the output must come back with exactly this affine
ROTATION = np.array([[np.cos(0.3), -np.sin(0.3), 0], [np.sin(0.3), np.cos(0.3), 0], [0, 0, 1]])
AFFINE_1MM = np.eye(4)
AFFINE_1MM[:3, :3] = ROTATION @ np.diag([-1.0, -1.0, 1.0])
AFFINE_1MM[:3, 3] = (20.5, 131.0, -17.25)


class Threshold(nn.Module):
    """A deterministic 'trained' model: edema where FLAIR z > 1, enhancing tumour where T1ce z > 1.

    labels: 4 class logits; regions: WT / TC / ET logits.
    """

    def __init__(self, target: str = "labels"):
        super().__init__()
        self.target = target
        self.scale = nn.Parameter(torch.tensor(10.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 4, *S] -> [B, K, *S]
        flair, t1ce = x[:, 3], x[:, 1]
        edema, enhancing = self.scale * (flair - 1), 2 * self.scale * (t1ce - 1)
        if self.target == "labels":
            return torch.stack([torch.zeros_like(flair), -torch.ones_like(flair) * 99, edema, enhancing], 1)
        return torch.stack([edema, -torch.ones_like(flair) * 99, enhancing], 1)


def balls(shape=SHAPE_1MM, centre=(27.0, 18.0, 16.0)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    brain = np.linalg.norm((grid - np.array(shape) / 2) / (np.array(shape) * 0.42), axis=-1) < 1
    distance = np.linalg.norm(grid - np.array(centre), axis=-1)
    return brain, distance < 8, distance < 4


def write_1mm_case(root: Path, case: str = "p1") -> tuple[Path, np.ndarray]:
    brain, whole, enhancing = balls()
    seg = np.where(enhancing, 4, np.where(whole, 2, 0)).astype(np.uint8)
    rng = np.random.default_rng(0)
    folder = root / case
    folder.mkdir(parents=True)
    for modality in BRATS.modalities:
        data = brain * (100 + rng.normal(0, 2, SHAPE_1MM))
        if modality == "flair":
            data = data + 200 * whole
        if modality == "t1ce":
            data = data + 300 * enhancing
        image = nib.Nifti1Image(data.astype(np.int16), AFFINE_1MM)
        image.set_qform(AFFINE_1MM, 1)
        image.set_sform(AFFINE_1MM, 2)
        nib.save(image, folder / f"{case}_{modality}.nii.gz")
    nib.save(nib.Nifti1Image(seg, AFFINE_1MM), folder / f"{case}_seg.nii.gz")
    return folder, seg


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def test_mirror_subsets():
    assert mirror_subsets(()) == [()]
    assert mirror_subsets((0, 2)) == [(), (0,), (2,), (0, 2)]
    assert len(mirror_subsets((0, 1, 2))) == 8


def test_sliding_window_reproduces_a_pointwise_model_on_odd_sizes():
    torch.manual_seed(0)
    model = nn.Conv3d(3, 2, 1)
    image = torch.randn(1, 3, 11, 13, 9)
    for mirror in ((), (0, 1, 2)):
        config = SlidingWindowConfig(patch_size=(8, 16, 6), overlap=0.5, mirror_axes=mirror)
        torch.testing.assert_close(predict_logits(model, image, config), model(image).detach(), atol=1e-5, rtol=0)


def test_mirror_tta_averages_flipped_predictions():
    torch.manual_seed(0)
    model = nn.Conv3d(2, 2, 3, padding=1)
    image = torch.randn(1, 2, 6, 7, 5)
    config = SlidingWindowConfig(patch_size=(6, 7, 5), mirror_axes=(1,))
    expected = (model(image) + model(image.flip(3)).flip(3)) / 2
    torch.testing.assert_close(predict_logits(model, image, config), expected.detach(), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="expected"):
        predict_logits(model, image[0], config)


@pytest.fixture(scope="module")
def trained_at_2mm(tmp_path_factory):
    """Plans from a 1 mm case preprocessed at 2 mm, as a model trained on the 2 mm cache would carry."""
    root = tmp_path_factory.mktemp("train")
    write_1mm_case(root / "raw", "t1")
    plans = preprocess_dataset(root / "raw", BRATS, root / "cache", PreprocessConfig(target_spacing=(2.0, 2.0, 2.0)))
    assert plans["cases"]["t1"]["resampled_shape"] < plans["cases"]["t1"]["original_shape"]
    return plans


@pytest.mark.parametrize("target", ["labels", "regions"])
def test_a_2mm_model_predicts_on_the_1mm_grid_with_the_input_affine(tmp_path, trained_at_2mm, target):
    folder, seg = write_1mm_case(tmp_path / "in")
    metadata = inference_metadata(trained_at_2mm, patch_size=(8, 10, 12), target=target)
    predictor = Predictor3D(Threshold(target), metadata, PredictConfig(mirror_axes=(0, 2)))
    (case,) = discover_cases(folder, BRATS, require_label=False)
    out = predictor.predict_to_file(case, tmp_path / "out")
    assert out == tmp_path / "out" / "p1.nii.gz"
    written, source = nib.load(out), nib.load(folder / "p1_flair.nii.gz")
    assert written.shape == source.shape == SHAPE_1MM
    np.testing.assert_array_equal(written.affine, source.affine)
    np.testing.assert_array_equal(written.header.get_qform(), source.header.get_qform())
    assert int(written.header["qform_code"]) == 1 and int(written.header["sform_code"]) == 2
    assert written.get_data_dtype() == np.uint8
    pred = np.asarray(written.dataobj)
    assert set(np.unique(pred)) == {0, 2, 4}
    assert dice(pred > 0, seg > 0) > 0.9
    assert dice(pred == 4, seg == 4) > 0.6  # a radius-4 ball seen through 2 mm voxels
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["p1.nii.gz"]  # no temporary files left


@pytest.mark.parametrize("target", ["labels", "regions"])
def test_probabilities_are_written_on_the_input_grid_and_give_the_labels(tmp_path, trained_at_2mm, target):
    """--probabilities: probabilities/<case>.nii.gz beside the labels, 4-D (i, j, k, channel) on the input's exact
    grid in 8 bits, channels named in the header; the labels are their threshold or argmax before post-processing,
    and outside the brain's crop box the background is certain."""
    folder, seg = write_1mm_case(tmp_path / "in")
    metadata = inference_metadata(trained_at_2mm, patch_size=(8, 10, 12), target=target)
    options = PredictConfig(mirror_axes=(0, 2), probabilities=True)
    predictor = Predictor3D(Threshold(target), metadata, options)
    (case,) = discover_cases(folder, BRATS, require_label=False)
    in_memory = predictor.predict(case, probabilities=True)
    probs = in_memory.probabilities  # [C, K, J, I]
    channels = 4 if target == "labels" else 3
    assert probs.shape == (channels, *SHAPE_1MM[::-1]) and probs.dtype == np.float32
    assert probs.min() >= 0 and probs.max() <= 1
    np.testing.assert_array_equal(
        probabilities_to_values(torch.from_numpy(probs), BRATS, target, predictor.threshold), in_memory.values
    )
    if target == "labels":
        np.testing.assert_allclose(probs.sum(0), 1, atol=1e-5)
        assert probs[0, 0, 0, 0] == 1  # a corner outside the crop box: background
    else:
        assert probs[:, 0, 0, 0].max() == 0

    out = predictor.predict_to_file(case, tmp_path / "out")
    written = nib.load(tmp_path / "out" / "probabilities" / "p1.nii.gz")
    source = nib.load(folder / "p1_flair.nii.gz")
    assert written.shape == (*SHAPE_1MM, channels) and written.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(written.affine, source.affine)
    assert int(written.header["qform_code"]) == 1 and int(written.header["sform_code"]) == 2
    names = "0,1,2,4" if target == "labels" else "WT,TC,ET"
    assert written.header["descrip"].item().decode() == f"rwkvseg probabilities: {names}"
    back = np.transpose(written.get_fdata(), (3, 2, 1, 0))  # (i, j, k, c) -> (c, k, j, i)
    np.testing.assert_allclose(back, probs, atol=1 / 255)
    labels = np.swapaxes(np.asarray(nib.load(out).dataobj), 0, 2)
    np.testing.assert_array_equal(labels, in_memory.values)
    whole = probs.argmax(0) > 0 if target == "labels" else probs[0] > 0.5
    assert dice(np.swapaxes(whole, 0, 2), seg > 0) > 0.9
    assert sorted(p.name for p in (tmp_path / "out").rglob("*")) == ["p1.nii.gz", "p1.nii.gz", "probabilities"]


def test_probabilities_are_refused_when_they_exist_and_kept_raw_by_post_processing(tmp_path, trained_at_2mm):
    folder, _ = write_1mm_case(tmp_path / "in")
    metadata = inference_metadata(trained_at_2mm, patch_size=(8, 10, 12))
    (case,) = discover_cases(folder, BRATS, require_label=False)
    kept = tmp_path / "out" / "probabilities" / "p1.nii.gz"
    kept.parent.mkdir(parents=True)
    kept.write_bytes(b"the user's file")
    options = PredictConfig(mirror_axes=(), probabilities=True, postprocess=PostProcess(et_min_voxels=10**6))
    predictor = Predictor3D(Threshold(), metadata, options)
    with pytest.raises(FileExistsError, match=r"already exist .*probabilities/p1\.nii\.gz"):
        predictor.predict_to_file(case, tmp_path / "out")
    assert kept.read_bytes() == b"the user's file" and not (tmp_path / "out" / "p1.nii.gz").exists()
    with pytest.raises(FileExistsError, match=r"probabilities/p1\.nii\.gz"):
        predict_paths_with(predictor, folder, tmp_path / "out")
    predictor.predict_to_file(case, tmp_path / "out", overwrite=True)
    labels = np.asarray(nib.load(tmp_path / "out" / "p1.nii.gz").dataobj)
    probs = nib.load(kept).get_fdata()  # post-processing relabelled every enhancing voxel; the probabilities keep ET
    assert not (labels == 4).any() and (probs[..., 3] > 0.5).any()


def predict_paths_with(predictor: Predictor3D, folder: Path, out: Path) -> list[Path]:
    from rwkvseg.infer.predict3d import predict_cases

    return predict_cases(predictor, [folder], out)


def test_postprocess_relabels_a_small_enhancing_tumour_on_the_output_grid(tmp_path, trained_at_2mm):
    folder, _ = write_1mm_case(tmp_path / "in")
    metadata = inference_metadata(trained_at_2mm, patch_size=(8, 10, 12))
    (case,) = discover_cases(folder, BRATS, require_label=False)
    raw, _ = Predictor3D(Threshold(), metadata, PredictConfig(mirror_axes=())).predict_case(case)
    enhancing = int((raw == 4).sum())  # counted on the 1 mm grid the file is written on
    assert enhancing > 100
    for min_voxels, relabelled in [(enhancing, False), (enhancing + 1, True)]:
        options = PredictConfig(mirror_axes=(), postprocess=PostProcess(largest=True, et_min_voxels=min_voxels))
        values, _ = Predictor3D(Threshold(), metadata, options).predict_case(case)
        np.testing.assert_array_equal(values > 0, raw > 0)  # one tumour: largest keeps it whole
        assert (values == 4).sum() == (0 if relabelled else enhancing)
        np.testing.assert_array_equal(values == 1, (raw == 4) if relabelled else np.zeros_like(raw, bool))
    with pytest.raises(ValueError, match="fill-holes fills binary masks, and this model predicts 3 foreground"):
        Predictor3D(Threshold(), metadata, PredictConfig(postprocess=PostProcess(fill_holes=True)))


def test_a_checkpoint_records_its_own_postprocessing_and_an_explicit_choice_overrides_it(tmp_path, trained_at_2mm):
    folder, _ = write_1mm_case(tmp_path / "in")
    metadata = inference_metadata(trained_at_2mm, patch_size=(8, 10, 12))
    (case,) = discover_cases(folder, BRATS, require_label=False)
    raw, _ = Predictor3D(Threshold(), metadata, PredictConfig(mirror_axes=())).predict_case(case)
    enhancing = int((raw == 4).sum())
    recorded = {
        **metadata,
        "inference": {**metadata.get("inference", {}), "postprocess": f"et-min-voxels={enhancing + 1}"},
    }
    by_default = Predictor3D(Threshold(), recorded, PredictConfig(mirror_axes=()))  # postprocess None: the record's
    assert by_default.postprocess == PostProcess(et_min_voxels=enhancing + 1)
    values, _ = by_default.predict_case(case)
    assert (values == 4).sum() == 0 and (values == 1).sum() == enhancing
    off = Predictor3D(Threshold(), recorded, PredictConfig(mirror_axes=(), postprocess=PostProcess()))
    np.testing.assert_array_equal(off.predict_case(case)[0], raw)  # --postprocess none: off
    broken = {**metadata, "inference": {"postprocess": "biggest"}}
    with pytest.raises(
        ValueError, match=r"records inference.postprocess 'biggest', which is not valid .* fix its sidecar"
    ):
        Predictor3D(Threshold(), broken, PredictConfig(mirror_axes=()))


def test_threshold_applies_to_region_checkpoints_and_is_refused_for_label_ones(tmp_path, trained_at_2mm):
    folder, _ = write_1mm_case(tmp_path / "in")
    (case,) = discover_cases(folder, BRATS, require_label=False)
    regions = inference_metadata(trained_at_2mm, patch_size=(8, 10, 12), target="regions")
    default, _ = Predictor3D(Threshold("regions"), regions, PredictConfig(mirror_axes=())).predict_case(case)
    half, _ = Predictor3D(Threshold("regions"), regions, PredictConfig(mirror_axes=(), threshold=0.5)).predict_case(
        case
    )
    np.testing.assert_array_equal(half, default)  # 0.5 is the default
    low, _ = Predictor3D(Threshold("regions"), regions, PredictConfig(mirror_axes=(), threshold=0.01)).predict_case(
        case
    )
    high, _ = Predictor3D(Threshold("regions"), regions, PredictConfig(mirror_axes=(), threshold=0.99)).predict_case(
        case
    )
    assert (high > 0).sum() < (default > 0).sum() < (low > 0).sum()  # a lower threshold takes in more tumour
    assert (high == 4).sum() < (default == 4).sum() < (low == 4).sum()
    assert np.all((high > 0) <= (default > 0)) and np.all((default > 0) <= (low > 0))  # nested masks
    # a release records the threshold chosen on validation (inference.threshold); --threshold overrides it
    recorded = {**regions, "inference": {**regions.get("inference", {}), "threshold": 0.01}}
    by_default, _ = Predictor3D(Threshold("regions"), recorded, PredictConfig(mirror_axes=())).predict_case(case)
    np.testing.assert_array_equal(by_default, low)
    given, _ = Predictor3D(Threshold("regions"), recorded, PredictConfig(mirror_axes=(), threshold=0.5)).predict_case(
        case
    )
    np.testing.assert_array_equal(given, default)
    broken = {**regions, "inference": {"threshold": 1.5}}
    with pytest.raises(ValueError, match=r"inference record holds threshold 1.5, not a number in \[0, 1\]; fix its"):
        Predictor3D(Threshold("regions"), broken, PredictConfig(mirror_axes=()))
    labels = inference_metadata(trained_at_2mm, patch_size=(8, 10, 12), target="labels")
    with pytest.raises(ValueError, match=r"--threshold 0.3: this 3D checkpoint predicts labels .* drop --threshold"):
        Predictor3D(Threshold("labels"), labels, PredictConfig(threshold=0.3))
    with pytest.raises(ValueError, match=r"records inference.threshold 0.3, but it predicts labels .* remove it"):
        Predictor3D(Threshold("labels"), {**labels, "inference": {"threshold": 0.3}}, PredictConfig())


@pytest.mark.parametrize(
    ("options", "names"),
    [
        ({"overlays": True}, "--overlay"),
        ({"overlays": True, "batch_size": 4}, "--batch-size, --overlay"),
        ({"skip_non_images": True}, "--skip-non-images"),
    ],
)
def test_2d_options_are_refused_for_a_3d_checkpoint(trained_at_2mm, options, names):
    metadata = inference_metadata(trained_at_2mm, patch_size=(8, 10, 12))
    with pytest.raises(ValueError, match=rf"^{names}: for 2D checkpoints, and this one is 3D: drop"):
        Predictor3D(Threshold(), metadata, PredictConfig(**options))


def threshold_checkpoint(path, trained_at_2mm, monkeypatch):
    """A 2 mm checkpoint of the Threshold model at path (its .safetensors returned), which loading rebuilds."""
    meta = CheckpointMeta(
        model="threshold",
        in_channels=4,
        num_classes=4,
        preprocessing=inference_metadata(trained_at_2mm, patch_size=(16, 16, 16)),
        spacing=(2.0, 2.0, 2.0),
    )
    monkeypatch.setattr("rwkvseg.checkpoint.build_model", lambda meta: Threshold())
    return save_checkpoint(path, Threshold(), meta)[0]


def test_predict_paths_loads_the_model_from_a_checkpoint(tmp_path, trained_at_2mm, monkeypatch):
    folder, seg = write_1mm_case(tmp_path / "in")
    threshold_checkpoint(tmp_path / "ckpt" / "best", trained_at_2mm, monkeypatch)
    (out,) = predict_paths(
        tmp_path / "ckpt" / "best", [tmp_path / "in"], tmp_path / "out", PredictConfig(mirror_axes=())
    )
    assert dice(np.asarray(nib.load(out).dataobj) > 0, seg > 0) > 0.9
    before = out.read_bytes()
    with pytest.raises(FileExistsError, match=r"output file\(s\) already exist .*p1\.nii\.gz"):
        predict_paths(tmp_path / "ckpt" / "best", [folder], tmp_path / "out")
    assert out.read_bytes() == before
    # explicit files, one per modality in the model's order
    files = [folder / f"p1_{m}.nii.gz" for m in BRATS.modalities]
    (out2,) = predict_paths(tmp_path / "ckpt" / "best", files, tmp_path / "out2", PredictConfig(mirror_axes=()))
    assert np.array_equal(np.asarray(nib.load(out2).dataobj), np.asarray(nib.load(out).dataobj))


def test_bad_prediction_input_writes_nothing(tmp_path, trained_at_2mm):
    folder, _ = write_1mm_case(tmp_path / "in")
    (folder / "p1_t2.nii.gz").unlink()
    predictor = Predictor3D(Threshold(), inference_metadata(trained_at_2mm, (8, 8, 8)))
    with pytest.raises(ValueError, match=r"lacks modality 't2'"):
        discover_cases(folder, BRATS, require_label=False)
    nib.save(nib.load(folder / "p1_t1.nii.gz").slicer[:, :, :-1], folder / "p1_t2.nii.gz")
    (case,) = discover_cases(folder, BRATS, require_label=False)
    with pytest.raises(ValueError, match=r"(?s)p1_t2.nii.gz has shape \(47, 41, 34\)"):
        predictor.predict_to_file(case, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="not trained on 3D volumes"):
        Predictor3D(Threshold(), {"dims": 2})


def upsample_to_original(case_dir: Path, row: dict[str, str], out_dir: Path) -> tuple[Path, np.ndarray]:
    """A 1 mm 240x240x155 int16 case rebuilt from the 2 mm compact files and cases.csv (crop box, affine)."""
    lo = np.array([int(v) for v in row["crop_lo"].split()])
    case = case_dir.name
    out_dir.mkdir(parents=True)
    for name in (*BRATS.modalities, "seg"):
        compact = nib.load(case_dir / f"{case}_{name}.nii.gz")
        # compact voxel c covers original voxels 2c + lo .. 2c + lo + 1: its affine is original @ scale-and-shift
        to_compact = np.diag([2.0, 2.0, 2.0, 1.0])
        to_compact[:3, 3] = lo + 0.5
        original_affine = compact.affine @ np.linalg.inv(to_compact)
        data = np.asarray(compact.dataobj)
        full = np.zeros((240, 240, 155), np.uint8 if name == "seg" else np.int16)
        up = data.repeat(2, 0).repeat(2, 1).repeat(2, 2)
        hi = np.minimum(lo + up.shape, full.shape)
        full[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = up[: hi[0] - lo[0], : hi[1] - lo[1], : hi[2] - lo[2]]
        nib.save(nib.Nifti1Image(full, np.round(original_affine, 6)), out_dir / f"{case}_{name}.nii.gz")
    return out_dir, original_affine


def test_real_brats_model_at_2mm_predicts_on_a_1mm_original_grid(brats_2mm, tmp_path):
    case = "Brats18_2013_2_1"
    with open(brats_2mm / "cases.csv") as handle:
        row = next(r for r in csv.DictReader(handle) if r["case"] == case)
    plans = preprocess_dataset(brats_2mm / case, BRATS, tmp_path / "cache")
    predictor = Predictor3D(Threshold(), inference_metadata(plans, (48, 48, 48)), PredictConfig(mirror_axes=()))
    at_2mm = predictor.predict_to_file(discover_cases(brats_2mm / case, BRATS)[0], tmp_path / "pred2mm")
    folder, affine = upsample_to_original(brats_2mm / case, row, tmp_path / "orig" / case)
    np.testing.assert_allclose(affine, [[-1, 0, 0, 0], [0, -1, 0, 239], [0, 0, 1, 0], [0, 0, 0, 1]], atol=1e-6)
    out = predictor.predict_to_file(discover_cases(folder, BRATS)[0], tmp_path / "pred1mm")
    written, source = nib.load(out), nib.load(folder / f"{case}_flair.nii.gz")
    assert written.shape == (240, 240, 155)
    np.testing.assert_array_equal(written.affine, source.affine)
    # the 1 mm prediction lands where the 2 mm one does, upsampled into the original grid
    lo = np.array([int(v) for v in row["crop_lo"].split()])
    reference = np.zeros((240, 240, 155), bool)
    up = (np.asarray(nib.load(at_2mm).dataobj) > 0).repeat(2, 0).repeat(2, 1).repeat(2, 2)
    reference[lo[0] : lo[0] + up.shape[0], lo[1] : lo[1] + up.shape[1], lo[2] : lo[2] + up.shape[2]] = up
    pred = np.asarray(written.dataobj) > 0
    assert reference.sum() > 1000
    assert dice(pred, reference) > 0.9


def test_command_line_preprocess_predict_evaluate(tmp_path, monkeypatch, capsys):
    from rwkvseg.cli import main

    write_1mm_case(tmp_path / "raw", "p1")
    write_1mm_case(tmp_path / "raw", "p2")
    assert main(["preprocess", str(tmp_path / "raw"), "--out", str(tmp_path / "cache"), "--spacing", "2"]) == 0
    from rwkvseg.data.preprocess3d import load_plans

    plans = load_plans(tmp_path / "cache")
    assert plans["target_spacing"] == [2.0, 2.0, 2.0]
    meta = CheckpointMeta(
        model="threshold", in_channels=4, num_classes=4, preprocessing=inference_metadata(plans, (16, 16, 16))
    )
    save_checkpoint(tmp_path / "ckpt", Threshold(), meta)
    monkeypatch.setattr("rwkvseg.checkpoint.build_model", lambda meta: Threshold())
    pred = tmp_path / "pred"
    args = ["predict", str(tmp_path / "ckpt"), str(tmp_path / "raw"), "--out", str(pred), "--mirror-axes", ""]
    assert main([*args, "--probabilities"]) == 0
    assert sorted(p.name for p in pred.glob("*.nii.gz")) == ["p1.nii.gz", "p2.nii.gz"]  # beside the .rwkvseg marker
    assert sorted(p.name for p in (pred / "probabilities").iterdir()) == ["p1.nii.gz", "p2.nii.gz"]
    assert nib.load(pred / "probabilities" / "p1.nii.gz").shape == (*SHAPE_1MM, 4)
    assert main(["evaluate", str(pred), str(tmp_path / "raw"), "--out", str(tmp_path / "eval")]) == 0
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["cases"] == 2 and summary["regions"]["WT"]["dice"]["mean"] > 0.9
    # bad input: a non-zero exit and a message naming the file, nothing written
    (tmp_path / "raw" / "p2" / "p2_t1.nii.gz").unlink()
    capsys.readouterr()
    assert main(["preprocess", str(tmp_path / "raw"), "--out", str(tmp_path / "cache2")]) == 2
    assert "p2_t1.nii.gz" in capsys.readouterr().err
    assert not (tmp_path / "cache2").exists()


def test_msd_4d_inputs_predict_to_a_3d_file_on_the_same_grid(tmp_path, monkeypatch):
    root = tmp_path / "Task01_BrainTumour"
    meta = {"modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}, "labels": {"0": "bg", "1": "edema"}}
    root.mkdir()
    (root / "dataset.json").write_text(json.dumps(meta))
    brain, whole, enhancing = balls()
    channels = [brain * 100 + 200 * whole, brain * 100, brain * 100 + 300 * enhancing, brain * 100]
    image = np.stack(channels, -1).astype(np.float32)  # (i, j, k, c) in the file's FLAIR, T1w, t1gd, T2w order
    seg = np.where(enhancing, 3, np.where(whole, 1, 0)).astype(np.uint8)
    for split in ("Tr", "Ts"):
        nib.save(nib.Nifti1Image(image, AFFINE_1MM), tmp_path / "x.nii.gz")
        (root / f"images{split}").mkdir()
        (tmp_path / "x.nii.gz").rename(root / f"images{split}" / "BRATS_001.nii.gz")
    (root / "labelsTr").mkdir()
    nib.save(nib.Nifti1Image(seg, AFFINE_1MM), root / "labelsTr" / "BRATS_001.nii.gz")
    spec = dataset_spec("msd_task01")
    plans = preprocess_dataset(root, spec, tmp_path / "cache", PreprocessConfig(target_spacing=(2.0, 2.0, 2.0)))
    meta = CheckpointMeta(
        model="threshold", in_channels=4, num_classes=4, preprocessing=inference_metadata(plans, (8, 8, 8))
    )
    save_checkpoint(tmp_path / "ckpt", Threshold(), meta)
    monkeypatch.setattr("rwkvseg.checkpoint.build_model", lambda meta: Threshold())
    (out,) = predict_paths(tmp_path / "ckpt", [root], tmp_path / "out", PredictConfig(mirror_axes=()))
    written, source = nib.load(out), nib.load(root / "imagesTs" / "BRATS_001.nii.gz")
    assert written.shape == SHAPE_1MM and source.shape == (*SHAPE_1MM, 4)
    np.testing.assert_array_equal(written.affine, source.affine)
    pred = np.asarray(written.dataobj)
    assert set(np.unique(pred)) == {0, 2, 3}  # the Threshold model's classes 2 and 3 are MSD labels 2 and 3
    assert dice(pred > 0, seg > 0) > 0.9


def test_nrrd_inputs_predict_to_nrrd_with_the_same_geometry(tmp_path, trained_at_2mm):
    sitk = pytest.importorskip("SimpleITK")
    folder, seg = write_1mm_case(tmp_path / "nifti")
    nrrd = tmp_path / "nrrd" / "p1"
    nrrd.mkdir(parents=True)
    for path in folder.iterdir():
        sitk.WriteImage(sitk.ReadImage(str(path)), str(nrrd / path.name.replace(".nii.gz", ".nrrd")))
    predictor = Predictor3D(Threshold(), inference_metadata(trained_at_2mm, (8, 8, 8)), PredictConfig(mirror_axes=()))
    (case,) = discover_cases(nrrd, BRATS, require_label=False)
    out = predictor.predict_to_file(case, tmp_path / "out")
    assert out.name == "p1.nrrd"
    written, source = sitk.ReadImage(str(out)), sitk.ReadImage(str(nrrd / "p1_flair.nrrd"))
    assert written.GetSize() == source.GetSize()
    np.testing.assert_allclose(written.GetOrigin(), source.GetOrigin())
    np.testing.assert_allclose(written.GetDirection(), source.GetDirection())
    np.testing.assert_allclose(written.GetSpacing(), source.GetSpacing())
    pred = np.swapaxes(sitk.GetArrayFromImage(written), 0, 2)  # (k, j, i) -> (i, j, k) like seg
    assert dice(pred > 0, seg > 0) > 0.9

    options = PredictConfig(mirror_axes=(), probabilities=True)
    with_probs = Predictor3D(Threshold(), inference_metadata(trained_at_2mm, (8, 8, 8)), options)
    with_probs.predict_to_file(case, tmp_path / "out", overwrite=True)
    probs = sitk.ReadImage(str(tmp_path / "out" / "probabilities" / "p1.nrrd"))  # a float32 vector image
    assert probs.GetSize() == source.GetSize() and probs.GetNumberOfComponentsPerPixel() == 4
    np.testing.assert_allclose(probs.GetOrigin(), source.GetOrigin())
    np.testing.assert_allclose(probs.GetDirection(), source.GetDirection())
    assert probs.GetMetaData("rwkvseg_channels") == "0,1,2,4"
    array = sitk.GetArrayFromImage(probs)  # [k, j, i, c]
    assert array.dtype == np.float32
    np.testing.assert_array_equal(np.swapaxes(array.argmax(-1), 0, 2) > 0, pred > 0)


def test_released_model_on_a_full_resolution_int16_case_keeps_the_grid(brats_2mm, tmp_path):
    """The released 3D model, by name through the CLI, on a validation case rebuilt at 1 mm (240x240x155 int16):
    the output has the input's shape and affine read back by nibabel and by MONAI's loader, BraTS label values,
    and its tumour lies where the reference is."""
    from monai.transforms import LoadImage

    from rwkvseg.cli import main
    from rwkvseg.released import released_models

    if "mmsegrwkv_small-brats2018" not in [m.name for m in released_models()]:
        pytest.skip("the released 3D model is not shipped in this install")
    case = "Brats18_2013_23_1"  # in the validation list of splits/brats2018_2mm.json
    with open(brats_2mm / "cases.csv") as handle:
        row = next(r for r in csv.DictReader(handle) if r["case"] == case)
    folder, _ = upsample_to_original(brats_2mm / case, row, tmp_path / "orig" / case)
    reference = folder.parent.parent / "ref"
    reference.mkdir()
    (folder / f"{case}_seg.nii.gz").rename(reference / f"{case}.nii.gz")  # the model must not see the labels
    pred = tmp_path / "pred"
    args = ["predict", "--model", "mmsegrwkv_small-brats2018", str(folder), "--out", str(pred), "--mirror-axes", ""]
    assert main(args) == 0
    out = pred / f"{case}.nii.gz"
    source = folder / f"{case}_flair.nii.gz"
    written = nib.load(out)
    assert written.shape == (240, 240, 155)
    np.testing.assert_array_equal(written.affine, nib.load(source).affine)
    loader = LoadImage(image_only=True)
    np.testing.assert_allclose(np.asarray(loader(out).affine), np.asarray(loader(source).affine), atol=1e-6)
    labels = np.asarray(written.dataobj)
    assert set(np.unique(labels)) <= {0, 1, 2, 4}
    truth = np.asarray(nib.load(reference / f"{case}.nii.gz").dataobj) > 0
    assert dice(labels > 0, truth) > 0.6  # whole tumour; a grid misplacement would drop far below


def rescaled_case(folder: Path, root: Path, case: str, zoom: float) -> Path:
    """The case in folder with the same voxels and every affine scaled: voxels of zoom mm, as case `case`."""
    (root / case).mkdir(parents=True)
    for path in folder.glob("*.nii.gz"):
        image = nib.load(path)
        affine = image.affine.copy()
        affine[:3, :3] *= zoom
        scaled = nib.Nifti1Image(np.asarray(image.dataobj), affine)
        scaled.set_qform(affine, 1)
        scaled.set_sform(affine, 2)
        nib.save(scaled, root / case / path.name.replace(folder.name, case))
    return root / case


def test_et_min_mm3_counts_each_case_in_its_own_voxels(tmp_path, trained_at_2mm):
    """One volume threshold, two spacings: the voxel count it stands for follows each case's voxel size."""
    one_mm, _ = write_1mm_case(tmp_path / "in")
    two_mm = rescaled_case(one_mm, tmp_path / "in", "p2", 2.0)
    metadata = inference_metadata(trained_at_2mm, patch_size=(8, 10, 12))
    for folder, voxel_mm3 in ((one_mm, 1.0), (two_mm, 8.0)):
        (case,) = discover_cases(folder, BRATS, require_label=False)
        raw, reference = Predictor3D(Threshold(), metadata, PredictConfig(mirror_axes=())).predict_case(case)
        assert reference.spacing == pytest.approx((voxel_mm3 ** (1 / 3),) * 3)
        enhancing = int((raw == 4).sum())
        assert enhancing > 100
        volume = enhancing * voxel_mm3  # mm3 of the enhancing tumour: kept at exactly this threshold, not above
        for threshold, relabelled in [(volume, False), (volume + 0.5, True)]:
            options = PredictConfig(mirror_axes=(), postprocess=PostProcess(et_min_mm3=threshold))
            values, _ = Predictor3D(Threshold(), metadata, options).predict_case(case)
            assert (values == 4).sum() == (0 if relabelled else enhancing)
            np.testing.assert_array_equal(values == 1, (raw == 4) if relabelled else np.zeros_like(raw, bool))


def test_predict_applies_et_min_mm3_by_each_output_grid(tmp_path, trained_at_2mm, monkeypatch, capsys):
    """rwkvseg predict on a 1 mm and a 2 mm copy of one case: et-min-voxels removes both enhancing tumours (the
    trap: N voxels of 1 mm are 1/8 of the volume of N of 2 mm), et-min-mm3 only the one below its volume."""
    from rwkvseg.cli import main

    one_mm, _ = write_1mm_case(tmp_path / "in")
    rescaled_case(one_mm, tmp_path / "in", "p2", 2.0)
    checkpoint = threshold_checkpoint(tmp_path / "ckpt" / "best", trained_at_2mm, monkeypatch)

    def predicted(out: str, spec: str) -> dict[str, np.ndarray]:
        args = ["predict", str(checkpoint), str(tmp_path / "in"), "--out", str(tmp_path / out), "--device", "cpu"]
        assert main([*args, "--postprocess", spec]) == 0
        return {case: np.asarray(nib.load(tmp_path / out / f"{case}.nii.gz").dataobj) for case in ("p1", "p2")}

    raw = predicted("raw", "none")
    et_1mm, et_2mm = int((raw["p1"] == 4).sum()), int((raw["p2"] == 4).sum())
    assert 100 < et_1mm < 8 * et_2mm  # the same ball: fewer mm3 on the 1 mm grid than on the 2 mm one
    counted = predicted("voxels", f"et-min-voxels={max(et_1mm, et_2mm) + 1}")
    assert not (counted["p1"] == 4).any() and not (counted["p2"] == 4).any()
    volume = predicted("mm3", f"et-min-mm3={(et_1mm + 8 * et_2mm) / 2}")  # between the two cases' ET volumes
    assert not (volume["p1"] == 4).any() and (volume["p1"] == 1).sum() == et_1mm
    np.testing.assert_array_equal(volume["p2"], raw["p2"])
    assert (
        main(
            [
                "predict",
                str(checkpoint),
                str(tmp_path / "in"),
                "--out",
                str(tmp_path / "bad"),
                "--device",
                "cpu",
                "--postprocess",
                "et-min-mm3=800,et-min-voxels=100",
            ]
        )
        == 2
    )
    assert "set the same threshold twice" in capsys.readouterr().err
