"""Every weight file shipped in the package loads strictly into the model its sidecar names: a renamed or
reshaped parameter anywhere in a model breaks this test before it breaks a user."""

import json
from pathlib import Path

import pytest
from safetensors.torch import load_model

import rwkvseg
from rwkvseg.models import create_model

WEIGHTS = sorted((Path(rwkvseg.__file__).parent / "weights").glob("*.safetensors"))


def test_weights_are_shipped():
    assert len(WEIGHTS) >= 5, WEIGHTS


@pytest.mark.parametrize("weights", WEIGHTS, ids=lambda p: p.stem)
def test_released_weights_load_strictly(weights):
    sidecar = json.loads(weights.with_suffix(".json").read_text())
    model = create_model(sidecar["model"], sidecar["in_channels"], sidecar["num_classes"], **sidecar["model_overrides"])
    missing, unexpected = load_model(model, weights, strict=True)
    assert not missing and not unexpected
