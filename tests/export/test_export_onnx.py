"""One small U-RWKV export (from a checkpoint with a 2D record) serves the tests marked slow here: one export takes
~1 min on an idle 2-core CPU and ~6 min under load (the ONNX exporter's fake-tensor passes), so they run with
`pytest -m slow tests/export`."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("onnxruntime")

from rwkvseg.checkpoint import CheckpointMeta, save_checkpoint
from rwkvseg.export.onnx import METADATA_KEY, ExportRecord, export_onnx, load_source, read_record, size_rule
from rwkvseg.export.runtime import OnnxPredictor, quantize_int8, resize_bilinear
from rwkvseg.export.verify import TOLERANCE, dice, verify_onnx
from rwkvseg.models import create_model

RECORD = {"channels": 3, "size": [64, 48], "resize": "resize", "normalization": "auto"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    torch.manual_seed(1)
    model = create_model("urwkv_test", 3, 1).eval()
    meta = CheckpointMeta("urwkv_test", 3, 1, preprocessing=RECORD)
    save_checkpoint(folder / "ckpt", model, meta)
    record = export_onnx(folder / "ckpt", folder / "m.onnx", program_path=folder / "m.pt2")
    return folder, model, record


@pytest.mark.slow
def test_record_is_embedded_and_readable_without_torch_models(exported):
    folder, _, record = exported
    assert record.source["kind"] == "checkpoint"
    assert record.axes == ({"multiple": 16, "min": 32}, {"multiple": 16, "min": 32})
    assert record.activation == "sigmoid" and record.preprocessing == RECORD
    assert read_record(folder / "m.onnx") == record
    import onnx

    props = {p.key: p.value for p in onnx.load(str(folder / "m.onnx"), load_external_data=False).metadata_props}
    assert json.loads(props[METADATA_KEY])["model"] == "urwkv_test"
    assert ExportRecord.from_json(props[METADATA_KEY]) == record
    graph = onnx.load(str(folder / "m.onnx")).graph
    assert not [n for n in graph.node if n.op_type == "Cast" and n.attribute[0].i == onnx.TensorProto.DOUBLE]
    assert any(n.op_type == "CumSum" for n in graph.node)  # the Bi-WKV, with float32 sums (|w| T = 5 here)


@pytest.mark.slow
def test_onnx_matches_pytorch_on_random_and_real_inputs(exported):
    folder = exported[0]
    rows = verify_onnx(folder / "m.onnx", load_source(folder / "ckpt"))
    assert {r.shape for r in rows if r.input == "random"} == {(2, 3, 32, 32), (1, 3, 32, 48)}
    for row in rows:
        assert row.max_abs_diff <= TOLERANCE and row.dice >= 0.999, row


@pytest.mark.slow
def test_batch_and_non_square_sizes_run_and_match(exported):
    folder, model, _ = exported
    predictor = OnnxPredictor(folder / "m.onnx", threads=1)
    x = torch.randn(3, 3, 80, 48)
    with torch.no_grad():
        expected = torch.sigmoid(model(x)).numpy()
    assert np.abs(predictor.predict_batch(x.numpy()) - expected).max() <= TOLERANCE


@pytest.mark.slow
def test_predictor_refuses_sizes_the_export_cannot_take(exported):
    predictor = OnnxPredictor(exported[0] / "m.onnx")
    with pytest.raises(ValueError, match=r"multiple of 16.*pad it to 48"):
        predictor.predict_batch(np.zeros((1, 3, 40, 32), np.float32))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        predictor.predict_batch(np.zeros((1, 1, 32, 32), np.float32))


@pytest.mark.slow
def test_image_protocol_equals_the_torch_prediction_path(exported):
    from rwkvseg.infer.predict2d import Preprocessing2D, predict_arrays

    folder, model, _ = exported
    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 256, (57, 71, 3), dtype=np.uint8), rng.integers(0, 256, (30, 90, 3), dtype=np.uint8)]
    pre = Preprocessing2D.from_meta(CheckpointMeta("urwkv_test", 3, 1, preprocessing=RECORD))
    with torch.no_grad():
        expected = predict_arrays(model, [p.astype(np.float32) / 255 for p in pixels], pre)
    got = OnnxPredictor(folder / "m.onnx").predict_images(pixels)
    for g, e, p in zip(got, expected, pixels, strict=True):
        assert g.shape == (1, *p.shape[:2])
        assert np.abs(g - e.numpy()).max() <= 1e-4


def test_resize_matches_torch_interpolate():
    x = np.random.default_rng(0).standard_normal((2, 37, 23)).astype(np.float32)
    for size in ((64, 48), (10, 7), (37, 23)):
        expected = F.interpolate(torch.from_numpy(x)[None], size=size, mode="bilinear", align_corners=False)[0]
        assert np.abs(resize_bilinear(x, size) - expected.numpy()).max() <= 1e-5


@pytest.mark.slow
def test_program_file_runs_without_the_custom_ops(exported):
    folder, model, _ = exported
    program = torch.export.load(str(folder / "m.pt2"))
    assert not any("rwkvseg" in str(n.target) for n in program.graph.nodes)
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_refuses_to_overwrite_and_names_unknown_sources(exported, tmp_path):
    folder = exported[0]
    before = (folder / "m.onnx").read_bytes()
    with pytest.raises(FileExistsError, match="overwrite"):
        export_onnx(folder / "ckpt", folder / "m.onnx")
    assert (folder / "m.onnx").read_bytes() == before
    with pytest.raises(ValueError, match="registered model"):
        export_onnx("no_such_model", tmp_path / "x.onnx")
    assert not list(tmp_path.iterdir())


def test_registered_sources_are_seeded_and_sized_by_dims():
    a, b = load_source("urwkv_test", seed=3), load_source("urwkv_test", seed=3)
    assert (a.dims, a.in_channels, a.num_classes) == (2, 3, 1)
    for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(p, q)
    c = load_source("mmsegrwkv_test")
    assert (c.dims, c.in_channels, c.num_classes) == (3, 4, 4)


@pytest.mark.parametrize(
    "name, rule",
    [
        ("basicunet", (16, 16, 16)),
        ("segresnet", (8, 8, 8)),
        ("dynunet", (32, 32, 32)),
        ("unetr", (0, 0, 0)),
        ("swinunetr", (0, 0, 0)),
    ],
)
def test_export_size_rule_of_the_3d_baselines(name, rule):
    """Dynamic axes step by what the model needs: its stride, or the coarsest level that must keep whole voxels
    (BasicUNet pads nothing and checks 1/16; an example at multiples of 1 failed its size check)."""
    model = create_model(name, 4, 4)
    assert size_rule(model, 3) == rule


def test_released_urwkv_is_exported_static_and_the_default_dynamic():
    assert size_rule(create_model("urwkv_test", 3, 1), 2) == (16, 16)
    released = create_model("urwkv_test", 3, 1, token_shift="permutation", dual_transpose_back=False)
    assert released.static_export and size_rule(released, 2) == (0, 0)


@pytest.mark.slow
def test_released_urwkv_exports_static_at_its_input_size_and_matches(tmp_path):
    """U-RWKV as its authors' code runs it takes square maps only: exported static at the record's size."""
    overrides = {"token_shift": "permutation", "dual_transpose_back": False}
    torch.manual_seed(2)
    model = create_model("urwkv_test", 3, 1, **overrides).eval()
    record = {**RECORD, "size": [64, 64]}
    save_checkpoint(tmp_path / "ckpt", model, CheckpointMeta("urwkv_test", 3, 1, overrides, preprocessing=record))
    exported = export_onnx(tmp_path / "ckpt", tmp_path / "m.onnx")
    assert exported.axes == (64, 64) and exported.model_overrides == overrides
    rows = verify_onnx(tmp_path / "m.onnx", load_source(tmp_path / "ckpt"), real=False)
    assert rows and all(r.max_abs_diff < TOLERANCE and r.shape[2:] == (64, 64) for r in rows)


@pytest.mark.slow
def test_int8_weights_keep_the_record_and_the_masks(exported):
    folder, _, record = exported
    out = quantize_int8(folder / "m.onnx", folder / "m_int8.onnx")
    quantized = OnnxPredictor(out)
    assert quantized.record == json.loads(record.to_json())
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 48)).astype(np.float32)
    fp32 = OnnxPredictor(folder / "m.onnx").predict_batch(x)
    int8 = quantized.predict_batch(x)
    assert np.abs(int8 - fp32).max() <= 0.05
    assert dice((int8 >= 0.5).astype(int), (fp32 >= 0.5).astype(int)) >= 0.95
    with pytest.raises(FileExistsError):
        quantize_int8(folder / "m.onnx", out)


def test_dice_counts_every_foreground_label():
    a = np.array([0, 1, 1, 2, 2, 0])
    assert dice(a, a) == 1.0 and dice(np.zeros(3), np.zeros(3)) == 1.0
    assert dice(a, np.array([0, 1, 0, 2, 2, 2])) == pytest.approx((2 / 3 + 4 / 5) / 2)


@pytest.mark.slow
def test_predict_files_writes_masks_at_the_image_size(exported, tmp_path):
    from PIL import Image

    from rwkvseg.export.runtime import predict_files

    rng = np.random.default_rng(2)
    paths = []
    for i, shape in enumerate(((40, 50, 3), (33, 21, 3))):
        paths.append(tmp_path / f"im{i}.png")
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(paths[-1])
    written = predict_files(exported[0] / "m.onnx", paths, tmp_path / "out")
    predictor = OnnxPredictor(exported[0] / "m.onnx")
    for path, mask_path in zip(paths, written, strict=True):
        mask = np.asarray(Image.open(mask_path))
        assert mask.shape == np.asarray(Image.open(path)).shape[:2]
        assert set(np.unique(mask)) <= {0, 255}
        np.testing.assert_array_equal(mask // 255, predictor.predict_mask(path))
    with pytest.raises(FileExistsError):
        predict_files(exported[0] / "m.onnx", paths, tmp_path / "out")


def test_a_released_ensemble_exports_as_one_graph_of_its_members_mean(tmp_path, monkeypatch, capsys):
    """`rwkvseg export NAME` of an ensemble release: one ONNX file whose sigmoid is the mean of the members'
    probabilities, its record naming the release and its member count (members: small CNNs, so that it runs in the
    default suite)."""
    from rwkvseg.cli import main
    from rwkvseg.export.runtime import OnnxPredictor
    from rwkvseg.released import ReleasedModel, export_release, update_index

    record = {"channels": 3, "size": [32, 32], "resize": "resize", "normalization": "auto"}
    weights = tmp_path / "weights"
    for k in range(2):
        torch.manual_seed(k)
        model = create_model("unet_test", 3, 1).eval()
        save_checkpoint(tmp_path / f"run{k}" / "best", model, CheckpointMeta("unet_test", 3, 1, preprocessing=record))
        export_release(tmp_path / f"run{k}" / "best", f"tiny-cv-k{k}", weights)
    update_index(
        ReleasedModel("tiny-cv", "unet_test", "synthetic", "none", members=("tiny-cv-k0", "tiny-cv-k1")), weights
    )
    monkeypatch.setattr("rwkvseg.released.weights_dir", lambda: weights)
    assert main(["export", "tiny-cv", "--out", str(tmp_path / "cv.onnx"), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "tiny-cv" in out and "FAILED" not in out
    predictor = OnnxPredictor(tmp_path / "cv.onnx")
    assert predictor.record["source"] == {"kind": "released", "name": "tiny-cv", "members": 2}
    assert predictor.record["activation"] == "sigmoid" and predictor.record["preprocessing"] == record
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 48), dtype=np.float32)
    probs = torch.sigmoid(torch.from_numpy(predictor.session.run(None, {predictor.input_name: x})[0]))
    with torch.no_grad():  # the members as released (int8 weights, loaded back), each on its own
        loaded = [load_source(weights / f"tiny-cv-k{k}.safetensors").model for k in range(2)]
        each = [torch.sigmoid(m(torch.from_numpy(x))) for m in loaded]
    mean = torch.stack(each).mean(0)
    assert probs.shape == (2, 1, 32, 48) and torch.allclose(probs, mean, atol=TOLERANCE)
    assert not torch.allclose(each[0], each[1], atol=1e-3)  # two different members
