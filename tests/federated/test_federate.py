"""`rwkvseg federate` end to end on Flower's simulation runtime: 2 sites, 2 rounds (validated after the last only:
validate_every = 2), a test-size model on a tiny synthetic 2D dataset. Checks the round files and checkpoints, that
only model weights and metrics cross between server and sites, and that a run resumed after round 1 ends with the
weights of the uninterrupted run. Validation after every round: tests/federated/test_deploy.py, test_privacy.py."""

import csv
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rwkvseg.checkpoint import load_checkpoint
from rwkvseg.cli import main
from rwkvseg.data.synthetic import write_synthetic_dataset
from rwkvseg.federated.config import load_federated_config
from rwkvseg.models import create_model

SIZE = 32
CONFIG = f"""
seed = 1
device = "cpu"
[model]
name = "unet_test"
[data]
size = [{SIZE}, {SIZE}]
batch_size = 2
val_batch_size = 2
num_workers = 0
[federated]
rounds = 2
local_epochs = 1
strategy = "fedprox"
proximal_mu = 0.1
num_sites = 2
client_cpus = 2
validate_every = 2
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fed")
    data = root / "data"
    write_synthetic_dataset(data, n=8, shape=(40, 36), seed=2)
    config = root / "fed.toml"
    config.write_text(CONFIG)
    return root, data, config


@pytest.fixture(scope="module")
def uninterrupted(setup):
    """federate() for 2 rounds, recording every message the server sends and receives."""
    from rwkvseg.federated.run import federate

    root, data, config_path = setup
    out = root / "full"
    config = load_federated_config(config_path, [f"data.root={data}", f"out={out}"])
    messages = []
    summary = federate(config, on_message=messages.append)
    return out, summary, messages


def test_rounds_files_and_checkpoint(uninterrupted):
    out, summary, _ = uninterrupted
    assert summary["rounds_done"] == 2 and summary["strategy"] == {"name": "fedprox", "proximal_mu": 0.1}
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [r["round"] for r in rows] == ["1", "2"]
    assert rows[0]["val_dice"] == "" and rows[0]["site_site1_dice"] == ""  # round 1: no evaluate message
    assert float(rows[1]["val_dice"]) >= 0
    header = list(rows[0])
    for column in (
        "round",
        "train_loss",
        "train_proximal",
        "val_dice",
        "val_cases",
        "site_site1_dice",
        "site_site2_dice",
        "train_setup_seconds",  # where a round's time goes: site setup (pooled), training, validation
        "train_seconds",
        "val_setup_seconds",
        "site_site1_setup_seconds",
        "round_seconds",
    ):
        assert column in header
    assert 0 < float(rows[1]["train_setup_seconds"]) < float(rows[1]["round_seconds"])
    last = summary["last"]
    pooled = (
        last["site_site1_dice"] * last["site_site1_val_cases"] + last["site_site2_dice"] * last["site_site2_val_cases"]
    ) / (last["val_cases"])
    assert last["val_dice"] == pytest.approx(pooled)
    assert last["train_proximal"] > 0
    sites = json.loads((out / "sites.json").read_text())["sites"]
    cases = [c for s in sites.values() for c in (*s["train"], *s["val"])]
    assert len(cases) == len(set(cases)) == 8
    model, meta = load_checkpoint(out / "last")
    assert (
        sum(p.numel() for p in model.parameters()) > 0
    )  # the standard checkpoint format: what `rwkvseg predict` loads
    assert meta.training["round"] == 2 and meta.training["federated"]["strategy"] == "fedprox"
    assert (out / "best.safetensors").is_file() and (out / "state.pt").is_file()
    assert summary["best_round"] == 2  # the only validated round


def test_only_weights_and_metrics_cross(uninterrupted):
    _, _, messages = uninterrupted
    reference = create_model("unet_test", 3, 1).state_dict()
    shapes = {k: tuple(v.shape) for k, v in reference.items()}
    image_like = {(SIZE, SIZE), (40, 36), (36, 40)}
    kinds = {"train": 0, "evaluate": 0}
    for message in messages:
        kinds[message.metadata.message_type] += 1
        content = message.content
        assert set(content.config_records) <= {"config"}
        for record in content.config_records.values():
            assert all(isinstance(v, (int, float)) for v in record.values()), record
        for record in content.metric_records.values():
            assert all(isinstance(v, (int, float)) for v in record.values()), record
        for record in content.array_records.values():
            assert set(record) == set(shapes)
            for key, array in record.items():
                value = array.numpy()
                assert tuple(value.shape) == shapes[key], key
                assert not any(tuple(value.shape[-2:]) == s for s in image_like), key
    # 2 rounds x 2 sites x (request + reply) for training; evaluation after round 2 only (validate_every = 2)
    assert kinds == {"train": 8, "evaluate": 4}


def test_cli_resume_repeats_the_uninterrupted_run(setup, uninterrupted, capsys):
    root, data, config = setup
    out = root / "resumed"
    base = ["federate", str(config), "--data", str(data), "--out", str(out)]
    assert main([*base, "--set", "federated.rounds=1", "--set", "epochs=1"]) == 0
    assert json.loads((out / "summary.json").read_text())["rounds_done"] == 1
    assert main(base) == 2 and "pass --resume" in capsys.readouterr().err
    assert main([*base, "--resume"]) == 0
    assert "2 rounds: best pooled validation dice" in capsys.readouterr().out
    full, resumed = load_file(uninterrupted[0] / "last.safetensors"), load_file(out / "last.safetensors")
    assert set(full) == set(resumed)
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], rtol=0, atol=1e-6, msg=key)
    assert np.isfinite(json.loads((out / "summary.json").read_text())["last"]["train_loss"])
