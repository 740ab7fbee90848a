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
