"""The deployment entry points (rwkvseg.federated.deploy) answer Flower messages from a site's own node config:
the checkpoint record written with --write-record rebuilds the model, a train message trains the site's cases,
an evaluate message scores its validation cases, and a site that is not in the federation is a clear error."""

import importlib.util
import json

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from rwkvseg.checkpoint import build_model, read_meta, save_checkpoint
from rwkvseg.cli import main
from rwkvseg.data.synthetic import write_synthetic_dataset


@pytest.fixture
def task_identity(monkeypatch):
    """In newer Flower releases (1.42, not 1.32), messages made outside a Flower runtime need the task identity
    the runtime would set (the test extra allows Flower 1.32 to 1.42: which one pip picks depends on the other
    pins); a site sets torch's thread count to its client_cpus, which this process gets back afterwards."""
    import torch

    if importlib.util.find_spec("flwr.supercore.task_identity") is not None:
        from flwr.supercore.task_identity import TaskIdentity

        for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
            monkeypatch.setattr(TaskIdentity, name, value)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def site_config(tmp_path, out, federated, n=5, data=""):
    """A synthetic 2D dataset in tmp_path/data and a federated config (test model, CPU, no loader workers unless
    data sets num_workers) writing to out."""
    write_synthetic_dataset(tmp_path / "data", n=n, shape=(32, 32), seed=1)
    config = tmp_path / "site.toml"
    config.write_text(
        f'device = "cpu"\nout = "{out}"\n[model]\nname = "unet_test"\n'
        f'[data]\nroot = "{tmp_path / "data"}"\nsize = [32, 32]\nbatch_size = 2\n'
        f"{data or 'num_workers = 0'}\n[federated]\n{federated}"
    )
    return config


def test_site_answers_train_and_evaluate_messages(tmp_path, task_identity, capsys):
    from rwkvseg.federated import deploy

    config = site_config(tmp_path, tmp_path / "site", "rounds = 2\n")
    record = tmp_path / "record.json"
    assert main(["federate", str(config), "--write-record", str(record)]) == 0
    assert "model unet_test (3 -> 1)" in capsys.readouterr().out
    model = build_model(read_meta(record))
    node = {"site": "A", "config": str(config)}
    context = Context(run_id=1, node_id=5, node_config=node, state=RecordDict(), run_config={"sites": "B,A"})
    arrays = ArrayRecord(model.state_dict())
    train = Message(
        RecordDict({"arrays": arrays, "config": ConfigRecord({"round": 1, "local-epochs": 1})}),
        dst_node_id=5,
        message_type="train",
    )
    reply = deploy.client(train, context)
    assert not reply.has_error(), reply.error
    metrics = reply.content["metrics"]
    assert metrics["site"] == 0 and metrics["num-examples"] == 4 and metrics["steps"] == 2
    assert set(reply.content["arrays"]) == set(model.state_dict())
    evaluate = Message(RecordDict({"arrays": reply.content["arrays"]}), dst_node_id=5, message_type="evaluate")
    scores = deploy.client(evaluate, context).content["metrics"]
    assert scores["num-examples"] == 1 and 0.0 <= scores["dice"] <= 1.0
    stranger = Context(
        run_id=1, node_id=6, node_config={**node, "site": "Z"}, state=RecordDict(), run_config={"sites": "B,A"}
    )
    with pytest.raises(ValueError, match=r"site 'Z' is not among the federation's sites \['A', 'B'\]"):
        deploy.client(train, stranger)


def test_a_site_starts_its_loader_workers_by_forkserver_unless_its_config_names_a_start(
    tmp_path, task_identity, monkeypatch
):
    """A site trains in a Flower process with gRPC threads, which forked loader workers must not inherit
    (grpc/grpc#32758): with data.worker_start = auto its training and validation loaders start their workers by
    forkserver (a real round and evaluation with one worker each: the site's dataset and transforms pickle); a
    start method the site's config names is kept, and so is auto where it does not fork."""
    import multiprocessing

    from rwkvseg.federated import deploy
    from rwkvseg.federated.config import load_federated_config
    from rwkvseg.federated.local import site_config as site_training_config
    from rwkvseg.train import loop, validate

    started = []

    def spy(base):
        class Recorded(base):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                started.append((self.num_workers, self.multiprocessing_context.get_start_method()))

        return Recorded

    monkeypatch.setattr(loop, "DataLoader", spy(loop.DataLoader))
    monkeypatch.setattr(validate, "DataLoader", spy(validate.DataLoader))
    config = site_config(tmp_path, tmp_path / "site", "rounds = 2\n", data="num_workers = 1\nval_batch_size = 1")
    record = tmp_path / "record.json"
    assert main(["federate", str(config), "--write-record", str(record)]) == 0
    started.clear()
    node = {"site": "A", "config": str(config)}
    context = Context(run_id=1, node_id=5, node_config=node, state=RecordDict(), run_config={"sites": "A"})
    arrays = ArrayRecord(build_model(read_meta(record)).state_dict())
    message = RecordDict({"arrays": arrays, "config": ConfigRecord({"round": 1, "local-epochs": 1})})
    reply = deploy.client(Message(message, dst_node_id=5, message_type="train"), context)
    assert not reply.has_error(), reply.error
    assert reply.content["metrics"]["steps"] == 2
    evaluate = Message(RecordDict({"arrays": reply.content["arrays"]}), dst_node_id=5, message_type="evaluate")
    scores = deploy.client(evaluate, context)
    assert not scores.has_error(), scores.error
    assert 0.0 <= scores.content["metrics"]["dice"] <= 1.0
    # train: the validation loader (built at setup) and the epoch's; evaluate: a new site setup's validation loader
    assert started == [(1, "forkserver")] * 3
    saved = json.loads((tmp_path / "site" / "sites" / "A" / "config.json").read_text())
    assert saved["data"]["worker_start"] == "forkserver"
    for start in ("fork", "spawn", "forkserver"):
        train = load_federated_config(config, [f"data.worker_start={start}"]).train
        assert site_training_config(train, tmp_path / "x", "data").data.worker_start == start
    # where auto does not fork (macOS and Windows start by spawn) it stays auto
    monkeypatch.setattr(multiprocessing, "get_start_method", lambda allow_none=False: None)
    monkeypatch.setattr(multiprocessing, "get_all_start_methods", lambda: ["spawn", "fork", "forkserver"])
    train = load_federated_config(config).train
    assert site_training_config(train, tmp_path / "x", "data").data.worker_start == "auto"


def test_site_clips_its_update_under_client_fixed_privacy(tmp_path, task_identity):
    """A deployed site whose config says client-fixed clips what it sends to the norm the server's train message
    carries (Flower's fixedclipping_mod), and refuses a train message without a norm or with another one."""
    import math

    from rwkvseg.federated import deploy
    from rwkvseg.federated.app import exchanged_state
    from rwkvseg.federated.config import load_federated_config
    from rwkvseg.models import create_model

    clip = 0.01
    table = f'rounds = 2\n[federated.privacy]\nmode = "client-fixed"\nclipping_norm = {clip}\n'
    config = site_config(tmp_path, tmp_path / "site", table)
    settings = load_federated_config(config).federated
    arrays = ArrayRecord(exchanged_state(create_model("unet_test", 3, 1), settings))  # no integer buffers
    node = {"site": "A", "config": str(config)}
    context = Context(run_id=1, node_id=5, node_config=node, state=RecordDict(), run_config={"sites": "A"})

    def train(**norm):
        record = RecordDict({"arrays": arrays, "config": ConfigRecord({"round": 1, "local-epochs": 1, **norm})})
        return deploy.client(Message(record, dst_node_id=5, message_type="train"), context)

    reply = train(clipping_norm=clip)
    assert not reply.has_error(), reply.error
    sent, received = reply.content["arrays"], arrays
    assert list(sent) == list(received)
    update = math.sqrt(sum(float(((sent[k].numpy() - received[k].numpy()) ** 2).sum()) for k in received))
    assert 0 < update <= clip * (1 + 1e-5)
    assert train().has_error()  # no clipping norm from the server
    with pytest.raises(ValueError, match=r"the server asks for clipping norm 1\.0, this site's federated\.privacy"):
        train(clipping_norm=1.0)  # a runtime turns the exception into an error reply


@pytest.mark.slow
def test_federation_on_the_deployment_runtime_matches_its_plan(tmp_path):
    """`rwkvseg federate --runtime deployment` runs a real SuperLink and one SuperNode per site on localhost
    (flwr run submits the app): the server writes the simulation's run folder (metrics per site and round, the
    global checkpoints, the resumable state), and every Flower process is gone afterwards. About 2 min on 2 cores:
    each message is a fresh flwr-clientapp process that imports torch."""
    import csv
    import json
    import subprocess

    from rwkvseg.checkpoint import load_checkpoint

    config = site_config(tmp_path, tmp_path / "run", "rounds = 2\nlocal_epochs = 1\nnum_sites = 2\n", n=6)
    assert main(["federate", str(config), "--runtime", "deployment"]) == 0
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds_done"] == 2
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["round"] for r in rows] == ["1", "2"]
    sites = json.loads((run / "sites.json").read_text())["sites"]
    for name in sites:  # each site trained and scored in every round, on its own cases
        assert all(float(r[f"site_{name}_val_cases"]) == len(sites[name]["val"]) for r in rows)
    assert sum(float(rows[0][f"site_{n}_val_cases"]) for n in sites) == float(rows[0]["val_cases"])
    model, meta = load_checkpoint(run / "last")
    assert meta.training["federated"]["rounds"] == 2 and sum(p.numel() for p in model.parameters()) > 0
    for name in sites:
        assert (run / "sites" / name / "split.json").is_file()
    logs = run / "deployment" / "logs"
    assert {p.name for p in logs.iterdir()} == {"superlink.log", "flwr-run.log"} | {f"supernode-{n}.log" for n in sites}
    left = subprocess.run(["pgrep", "-f", str(run / "deployment")], capture_output=True, text=True).stdout
    assert left == "", f"Flower processes still running: {left}"


def test_site_keeps_its_optimizer_state_between_rounds(tmp_path, task_identity):
    """site_optimizer = keep: a site's round N starts from its optimizer state of round N-1, kept in its own folder
    (rounds N-1 and N on disk); a round repeated from the same global weights (a resumed run) trains the same
    weights; a missing state file is an error naming the fix; the fresh optimizer gives other weights."""
    import torch

    from rwkvseg.federated import deploy

    def run_round(context, arrays, round_):
        config = ConfigRecord({"round": round_, "local-epochs": 1})
        message = Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=5, message_type="train")
        return deploy.client(message, context)

    def site(name, setting):
        config = site_config(tmp_path / name, tmp_path / name / "run", f'rounds = 3\nsite_optimizer = "{setting}"\n')
        node = {"site": "A", "config": str(config)}
        return Context(run_id=1, node_id=5, node_config=node, state=RecordDict(), run_config={"sites": "A"})

    keep, fresh = site("keep", "keep"), site("fresh", "fresh")
    start = ArrayRecord(build_model(read_meta(_record(tmp_path, keep))).state_dict())
    first = run_round(keep, start, 1).content["arrays"]
    assert not run_round(fresh, start, 1).has_error()
    second = run_round(keep, first, 2).content["arrays"].to_torch_state_dict()

    def files():
        return sorted(p.name for p in (tmp_path / "keep").rglob("optimizer-round*.pt"))

    assert files() == ["optimizer-round1.pt", "optimizer-round2.pt"]
    again = run_round(keep, first, 2).content["arrays"].to_torch_state_dict()
    other = run_round(fresh, first, 2).content["arrays"].to_torch_state_dict()
    moved = [k for k in second if second[k].is_floating_point() and not torch.equal(second[k], other[k])]
    assert moved, "keeping the momentum changed nothing"
    for key in second:
        torch.testing.assert_close(again[key], second[key], rtol=0, atol=0, msg=key)
    assert not list((tmp_path / "fresh").rglob("optimizer-round*.pt"))
    assert not run_round(keep, ArrayRecord(second), 3).has_error()
    assert files() == ["optimizer-round2.pt", "optimizer-round3.pt"]
    next((tmp_path / "keep").rglob("optimizer-round3.pt")).unlink()
    with pytest.raises(
        FileNotFoundError, match=r"optimizer-round3.pt is missing: .* set federated.site_optimizer = fresh"
    ):
        run_round(keep, ArrayRecord(second), 4)


def test_the_record_and_a_site_start_from_model_init(tmp_path, task_identity, monkeypatch):
    """model.init: the record names the source, and a site's model holds its weights where the server sends none
    (integer buffers under differential privacy or FedAvgM) in every round; the site reads and hashes the source
    in its first round only."""
    import torch

    from rwkvseg.federated import app, deploy
    from rwkvseg.files import file_sha256
    from rwkvseg.train import finetune

    config = site_config(tmp_path, tmp_path / "site", "rounds = 1\n")
    meta = read_meta(_record(tmp_path, Context(1, 5, {"config": str(config)}, RecordDict(), {})))
    source = build_model(meta)
    for buffer in source.buffers():
        if not buffer.is_floating_point():
            buffer.fill_(5)  # BatchNorm's step counts
    save_checkpoint(tmp_path / "init", source, meta)
    text = config.read_text().replace('name = "unet_test"\n', f'name = "unet_test"\ninit = "{tmp_path / "init"}"\n')
    config.write_text(text)
    context = Context(1, 5, {"site": "A", "config": str(config)}, RecordDict(), {"sites": "A"})
    record = {"source": str(tmp_path / "init"), "weights_sha256": file_sha256(tmp_path / "init.safetensors")}
    assert read_meta(_record(tmp_path, context)).training["init"] == record
    started, train_site = [], app.train_site

    def spy(config, data, model, **kwargs):
        started.append({k: v.clone() for k, v in model.state_dict().items()})
        return train_site(config, data, model, **kwargs)

    monkeypatch.setattr(app, "train_site", spy)
    reads = []

    def counting(name):
        original = getattr(finetune, name)

        def counted(*args, **kwargs):
            reads.append(name)
            return original(*args, **kwargs)

        return counted

    for name in ("file_sha256", "load_checkpoint"):
        monkeypatch.setattr(finetune, name, counting(name))
    sent = {k: torch.zeros_like(v) for k, v in source.state_dict().items() if v.is_floating_point()}
    for round_ in (1, 2):
        message = Message(
            RecordDict({"arrays": ArrayRecord(sent), "config": ConfigRecord({"round": round_, "local-epochs": 1})}),
            dst_node_id=5,
            message_type="train",
        )
        assert not deploy.client(message, context).has_error()
    assert reads == ["file_sha256", "load_checkpoint"]
    for started_round in started:
        for key, value in source.state_dict().items():
            assert torch.equal(started_round[key], sent.get(key, value)), key


def _record(tmp_path, context):
    record = tmp_path / "record.json"
    assert main(["federate", context.node_config["config"], "--write-record", str(record)]) == 0
    return record


@pytest.mark.parametrize("per_case", [0, 4])
def test_a_3d_site_weighs_its_update_by_training_cases_not_patches(tmp_path, task_identity, per_case):
    """A 3D training set's length is its patches per epoch, the same at every site; FedAvg weighs by cases. With
    federated.patches_per_case the site's epoch is that many patches per training case (here loaded by one worker,
    started by forkserver as at every site: the patch dataset pickles)."""
    from rwkvseg.data.synthetic3d import write_synthetic_volumes
    from rwkvseg.federated import deploy

    write_synthetic_volumes(tmp_path / "raw", n=4, shape=(23, 27, 21), spacing=2.0, seed=1)
    config = tmp_path / "site3d.toml"
    config.write_text(
        f'dims = 3\ndevice = "cpu"\namp = "off"\nout = "{tmp_path / "fed"}"\n[model]\nname = "mmsegrwkv_test"\n'
        f'[data]\nroot = "{tmp_path / "raw"}"\npatch_size = [15, 23, 21]\nsamples_per_epoch = 6\nbatch_size = 2\n'
        f"num_workers = {1 if per_case else 0}\nval_fraction = 0.34\n[infer]\nmirror_axes = []\n"
        f"[federated]\nrounds = 1\npatches_per_case = {per_case}\n"
    )
    record = tmp_path / "record.json"
    assert main(["federate", str(config), "--write-record", str(record)]) == 0
    model = build_model(read_meta(record))
    context = Context(
        run_id=1,
        node_id=5,
        node_config={"site": "A", "config": str(config)},
        state=RecordDict(),
        run_config={"sites": "A,B"},
    )
    train = Message(
        RecordDict(
            {"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord({"round": 1, "local-epochs": 1})}
        ),
        dst_node_id=5,
        message_type="train",
    )
    reply = deploy.client(train, context)
    assert not reply.has_error(), reply.error
    metrics = reply.content["metrics"]
    split = json.loads((tmp_path / "fed" / "sites" / "A" / "split.json").read_text())["folds"][0]
    cases = len(split["train"])
    assert metrics["num-examples"] == cases == 3
    assert metrics["steps"] == (3 if per_case == 0 else per_case * cases // 2)  # patches in batches of 2
    saved = json.loads((tmp_path / "fed" / "sites" / "A" / "config.json").read_text())
    assert (saved["data"]["num_workers"], saved["data"]["worker_start"]) == (1 if per_case else 0, "forkserver")
