import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from rwkvseg.export.onnx import export_onnx, load_source
from rwkvseg.export.runtime import OnnxPredictor
from rwkvseg.export.verify import TOLERANCE, verify_onnx


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
