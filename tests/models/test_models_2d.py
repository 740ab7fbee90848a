"""Every registered 2D model: forward and backward on odd sizes, finite outputs and gradients, and a state dict
that round-trips. 2D model modules declare SPATIAL_DIMS = 2; the registry's other modules are skipped."""

import importlib

import pytest
import torch

from rwkvseg.models import create_model, list_models
from rwkvseg.models.registry import MODEL_MODULES


def models_2d() -> list[str]:
    names = []
    for module in MODEL_MODULES:
        mod = importlib.import_module(f"rwkvseg.models.{module}")
        if getattr(mod, "SPATIAL_DIMS", None) == 2:
            names += sorted(mod.MODELS)
    return names


def models_under_test_2d() -> list[str]:
    """The tiny "<family>_test" variant of each family that has one, every variant of the others."""
    names = models_2d()
    return [n for n in names if n.endswith("_test") or f"{n.split('_')[0]}_test" not in names]


def test_2d_models_are_registered():
    names = models_2d()
    assert {"urwkv", "urwkv_s", "urwkv_test", "unet", "cmunext", "cmunext_s"} <= set(names)
    assert set(names) <= set(list_models())


@pytest.mark.parametrize("name", models_under_test_2d())
def test_forward_backward_on_odd_size(name):
    torch.manual_seed(0)
    model = create_model(name, in_channels=1, num_classes=2)
    x = torch.randn(2, 1, 33, 47)
    out = model(x)
    assert out.shape == (2, 2, 33, 47)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: {pname} gets no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: {pname} has a non-finite gradient"


@pytest.mark.parametrize("name", models_under_test_2d())
def test_state_dict_round_trips(name):
    torch.manual_seed(0)
    a = create_model(name, in_channels=3, num_classes=1)
    a(torch.randn(2, 3, 32, 48))  # move the BatchNorm running statistics off their initial values
    torch.manual_seed(1)
    b = create_model(name, in_channels=3, num_classes=1)
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 3, 21, 19)
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x), rtol=0, atol=0)
