import json
from functools import partial
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from rwkvseg.data.specs import DatasetSpec, dataset_spec, spec_from_dataset_json
from rwkvseg.data.volumes import (
    case_from_files,
    discover_cases,
    load_case,
    read_spacing,
    read_volume,
)
from writers import save_nifti
from writers import write_brats_case as write_case

SHAPE = (11, 13, 9)  # (i, j, k) as stored in the file
AFFINE = np.array([[-1.0, 0, 0, 30], [0, -1.2, 0, 40], [0, 0, 2.5, -7], [0, 0, 0, 1]])
save = partial(save_nifti, affine=AFFINE)


def labels(shape=SHAPE, values=(1, 2, 4)) -> np.ndarray:
    seg = np.zeros(shape, dtype=np.uint8)
    seg[3:7, 4:9, 2:6] = values[1]
    seg[4:6, 5:8, 3:5] = values[0]
    seg[5, 6, 4] = values[2]
    return seg


def write_brats(root: Path, case: str, spec: DatasetSpec, seg_values=(1, 2, 4), shape=SHAPE) -> Path:
    rng = np.random.default_rng(0)
    images = [(rng.random(shape) * 100 + 10 * index).astype(np.int16) for index in range(len(spec.modalities))]
    return write_case(root, case, images, labels(shape, seg_values), spec, AFFINE)


def test_presets_paint_the_nested_regions_back():
    assert dataset_spec("brats").paint_values() == (2, 1, 4)
    assert dataset_spec("brats2023").paint_values() == (2, 1, 3)
    assert dataset_spec("msd_task01").paint_values() == (1, 2, 3)
    with pytest.raises(ValueError, match="unknown dataset preset 'bratz'"):
        dataset_spec("bratz")
    with pytest.raises(ValueError, match="not foreground labels"):
        dataset_spec("brats", regions=(("WT", (1, 2, 3)),))
    spec = dataset_spec("brats2023")
    assert DatasetSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_brats_case_folders_load_in_kji_order_with_class_indices(tmp_path):
    spec = dataset_spec("brats")
    write_brats(tmp_path / "HGG", "Brats18_X_1", spec)
    write_brats(tmp_path / "LGG", "Brats18_A_1", spec)
    cases = discover_cases(tmp_path, spec)
    assert [c.case_id for c in cases] == ["Brats18_A_1", "Brats18_X_1"]
    assert [s.path.name for s in cases[0].images] == [f"Brats18_A_1_{m}.nii.gz" for m in spec.modalities]
    case = load_case(cases[0], spec)
    assert case.image.shape == (4, 9, 13, 11)
    assert case.spacing == pytest.approx((2.5, 1.2, 1.0))
    np.testing.assert_allclose(case.affine, AFFINE, atol=1e-6)  # float32 in the header
    expected = np.swapaxes(labels(), 0, 2)
    np.testing.assert_array_equal(case.label, np.array([0, 1, 2, 0, 3])[expected])
    raw = nib.load(cases[0].images[2].path).get_fdata()
    np.testing.assert_array_equal(case.image[2], np.swapaxes(raw, 0, 2))
    assert case.source_dtype == np.int16
    # a single case folder is a dataset of one
    assert [c.case_id for c in discover_cases(tmp_path / "HGG" / "Brats18_X_1", spec)] == ["Brats18_X_1"]


def test_brats2023_naming_and_et_label_3(tmp_path):
    spec = dataset_spec("brats2023")
    write_brats(tmp_path, "BraTS-GLI-00001-000", spec, seg_values=(1, 2, 3))
    (case,) = discover_cases(tmp_path, spec)
    assert case.images[0].path.name == "BraTS-GLI-00001-000-t1n.nii.gz"
    assert case.label.name == "BraTS-GLI-00001-000-seg.nii.gz"
    assert set(np.unique(load_case(case, spec).label)) == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="no brats cases found"):
        discover_cases(tmp_path, dataset_spec("brats"))


def test_msd_task01_4d_files_follow_the_dataset_json_channel_order(tmp_path):
    meta = {"modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}, "labels": {"0": "bg", "1": "edema"}}
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    image = np.stack([np.full(SHAPE, c + 1, dtype=np.float32) for c in range(4)], axis=-1)
    save(tmp_path / "imagesTr" / "BRATS_001.nii.gz", image)
    save(tmp_path / "imagesTr" / "._BRATS_001.nii.gz", image)  # macOS junk in the MSD archive
    save(tmp_path / "labelsTr" / "BRATS_001.nii.gz", labels(values=(2, 1, 3)))
    spec = dataset_spec("msd_task01")
    (case,) = discover_cases(tmp_path, spec)
    loaded = load_case(case, spec)
    # model order t1w, t1gd, t2w, flair = file channels 1, 2, 3, 0
    assert [float(loaded.image[m].mean()) for m in range(4)] == [2.0, 3.0, 4.0, 1.0]
    assert loaded.image.shape == (4, 9, 13, 11)
    # one 4-D file given directly: channels named by the dataset.json one folder up, like the folder (issue 19)
    direct = case_from_files([tmp_path / "imagesTr" / "BRATS_001.nii.gz"], spec)
    assert direct.channels == ("FLAIR", "T1w", "t1gd", "T2w")
    assert [float(load_case(direct, spec).image[m].mean()) for m in range(4)] == [2.0, 3.0, 4.0, 1.0]
    (tmp_path / "dataset.json").unlink()  # a bare 4-D file: refused unless its channels are named
    with pytest.raises(ValueError, match="--modalities"):
        case_from_files([tmp_path / "imagesTr" / "BRATS_001.nii.gz"], spec)
    named = case_from_files([tmp_path / "imagesTr" / "BRATS_001.nii.gz"], spec, names=("t2w", "flair", "t1w", "t1gd"))
    assert [float(load_case(named, spec).image[m].mean()) for m in range(4)] == [3.0, 4.0, 1.0, 2.0]


def test_nnunet_raw_with_v2_dataset_json_and_regions(tmp_path):
    meta = {
        "channel_names": {"0": "CT", "1": "PET"},
        "labels": {"background": 0, "organ": 1, "tumour": 2},
        "file_ending": ".nii.gz",
    }
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    for case in ("case_a", "case_b"):
        for channel in range(2):
            save(tmp_path / "imagesTr" / f"{case}_{channel:04d}.nii.gz", np.full(SHAPE, channel, np.float32))
        save(tmp_path / "labelsTr" / f"{case}.nii.gz", labels(values=(2, 1, 2)))
    spec = spec_from_dataset_json(tmp_path / "dataset.json")
    assert spec.modalities == ("CT", "PET") and spec.label_values == (0, 1, 2)
    assert spec.regions == (("organ", (1,)), ("tumour", (2,)))  # plain labels keep dataset.json's names
    cases = discover_cases(tmp_path, spec)
    assert [c.case_id for c in cases] == ["case_a", "case_b"]
    assert load_case(cases[1], spec).image[1].max() == 1
    meta["labels"] = {"background": 0, "whole": [1, 2], "core": 2}
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    assert spec_from_dataset_json(tmp_path / "dataset.json").regions == (("whole", (1, 2)), ("core", (2,)))
    (tmp_path / "imagesTr" / "case_b_0001.nii.gz").unlink()
    with pytest.raises(ValueError, match="case_b_0001"):
        discover_cases(tmp_path, spec)


def test_itk_formats_read_with_the_same_geometry_as_nifti(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    data = np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE)
    nifti = save(tmp_path / "a.nii.gz", data)
    reference = read_volume(nifti)
    for suffix in (".nrrd", ".mha"):
        sitk.WriteImage(sitk.ReadImage(str(nifti)), str(tmp_path / f"a{suffix}"))
        volume = read_volume(tmp_path / f"a{suffix}")
        np.testing.assert_array_equal(volume.array, reference.array)
        np.testing.assert_allclose(volume.affine, reference.affine, atol=1e-5)
        assert volume.spacing == pytest.approx(reference.spacing)
        assert read_spacing(tmp_path / f"a{suffix}") == pytest.approx(reference.spacing)
    assert read_spacing(nifti) == pytest.approx((2.5, 1.2, 1.0))


# Bad input: each names the offending file and says what to do.


def test_missing_modality_names_the_file(tmp_path):
    spec = dataset_spec("brats")
    folder = write_brats(tmp_path, "c1", spec)
    (folder / "c1_t1ce.nii.gz").unlink()
    with pytest.raises(ValueError, match=r"lacks modality 't1ce' \(c1_t1ce.nii.gz\)"):
        discover_cases(tmp_path, spec)


@pytest.mark.parametrize("what", ["shape", "affine"])
def test_modalities_on_different_grids(tmp_path, what):
    spec = dataset_spec("brats")
    folder = write_brats(tmp_path, "c1", spec)
    if what == "shape":
        save(folder / "c1_t2.nii.gz", np.ones((11, 13, 10), np.int16))
    else:
        save_nifti(folder / "c1_t2.nii.gz", np.ones(SHAPE, np.int16), AFFINE @ np.diag([1, 1, 1.5, 1]))
    (case,) = discover_cases(tmp_path, spec)
    with pytest.raises(ValueError, match=r"(?s)c1_t2.nii.gz has shape .* resample the modalities to one grid"):
        load_case(case, spec)


def test_4d_file_where_3d_expected(tmp_path):
    path = save(tmp_path / "x.nii.gz", np.ones((*SHAPE, 3), np.float32))
    with pytest.raises(ValueError, match=r"x.nii.gz is 4-D with shape \(11, 13, 9, 3\).*msd layout"):
        read_volume(path)
    assert read_volume(save(tmp_path / "y.nii.gz", np.ones((*SHAPE, 1), np.float32))).array.shape == (9, 13, 11)


def test_nan_and_inf_voxels(tmp_path):
    data = np.ones(SHAPE, np.float32)
    data[1, 2, 3] = np.nan
    data[2, 2, 3] = np.inf
    with pytest.raises(ValueError, match=r"nan.nii.gz holds 2 NaN/Inf voxels; replace them"):
        read_volume(save(tmp_path / "nan.nii.gz", data))


def test_wrong_label_values(tmp_path):
    spec = dataset_spec("brats")
    folder = write_brats(tmp_path, "c1", spec, seg_values=(1, 2, 3))  # BraTS 2023 labels in a 2018 set
    (case,) = discover_cases(tmp_path, spec)
    with pytest.raises(ValueError, match=r"c1_seg.nii.gz holds label values \[3\] outside \[0, 1, 2, 4\]"):
        load_case(case, spec)
    assert (folder / "c1_seg.nii.gz").exists()  # nothing touched


def test_real_brats2018_case(brats_2mm):
    spec = dataset_spec("brats")
    cases = discover_cases(brats_2mm, spec)
    assert len(cases) == 18
    case = load_case(cases[0], spec)
    assert case.image.shape == (4, 73, 88, 73) and case.spacing == (2.0, 2.0, 2.0)
    assert case.source_dtype == np.uint8
    assert set(np.unique(case.label)) == {0, 1, 2, 3}


def test_dicom_series_folder(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    array = np.arange(7 * 9 * 11, dtype=np.int16).reshape(7, 9, 11)  # (k, j, i)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.9, 0.8, 2.0))
    image.SetOrigin((-10.0, 5.0, 3.0))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        slice_ = image[:, :, k]
        position = "\\".join(str(v) for v in image.TransformIndexToPhysicalPoint((0, 0, k)))
        tags = {"0008|0060": "MR", "0020|000d": "1.2.3.4", "0020|000e": "1.2.3.4.5", "0020|0013": str(k + 1)}
        tags.update({"0020|0037": "1\\0\\0\\0\\1\\0", "0020|0032": position, "0018|0050": "2.0"})
        for tag, value in tags.items():
            slice_.SetMetaData(tag, value)
        writer.SetFileName(str(tmp_path / f"slice{k:03d}.dcm"))
        writer.Execute(slice_)
    volume = read_volume(tmp_path)
    np.testing.assert_array_equal(volume.array, array)
    assert volume.spacing == pytest.approx((2.0, 0.8, 0.9))
    # DICOM's LPS world turned into nibabel's RAS
    expected = [[-0.9, 0, 0, 10], [0, -0.8, 0, -5], [0, 0, 2, 3], [0, 0, 0, 1]]
    np.testing.assert_allclose(volume.affine, expected, atol=1e-6)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="folder without a DICOM series"):
        read_volume(tmp_path / "empty")
