"""Prediction with a compiled model (aot_eager on the CPU: the whole trace, eager kernels) writes the masks and
probabilities of eager prediction, and reports the compile time apart."""

import numpy as np
import torch
import torch._dynamo
from PIL import Image

from rwkvseg.checkpoint import CheckpointMeta, save_checkpoint
from rwkvseg.cli import main
from rwkvseg.data.specs import dataset_spec
from rwkvseg.infer.predict import PredictConfig, predict
from rwkvseg.models import create_model
from rwkvseg.records import Preprocessing2D
from writers import save_png

RUNS = ("eager", "compiled")


def test_compiled_prediction_writes_the_eager_masks(tmp_path, caplog):
    torch.manual_seed(0)
    model = create_model("urwkv_test", 3, 1)
    pre = Preprocessing2D(3, (32, 32), "resize", "dtype")
    ck = save_checkpoint(tmp_path / "ck", model, CheckpointMeta("urwkv_test", 3, 1, preprocessing=pre.to_dict()))[0]
    rng = np.random.default_rng(1)
    for i, shape in enumerate([(40, 50), (33, 21), (32, 32)]):
        save_png(tmp_path / "in" / f"x{i}.png", rng.integers(0, 256, (*shape, 3), dtype=np.uint8))
    torch._dynamo.reset()
    eager = PredictConfig(batch_size=3, probabilities=True, compile="off")
    predict(ck, [tmp_path / "in"], tmp_path / "eager", eager)
    with caplog.at_level("INFO", logger="rwkvseg.compiling"):
        code = main(
            [
                "predict",
                str(ck),
                str(tmp_path / "in"),
                "--out",
                str(tmp_path / "compiled"),
                "--batch-size",
                "3",
                "--probabilities",
                "--compile",
                "on",
                "--compile-backend",
                "aot_eager",
            ]
        )
    assert code == 0 and "compiled the model in" in caplog.text
    for i in range(3):
        a, b = (
            np.asarray(Image.open(tmp_path / d / "probabilities" / f"x{i}.png")).astype(int)
            for d in ("eager", "compiled")
        )
        assert np.abs(a - b).max() <= 1  # 8-bit probabilities
        m_a, m_b = (np.asarray(Image.open(tmp_path / d / f"x{i}.png")) for d in RUNS)
        sure = np.abs(a - 127.5) > 2  # pixels not within rounding of the threshold
        assert m_a.shape == m_b.shape and np.array_equal(m_a[sure], m_b[sure]) and sure.mean() > 0.9


def test_a_frozen_compile_matches_eager_and_holds_the_weights_as_constants():
    # Inductor on the CPU: a convolution, an inference BatchNorm (which freezing folds into it) and a GELU
    from rwkvseg.compiling import compile_callable

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.GELU())
    model.eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 16, 16)
    torch._dynamo.reset()
    try:
        frozen = compile_callable(model, "default", freeze=True)
        with torch.inference_mode():
            expected, got = model(x), frozen(x)
            with torch.no_grad():
                model[0].weight.mul_(2)  # after the first call: the frozen graph keeps the weights it folded
            again, changed = frozen(x), model(x)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(again, got) and not torch.allclose(changed, expected)


def test_prediction_freezes_on_the_cpu_and_on_cuda():
    from rwkvseg.compiling import prediction_freezes

    assert prediction_freezes("cpu") and prediction_freezes(torch.device("cpu"))
    assert prediction_freezes("cuda") and prediction_freezes("cuda:0")  # 2D and 3D timed frozen on an H100
    assert not prediction_freezes("mps")  # not timed there


def test_prediction_compiles_frozen_on_the_cpu(monkeypatch, tmp_path):
    import rwkvseg.infer.predict2d as predict2d
    import rwkvseg.infer.predict3d as predict3d

    seen = []

    def spy(fn, setting, device, what, backend="inductor", fullgraph=False, freeze=False):
        seen.append((str(device), freeze))
        return fn

    monkeypatch.setattr(predict2d, "maybe_compile", spy)
    monkeypatch.setattr(predict3d, "maybe_compile", spy)
    model = create_model("urwkv_test", 3, 1)
    pre = Preprocessing2D(3, (32, 32), "resize", "dtype")
    ck = save_checkpoint(tmp_path / "ck", model, CheckpointMeta("urwkv_test", 3, 1, preprocessing=pre.to_dict()))[0]
    save_png(tmp_path / "in" / "x.png", np.zeros((32, 32, 3), dtype=np.uint8))
    predict(ck, [tmp_path / "in"], tmp_path / "out", PredictConfig(compile="on"))
    metadata = {"dims": 3, "dataset": dataset_spec("brats").to_dict(), "target": "labels", "patch_size": [8, 8, 8]}
    predict3d.Predictor3D(torch.nn.Conv3d(4, 4, 1), metadata, PredictConfig(compile="on"))
    assert seen == [("cpu", True), ("cpu", True)]
