"""Every registered 3D model behind one interface: [B, M, T, H, W] -> logits [B, K, T, H, W]."""

import pytest
import torch

from rwkvseg.bench.complexity import count_parameters
from rwkvseg.models import baselines3d, create_model, list_models, mmsegrwkv

MODELS_3D = sorted({*mmsegrwkv.MODELS, *baselines3d.MODELS})

# Narrow settings (same architecture) at each model's smallest legal input, to keep the CPU suite fast.
SMALL = {
    "mmsegrwkv": (dict(widths=(8, 8, 16, 16), decoder_hidden=16, full_res_width=4), (5, 7, 3)),
    "mmsegrwkv_lite": (dict(widths=(8, 8, 16, 16), decoder_hidden=16, full_res_width=4), (5, 7, 3)),
    "mmsegrwkv_test": ({}, (5, 7, 3)),
    "swinunetr": (dict(feature_size=12, depths=(1, 1, 1, 1)), (64, 32, 32)),
    "unetr": (dict(img_size=32, hidden_size=48, mlp_dim=96, num_heads=4, feature_size=8), (32, 32, 32)),
    "segresnet": (dict(init_filters=8), (8, 8, 16)),
    "basicunet": (dict(features=(4, 4, 8, 8, 16, 4)), (33, 17, 19)),
    "dynunet": (dict(filters=(4, 8, 8, 16, 16, 16)), (64, 32, 32)),
}

# Parameter counts of the default configurations with 4 modalities and 4 classes: MONAI's models as in
# docs/targets.md, MMSegRWKV's paper configuration about 37 M (docs/mmsegrwkv.md).
DEFAULT_PARAMS_M = {
    "swinunetr": 62.2,
    "unetr": 102.5,
    "segresnet": 4.7,
    "basicunet": 5.8,
    "dynunet": 31.2,
    "mmsegrwkv": 37.0,
}


def test_every_3d_model_is_registered_and_covered():
    assert set(MODELS_3D) <= set(list_models())
    assert set(SMALL) == set(MODELS_3D)


# With the narrow overrides the MMSegRWKV variants are one network: run it once by default (mmsegrwkv_test).
FORWARD_CASES = [
    pytest.param(name, marks=pytest.mark.slow) if name in ("mmsegrwkv", "mmsegrwkv_lite") else name
    for name in MODELS_3D
]


@pytest.mark.parametrize("name", FORWARD_CASES)
def test_forward_backward_and_state_dict(name):
    overrides, size = SMALL[name]
    torch.manual_seed(0)
    model = create_model(name, 2, 3, **overrides)
    y = model(torch.randn(1, 2, *size))
    assert y.shape == (1, 3, *size)
    assert torch.isfinite(y).all()
    y.square().mean().backward()
    for pname, p in model.named_parameters():
        if "norm_cross_attn" in pname:  # MONAI's ViT blocks create a cross-attention norm that UNETR never uses
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    torch.manual_seed(1)
    twin = create_model(name, 2, 3, **overrides)
    state = model.state_dict()
    twin.load_state_dict(state)
    for key, value in twin.state_dict().items():
        assert torch.equal(value, state[key]), key


@pytest.mark.parametrize("name", sorted(DEFAULT_PARAMS_M))
def test_default_parameter_counts(name):
    if name.startswith("mmsegrwkv"):
        with torch.device("meta"):
            model = create_model(name, 4, 4)
        tolerance = 0.05
    else:
        model = create_model(name, 4, 4)
        tolerance = 0.01
    assert abs(count_parameters(model) / 1e6 / DEFAULT_PARAMS_M[name] - 1) < tolerance


@pytest.mark.parametrize(
    ("name", "overrides", "size", "message"),
    [
        ("swinunetr", dict(feature_size=12), (33, 64, 64), "multiple of 32"),
        ("swinunetr", dict(feature_size=12), (32, 32, 32), "more than one voxel"),
        ("dynunet", dict(filters=(4, 8, 8, 16, 16, 16)), (32, 32, 32), "more than one voxel"),
        ("segresnet", dict(init_filters=8), (12, 8, 8), "multiple of 8"),
        ("basicunet", dict(features=(4, 4, 8, 8, 16, 4)), (16, 16, 31), "more than one voxel"),
        ("unetr", dict(img_size=32, hidden_size=48, mlp_dim=96, num_heads=4), (32, 32, 48), "exactly"),
    ],
)
def test_unsupported_sizes_say_which_sizes_work(name, overrides, size, message):
    model = create_model(name, 1, 2, **overrides)
    with pytest.raises(ValueError, match=message):
        model(torch.zeros(1, 1, *size))


def test_unetr_takes_its_size_at_build_time():
    with pytest.raises(ValueError, match="multiples of 16"):
        create_model("unetr", 1, 2, img_size=40)
    assert create_model("unetr", 1, 2, img_size=(32, 48, 64), hidden_size=48, num_heads=4).fixed_size == (32, 48, 64)


def test_baseline_overrides_are_checked():
    with pytest.raises(ValueError, match="unknown overrides"):
        create_model("segresnet", 4, 3, init_filter=8)
