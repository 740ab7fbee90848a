import pytest
import torch
from serve_support import BRATS, PRE_2D, FlairBall

from rwkvseg.checkpoint import CheckpointMeta, save_checkpoint
from rwkvseg.models import create_model, registry
from rwkvseg.records import inference_metadata
from writers import Bright


@pytest.fixture(scope="module")
def test_models(tmp_path_factory):
    """Checkpoints on disk: a real urwkv_test, the exact 'bright' model and a 3D 'flairball' model."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        real = dict(registry._builders())
        monkeypatch.setattr(registry, "_builders", lambda: {**real, "bright": Bright, "flairball": FlairBall})
        yield _write_checkpoints(tmp_path_factory.mktemp("ckpt"))


def _write_checkpoints(folder):
    torch.manual_seed(0)
    urwkv = save_checkpoint(
        folder / "urwkv", create_model("urwkv_test", 3, 1), CheckpointMeta("urwkv_test", 3, 1, preprocessing=PRE_2D)
    )[0]
    bright = save_checkpoint(
        folder / "bright", Bright(3, 1), CheckpointMeta("bright", 3, 1, preprocessing={**PRE_2D, "size": [16, 16]})
    )[0]
    cut = save_checkpoint(  # the same model recording a cut of 0.9 (sidecar training.threshold)
        folder / "cut",
        Bright(3, 1),
        CheckpointMeta("bright", 3, 1, preprocessing={**PRE_2D, "size": [16, 16]}, training={"threshold": 0.9}),
    )[0]
    plans = {
        "dataset": BRATS.to_dict(),
        "target_spacing": [2.0, 2.0, 2.0],
        "preprocess": {"target_spacing": [2.0, 2.0, 2.0], "crop_nonzero": True},
        "normalisation": "zscore",
    }
    meta3d = CheckpointMeta(
        "flairball", 4, 4, preprocessing=inference_metadata(plans, (16, 16, 16)), spacing=(2.0, 2.0, 2.0)
    )
    ball = save_checkpoint(folder / "ball", FlairBall(), meta3d)[0]
    return {"urwkv": urwkv, "bright": bright, "cut": cut, "ball": ball}
