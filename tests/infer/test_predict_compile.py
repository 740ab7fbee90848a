"""Prediction with a compiled model (aot_eager on the CPU: the whole trace, eager kernels) writes the masks and
probabilities of eager prediction, and reports the compile time apart."""

import numpy as np
import torch
import torch._dynamo
from PIL import Image

from rwkvseg.checkpoint import CheckpointMeta, save_checkpoint
from rwkvseg.cli import main
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
