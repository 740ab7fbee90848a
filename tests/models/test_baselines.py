"""The baselines beside our models: MONAI's networks (2D and 3D) and the hand-written CMUNeXt."""

import pytest
import torch

from rwkvseg.bench.complexity import count_parameters
from rwkvseg.models import create_model, list_models

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


def test_baselines_are_registered():
    assert {"urwkv", "urwkv_s", "urwkv_test", "unet", "cmunext", "cmunext_s"} <= set(list_models())
    assert {"mmsegrwkv", "swinunetr", "unetr", "segresnet", "basicunet", "dynunet"} <= set(list_models())


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


def test_basic_unet_serves_2d_and_3d():
    flat = create_model("unet_test", 1, 2)
    deep = create_model("basicunet", 1, 2, features=(4, 4, 8, 8, 16, 4))
    assert (flat.spatial_dims, deep.spatial_dims) == (2, 3)
    assert type(flat.net) is type(deep.net)
    with pytest.raises(ValueError, match=r"expects \[B, C, H, W\]"):
        flat(torch.zeros(1, 1, 16, 16, 16))
    with pytest.raises(ValueError, match=r"expects \[B, C, T, H, W\]"):
        deep(torch.zeros(1, 1, 32, 32))


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
    with pytest.raises(ValueError, match=r"unknown overrides \['net'\]"):
        create_model("unet_test", 4, 3, net="SegResNet")
    with pytest.raises(ValueError, match=r"CMUNeXtConfig\.dims must list 5 stages"):
        create_model("cmunext_test", 3, 1, dims=[4, 8, 8, 16])


def test_dynunet_deep_supervision_returns_its_heads_in_training_only():
    torch.manual_seed(0)
    net = create_model("dynunet", 4, 3, filters=(4, 8, 8, 16, 16, 16), deep_supervision=True, deep_supr_num=2)
    x = torch.randn(1, 4, 32, 64, 32)
    outputs = net.train()(x)
    assert isinstance(outputs, tuple) and len(outputs) == 3
    assert all(o.shape == (1, 3, 32, 64, 32) for o in outputs)
    with torch.no_grad():
        main = net.eval()(x)
    assert isinstance(main, torch.Tensor) and main.shape == (1, 3, 32, 64, 32)
    sum(o.square().mean() for o in outputs).backward()
    assert all(p.grad is not None for p in net.net.deep_supervision_heads.parameters())
