"""What a site does with the model it is sent: on the CPU its 3-D convolutions run as `rwkvseg train` runs them."""

from types import SimpleNamespace

import torch
from torch import nn

from rwkvseg.cpu_convs import OneDnnConv3d
from rwkvseg.devices import placed
from rwkvseg.federated.local import validate_site
from rwkvseg.models import create_model
from rwkvseg.train.config import TrainConfig, VolumeDataConfig


def _plain_convs(model: nn.Module) -> int:
    return sum(type(m) is nn.Conv3d for m in model.modules())


def test_a_cpu_site_keeps_3d_convolutions_off_the_slow_path():
    model = create_model("mmsegrwkv_test", 4, 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert _plain_convs(model) > 0
    seen = []
    data = SimpleNamespace(validate=lambda m: seen.append(m) or {"dice": 0.5})
    scores = validate_site(TrainConfig(dims=3, data=VolumeDataConfig()), data, model, torch.device("cpu"))
    assert seen == [model] and scores["dice"] == 0.5 and not model.training
    # the same modules and weights, every plain 3-D convolution now the oneDNN subclass (where torch has oneDNN)
    if torch.backends.mkldnn.is_available():
        assert _plain_convs(model) == 0 and any(isinstance(m, OneDnnConv3d) for m in model.modules())
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert placed(model, torch.device("cpu")) is model  # twice: nothing more changes


def test_a_2d_model_is_left_as_it_is():
    model = create_model("unet_test", 3, 1)
    classes = [type(m) for m in model.modules()]
    placed(model, torch.device("cpu"))
    assert [type(m) for m in model.modules()] == classes
