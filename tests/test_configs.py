"""The committed configs load, name registered models and keep the recipe they say they share."""

from pathlib import Path

import pytest

from rwkvseg.federated.config import load_federated_config
from rwkvseg.models import list_models
from rwkvseg.train.config import load_config, to_dict

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TRAIN_CONFIGS = sorted(p for p in CONFIGS.glob("*.toml") if not p.name.startswith("federated_"))


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.name)
def test_training_config_loads_with_a_registered_model(path):
    config = load_config(path)
    assert config.model.name in list_models()


def test_federated_config_loads():
    config = load_federated_config(CONFIGS / "federated_brats2018_small.toml")
    assert config.train.model.name in list_models()


def test_brats_configs_differ_from_mmsegrwkv_only_in_model_and_folder():
    def recipe(name: str) -> dict:
        settings = to_dict(load_config(CONFIGS / name))
        settings.pop("out")
        settings.pop("model")
        return settings

    reference = recipe("brats2018_mmsegrwkv.toml")
    for baseline in ("brats2018_mmsegrwkv_small.toml", "brats2018_segresnet.toml", "brats2018_dynunet.toml"):
        assert recipe(baseline) == reference, baseline
