"""`rwkvseg predict --precision bf16`: the model runs under bfloat16 autocast (2D batches, 3D window batches), its
outputs come back as float32, the prediction is the float32 one up to bf16 rounding, and a CPU without native
bfloat16 is refused with one line."""

import numpy as np
import pytest
import torch
from PIL import Image
from test_predict3d import trained_at_2mm  # noqa: F401  (a fixture)
from test_predict_memory_format import one_case_and_net, urwkv_test_prediction
from torch import nn

import rwkvseg.devices as devices
from rwkvseg.cli import main
from rwkvseg.infer.precision import in_precision
from rwkvseg.infer.predict import PredictConfig
from rwkvseg.infer.predict3d import Predictor3D

native = pytest.mark.skipif(not devices.cpu_has_native_bf16(), reason="this CPU has no native bfloat16")


def dtypes_of(module: nn.Module, seen: list) -> nn.Module:
    """Appends the dtype of the output of every convolution of module at each call."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            m.register_forward_hook(lambda _m, _args, out: seen.append(out.dtype))
    return module


def test_in_precision_runs_autocast_and_returns_float32():
    torch.manual_seed(0)
    seen = []
    net = dtypes_of(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)), seen)
    x = torch.randn(2, 3, 9, 9)
    assert in_precision(net, "fp32", "cpu") is net
    with torch.no_grad():
        y32, y16 = net(x), in_precision(net, "bf16", "cpu")(x)
    assert y16.dtype == torch.float32 and y16.shape == y32.shape
    assert set(seen[:2]) == {torch.float32} and set(seen[2:]) == {torch.bfloat16}
    torch.testing.assert_close(y16, y32, atol=0.05, rtol=0.02)  # bf16 has 8 bits of mantissa


def test_unknown_or_unsupported_precisions_are_refused(monkeypatch):
    with pytest.raises(ValueError, match="--precision 'fp16' unknown; choose one of fp32, bf16"):
        PredictConfig(precision="fp16")
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)
    with pytest.raises(ValueError, match=r"this CPU has no native bfloat16 .* use --precision fp32"):
        PredictConfig(precision="bf16")
    PredictConfig(precision="fp32")  # float32 runs anywhere


def test_cli_refuses_bf16_on_a_cpu_without_it_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)
    argv = ["predict", str(tmp_path / "ck.safetensors"), str(tmp_path), "--out", str(tmp_path / "out")]
    assert main([*argv, "--precision", "bf16"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--precision bf16" in err
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)
    assert main([*argv, "--precision", "bf16", "--runtime", "onnx"]) == 2  # an exported file runs as exported
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--runtime onnx runs the exported file as it was exported" in err
    assert not (tmp_path / "out").exists()


@native
def test_2d_prediction_in_bf16_writes_the_float32_probabilities(tmp_path, monkeypatch):
    seen = []
    base = urwkv_test_prediction(tmp_path, monkeypatch, lambda model: dtypes_of(model, seen))
    assert main([*base, "--out", str(tmp_path / "fp32")]) == 0
    assert seen and set(seen) == {torch.float32}
    seen.clear()
    assert main([*base, "--out", str(tmp_path / "bf16"), "--precision", "bf16"]) == 0
    assert seen and set(seen) == {torch.bfloat16}
    for i in range(2):
        a, b = (
            np.asarray(Image.open(tmp_path / run / "probabilities" / f"x{i}.png")).astype(int)
            for run in ("fp32", "bf16")
        )
        assert np.abs(a - b).max() <= 3  # 8-bit probabilities: bf16 rounding moves them by a few steps at most


@native
def test_3d_prediction_runs_each_window_batch_in_bf16(tmp_path, trained_at_2mm):  # noqa: F811
    case, metadata, net = one_case_and_net(tmp_path, trained_at_2mm)
    with torch.no_grad():  # clear winners: the labels compared below are not decided by rounding
        net[2].bias.copy_(torch.tensor([0.0, 2.0, -2.0, 1.0]))
    values, seen = {}, []
    dtypes_of(net, seen)
    for p in ("fp32", "bf16"):
        options = PredictConfig(mirror_axes=(0,), sw_batch_size=2, precision=p)
        values[p], _ = Predictor3D(net, metadata, options).predict_case(case)
        assert seen and set(seen) == {torch.float32 if p == "fp32" else torch.bfloat16}
        seen.clear()
    assert values["bf16"].shape == values["fp32"].shape
    assert (values["bf16"] == values["fp32"]).mean() > 0.99


@pytest.mark.parametrize(
    "name, shape",
    [
        ("urwkv_test", (2, 3, 32, 32)),
        ("cmunext_test", (2, 3, 32, 32)),
        ("unet_test", (2, 3, 32, 32)),
        ("mmsegrwkv_test", (1, 4, 32, 32, 32)),
    ],
)
def test_bf16_weights_change_no_output_under_autocast(name, shape):
    """hold_bf16_weights rounds the convolution and linear weights as autocast does at every call: the outputs are
    bit for bit those of the float32 weights under bf16 autocast, the other parameters (norms, Bi-WKV's decays) stay
    float32, and the weights take half the bytes."""
    from rwkvseg.bf16_weights import BF16_WEIGHT_LAYERS, hold_bf16_weights
    from rwkvseg.infer.precision import for_precision
    from rwkvseg.models import create_model

    torch.manual_seed(0)
    model = create_model(name, shape[1], 2).eval()
    x = torch.randn(shape)
    forward = in_precision(model, "bf16", "cpu")
    with torch.no_grad():
        before = forward(x)
        assert for_precision(model, "fp32") is model and all(p.dtype == torch.float32 for p in model.parameters())
        assert hold_bf16_weights(model) is model
        after = forward(x)
    assert torch.equal(before, after)
    held = {id(p) for m in model.modules() if isinstance(m, BF16_WEIGHT_LAYERS) for p in m.parameters(False)}
    dtypes = {p.dtype for p in model.parameters() if id(p) in held}
    others = {p.dtype for p in model.parameters() if id(p) not in held}
    assert held and dtypes == {torch.bfloat16}
    assert others == {torch.float32}  # every one of these models has normalization layers
