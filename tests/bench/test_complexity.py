import json

import pytest
import torch
from torch import nn

from rwkvseg.bench.complexity import count_layer_io, count_macs, count_parameters, measure_latency
from rwkvseg.models import create_model


class Small(nn.Module):
    """Conv (grouped), transposed conv and linear layers with hand-countable MACs, and a bare matmul."""

    def __init__(self, dims: int = 2):
        super().__init__()
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
        up = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[dims - 1]
        bn = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dims - 1]
        self.conv = conv(3, 8, 3, padding=1)
        self.grouped = conv(8, 8, 3, padding=1, groups=2, bias=False)
        self.norm = bn(8)
        self.up = up(8, 4, 2, stride=2)
        self.fc = nn.Linear(4, 6)
        self.mix = nn.Parameter(torch.randn(6, 6))

    def forward(self, x):
        x = self.up(self.norm(self.grouped(self.conv(x))))
        x = self.fc(x.movedim(1, -1))
        return x @ self.mix  # functional matmul: not counted by hooks


@pytest.mark.parametrize("dims,size", [(1, (7,)), (2, (5, 7)), (3, (3, 5, 4))])
def test_count_macs_matches_hand_count(dims, size):
    model = Small(dims)
    n = torch.tensor(size).prod().item()
    k = 3**dims
    expected = n * 8 * 3 * k + n * 8 * 4 * k + n * 8 * 4 * 2**dims + n * 2**dims * 6 * 4
    assert count_macs(model, (1, 3, *size)) == expected
    # FlopCounterMode also sees the functional matmul
    assert count_macs(model, (1, 3, *size), method="torch") == expected + n * 2**dims * 6 * 6
    assert count_macs(model, (2, 3, *size)) == 2 * expected


@pytest.mark.parametrize("dims,size", [(1, (7,)), (2, (5, 7)), (3, (3, 5, 4))])
def test_count_layer_io_sums_the_layers_inputs_and_outputs(dims, size):
    model = Small(dims).train()
    n = torch.tensor(size).prod().item()
    up = n * 2**dims  # elements per channel after the transposed conv
    conv, grouped = 3 * n + 8 * n, 8 * n + 8 * n
    transposed, fc = 8 * n + 4 * up, 4 * up + 6 * up  # the norm and the functional matmul count nothing
    assert count_layer_io(model, (1, 3, *size)) == conv + grouped + transposed + fc
    assert count_layer_io(model, (2, 3, *size)) == 2 * (conv + grouped + transposed + fc)
    assert model.training


def test_count_macs_restores_mode_and_rejects_unknown_method():
    model = Small().train()
    count_macs(model, (1, 3, 4, 4))
    assert model.training
    with pytest.raises(ValueError, match="hooks"):
        count_macs(model, (1, 3, 4, 4), method="thop")


def test_count_parameters_counts_shared_once_and_trainable():
    lin = nn.Linear(4, 5)
    model = nn.Sequential(lin, nn.ReLU(), nn.Linear(5, 4), lin)
    assert count_parameters(model) == (4 * 5 + 5) + (5 * 4 + 4)
    lin.weight.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == 5 + 5 * 4 + 4


def test_measure_latency_reports_ordered_times_and_restores_threads():
    threads = torch.get_num_threads()
    out = measure_latency(Small(), (1, 3, 8, 8), threads=1, warmup=1, repeats=3)
    assert 0 < out["min_ms"] <= out["median_ms"] <= out["max_ms"]
    assert torch.get_num_threads() == threads
    model = Small()
    measure_latency(model, (1, 3, 8, 8), warmup=0, repeats=1, channels_last=True)
    assert model.conv.weight.is_contiguous()  # converted back


def test_bench_complexity_command_writes_a_row_per_model(tmp_path, capsys):
    from rwkvseg.cli import main

    out = tmp_path / "complexity.json"
    argv = ["bench", "complexity", "--models", "urwkv_test", "cmunext_test", "--size", "32", "40", "--repeats", "1"]
    assert main([*argv, "--threads", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["model"] for r in rows] == ["urwkv_test", "cmunext_test"]
    assert all(r["params_m"] > 0 and r["gmacs"] > 0 and r["median_ms"] > 0 for r in rows)
    for row in rows:  # bf16 bytes of the layers' inputs and outputs, in MiB
        elements = count_layer_io(create_model(row["model"], 3, 1), (1, 3, 32, 40))
        assert row["layer_io_mib"] == pytest.approx(elements * 2 / 2**20)
    printed = capsys.readouterr().out
    assert "urwkv_test" in printed and "layer I/O MiB" in printed
