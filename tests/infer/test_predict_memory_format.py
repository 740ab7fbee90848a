"""`rwkvseg predict --memory-format channels_last`: the model and each batch (2D) or window batch (3D) it is fed
are channels-last, and the prediction is the contiguous one up to rounding."""

import numpy as np
import pytest
import torch
from PIL import Image
from test_predict3d import trained_at_2mm, write_1mm_case  # noqa: F401  (a fixture)
from torch import nn

import rwkvseg.infer.predict2d as predict2d
from rwkvseg.checkpoint import CheckpointMeta, save_checkpoint
from rwkvseg.cli import main
from rwkvseg.data.specs import dataset_spec
from rwkvseg.data.volumes import discover_cases
from rwkvseg.infer.predict import PredictConfig
from rwkvseg.infer.predict3d import Predictor3D
from rwkvseg.models import create_model
from rwkvseg.records import Preprocessing2D, inference_metadata
from writers import save_png


def spy(model, seen):
    """Appends, at each call of model, whether its input and its kernels were channels-last."""

    def look(module, args):
        x = args[0]
        layout = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        kernels = [p for p in module.parameters() if p.dim() == x.dim()]
        seen.append(  # some kernels (1 x 1, depthwise) have the same strides in both layouts
            x.is_contiguous(memory_format=layout)
            and not x.is_contiguous()
            and all(p.is_contiguous(memory_format=layout) for p in kernels)
            and any(not p.is_contiguous() for p in kernels)
        )

    model.register_forward_pre_hook(look)
    return model


def urwkv_test_prediction(tmp_path, monkeypatch, wrap) -> list[str]:
    """A urwkv_test checkpoint and two odd-sized images under tmp_path, predict2d's loader handing each loaded model
    through wrap (a spy); returns the `rwkvseg predict` arguments but --out (probabilities, no compile, one flip)."""
    torch.manual_seed(0)
    pre = Preprocessing2D(3, (32, 32), "resize", "dtype")
    meta = CheckpointMeta("urwkv_test", 3, 1, preprocessing=pre.to_dict())
    ck = save_checkpoint(tmp_path / "ck", create_model("urwkv_test", 3, 1), meta)[0]
    rng = np.random.default_rng(1)
    for i, shape in enumerate([(40, 50), (33, 21)]):
        save_png(tmp_path / "in" / f"x{i}.png", rng.integers(0, 256, (*shape, 3), dtype=np.uint8))
    load = predict2d.load_checkpoints

    def spied_load(*args, **kwargs):
        model, meta = load(*args, **kwargs)
        return wrap(model), meta

    monkeypatch.setattr(predict2d, "load_checkpoints", spied_load)
    return ["predict", str(ck), str(tmp_path / "in"), "--probabilities", "--compile", "off", "--mirror-axes", "1"]


def test_2d_prediction_in_channels_last_writes_the_contiguous_probabilities(tmp_path, monkeypatch):
    seen = []
    base = urwkv_test_prediction(tmp_path, monkeypatch, lambda model: spy(model, seen))
    assert main([*base, "--out", str(tmp_path / "contiguous")]) == 0
    assert seen and not any(seen)
    seen.clear()
    assert main([*base, "--out", str(tmp_path / "channels_last"), "--memory-format", "channels_last"]) == 0
    assert len(seen) == 4 and all(seen)  # each image (one per pass on the CPU) and its flip
    for i in range(2):
        a, b = (
            np.asarray(Image.open(tmp_path / run / "probabilities" / f"x{i}.png")).astype(int)
            for run in ("contiguous", "channels_last")
        )
        assert np.abs(a - b).max() <= 1  # 8-bit probabilities, equal up to a rounding step


def one_case_and_net(tmp_path, trained_at_2mm):  # noqa: F811
    """A 1 mm BraTS-like case under tmp_path, the 3D inference metadata of a small window, and a two-convolution
    net: (case, metadata, net)."""
    folder, _ = write_1mm_case(tmp_path / "in")
    (case,) = discover_cases(folder, dataset_spec("brats"), require_label=False)
    metadata = inference_metadata(trained_at_2mm, patch_size=(8, 10, 12), target="labels")
    torch.manual_seed(0)
    return case, metadata, nn.Sequential(nn.Conv3d(4, 6, 3, padding=1), nn.ReLU(), nn.Conv3d(6, 4, 3, padding=1))


def test_3d_prediction_feeds_each_window_batch_channels_last(tmp_path, trained_at_2mm):  # noqa: F811
    case, metadata, net = one_case_and_net(tmp_path, trained_at_2mm)
    values, seen = {}, []
    for memory_format in ("contiguous", "channels_last"):
        model = spy(nn.Sequential(*(m for m in net)), seen)  # the same weights, converted or not
        options = PredictConfig(mirror_axes=(0,), sw_batch_size=2, memory_format=memory_format)
        values[memory_format], _ = Predictor3D(model, metadata, options).predict_case(case)
        assert seen and all(s == (memory_format == "channels_last") for s in seen)
        seen.clear()
        net.to(memory_format=torch.contiguous_format)
    np.testing.assert_array_equal(values["channels_last"], values["contiguous"])


def test_a_bad_memory_format_is_refused():
    with pytest.raises(ValueError, match="--memory-format = 'nhwc' is not valid"):
        PredictConfig(memory_format="nhwc")
