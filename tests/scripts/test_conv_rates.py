"""scripts/conv_rates.py: every distinct convolution of a model, captured with its arguments and timed alone."""

import json
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from rwkvseg.bench.models import ModelBenchConfig
from writers import load_script


@pytest.fixture(scope="module")
def script():
    return load_script("conv_rates")


class _Net(nn.Module):
    """A first convolution (of the input: no input gradient), two of one signature like it but for the gradient, a
    strided grouped one with a bias and a transposed one (4 channels in, as the bench's 3D input)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv3d(4, 4, 3, padding=1, bias=False)
        self.a = nn.Conv3d(4, 4, 3, padding=1, bias=False)
        self.b = nn.Conv3d(4, 4, 3, padding=1, bias=False)
        self.down = nn.Conv3d(4, 8, 2, stride=2, groups=2)
        self.up = nn.ConvTranspose3d(8, 3, 2, stride=2)

    def forward(self, x):
        return self.up(self.down(self.b(self.a(self.first(x)))))


def _config(memory_format="channels_last"):
    return ModelBenchConfig(dims=3, device="cpu", memory_format=memory_format)


def test_every_convolution_is_captured_once_per_call_with_its_arguments(script):
    calls = script.convolutions(_Net(), 3, 1, 8, _config("contiguous"))
    assert sum(calls.values()) == 5
    by_weight = {(sig.weight, sig.input_grad): (sig, n) for sig, n in calls.items()}
    same, n = by_weight[(4, 4, 3, 3, 3), True]
    assert n == 2  # a and b: one signature, counted twice
    assert same[:2] == ((1, 4, 8, 8, 8), "contiguous") and same[4] is False and same[6] == (1, 1, 1)
    first, n = by_weight[(4, 4, 3, 3, 3), False]  # the same shapes, but the model's input needs no gradient
    assert n == 1 and first[:-1] == same[:-1]
    down, _ = by_weight[(8, 2, 2, 2, 2), True]
    assert down[5] == (2, 2, 2) and down[10] == 2 and down[4] is True and down[8] is False
    up, _ = by_weight[(8, 3, 2, 2, 2), True]
    assert up[8] is True and up[0] == (1, 8, 4, 4, 4)
    assert {sig[1] for sig in calls} == {"contiguous"}
    # channels-last: the bench's input reaches the first convolution so (what the next ones get is the backend's
    # choice: oneDNN's 3D convolutions answer channels-first, so a and b differ in their input's layout here)
    first = [sig for sig in script.convolutions(_Net(), 3, 1, 8, _config()) if sig[0] == (1, 4, 8, 8, 8)]
    assert "channels_last" in {sig[1] for sig in first}


def test_multiply_adds_match_the_outputs_each_convolution_makes(script):
    calls = script.convolutions(_Net(), 3, 2, 8, _config("contiguous"))
    for sig in calls:
        x = torch.zeros(sig[0])
        w = torch.zeros(sig[2])
        if sig[8]:  # transposed: every input position times C_out / groups times the kernel
            expected = x.numel() * w.shape[1] * math.prod(w.shape[2:])
        else:  # every output position times C_in / groups times the kernel
            out = F.conv3d(x, w, stride=sig[5], padding=sig[6], dilation=sig[7], groups=sig[10])
            expected = out.numel() * w.shape[1] * math.prod(w.shape[2:])
        assert script.macs(sig) == expected


def test_replay_runs_the_captured_convolution_forward_and_backward(script):
    net = _Net()
    calls = script.convolutions(net, 3, 1, 8, _config())
    for sig in calls:
        out = script.replay(sig, "infer", torch.device("cpu"))()
        x = torch.randn(sig[0])
        w = torch.randn(sig[2])
        bias = None
        expected = torch.ops.aten.convolution(x, w, bias, *[list(v) for v in sig[5:8]], sig[8], list(sig[9]), sig[10])
        assert out.shape == expected.shape and out.dtype == torch.float32
        script.replay(sig, "train", torch.device("cpu"))()  # convolution_backward with these arguments runs


def test_rows_are_timed_and_sorted_by_cost(script):
    calls = script.convolutions(_Net(), 3, 1, 8, _config("contiguous"))
    rows = script.rates(calls, "infer", torch.device("cpu"), warmup=1, repeats=2)
    assert len(rows) == 4 and sum(r["calls"] for r in rows) == 5
    assert all(r["heuristic_ms"] > 0 and "benchmark_ms" not in r for r in rows)  # no cuDNN on the CPU
    costs = [r["calls"] * r["heuristic_ms"] for r in rows]
    assert costs == sorted(costs, reverse=True)
    totals = script.totals_of(rows)
    assert totals["heuristic_ms"] == pytest.approx(sum(costs)) and "benchmark_ms" not in totals
    train = script.rates(calls, "train", torch.device("cpu"), warmup=1, repeats=1)
    # the backward: the weight's gradient, and the input's but for the first convolution
    factor = {(tuple(r["input"]), tuple(r["weight"]), r["input_grad"]): 3 if r["input_grad"] else 2 for r in rows}
    assert sorted(factor.values()) == [2, 3, 3, 3]
    infer = {(tuple(r["input"]), tuple(r["weight"]), r["input_grad"]): r["gmacs"] for r in rows}
    for r in train:
        key = (tuple(r["input"]), tuple(r["weight"]), r["input_grad"])
        assert r["gmacs"] == pytest.approx(factor[key] * infer[key])
    lines = script.table("net", rows)
    assert lines[0] == "net: 5 convolutions in 4 shapes" and lines[-1].startswith("total: heuristic ")
    assert sum(", no grad)" in line for line in lines) == 1


def test_the_command_tables_a_registered_model_and_refuses_bad_settings(script, tmp_path, capsys):
    out = tmp_path / "rates.json"
    assert (
        script.main(
            ["segresnet", "--dims", "3", "--side", "16", "--device", "cpu", "--repeats", "1", "--json", str(out)]
        )
        == 0
    )
    result = json.loads(out.read_text())
    rows = result["models"]["segresnet"]["rows"]
    assert sum(r["calls"] for r in rows) == 32  # SegResNet's convolutions at its default widths
    assert result["settings"]["batch"] == 1 and "segresnet: 32 convolutions" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        script.main(["segresnet", "--dims", "3", "--side", "16", "--device", "cpu", "--json", str(out)])
    assert exit_info.value.code == 2 and "exists; choose a new file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.main(["segresnet", "--dims", "3", "--side", "16", "--device", "cpu", "--override", "dynunet:x=1"])
    assert "not one of the models" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # a size the model refuses: its message, no traceback
        script.main(["dynunet", "--dims", "3", "--side", "16", "--device", "cpu"])
    assert exit_info.value.code == 2 and "dynunet at --side 16: dynunet needs" in capsys.readouterr().err
