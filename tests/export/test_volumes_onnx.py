"""3D prediction with onnxruntime (`rwkvseg predict EXPORT.onnx CASE --runtime onnx`): a hand-built 1x1x1
convolution with a 3D record gives the same label volume, on the same grid, as the checkpoint path with the same
network in torch."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from tests.export.test_runtime import conv_file  # noqa: E402
from tests.infer.test_predict3d import write_1mm_case  # noqa: E402

from rwkvseg.cli import main  # noqa: E402
from rwkvseg.data.preprocess3d import PreprocessConfig, preprocess_dataset  # noqa: E402
from rwkvseg.data.specs import dataset_spec  # noqa: E402
from rwkvseg.export.onnx import ExportRecord  # noqa: E402
from rwkvseg.export.runtime import OnnxPredictor  # noqa: E402
from rwkvseg.export.volumes import predict_volumes  # noqa: E402
from rwkvseg.infer.predict import PredictConfig  # noqa: E402
from rwkvseg.infer.predict3d import Predictor3D, predict_cases  # noqa: E402
from rwkvseg.records import inference_metadata  # noqa: E402
from writers import save_conv_onnx  # noqa: E402

PATCH = (16, 16, 16)


def conv3d_file(path, weight, bias, preprocessing, axes=PATCH, activation="softmax", class_names=()):
    k, c = weight.shape[:2]
    record = ExportRecord(
        "tiny3d", 3, c, k, tuple(axes), activation, {"kind": "test"}, preprocessing=preprocessing,
        class_names=tuple(class_names),
    )  # fmt: skip
    save_conv_onnx(path, weight, bias, record)
    return record


def conv3d(weight, bias):
    conv = torch.nn.Conv3d(weight.shape[1], weight.shape[0], 1)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(weight))
        conv.bias.copy_(torch.from_numpy(bias))
    return conv


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(onnx file, the same 1x1x1 convolution in torch, its 3D metadata) for a 2 mm BraTS-style cache."""
    root = tmp_path_factory.mktemp("onnx3d")
    write_1mm_case(root / "raw", "t1")
    plans = preprocess_dataset(root / "raw", dataset_spec("brats"), root / "cache", PreprocessConfig((2.0,) * 3))
    metadata = inference_metadata(plans, patch_size=PATCH)
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((4, 4, 1, 1, 1)).astype(np.float32)
    bias = np.array([0.5, -0.2, 0.1, -0.4], np.float32)
    conv3d_file(root / "tiny3d.onnx", weight, bias, metadata)
    return root / "tiny3d.onnx", conv3d(weight, bias), metadata


def test_onnx_volumes_equal_the_torch_path_on_the_input_grid(exported, tmp_path):
    path, conv, metadata = exported
    folder, _ = write_1mm_case(tmp_path / "in")
    options = PredictConfig(mirror_axes=(0, 2), overlap=0.5)
    (ours,) = predict_volumes(path, [folder], tmp_path / "onnx", options)
    (ref,) = predict_cases(Predictor3D(conv, metadata, options), [folder], tmp_path / "torch")
    written, source = nib.load(ours), nib.load(folder / "p1_flair.nii.gz")
    assert written.shape == source.shape
    np.testing.assert_array_equal(written.affine, source.affine)
    labels = np.asarray(written.dataobj)
    assert len(np.unique(labels)) > 1  # the comparison below is not between two empty volumes
    np.testing.assert_array_equal(labels, np.asarray(nib.load(ref).dataobj))


def test_predict_command_runs_a_3d_export_and_a_2d_export_is_refused(exported, tmp_path, capsys):
    path, _, _ = exported
    folder, _ = write_1mm_case(tmp_path / "in")
    assert main(["predict", str(path), str(folder), "--out", str(tmp_path / "out"), "--runtime", "onnx"]) == 0
    assert "wrote 1 label volumes" in capsys.readouterr().out
    assert (tmp_path / "out" / "p1.nii.gz").is_file()
    flat = tmp_path / "tiny2d.onnx"
    conv_file(flat, np.ones((1, 3, 1, 1), np.float32), np.zeros(1, np.float32))
    with pytest.raises(ValueError, match="is a 2D export; 3D prediction needs"):
        predict_volumes(flat, [folder], tmp_path / "x", PredictConfig())
    assert not (tmp_path / "x").exists()


def test_a_region_model_reads_its_channels_as_the_checkpoint_does(tmp_path):
    """Sigmoid per region (WT, TC, ET): the record keeps the regions in channel order, so onnxruntime paints the same
    labels as torch (a record written with sorted keys read ET as WT and could not paint: session 26's bug)."""
    write_1mm_case(tmp_path / "raw", "t1")
    plans = preprocess_dataset(
        tmp_path / "raw", dataset_spec("brats"), tmp_path / "cache", PreprocessConfig((2.0,) * 3)
    )
    metadata = inference_metadata(plans, patch_size=PATCH, target="regions")
    assert list(metadata["dataset"]["regions"]) == ["WT", "TC", "ET"]
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((3, 4, 1, 1, 1)).astype(np.float32)
    bias = np.array([0.3, -0.1, -0.6], np.float32)
    record = conv3d_file(
        tmp_path / "r.onnx", weight, bias, metadata, activation="sigmoid", class_names=("WT", "TC", "ET")
    )
    assert list(ExportRecord.from_json(record.to_json()).preprocessing["dataset"]["regions"]) == ["WT", "TC", "ET"]
    folder, _ = write_1mm_case(tmp_path / "in")
    options = PredictConfig(overlap=0.5)
    (ours,) = predict_volumes(tmp_path / "r.onnx", [folder], tmp_path / "onnx", options)
    (ref,) = predict_cases(Predictor3D(conv3d(weight, bias), metadata, options), [folder], tmp_path / "torch")
    labels = np.asarray(nib.load(ours).dataobj)
    assert set(np.unique(labels)) > {0}  # regions were painted, not an empty volume
    np.testing.assert_array_equal(labels, np.asarray(nib.load(ref).dataobj))


def test_a_region_record_written_with_sorted_keys_is_read_in_channel_order(tmp_path):
    """Files exported before the fix: json with sorted keys put the regions as ET, TC, WT; class_names (the output
    channels) give their order back, to the record and to onnxruntime's reader. Labels records are left as they are."""
    regions = {"WT": [1, 2, 4], "TC": [1, 4], "ET": [4]}
    pre = {"target": "regions", "dataset": {**dataset_spec("brats").to_dict(), "regions": regions}}
    record = ExportRecord(
        "m", 3, 4, 3, PATCH, "sigmoid", {"kind": "test"}, preprocessing=pre, class_names=tuple(regions)
    )
    old = json.dumps(json.loads(record.to_json()), sort_keys=True)
    assert list(json.loads(old)["preprocessing"]["dataset"]["regions"]) == ["ET", "TC", "WT"]
    read = ExportRecord.from_json(old)
    assert read == record and list(read.preprocessing["dataset"]["regions"]) == ["WT", "TC", "ET"]
    conv3d_file(tmp_path / "old.onnx", np.ones((3, 4, 1, 1, 1), np.float32), np.zeros(3, np.float32), pre)
    model = onnx.load(str(tmp_path / "old.onnx"))
    model.metadata_props[0].value = old  # as an earlier rwkvseg wrote it
    onnx.save_model(model, str(tmp_path / "old.onnx"))
    assert list(OnnxPredictor(tmp_path / "old.onnx").preprocessing["dataset"]["regions"]) == ["WT", "TC", "ET"]
    labels = ExportRecord("m", 3, 4, 4, PATCH, "softmax", {"kind": "test"}, preprocessing={**pre, "target": "labels"})
    sorted_labels = ExportRecord.from_json(json.dumps(json.loads(labels.to_json()), sort_keys=True))
    assert list(sorted_labels.preprocessing["dataset"]["regions"]) == ["ET", "TC", "WT"]  # not a region record


def test_onnx_volumes_write_the_torch_paths_probabilities(tmp_path, capsys):
    """`rwkvseg predict EXPORT.onnx CASE --runtime onnx --probabilities`: the same probability file (4-D 8-bit
    NIfTI, one channel per region, on the input's grid) as the checkpoint path with the same network."""
    write_1mm_case(tmp_path / "raw", "t1")
    plans = preprocess_dataset(
        tmp_path / "raw", dataset_spec("brats"), tmp_path / "cache", PreprocessConfig((2.0,) * 3)
    )
    metadata = inference_metadata(plans, patch_size=PATCH, target="regions")
    rng = np.random.default_rng(4)
    weight = rng.standard_normal((3, 4, 1, 1, 1)).astype(np.float32)
    bias = np.array([0.2, -0.3, -0.5], np.float32)
    conv3d_file(tmp_path / "r.onnx", weight, bias, metadata, activation="sigmoid", class_names=("WT", "TC", "ET"))
    folder, _ = write_1mm_case(tmp_path / "in")
    argv = ["predict", str(tmp_path / "r.onnx"), str(folder), "--out", str(tmp_path / "onnx"), "--runtime", "onnx"]
    assert main([*argv, "--probabilities"]) == 0
    assert "wrote 1 label volumes" in capsys.readouterr().out
    options = PredictConfig(overlap=0.5, probabilities=True)
    predict_cases(Predictor3D(conv3d(weight, bias), metadata, options), [folder], tmp_path / "torch")
    got, expected = (nib.load(tmp_path / k / "probabilities" / "p1.nii.gz") for k in ("onnx", "torch"))
    source = nib.load(folder / "p1_flair.nii.gz")
    assert got.shape == (*source.shape, 3)
    np.testing.assert_array_equal(got.affine, source.affine)
    values = np.asarray(got.dataobj)
    assert len(np.unique(np.round(values * 255))) > 10  # probabilities, not labels
    assert np.abs(values - np.asarray(expected.dataobj)).max() <= 1 / 255 + 1e-6  # 8-bit steps of equal values
