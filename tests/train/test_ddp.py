"""Data-parallel training: 2 CPU processes (gloo, under torchrun) against one process at the same global batch,
a resume on another world size, and a failing rank that ends the run instead of hanging."""

import contextlib
import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rwkvseg.checkpoint import load_checkpoint
from rwkvseg.cli import main
from rwkvseg.data.synthetic import write_synthetic_dataset
from rwkvseg.train.distributed import CpuSyncBatchNorm, Launch, rank_batch, shard_order, sync_batchnorm

SRC = Path(__file__).resolve().parents[2] / "src"
RTOL = 1e-4  # issue 16: 2-process loss equal to one process within 1e-4 relative after 5 steps
CONFIG = """epochs = 5
max_steps_per_epoch = 1
val_every = 5
device = "cpu"
[model]
name = "urwkv_test"
[optim]
schedule = "constant"
[data]
size = [32, 32]
batch_size = 4
val_batch_size = 2
num_workers = 0
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    write_synthetic_dataset(root / "data", n=10, shape=(37, 41), seed=4)
    (root / "c.toml").write_text(CONFIG)
    return root


@contextlib.contextmanager
def one_thread():
    """As torchrun's workers (OMP_NUM_THREADS=1); also keeps the 2-core CI machine from oversubscribing."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def torchrun(*argv, script=None, timeout=120):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    target = [str(script)] if script else ["-m", "rwkvseg.cli"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *target]
    start = time.perf_counter()
    done = subprocess.run(
        [*command, *map(str, argv)], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    return done.returncode, done.stdout + done.stderr, time.perf_counter() - start


def losses(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return [float(row["train_loss"]) for row in csv.DictReader(f)]


def test_two_processes_match_one_and_resume_on_one(setup, capsys):
    base = ["train", setup / "c.toml", "--data", setup / "data", "--no-progress"]
    with one_thread():  # the reference: one process, global batch 4, 7 steps
        assert main([str(a) for a in [*base, "--out", setup / "single", "--set", "epochs=7"]]) == 0
    single = losses(setup / "single")

    code, out, seconds = torchrun(*base, "--out", setup / "ddp")
    assert code == 0, out
    assert "global batch 4 (2 per process x 2 processes)" in out
    ddp = losses(setup / "ddp")
    worst = max(abs(a - b) / abs(a) for a, b in zip(single[:5], ddp, strict=True))
    print(f"\nsingle {single[:5]}\nddp    {ddp}\nmax relative difference {worst:.2e} (torchrun {seconds:.1f} s)")
    assert worst < RTOL

    model, meta = load_checkpoint(setup / "ddp" / "best.safetensors")  # written once, by rank 0
    reference, _ = load_checkpoint(setup / "single" / "best.safetensors")
    assert meta.training["best"]["epoch"] == 5
    for name, value in model.state_dict().items():
        # fp32 drift of the gloo all-reduce's summation order over 5 steps: at most 1.46e-4 absolute (stem and
        # depthwise kernels of magnitude 0.2-0.35; BatchNorm running_var 3.9e-4 of 1.35) on the 2-core CI machine
        # of 2026-12-04 (under 1e-4 on earlier machines). The loss check above (RTOL) is the equivalence target;
        # this one checks that rank 0 wrote the trained weights
        torch.testing.assert_close(value, reference.state_dict()[name], rtol=1e-3, atol=5e-4, msg=name)
    assert not list((setup / "ddp").glob(".*.tmp"))

    with one_thread():  # the 2-process run resumed by one process at the same global batch: steps 6 and 7
        assert main([str(a) for a in [*base, "--out", setup / "ddp", "--set", "epochs=7", "--resume"]]) == 0
    resumed = losses(setup / "ddp")
    assert resumed[:5] == ddp
    assert max(abs(a - b) / abs(a) for a, b in zip(single, resumed, strict=True)) < RTOL


def test_two_processes_start_from_model_init_as_one_does(setup, tmp_path):
    base = ["train", setup / "c.toml", "--data", setup / "data", "--no-progress", "--set", "epochs=2"]
    with one_thread():
        assert main([str(a) for a in [*base, "--out", tmp_path / "source", "--set", "epochs=1"]]) == 0
        tuned = [*base, "--set", f"model.init={tmp_path / 'source' / 'last'}"]
        assert main([str(a) for a in [*tuned, "--out", tmp_path / "single"]]) == 0
    code, out, _ = torchrun(*tuned, "--out", tmp_path / "ddp")
    assert code == 0, out
    single, ddp = losses(tmp_path / "single"), losses(tmp_path / "ddp")
    assert max(abs(a - b) / abs(a) for a, b in zip(single, ddp, strict=True)) < RTOL
    _, meta = load_checkpoint(tmp_path / "ddp" / "best.safetensors")
    assert meta.training["init"]["source"] == str(tmp_path / "source" / "last")


FAILING_RANK = """import os, sys
from rwkvseg.data.dataset2d import SegDataset2D

if os.environ["RANK"] == "1":
    def fail(self, index):
        raise RuntimeError("injected failure while loading a sample")
    SegDataset2D.__getitem__ = fail

from rwkvseg.cli import main
sys.exit(main())
"""


def test_failing_rank_ends_the_run(setup, tmp_path):
    script = tmp_path / "failing_rank.py"
    script.write_text(FAILING_RANK)
    argv = ["train", setup / "c.toml", "--data", setup / "data", "--out", tmp_path / "run", "--no-progress"]
    # a hang would end in subprocess.TimeoutExpired (the surviving rank also gives up after --dist-timeout 20)
    code, out, seconds = torchrun(*argv, "--dist-timeout", "20", script=script, timeout=120)
    print(f"\nthe failing run ended after {seconds:.1f} s with exit code {code}")
    assert code != 0
    assert "rank 1 of 2 failed: RuntimeError: injected failure" in out
    assert not (tmp_path / "run" / "state.pt").exists()


FITTING_RANKS = """import os, sys
import rwkvseg.train.train as train_module
from rwkvseg.train.state import ScheduleFit

def budget_fit(config, start):  # each rank its own clock: rank 0 fits the run to 3 epochs after epoch 2, rank 1
    rank = int(os.environ["RANK"])  # to 4 after any epoch it is asked at
    def fit_schedule(progress):
        if rank == 0 and progress.epoch != 2:
            return None
        return ScheduleFit(config.epochs, 3 if rank == 0 else 4, progress.epoch, progress.step, 1.0, 1.0)
    return fit_schedule

train_module.budget_fit = budget_fit
from rwkvseg.cli import main
sys.exit(main())
"""


def test_every_rank_follows_the_schedule_fit_of_rank_0(setup, tmp_path):
    """The fit is rank 0's decision, broadcast as the budget stop's is: the ranks train the same epochs (a rank
    that went on alone would wait for the others' gradients until the timeout)."""
    script = tmp_path / "fitting_ranks.py"
    script.write_text(FITTING_RANKS)
    argv = ["train", setup / "c.toml", "--data", setup / "data", "--out", tmp_path / "run", "--no-progress"]
    code, out, _ = torchrun(*argv, "--dist-timeout", "20", script=script, timeout=120)
    assert code == 0, out
    assert "schedule fitted to the budget: 5 -> 3 epochs" in out
    assert len(losses(tmp_path / "run")) == 3
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["complete"] and summary["schedule_fit"]["epochs"] == 3 and summary["schedule_fit"]["epoch"] == 2


LEAVING = """import os, sys
import torch
import torch.distributed as dist
from rwkvseg.train.distributed import Launch, data_parallel, process_group

def gloo_threads():  # gloo's worker threads, by the name torch gives them
    names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    return names.count("pt_gloo_runloop")

def train(fail):
    global inside
    model = data_parallel(torch.nn.Linear(3, 1), torch.device("cpu"))
    model(torch.randn(4, 3)).sum().backward()
    for _ in range(8):  # operations whose tensors only gloo's threads hold when the group goes
        dist.all_reduce(torch.randn(1_000_000), async_op=True)
    inside = gloo_threads()
    if fail:
        raise RuntimeError("injected failure")

try:
    with process_group(torch.device("cpu"), Launch.from_env()):
        train(sys.argv[1] == "fail")
except RuntimeError:
    pass
print(f"rank {os.environ['RANK']}: {inside} gloo threads in the group, {gloo_threads()} after it")
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc (Linux)")
@pytest.mark.parametrize("end", ["ok", "fail"])
def test_leaving_the_group_stops_its_threads(tmp_path, end):
    """Leaving the process group (after a DDP step, with operations in flight, on success and on an error)
    destroys gloo's backend there, stopping its worker threads. Left running into the interpreter's exit, such
    a thread that drops a finished operation's tensor asks for the GIL and aborts the process ("terminate
    called without an active exception", SIGABRT) after a completed run: 9 of 150 fine-tune runs under load on
    the 2-core machine, before process_group destroyed the backend."""
    script = tmp_path / "leaving.py"
    script.write_text(LEAVING)
    code, out, _ = torchrun(end, script=script)
    assert code == 0, out
    assert "terminate called" not in out, out
    for rank in range(2):
        assert re.search(f"rank {rank}: [1-9][0-9]* gloo threads in the group, 0 after it", out), out


def test_shards_cover_each_global_batch_in_order():
    order = torch.randperm(23, generator=torch.Generator().manual_seed(0)).tolist()
    shards = [shard_order(order, 5, 4, r, 2) for r in range(2)]
    for k in range(5):
        step = shards[0][2 * k : 2 * k + 2] + shards[1][2 * k : 2 * k + 2]
        assert step == order[4 * k : 4 * k + 4]
    with pytest.raises(ValueError, match="does not divide over 3 processes"):
        rank_batch(4, 3)
    with pytest.raises(ValueError, match="cannot fill 6 step"):
        shard_order(order, 6, 4, 0, 2)


def test_launch_from_env():
    assert Launch.from_env({}) == Launch(0, 1, 0)
    assert Launch.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == Launch(3, 4, 1)
    with pytest.raises(ValueError, match="without LOCAL_RANK"):
        Launch.from_env({"RANK": "0", "WORLD_SIZE": "2"})


def test_sync_batchnorm_keeps_parameters_and_state_dict():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3))
    weight, keys = model[1].weight, list(model.state_dict())
    synced = sync_batchnorm(model, torch.device("cpu"))
    assert isinstance(synced[1], CpuSyncBatchNorm) and synced[1].weight is weight
    assert list(synced.state_dict()) == keys
    x = torch.randn(4, 1, 8, 8)
    reference = torch.nn.functional.batch_norm(model[0](x), None, None, weight, model[1].bias, training=True)
    torch.testing.assert_close(synced(x), reference)  # one process: plain batch norm
