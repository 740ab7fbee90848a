"""Every registered model (timm style): output shapes, odd input sizes, finite gradients of every parameter and a
state dict that round-trips. A model registered without test settings below fails here instead of going untested."""

import pytest
import torch

from rwkvseg.models import create_model, list_models

# Narrow settings (same architecture) so that the whole table runs in seconds on 2 CPU cores.
URWKV = dict(dims=(4, 8, 8, 16, 32), expansion=2)
CMUNEXT = dict(dims=(4, 8, 8, 16, 16), depths=(1, 1, 1, 2, 1), kernels=(3, 3, 5, 5, 5), expansion=2)
UNET = dict(features=(4, 4, 8, 8, 16, 4))
MMSEG = dict(widths=(8, 8, 16, 16), depths=(1, 1, 1, 1), decoder_hidden=16, full_res_width=4)

# name -> (test-size overrides, an input size it takes: odd wherever the model accepts odd sizes)
SMALL: dict[str, tuple[dict, tuple[int, ...]]] = {
    "urwkv": (URWKV, (33, 47)),
    "urwkv_s": (URWKV, (33, 47)),
    "urwkv_test": ({}, (33, 47)),
    "cmunext": (CMUNEXT, (33, 47)),
    "cmunext_s": (CMUNEXT, (33, 47)),
    "cmunext_l": (CMUNEXT, (33, 47)),
    "cmunext_test": ({}, (33, 47)),
    "unet": (UNET, (33, 47)),
    "unet_small": (UNET, (33, 47)),
    "unet_test": ({}, (33, 47)),
    "mmsegrwkv": (MMSEG, (5, 7, 3)),
    "mmsegrwkv_lite": (MMSEG, (5, 7, 3)),
    "mmsegrwkv_test": ({}, (5, 7, 3)),
    "swinunetr": (dict(feature_size=12, depths=(1, 1, 1, 1)), (64, 32, 32)),
    "unetr": (dict(img_size=32, hidden_size=48, mlp_dim=96, num_heads=4, feature_size=8), (32, 32, 32)),
    "segresnet": (dict(init_filters=8), (8, 8, 16)),
    "basicunet": (UNET, (33, 17, 19)),
    "dynunet": (dict(filters=(4, 8, 8, 16, 16, 16)), (64, 32, 32)),
}

ODD = {2: (33, 34), 3: (17, 18, 19)}
# models that need particular sizes refuse odd ones with an error that names the sizes that work
REFUSES_ODD = {
    "swinunetr": "multiple of 32, .*; pad to",
    "dynunet": "multiple of 32, .*; pad to",
    "segresnet": "multiple of 8, .*; pad to",
    "unetr": "exactly .* rebuild with img_size",
    "basicunet": "more than one voxel .* use at least 32",
}
UNUSED_PARAMETERS = ("norm_cross_attn",)  # MONAI's ViT blocks build a cross-attention norm that UNETR never calls


def _build(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(name, in_channels=2, num_classes=3, **SMALL[name][0])


def test_every_registered_model_has_test_settings():
    assert sorted(SMALL) == list_models()
    assert REFUSES_ODD.keys() <= SMALL.keys()


@pytest.mark.parametrize("name", list_models())
def test_forward_backward(name):
    size = SMALL[name][1]
    model = _build(name)
    y = model(torch.randn(2, 2, *size))
    assert y.shape == (2, 3, *size)
    assert torch.isfinite(y).all()
    y.square().mean().backward()
    for pname, p in model.named_parameters():
        if any(unused in pname for unused in UNUSED_PARAMETERS):
            continue
        assert p.grad is not None, f"{name}: {pname} gets no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: {pname} has a non-finite gradient"


@pytest.mark.parametrize("name", list_models())
def test_odd_sizes_are_padded_and_cropped_or_refused(name):
    odd = ODD[len(SMALL[name][1])]
    model = _build(name).eval()
    x = torch.randn(1, 2, *odd)
    if name in REFUSES_ODD:
        with pytest.raises(ValueError, match=REFUSES_ODD[name]):
            model(x)
        return
    with torch.no_grad():
        y = model(x)
    assert y.shape == (1, 3, *odd)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", list_models())
def test_state_dict_round_trip(name):
    size = SMALL[name][1]
    a = _build(name, seed=0)
    with torch.no_grad():
        a(torch.randn(2, 2, *size))  # move any BatchNorm running statistics off their initial values
    b = _build(name, seed=1)
    state = a.state_dict()
    assert any(not torch.equal(v, b.state_dict()[k]) for k, v in state.items()), "the seeds build the same model"
    b.load_state_dict(state, strict=True)
    for key, value in b.state_dict().items():
        assert torch.equal(value, state[key]), key
    x = torch.randn(1, 2, *size)
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x), rtol=0, atol=0)
