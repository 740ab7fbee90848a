"""Every weight file shipped in the package loads strictly into the model its sidecar names (after its int8
tensors are dequantized): a renamed or reshaped parameter anywhere in a model breaks this test before it breaks a
user."""

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

import rwkvseg
from rwkvseg.checkpoint import dequantize
from rwkvseg.models import create_model

WEIGHTS = sorted((Path(rwkvseg.__file__).parent / "weights").glob("*.safetensors"))


def test_weights_are_shipped():
    assert len(WEIGHTS) >= 5, WEIGHTS


@pytest.mark.parametrize("weights", WEIGHTS, ids=lambda p: p.stem)
def test_released_weights_load_strictly(weights):
    sidecar = json.loads(weights.with_suffix(".json").read_text())
    model = create_model(sidecar["model"], sidecar["in_channels"], sidecar["num_classes"], **sidecar["model_overrides"])
    missing, unexpected = model.load_state_dict(dequantize(load_file(str(weights))), strict=True)
    assert not missing and not unexpected
