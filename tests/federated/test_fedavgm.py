"""FedAvgM (server momentum) in the server loop, driven by a stand-in for Flower's Grid whose two "sites" move
every floating-point weight by a fixed step: the global weights after each round follow FedAvgM's formula, the
momentum is saved in state.pt, and a run resumed after round 2 ends where the uninterrupted run does."""

import time
from dataclasses import replace

import pytest
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from rwkvseg.checkpoint import CheckpointMeta, build_model, read_meta, save_checkpoint
from rwkvseg.federated.app import POLL_S, ServerPlan, _send_and_receive, run_federation
from rwkvseg.federated.config import FederatedConfig, FederatedSettings
from rwkvseg.federated.state import STATE_FILE
from rwkvseg.files import file_sha256
from rwkvseg.records import Preprocessing2D
from rwkvseg.train.config import ModelConfig, TrainConfig

META = CheckpointMeta(model="unet_test", in_channels=3, num_classes=1)
STEPS = (0.1, 0.4)  # what each site subtracts from every floating-point weight
CASES = (1, 2)  # each site's training cases: the FedAvg weights
MEAN_STEP = sum(s * n for s, n in zip(STEPS, CASES, strict=True)) / sum(CASES)  # 0.3: the server's pseudo-gradient


class _Grid:
    """Answers the server's messages as two sites would, without Flower's runtime (Flower's Grid interface: push
    the messages, pull the replies); with late_pulls, the replies come only at that many pulls after the push."""

    def __init__(self, late_pulls=0):
        self.replies, self.pushed, self.late_pulls, self.pulls = {}, 0, late_pulls, 0

    def get_node_ids(self):
        return [11, 12]

    def push_messages(self, messages):
        ids = []
        for site, message in enumerate(messages):
            self.pushed += 1
            message.metadata.__dict__["_message_id"] = f"m{self.pushed}"  # as Flower's grids set it
            self.replies[message.metadata.message_id] = _answer(site, message)
            ids.append(message.metadata.message_id)
        self.pulls = 0
        return ids

    def pull_messages(self, message_ids):
        self.pulls += 1
        if self.pulls <= self.late_pulls:
            return []
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]


def _answer(site, message):
    metrics = {"num-examples": CASES[site], "site": site}
    if message.metadata.message_type == "train":
        received = message.content["arrays"].to_torch_state_dict()
        trained = {k: v - STEPS[site] if v.is_floating_point() else v for k, v in received.items()}
        content = RecordDict({"arrays": ArrayRecord(trained), "metrics": MetricRecord(metrics | {"loss": 1.0})})
    else:
        content = RecordDict({"metrics": MetricRecord(metrics | {"dice": 0.5})})
    return Message(content, reply_to=message)


def _config(out, rounds, **federated):
    settings = FederatedSettings(rounds=rounds, local_epochs=1, strategy="fedavgm", **federated)
    return FederatedConfig(train=TrainConfig(epochs=rounds, out=str(out), device="cpu"), federated=settings)


def _run(out, rounds, resume=False, **federated):
    config = _config(out, rounds, **federated)
    out.mkdir(exist_ok=True)
    run_federation(ServerPlan(config, ("a", "b"), str(out), META, resume), _Grid())
    return torch.load(out / STATE_FILE, weights_only=True)


def test_global_weights_follow_server_momentum(tmp_path):
    torch.manual_seed(0)  # run_federation seeds from the config; this is the same model it starts from
    start = build_model(META).state_dict()
    beta, lr = 0.9, 0.5
    state = _run(tmp_path / "run", rounds=3, server_momentum=beta, server_lr=lr)
    # v1 = g, v2 = beta g + g, v3 = beta v2 + g; w3 = w0 - lr (v1 + v2 + v3) with g = MEAN_STEP every round
    travelled = lr * MEAN_STEP * (1 + (1 + beta) + (1 + beta + beta**2))
    floating = [k for k, v in start.items() if v.is_floating_point()]
    assert len(floating) < len(start)  # unet_test's BatchNorms count their steps in integer buffers
    for key, value in state["global"].items():
        if key in floating:
            torch.testing.assert_close(value, start[key] - travelled, rtol=0, atol=1e-5, msg=key)
        else:  # not exchanged under FedAvgM: the server's stay as they were, integers
            assert value.dtype == start[key].dtype and torch.equal(value, start[key]), key
    momentum = state["server"]
    assert set(momentum) == {f"momentum.{k}" for k in floating}
    expected = MEAN_STEP * (1 + beta + beta**2)
    for key in floating:
        full = torch.full_like(start[key], expected)
        torch.testing.assert_close(momentum[f"momentum.{key}"], full, atol=1e-5, rtol=0, msg=key)
    assert state["strategy"] == {"name": "fedavgm", "proximal_mu": 0.0, "server_momentum": beta, "server_lr": lr}


def test_resumed_run_continues_with_the_saved_momentum(tmp_path):
    full = _run(tmp_path / "full", rounds=4)
    _run(tmp_path / "cut", rounds=2)
    resumed = _run(tmp_path / "cut", rounds=4, resume=True)
    for key, value in full["global"].items():
        torch.testing.assert_close(resumed["global"][key], value, rtol=0, atol=1e-6, msg=key)
    with pytest.raises(ValueError, match="strategy"):
        _run(tmp_path / "cut", rounds=5, resume=True, server_momentum=0.5)


def test_the_first_global_model_is_model_init_and_the_checkpoints_name_it(tmp_path):
    meta = replace(META, preprocessing=Preprocessing2D(3, (32, 32)).to_dict())
    torch.manual_seed(7)
    source = build_model(meta)
    for buffer in source.buffers():
        if not buffer.is_floating_point():
            buffer.fill_(5)  # BatchNorm's step counts: not exchanged under FedAvgM, so the server's own stay
    save_checkpoint(tmp_path / "init", source, meta)
    lr = 0.5
    settings = FederatedSettings(rounds=1, local_epochs=1, strategy="fedavgm", server_lr=lr)
    model = ModelConfig(name="unet_test", init=str(tmp_path / "init"))
    train = TrainConfig(model=model, epochs=1, out=str(tmp_path / "run"), device="cpu")
    (tmp_path / "run").mkdir()
    run_federation(ServerPlan(FederatedConfig(train, settings), ("a", "b"), str(tmp_path / "run"), meta), _Grid())
    state = torch.load(tmp_path / "run" / STATE_FILE, weights_only=True)
    for key, value in source.state_dict().items():
        if value.is_floating_point():  # round 1 of FedAvgM: w0 - server_lr x the sites' mean step
            torch.testing.assert_close(state["global"][key], value - lr * MEAN_STEP, rtol=0, atol=1e-5, msg=key)
        else:
            assert torch.equal(state["global"][key], value), key
    record = {"source": str(tmp_path / "init"), "weights_sha256": file_sha256(tmp_path / "init.safetensors")}
    assert read_meta(tmp_path / "run" / "last").training["init"] == record


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(server_momentum=1.0), "must be in"),
        (dict(server_lr=0.0), "must be in"),
        (dict(server_momentum=0.0, server_lr=1.0), "is fedavg"),
    ],
)
def test_bad_server_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        FederatedSettings(strategy="fedavgm", **settings)


def _evaluate_messages():
    return [Message(RecordDict({}), dst_node_id=n, message_type="evaluate") for n in (11, 12)]


def test_the_server_pulls_replies_every_fraction_of_a_second():
    # Flower's own send_and_receive waits 3 s between pulls on the deployment runtime: 9 s for replies that come
    # at the fourth pull; the server's exchange asks every POLL_S
    start = time.monotonic()
    replies = _send_and_receive(_Grid(late_pulls=3), _evaluate_messages(), timeout=30)
    assert sorted(int(r.content["metrics"]["site"]) for r in replies) == [0, 1]
    assert time.monotonic() - start < 4 * POLL_S + 1.0


def test_the_server_stops_pulling_at_the_timeout_with_the_replies_it_has():
    start = time.monotonic()
    assert _send_and_receive(_Grid(late_pulls=10**6), _evaluate_messages(), timeout=0.5) == []
    assert 0.5 <= time.monotonic() - start < 0.5 + POLL_S + 0.5
