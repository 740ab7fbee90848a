import logging

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from rwkvseg.checkpoint import CheckpointMeta, save_checkpoint
from rwkvseg.export.onnx import ExportRecord, build_record, export_onnx, export_program, load_source
from rwkvseg.export.runtime import OnnxPredictor
from rwkvseg.export.verify import TOLERANCE, verify_onnx
from rwkvseg.models import create_model

SWIN_TINY = {"feature_size": 12, "depths": (1, 1, 1, 1)}  # the smallest SwinUNETR MONAI builds (12 | feature_size)


@pytest.mark.slow  # one 3D export takes minutes on a shared 2-core machine
def test_mmsegrwkv_exports_with_dynamic_batch_and_in_plane_size(tmp_path):
    loaded = load_source("mmsegrwkv_test")
    record = export_onnx(loaded, tmp_path / "m.onnx")
    assert record.dims == 3 and record.activation == "softmax"
    assert record.axes == (64, {"multiple": 32, "min": 64}, {"multiple": 32, "min": 64})
    rows = verify_onnx(tmp_path / "m.onnx", loaded)
    assert len(rows) >= 2
    for row in rows:
        assert row.max_abs_diff <= TOLERANCE and row.dice >= 0.999, row
    with pytest.raises(ValueError, match="exactly 64"):
        OnnxPredictor(tmp_path / "m.onnx").predict_batch(np.zeros((1, 4, 32, 64, 64), np.float32))


def test_swinunetr_is_exported_static_at_its_patch_size_when_dynamic_axes_are_asked(tmp_path, caplog):
    """Dynamic spatial axes never finished for SwinUNETR (sympy on its window padding): static in space, batch
    still dynamic, at the checkpoint's patch size (~25 s: torch.export only, no ONNX conversion)."""
    torch.manual_seed(0)
    model = create_model("swinunetr", 2, 3, **SWIN_TINY).eval()
    meta = CheckpointMeta("swinunetr", 2, 3, model_overrides=SWIN_TINY, preprocessing={"patch_size": [64, 32, 32]})
    save_checkpoint(tmp_path / "ckpt", model, meta)
    loaded = load_source(tmp_path / "ckpt")
    with caplog.at_level(logging.INFO, logger="rwkvseg.export.onnx"):
        ep, example, axes = export_program(loaded)  # dynamic=True, the default
    assert "swinunetr is exported static at 64x32x32" in caplog.text and "--size" in caplog.text
    assert axes == (64, 32, 32) and example.shape[2:] == (64, 32, 32)
    record = ExportRecord.from_json(build_record(loaded, axes, 20).to_json())
    assert all(isinstance(a, int) for a in record.axes)
    x = torch.randn(1, 2, 64, 32, 32)  # another batch size than the example's 2
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), model(x))
    with pytest.raises(Exception, match="64"):
        ep.module()(torch.randn(1, 2, 96, 32, 32))


@pytest.mark.slow  # export + onnxruntime check at 96^3: about a minute on a shared 2-core machine
def test_registered_swinunetr_exports_static_at_96_cubed_and_matches(tmp_path):
    loaded = load_source("swinunetr", in_channels=2, num_classes=3, overrides=SWIN_TINY)
    record = export_onnx(loaded, tmp_path / "s.onnx")
    assert record.axes == (96, 96, 96)
    # by name, as `rwkvseg export --verify` does: rebuilt with the record's channels and overrides
    rows = verify_onnx(tmp_path / "s.onnx", "swinunetr", real=False)
    assert {r.shape for r in rows} == {(2, 2, 96, 96, 96), (1, 2, 96, 96, 96)}
    for row in rows:
        assert row.max_abs_diff <= TOLERANCE and row.dice >= 0.999, row
    with pytest.raises(ValueError, match="exactly 96"):
        OnnxPredictor(tmp_path / "s.onnx").predict_batch(np.zeros((1, 2, 64, 96, 96), np.float32))
