"""scripts/profile_wkv_host.py: the host time of eager Bi-WKV calls, split into our wrappers, Triton's launcher,
allocation and autograd (here with the kernels stubbed out: no GPU)."""

import json

import pytest
import torch

from rwkvseg.ops import bi_wkv
from writers import load_script


@pytest.fixture(scope="module")
def script():
    return load_script("profile_wkv_host")


def test_cprofile_entries_fall_into_their_groups(script):
    assert script.group_of("/x/src/rwkvseg/ops/bi_wkv/triton.py", "forward") == "rwkvseg"
    assert script.group_of("/x/site-packages/triton/runtime/jit.py", "run") == "triton"
    assert script.group_of("/x/site-packages/torch/autograd/function.py", "apply") == "autograd"
    assert script.group_of("~", "<built-in method torch.empty>") == "allocation"
    assert script.group_of("~", "<built-in method apply>") == "autograd"
    assert script.group_of("~", "<built-in method launch>") == "launch and other builtins"
    assert script.group_of("/usr/lib/python3.11/contextlib.py", "__enter__") == "other"


def test_stubbed_run_writes_the_wrappers_host_time_and_restores_the_kernels(script, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--stub-kernels", "--device", "cpu", "--shapes", "2,64,32", "--calls", "5", "--out", str(out)]
    assert script.main(args) == 0
    doc = json.loads((out / "host.json").read_text())
    assert doc["environment"]["stub_kernels"] is True
    assert [(r["shape"], r["grad"]) for r in doc["rows"]] == [("2x64x32", False), ("2x64x32", True)]
    for row in doc["rows"]:
        assert row["host_us"] > 0 and row["wall_us"] >= row["host_us"]
        assert set(row["profiled_us"]) == set(script.GROUPS)
        assert row["profiled_us"]["rwkvseg"] > 0 and row["profiled_us"]["allocation"] > 0
        assert any("triton.py" in name for name, _ in row["top"])  # the Function's forward ran (its launches not)
    assert "2x64x32" in capsys.readouterr().out
    # the stubs are gone: the real operator runs again and gives the exact path's numbers
    gen = torch.Generator().manual_seed(0)
    w, u, k, v = torch.rand(8, generator=gen), torch.rand(8, generator=gen), *torch.randn(2, 1, 16, 8, generator=gen)
    torch.testing.assert_close(bi_wkv(w, u, k, v), bi_wkv(w, u, k, v, impl="chunked"))
    assert bi_wkv(w, u, k, v).abs().sum() > 0


def test_refuses_what_it_cannot_do(script, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    assert script.main(["--stub-kernels", "--out", str(tmp_path / "taken")]) == 2
    assert "exists; pass a new folder" in capsys.readouterr().err
    assert script.main(["--stub-kernels", "--shapes", "2,64", "--out", str(tmp_path / "a")]) == 2
    assert "write 'B,T,C;B,T,C'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert script.main(["--device", "cpu", "--out", str(tmp_path / "b")]) == 2
        assert "pass --stub-kernels" in capsys.readouterr().err
