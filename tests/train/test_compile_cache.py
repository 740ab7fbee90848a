"""The compile cache (rwkvseg.train.compile_cache) carries torch.compile's work to a fresh process: a second
process with an empty local Inductor cache, given only the file, finds its compiled graph there (an FX-graph
cache hit) and computes the same result; a missing or damaged file means compiling afresh, never an error."""

import json
import os
import subprocess
import sys

import pytest

SCRIPT = """
import json, sys, torch
from torch._dynamo.utils import counters
from rwkvseg.train.compile_cache import load_compile_cache, save_compile_cache

mode, path = sys.argv[1], sys.argv[2]
loaded = load_compile_cache(path) if mode == "load" else None
f = torch.compile(lambda x: torch.sin(x) * 2 + x.cos(), backend="inductor")
y = f(torch.linspace(0, 1, 64))
size = save_compile_cache(path) if mode == "save" else None
print(json.dumps({"loaded": loaded, "size": size, "hits": counters["inductor"]["fxgraph_cache_hit"],
                  "misses": counters["inductor"]["fxgraph_cache_miss"], "y": y.tolist()}))
"""


def run(mode, path, inductor_dir):
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(inductor_dir), "TORCHINDUCTOR_FX_GRAPH_CACHE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode, str(path)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


@pytest.mark.slow
def test_a_fresh_process_finds_the_compiled_graph_in_the_file(tmp_path):
    blob = tmp_path / "compile.bin"
    first, _ = run("save", blob, tmp_path / "inductor_a")
    assert first["misses"] >= 1 and first["size"] == blob.stat().st_size > 0
    second, log = run("load", blob, tmp_path / "inductor_b")  # an empty local cache: only the file can hit
    assert second["loaded"] is True and second["hits"] >= 1 and second["misses"] == 0
    assert second["y"] == first["y"]
    blob.write_bytes(b"not a cache")
    third, log = run("load", blob, tmp_path / "inductor_c")
    assert third["loaded"] is False and third["hits"] == 0 and third["y"] == first["y"]
    assert "not loaded" in log and "compiling afresh" in log


def test_no_file_yet_is_not_an_error(tmp_path, caplog):
    from rwkvseg.train.compile_cache import load_compile_cache

    with caplog.at_level("INFO"):
        assert load_compile_cache(str(tmp_path / "missing.bin")) is False
    assert "does not exist yet" in caplog.text
    assert not (tmp_path / "missing.bin").exists()


@pytest.mark.slow
def test_training_writes_the_cache_after_its_first_step_and_the_next_run_loads_it(tmp_path):
    """`rwkvseg train --set compile_cache=FILE` with Inductor: the first run writes FILE after its first
    (compiled) step; a second run in a fresh process with an empty local Inductor cache loads it."""
    from rwkvseg.data.synthetic import write_synthetic_dataset

    write_synthetic_dataset(tmp_path / "data", n=6, shape=(32, 32), seed=1)
    blob = tmp_path / "step.bin"
    logs = []
    for name in ("first", "second"):
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"inductor_{name}")}
        command = [sys.executable, "-m", "rwkvseg.cli", "train", "--data", str(tmp_path / "data")]
        command += ["--out", str(tmp_path / name), "--no-progress"]
        for setting in ("model.name=urwkv_test", "epochs=1", "device=cpu", "data.size=[32,32]", "data.batch_size=2"):
            command += ["--set", setting]
        command += ["--set", "compile=on", "--set", f"compile_cache={blob}"]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr
        logs.append(done.stdout + done.stderr)
        assert blob.stat().st_size > 0
    assert "does not exist yet" in logs[0] and "wrote the compile cache" in logs[0]
    assert "loaded the compile cache" in logs[1]
    first = json.loads((tmp_path / "first" / "summary.json").read_text())
    second = json.loads((tmp_path / "second" / "summary.json").read_text())
    assert first["last"]["train_loss"] == second["last"]["train_loss"]  # the cached step computes the same
