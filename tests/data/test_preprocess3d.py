import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from rwkvseg.data.preprocess3d import (
    PreprocessConfig,
    load_cached_case,
    load_plans,
    nonzero_box,
    prepare_for_model,
    preprocess_dataset,
    resample_labels,
)
from rwkvseg.data.specs import dataset_spec
from rwkvseg.data.volumes import discover_cases, load_case
from writers import write_brats_case

SHAPE = (23, 19, 15)  # (i, j, k)
AFFINE = np.array([[-1.0, 0, 0, 10], [0, -1, 0, 20], [0, 0, 1, -3], [0, 0, 0, 1]])
BRAIN = (slice(3, 20), slice(2, 17), slice(2, 13))  # (i, j, k): crop box (k, j, i) = (2..13, 2..17, 3..20)


def write_case(root: Path, case: str, dtype=np.int16, seg_values=(1, 2, 4), seed=0) -> Path:
    spec = dataset_spec("brats")
    rng = np.random.default_rng(seed)
    images = []
    for index in range(len(spec.modalities)):
        data = np.zeros(SHAPE, dtype=dtype)
        data[BRAIN] = (rng.random((17, 15, 11)) * 200 + 20 + 30 * index).astype(dtype)
        images.append(data)
    seg = np.zeros(SHAPE, np.uint8)
    seg[6:14, 5:12, 4:10] = seg_values[1]
    seg[8:12, 7:10, 5:8] = seg_values[0]
    seg[9:11, 8:9, 6:7] = seg_values[2]
    return write_brats_case(root, case, images, seg, spec, AFFINE)


def test_nonzero_box_is_the_union_over_modalities():
    image = np.zeros((2, 9, 8, 7))
    image[0, 2, 3, 4] = 1
    image[1, 5, 1, 6] = -1
    assert nonzero_box(image) == ((2, 1, 4), (6, 4, 7))


def test_resample_labels_keeps_classes_and_shape():
    labels = np.zeros((9, 10, 11), np.uint8)
    labels[2:7, 3:8, 3:9] = 1
    labels[4:5, 5:6, 5:7] = 2
    out = resample_labels(labels, (18, 20, 22), 3)
    assert out.shape == (18, 20, 22) and set(np.unique(out)) == {0, 1, 2}
    assert (out == 1).sum() + (out == 2).sum() == pytest.approx(8 * ((labels > 0).sum()), rel=0.15)


def test_preprocess_crops_normalises_and_records_properties(tmp_path):
    write_case(tmp_path / "raw", "c1")
    plans = preprocess_dataset(tmp_path / "raw", dataset_spec("brats"), tmp_path / "cache")
    assert plans == load_plans(tmp_path / "cache")
    props = plans["cases"]["c1"]
    assert props["original_shape"] == [15, 19, 23]
    assert props["crop_lo"] == [2, 2, 3] and props["crop_hi"] == [13, 17, 20]
    assert props["resampled_shape"] == [11, 15, 17] and plans["target_spacing"] == [1.0, 1.0, 1.0]
    np.testing.assert_allclose(props["original_affine"], AFFINE)
    assert props["storage_dtype"] == "int16"
    case = load_cached_case(tmp_path / "cache", "c1")
    assert case.image.shape == (4, 11, 15, 17) and case.image.dtype == np.float32
    np.testing.assert_allclose(case.image.reshape(4, -1).mean(1), 0, atol=1e-5)
    np.testing.assert_allclose(case.image.reshape(4, -1).std(1), 1, atol=1e-4)
    original = load_case(discover_cases(tmp_path / "raw", dataset_spec("brats"))[0], dataset_spec("brats"))
    np.testing.assert_array_equal(case.label, original.label[2:13, 2:17, 3:20])
    for cls, coords in case.foreground.items():
        assert len(coords) == (case.label == cls).sum()
        assert (case.label[tuple(coords.T)] == cls).all()


def test_resampling_to_a_coarser_spacing_and_predict_time_preprocessing_match_the_cache(tmp_path):
    write_case(tmp_path / "raw", "c1", dtype=np.float32)
    spec = dataset_spec("brats")
    config = PreprocessConfig(target_spacing=(2.0, 2.0, 2.0), fg_samples_per_class=5)
    plans = preprocess_dataset(tmp_path / "raw", spec, tmp_path / "cache", config)
    props = plans["cases"]["c1"]
    assert props["resampled_shape"] == [6, 8, 8] and props["storage_dtype"] == "float16"
    case = load_cached_case(tmp_path / "cache", "c1")
    assert case.image.shape == (4, 6, 8, 8) and set(np.unique(case.label)) <= {0, 1, 2, 3}
    assert all(len(c) <= 5 for c in case.foreground.values())
    image, predict_props = prepare_for_model(load_case(discover_cases(tmp_path / "raw", spec)[0], spec), plans)
    # float16 storage is the only difference between the cache and predict-time preprocessing
    np.testing.assert_allclose(image, case.image, atol=2e-2)
    assert predict_props["crop_lo"] == props["crop_lo"]


def test_uint8_sources_are_cached_losslessly(tmp_path):
    write_case(tmp_path / "raw", "c1", dtype=np.uint8)
    preprocess_dataset(tmp_path / "raw", dataset_spec("brats"), tmp_path / "cache")
    with np.load(tmp_path / "cache" / "c1.npz") as data:
        assert data["image"].dtype == np.uint8
        stored = data["image"][0]
    t1 = nib.load(tmp_path / "raw" / "c1" / "c1_t1.nii.gz").get_fdata()
    np.testing.assert_array_equal(stored, np.swapaxes(t1, 0, 2)[2:13, 2:17, 3:20])


def test_a_bad_case_stops_the_run_and_leaves_no_half_files(tmp_path):
    write_case(tmp_path / "raw", "a_good", seed=1)
    write_case(tmp_path / "raw", "b_bad", seg_values=(1, 2, 3), seed=2)
    with pytest.raises(ValueError, match=r"b_bad_seg.nii.gz holds label values \[3\]"):
        preprocess_dataset(tmp_path / "raw", dataset_spec("brats"), tmp_path / "cache")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["a_good.npz"]
    with np.load(tmp_path / "cache" / "a_good.npz") as data:
        assert data["image"].shape == (4, 11, 15, 17)
    with pytest.raises(FileNotFoundError, match="run `rwkvseg preprocess`"):
        load_plans(tmp_path / "cache")


def test_cache_version_mismatch_is_reported(tmp_path):
    write_case(tmp_path / "raw", "c1")
    preprocess_dataset(tmp_path / "raw", dataset_spec("brats"), tmp_path / "cache")
    plans = json.loads((tmp_path / "cache" / "plans.json").read_text())
    plans["version"] = 0
    (tmp_path / "cache" / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(ValueError, match="preprocess again"):
        load_plans(tmp_path / "cache")


def test_real_brats2018_cache_fits_64_mib(brats_2mm, tmp_path):
    plans = preprocess_dataset(brats_2mm, dataset_spec("brats"), tmp_path)
    assert len(plans["cases"]) == 18 and plans["target_spacing"] == [2.0, 2.0, 2.0]
    size = sum(p.stat().st_size for p in tmp_path.iterdir())
    assert size < 64 * 2**20
    case = load_cached_case(tmp_path, "Brats18_2013_20_1", plans)
    assert case.image.shape[0] == 4 and set(case.foreground) == {1, 2, 3}
    counts = plans["cases"]["Brats18_2013_20_1"]["class_voxels"]
    assert counts[1:] == [8464, 13028, 5160]  # cases.csv: label voxel counts survive the crop
