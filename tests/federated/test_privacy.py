"""Differential privacy in `rwkvseg federate` ([federated.privacy], Flower's fixed-clipping wrappers): the settings
are validated; on a 2-site, 2-round run of a test-size model the clipping bounds the updates where the mode says
(at the server: the global update; at the site: what the site sends), the noise changes the global weights, and
only floating-point weights travel."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rwkvseg.checkpoint import load_checkpoint
from rwkvseg.data.synthetic import write_synthetic_dataset
from rwkvseg.federated.config import load_federated_config

CLIP = 0.01  # far below a local epoch's update of the test model (checked against the run without DP)
CONFIG = """
seed = 1
device = "cpu"
[model]
name = "unet_test"
[data]
size = [32, 32]
batch_size = 2
val_batch_size = 2
num_workers = 0
[federated]
rounds = 2
local_epochs = 1
num_sites = 2
client_cpus = 2
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fed_dp")
    write_synthetic_dataset(root / "data", n=8, shape=(40, 36), seed=2)
    (root / "fed.toml").write_text(CONFIG)
    return root


def _federate(root, name, *overrides):
    from rwkvseg.federated.run import federate

    out = root / name
    config = load_federated_config(root / "fed.toml", [f"data.root={root / 'data'}", f"out={out}", *overrides])
    messages = []  # (message, its arrays as they crossed: the server-side DP wrapper clips replies in place later)
    summary = federate(config, on_message=lambda m: messages.append((m, _arrays(m) if "arrays" in m.content else None)))
    return out, summary, messages


@pytest.fixture(scope="module")
def plain(setup):
    return _federate(setup, "plain")


@pytest.fixture(scope="module")
def client_noisy(setup):
    return _federate(
        setup,
        "client_noisy",
        "federated.privacy.mode=client-fixed",
        f"federated.privacy.clipping_norm={CLIP}",
        "federated.privacy.noise_multiplier=1.0",
    )


@pytest.fixture(scope="module")
def server_clipped(setup):
    return _federate(
        setup,
        "server_clipped",
        "federated.privacy.mode=server-fixed",
        f"federated.privacy.clipping_norm={CLIP}",
        "federated.privacy.noise_multiplier=0",
    )


def _arrays(message) -> dict[str, np.ndarray]:
    return {k: np.asarray(a.numpy(), dtype=np.float64) for k, a in message.content["arrays"].items()}


def _norm(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum((a[k] - b[k]) ** 2)) for k in a))


def _rounds(messages) -> list[dict]:
    """Per round: the global weights sent for training, the sites' trained weights and the aggregated weights
    (sent for evaluation)."""
    rounds: list[dict] = []
    for message, arrays in messages:
        content, kind = message.content, message.metadata.message_type
        if kind == "train" and "config" in content:
            if not rounds or rounds[-1].get("aggregated") is not None:
                rounds.append({"global": arrays, "sites": [], "aggregated": None})
        elif kind == "train":
            rounds[-1]["sites"].append(arrays)
        elif arrays is not None:
            rounds[-1]["aggregated"] = arrays
    return rounds


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("mode=local", "federated.privacy.mode = 'local' is not valid; choose one of off, server-fixed, client-fixed"),
        ("noise_multiplier=-1", "federated.privacy.noise_multiplier = -1.0 must be >= 0"),
        ("clipping_norm=0", "federated.privacy.clipping_norm = 0.0 must be > 0"),
        ("epsilon=1", "unknown setting(s) federated.privacy.epsilon"),
    ],
)
def test_privacy_settings_are_validated(tmp_path, setting, message):
    (tmp_path / "fed.toml").write_text(CONFIG)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_federated_config(tmp_path / "fed.toml", [f"federated.privacy.{setting}"])
    config = load_federated_config(tmp_path / "fed.toml", ["federated.privacy.mode=server-fixed"])
    privacy = config.federated.privacy
    assert (privacy.mode, privacy.noise_multiplier, privacy.clipping_norm, privacy.enabled) == (
        "server-fixed",
        1.0,
        1.0,
        True,
    )
    assert not load_federated_config(tmp_path / "fed.toml").federated.privacy.enabled


def test_client_clipping_and_noise(plain, client_noisy):
    """client-fixed: every update a site sends is within the clipping norm (without DP they are far beyond it);
    the server's noise makes the global weights differ from the run without DP, and they stay finite."""
    out, summary, messages = client_noisy
    for round_ in _rounds(plain[2]):
        assert all(_norm(site, round_["global"]) > 10 * CLIP for site in round_["sites"])
    rounds = _rounds(messages)
    assert len(rounds) == 2
    for round_ in rounds:
        assert len(round_["sites"]) == 2
        for site in round_["sites"]:
            assert _norm(site, round_["global"]) <= CLIP * (1 + 1e-5)
        assert not any(k.endswith("num_batches_tracked") for k in round_["global"])  # integer buffers stay home
    noisy, clean = load_file(out / "last.safetensors"), load_file(plain[0] / "last.safetensors")
    assert all(torch.isfinite(v).all() for v in noisy.values() if v.is_floating_point())
    differences = [(noisy[k] - clean[k]).abs().max().item() for k in clean if clean[k].is_floating_point()]
    assert max(differences) > 1e-3
    record = {"mode": "client-fixed", "noise_multiplier": 1.0, "clipping_norm": CLIP, "noise_std": CLIP / 2}
    assert summary["strategy"] == {"name": "fedavg", "proximal_mu": 0.0, "privacy": record}
    resolved = json.loads((out / "federated.json").read_text())["federated"]["privacy"]
    assert resolved == {"mode": "client-fixed", "noise_multiplier": 1.0, "clipping_norm": CLIP}
    assert load_checkpoint(out / "last")[1].training["federated"]["privacy"] == resolved
    assert np.isfinite(summary["last"]["val_dice"])


def test_server_clipping_bounds_the_global_update(server_clipped):
    """server-fixed with noise 0: the sites send their updates unclipped and the server's clipping keeps the
    global update of every round within the clipping norm."""
    _, summary, messages = server_clipped
    rounds = _rounds(messages)
    assert len(rounds) == 2 and summary["strategy"]["privacy"]["noise_std"] == 0
    for round_ in rounds:
        assert all(_norm(site, round_["global"]) > 10 * CLIP for site in round_["sites"])
        assert 0 < _norm(round_["aggregated"], round_["global"]) <= CLIP * (1 + 1e-5)
