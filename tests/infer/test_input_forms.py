"""Issue 19: every 3D input form reaches the model with the channels it was trained on, in the orientation it was
trained in, and comes back on the input's own grid under the case's name.

The forms (`input_forms`): a BraTS case folder, per-modality files given in another order, an MSD 4-D file with its
dataset.json (channels FLAIR, T1w, T1gd, T2w), an nnU-Net folder, a DICOM case folder of four series (written from
the NIfTI files with SimpleITK) and a permuted / flipped grid. Predictions are compared in world space: each output
is turned to RAS (nibabel `as_closest_canonical`) before the voxels are compared.
"""

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from test_predict3d import Threshold, write_1mm_case
from torch import nn

from rwkvseg.data.preprocess3d import PreprocessConfig, preprocess_dataset
from rwkvseg.data.specs import channel_order, dataset_spec, safe_name, spec_from_dataset_json
from rwkvseg.data.volumes import input_cases
from rwkvseg.infer.predict import PredictConfig
from rwkvseg.infer.predict3d import Predictor3D, default_mirror_axes, predict_paths
from rwkvseg.records import inference_metadata

BRATS = dataset_spec("brats")
MSD_CHANNELS = {"0": "FLAIR", "1": "T1w", "2": "T1gd", "3": "T2w"}  # MSD Task01's dataset.json
MSD_ORDER = ("flair", "t1", "t1ce", "t2")  # the BraTS files in that channel order
# a permutation with flips of the voxel axes (nibabel orientation: new axis n takes old axis ornt[n, 0])
PERMUTE_FLIP = np.array([[2, -1], [0, 1], [1, -1]])
REGIONS = {"WT": (1, 2, 4), "TC": (1, 4), "ET": (4,)}


def canonical(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A label file's voxels and affine turned to RAS: equal arrays mean equal labels in world space."""
    image = nib.as_closest_canonical(nib.load(path))
    return np.asarray(image.dataobj), image.affine


def region_dice(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    out = {}
    for name, values in REGIONS.items():
        x, y = np.isin(a, values), np.isin(b, values)
        out[name] = 1.0 if not (x.any() or y.any()) else float(2 * (x & y).sum() / (x.sum() + y.sum()))
    return out


def write_dicom_series(image, folder: Path, description: str, series_uid: str) -> Path:
    """One MR slice per file with the tags a scanner writes for a 3-D stack (as in tests/data/test_dicom.py)."""
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    d = image.GetDirection()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        slice_ = image[:, :, k]
        tags = {
            "0008|0016": "1.2.840.10008.5.1.4.1.1.4",
            "0008|0018": f"{series_uid}.{k + 1}",
            "0008|0060": "MR",
            "0008|103e": description,
            "0010|0020": "case",
            "0020|000d": "1.2.826.0.1.3680043.8.498.1",
            "0020|000e": series_uid,
            "0020|0052": "1.2.826.0.1.3680043.8.498.2",
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k))),
            "0020|0037": "\\".join(str(v) for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
        }
        for tag, value in tags.items():
            slice_.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"IM{k + 1:04d}.dcm"))
        writer.Execute(slice_)
    return folder


def input_forms(case_dir: Path, root: Path, dicom: bool = True) -> dict[str, tuple[list[Path], tuple[str, ...]]]:
    """The same case in every input form: {form: (inputs, channel names in the order the input holds them)}."""
    case = case_dir.name
    files = {m: case_dir / f"{case}_{m}.nii.gz" for m in BRATS.modalities}
    forms: dict[str, tuple[list[Path], tuple[str, ...]]] = {"brats folder": ([case_dir], BRATS.modalities)}
    scrambled = ("flair", "t2", "t1", "t1ce")
    forms["per-modality files"] = ([files[m] for m in scrambled], scrambled)
    reference = nib.load(files["t1"])
    stacked = np.stack([np.asarray(nib.load(files[m]).dataobj) for m in MSD_ORDER], -1)
    msd = root / "Task01_BrainTumour"
    (msd / "imagesTs").mkdir(parents=True)
    (msd / "dataset.json").write_text(json.dumps({"modality": MSD_CHANNELS, "labels": {"0": "background"}}))
    nib.save(nib.Nifti1Image(stacked, reference.affine), msd / "imagesTs" / f"{case}.nii.gz")
    forms["MSD 4-D file + dataset.json"] = ([msd / "imagesTs" / f"{case}.nii.gz"], tuple(MSD_CHANNELS.values()))
    nnunet = root / "Dataset001_BrainTumour"
    (nnunet / "imagesTs").mkdir(parents=True)
    meta = {"channel_names": MSD_CHANNELS, "labels": {"background": 0, "edema": 1}, "file_ending": ".nii.gz"}
    (nnunet / "dataset.json").write_text(json.dumps(meta))
    for index, modality in enumerate(MSD_ORDER):
        nib.save(nib.load(files[modality]), nnunet / "imagesTs" / f"{case}_{index:04d}.nii.gz")
    forms["nnU-Net folder"] = ([nnunet], tuple(MSD_CHANNELS.values()))
    turned = root / "permuted" / case
    turned.mkdir(parents=True)
    for path in files.values():
        nib.save(nib.load(path).as_reoriented(PERMUTE_FLIP), turned / path.name)
    forms["permuted + flipped grid"] = ([turned], BRATS.modalities)
    if dicom:
        import SimpleITK as sitk

        descriptions = {"t1": "AX T1 pre", "t1ce": "AX T1 POST GD", "t2": "T2 TSE", "flair": "T2 FLAIR"}
        for index, modality in enumerate(scrambled):
            image = sitk.Cast(sitk.ReadImage(str(files[modality])), sitk.sitkInt16)
            write_dicom_series(image, root / "dicom" / case / modality, descriptions[modality], f"1.2.3.4.{index}")
        in_folder_order = tuple(descriptions[m] for m in sorted(scrambled))  # series are listed by subfolder
        forms["DICOM case (4 series)"] = ([root / "dicom" / case], in_folder_order)
    return forms


# ---------------------------------------------------------------------------------------------- fast, synthetic


class Directional(nn.Module):
    """A model that is not invariant to flips or axis permutations: a fixed random 3x3x3 convolution, 4 classes."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv3d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * 5


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    write_1mm_case(root / "raw", "t1")
    return preprocess_dataset(root / "raw", BRATS, root / "cache", PreprocessConfig(target_spacing=(2.0, 2.0, 2.0)))


def test_every_form_reaches_the_model_with_its_channels_and_orientation(tmp_path, plans):
    folder, _ = write_1mm_case(tmp_path / "in", "p1")
    metadata = inference_metadata(plans, (16, 16, 16))
    assert metadata["orientation"] == "".join(nib.aff2axcodes(nib.load(folder / "p1_t1.nii.gz").affine))
    predictor = Predictor3D(Directional(), metadata, PredictConfig(mirror_axes=()))
    forms = input_forms(folder, tmp_path / "forms")
    outputs = {}
    for form, (inputs, names) in forms.items():
        (case,) = input_cases(inputs, BRATS)
        assert case.case_id == "p1", form  # named after the case, never after a file (`p1_flair`)
        assert case.channels == names, form
        outputs[form] = predictor.predict_to_file(case, tmp_path / "out" / form.replace(" ", "_"))
        assert outputs[form].name == "p1.nii.gz"
    reference, affine = canonical(outputs["brats folder"])
    assert len(np.unique(reference)) > 1
    for form, out in outputs.items():
        labels, form_affine = canonical(out)
        np.testing.assert_allclose(form_affine, affine, atol=1e-4, err_msg=form)
        np.testing.assert_array_equal(labels, reference, err_msg=form)  # exact: no resampling on any path
    # with mirror TTA too: the permuted grid reaches the model as the same array, so the labels are the same
    tta = Predictor3D(Directional(), metadata, PredictConfig(mirror_axes=(0, 1, 2)))
    with_tta = {}
    for form in ("brats folder", "permuted + flipped grid"):
        (case,) = input_cases(forms[form][0], BRATS)
        with_tta[form] = canonical(tta.predict_to_file(case, tmp_path / "tta" / form.replace(" ", "_")))[0]
    np.testing.assert_array_equal(with_tta["brats folder"], with_tta["permuted + flipped grid"])
    # the output lies on the input's grid exactly: the permuted input's own shape and affine
    turned = nib.load(forms["permuted + flipped grid"][0][0] / "p1_t1.nii.gz")
    written = nib.load(outputs["permuted + flipped grid"])
    assert written.shape == turned.shape
    np.testing.assert_array_equal(written.affine, turned.affine)


def test_without_reorientation_a_permuted_grid_would_predict_differently(tmp_path, plans):
    """The check above has teeth: a model trained in another orientation sees a different input."""
    folder, _ = write_1mm_case(tmp_path / "in", "p1")
    as_ras = {**inference_metadata(plans, (16, 16, 16)), "orientation": "RAS"}
    lps = inference_metadata(plans, (16, 16, 16))
    assert lps["orientation"] != "RAS"
    (case,) = input_cases([folder], BRATS)
    a = Predictor3D(Directional(), as_ras, PredictConfig(mirror_axes=())).predict_case(case)[0]
    b = Predictor3D(Directional(), lps, PredictConfig(mirror_axes=())).predict_case(case)[0]
    assert a.shape == b.shape and (a != b).mean() > 0.01


def test_a_bare_4d_file_needs_its_channel_names(tmp_path, plans):
    folder, _ = write_1mm_case(tmp_path / "in", "p1")
    stacked = np.stack([np.asarray(nib.load(folder / f"p1_{m}.nii.gz").dataobj) for m in MSD_ORDER], -1)
    bare = tmp_path / "bare" / "p1.nii.gz"
    bare.parent.mkdir()
    nib.save(nib.Nifti1Image(stacked, nib.load(folder / "p1_t1.nii.gz").affine), bare)
    with pytest.raises(ValueError, match=r"--modalities"):
        input_cases([bare], BRATS)
    (case,) = input_cases([bare], BRATS, names=("FLAIR", "T1", "T1ce", "T2"))
    assert [src.channel for src in case.images] == [1, 2, 3, 0]  # t1, t1ce, t2, flair of the model
    with pytest.raises(ValueError, match=r"--modalities"):
        input_cases([bare], BRATS, names=("FLAIR", "T1", "T2"))  # three names for four channels
    # per-modality files without modality names are refused the same way
    plain = [tmp_path / "plain" / f"scan{i}.nii.gz" for i in range(4)]
    for index, path in enumerate(plain):
        path.parent.mkdir(exist_ok=True)
        nib.save(nib.load(folder / f"p1_{BRATS.modalities[index]}.nii.gz"), path)
    with pytest.raises(ValueError, match=r"--modalities"):
        input_cases(plain, BRATS)
    (case,) = input_cases(plain[::-1], BRATS, names=("flair", "t2", "t1ce", "t1"))
    assert [src.path for src in case.images] == plain


def test_channel_names_across_conventions():
    model = ("t1", "t1ce", "t2", "flair")
    assert channel_order(("FLAIR", "T1w", "T1gd", "T2w"), model, "msd") == (1, 2, 3, 0)
    assert channel_order(("t1n", "t1c", "t2w", "t2f"), model, "brats2023") == (0, 1, 2, 3)
    assert channel_order(("flair", "t1", "t1ce", "t2"), ("T1w", "T1gd", "T2w", "FLAIR"), "x") == (1, 2, 3, 0)
    with pytest.raises(ValueError, match="more than one"):
        channel_order(("t1", "t1", "t2", "flair"), model, "x")
    with pytest.raises(ValueError, match="--modalities"):
        channel_order(("CT", "PET", "a", "b"), model, "x")


def test_prediction_uses_the_checkpoint_defaults_unless_given(plans):
    metadata = {**inference_metadata(plans, (16, 16, 16)), "inference": {"overlap": 0.25, "mirror_axes": [2]}}
    window = Predictor3D(Threshold(), metadata).window  # on the CPU: the recorded overlap, mirror TTA off
    assert (window.overlap, window.mirror_axes) == (0.25, ())
    assert default_mirror_axes(None, metadata["inference"], torch.device("cuda")) == (2,)  # on a GPU: recorded
    window = Predictor3D(Threshold(), metadata, PredictConfig(overlap=0.5, mirror_axes=(0, 1))).window
    assert (window.overlap, window.mirror_axes) == (0.5, (0, 1))
    window = Predictor3D(Threshold(), inference_metadata(plans, (16, 16, 16))).window  # none recorded
    assert (window.overlap, window.mirror_axes) == (0.5, ())
    assert default_mirror_axes(None, {}, torch.device("cuda")) == (0, 1, 2)


def test_command_line_defaults_come_from_the_checkpoint(tmp_path, plans, monkeypatch):
    from rwkvseg.checkpoint import CheckpointMeta, save_checkpoint
    from rwkvseg.cli import main

    seen = []
    original = Predictor3D.__init__

    def spy(self, model, metadata, options=None):
        original(self, model, metadata, options)
        seen.append((self.window.overlap, self.window.mirror_axes))

    monkeypatch.setattr(Predictor3D, "__init__", spy)
    monkeypatch.setattr("rwkvseg.checkpoint.build_model", lambda meta: Threshold())
    metadata = {**inference_metadata(plans, (16, 16, 16)), "inference": {"overlap": 0.25, "mirror_axes": []}}
    save_checkpoint(tmp_path / "ckpt", Threshold(), CheckpointMeta("threshold", 4, 4, preprocessing=metadata))
    write_1mm_case(tmp_path / "in", "p1")
    assert main(["predict", str(tmp_path / "ckpt"), str(tmp_path / "in"), "--out", str(tmp_path / "a")]) == 0
    args = ["--out", str(tmp_path / "b"), "--overlap", "0.5", "--mirror-axes", "1"]
    assert main(["predict", str(tmp_path / "ckpt"), str(tmp_path / "in"), *args]) == 0
    assert seen == [(0.25, ()), (0.5, (1,))]


def test_empty_images_ts_falls_back_to_images_tr_with_a_warning(tmp_path, caplog):
    folder, _ = write_1mm_case(tmp_path / "in", "p1")
    forms = input_forms(folder, tmp_path / "forms", dicom=False)
    root = forms["nnU-Net folder"][0][0]
    (root / "imagesTs").rename(root / "imagesTr")
    (root / "imagesTs").mkdir()
    with caplog.at_level("WARNING"):
        (case,) = input_cases([root], BRATS)
    assert case.images[0].path.parent == root / "imagesTr"
    assert "imagesTs is empty" in caplog.text


def test_label_and_region_names_from_dataset_json_are_safe_columns(tmp_path):
    meta = {"channel_names": {"0": "T1"}, "labels": {"background": 0, "whole tumor": 1, "necrotic core": 2}}
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    spec = spec_from_dataset_json(tmp_path / "dataset.json")
    assert spec.region_names == ("whole_tumor", "necrotic_core")
    assert safe_name(" enhancing  tumour/ET ") == "enhancing_tumour_ET"
    v1 = {"modality": {"0": "CT"}, "labels": {"0": "background", "1": "liver", "2": "liver tumour"}}
    (tmp_path / "dataset.json").write_text(json.dumps(v1))
    assert spec_from_dataset_json(tmp_path / "dataset.json").region_names == ("liver", "liver_tumour")


# ----------------------------------------------------------------------------------- the released model, real case


@pytest.mark.slow  # six released-model predictions: ~3.5 CPU minutes (~1 min alone on 2 cores)
def test_released_model_gives_the_same_labels_from_every_input_form(brats_2mm, tmp_path):
    """Done criterion of issue 19 on a real BraTS 2018 case (2 mm), the released model without mirror TTA: the same
    labels in world space from every form. Tolerance without TTA: exact equality (Dice 1.0) is asserted, since
    every path hands the model the same array (orientation changes permute axes without resampling, DICOM int16
    holds the uint8 intensities exactly); the checkpoint records no orientation, so LPS (BraTS) is assumed."""
    pytest.importorskip("SimpleITK")
    pytest.importorskip("pydicom")
    from rwkvseg.released import released_checkpoint, released_models

    name = "mmsegrwkv_small-brats2018"
    if name not in [m.name for m in released_models()]:
        pytest.skip("the released 3D model is not shipped in this install")
    case = "Brats18_2013_23_1"
    predictor = Predictor3D.from_checkpoint(released_checkpoint(name), PredictConfig(mirror_axes=()))
    assert predictor.orientation == "LPS"
    outputs = {}
    for form, (inputs, names) in input_forms(brats_2mm / case, tmp_path / "forms").items():
        (found,) = input_cases(inputs, predictor.spec)
        assert found.case_id == case and found.channels == names
        outputs[form] = predictor.predict_to_file(found, tmp_path / "out" / form.replace(" ", "_"))
    reference, _ = canonical(outputs["brats folder"])
    assert set(np.unique(reference)) == {0, 1, 2, 4}
    for form, out in outputs.items():
        dice = region_dice(canonical(out)[0], reference)
        assert min(dice.values()) == 1.0, (form, dice)


def test_dicom_case_predicts_and_writes_a_dicom_seg(tmp_path, plans, monkeypatch):
    pytest.importorskip("SimpleITK")
    pydicom = pytest.importorskip("pydicom")
    pytest.importorskip("highdicom")
    from rwkvseg.checkpoint import CheckpointMeta, save_checkpoint

    folder, _ = write_1mm_case(tmp_path / "in", "p1")
    forms = input_forms(folder, tmp_path / "forms")
    dicom_case = forms["DICOM case (4 series)"][0][0]
    metadata = inference_metadata(plans, (16, 16, 16))
    save_checkpoint(tmp_path / "ckpt", Threshold(), CheckpointMeta("threshold", 4, 4, preprocessing=metadata))
    monkeypatch.setattr("rwkvseg.checkpoint.build_model", lambda meta: Threshold())
    (nifti,) = predict_paths(tmp_path / "ckpt", [dicom_case], tmp_path / "nifti", PredictConfig(mirror_axes=()))
    assert nifti.name == "p1.nii.gz"  # NIfTI stays the default
    labels, _ = canonical(nifti)
    (from_nifti,) = predict_paths(tmp_path / "ckpt", [folder], tmp_path / "ref", PredictConfig(mirror_axes=()))
    np.testing.assert_array_equal(labels, canonical(from_nifti)[0])
    assert region_dice(labels, canonical(folder / "p1_seg.nii.gz")[0])["WT"] > 0.9
    options = PredictConfig(mirror_axes=(), out_format="dicom-seg")
    (seg_file,) = predict_paths(tmp_path / "ckpt", [dicom_case], tmp_path / "seg", options)
    assert seg_file.name == "p1.dcm"
    ds = pydicom.dcmread(seg_file)
    assert ds.Modality == "SEG"
    referenced = {item.SeriesInstanceUID for item in ds.ReferencedSeriesSequence}
    t1 = pydicom.dcmread(next((dicom_case / "t1").iterdir()), stop_before_pixels=True)
    assert referenced == {t1.SeriesInstanceUID}  # the first modality's series (t1)
    assert [s.SegmentLabel for s in ds.SegmentSequence] == list(BRATS.region_names)
    with pytest.raises(ValueError, match="dicom-seg needs DICOM"):
        predict_paths(tmp_path / "ckpt", [folder], tmp_path / "bad", options)


def test_command_line_names_the_channels_of_a_bare_4d_file(tmp_path, plans, monkeypatch, capsys):
    from rwkvseg.checkpoint import CheckpointMeta, save_checkpoint
    from rwkvseg.cli import main

    folder, _ = write_1mm_case(tmp_path / "in", "p1")
    stacked = np.stack([np.asarray(nib.load(folder / f"p1_{m}.nii.gz").dataobj) for m in MSD_ORDER], -1)
    bare = tmp_path / "bare" / "p1.nii.gz"
    bare.parent.mkdir()
    nib.save(nib.Nifti1Image(stacked, nib.load(folder / "p1_t1.nii.gz").affine), bare)
    metadata = {**inference_metadata(plans, (16, 16, 16)), "inference": {"overlap": 0.5, "mirror_axes": []}}
    save_checkpoint(tmp_path / "ckpt", Threshold(), CheckpointMeta("threshold", 4, 4, preprocessing=metadata))
    monkeypatch.setattr("rwkvseg.checkpoint.build_model", lambda meta: Threshold())
    ckpt = str(tmp_path / "ckpt")
    assert main(["predict", ckpt, str(bare), "--out", str(tmp_path / "a")]) == 2
    assert "--modalities" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    args = ["--out", str(tmp_path / "a"), "--modalities", "FLAIR,T1,T1ce,T2"]
    assert main(["predict", ckpt, str(bare), *args]) == 0
    assert main(["predict", ckpt, str(folder), "--out", str(tmp_path / "b")]) == 0
    np.testing.assert_array_equal(
        canonical(tmp_path / "a" / "p1.nii.gz")[0], canonical(tmp_path / "b" / "p1.nii.gz")[0]
    )


@pytest.mark.parametrize(
    "content, message",
    [
        ({}, "no cases found under"),
        ({"scan.nii.gz": None, "notes.txt": b"not DICOM"}, "no cases found under"),
        ({"t1/IM0001": bytes(128) + b"DICM" + bytes(16)}, "install the extra: pip install 'rwkvseg[dicom]'"),
    ],
    ids=["empty folder", "NIfTI folder", "DICOM Part-10 file"],
)
def test_without_pydicom_predict_asks_for_the_extra_only_for_dicom(
    tmp_path, plans, monkeypatch, capsys, content, message
):
    from rwkvseg.checkpoint import CheckpointMeta, save_checkpoint
    from rwkvseg.cli import main

    folder = tmp_path / "in"
    folder.mkdir()
    for name, data in content.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        if data is None:
            nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.int16), np.eye(4)), folder / name)
        else:
            (folder / name).write_bytes(data)
    metadata = inference_metadata(plans, (16, 16, 16))
    save_checkpoint(tmp_path / "ckpt", Threshold(), CheckpointMeta("threshold", 4, 4, preprocessing=metadata))
    monkeypatch.setattr("rwkvseg.checkpoint.build_model", lambda meta: Threshold())
    monkeypatch.setitem(sys.modules, "pydicom", None)  # an install without the dicom extra
    assert main(["predict", str(tmp_path / "ckpt"), str(folder), "--out", str(tmp_path / "out")]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("rwkvseg: error: ") and message in line
    assert not (tmp_path / "out").exists()
