"""scripts/memory_plan.py: the buffers that make a compiled model's planned memory peak, by module."""

import json

import pytest
import torch
from torch import nn

from rwkvseg.models import registry
from writers import load_script


class Skip(nn.Module):
    """A 16-channel map (`keep`) held across a 64-channel one (`wide`) for the concatenation at the end."""

    def __init__(self, in_channels, num_classes):
        super().__init__()
        self.keep = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.wide, self.narrow = nn.Conv2d(16, 64, 3, padding=1), nn.Conv2d(64, 4, 3, padding=1)
        self.head = nn.Conv2d(20, num_classes, 1)

    def forward(self, x):
        kept = self.keep(x)  # [B, 16, H, W], live until the concatenation
        return self.head(torch.cat([kept, self.narrow(self.wide(kept))], dim=1))  # wide: [B, 64, H, W]


@pytest.fixture
def skip_model(monkeypatch):
    builders = registry._builders()
    monkeypatch.setattr(registry, "_builders", lambda: {**builders, "skip_test": Skip})


def test_the_plan_names_the_map_held_across_the_peak(skip_model, tmp_path, capsys):
    """float32, 1 x 3 x 32 x 32: the peak falls where `wide`'s map (64 x 32^2 x 4 B = 256 KiB, the largest buffer)
    is written while `keep`'s (16 channels, 64 KiB) waits for the concatenation; each is named by the module that
    made it, and the report lands in OUT as text and JSON."""
    script = load_script("memory_plan")
    out = tmp_path / "plan"
    argv = ["skip_test", "--dims", "2", "--side", "32", "--device", "cpu", "--no-amp", "--out", str(out)]
    assert script.main(argv) == 0
    doc = json.loads((out / "plan.json").read_text())
    (graph,) = doc["graphs"]
    step = graph["peak_step"]
    largest = graph["largest"][0]
    assert (largest["module"], largest["mb"], largest["graph_input"]) == ("wide", 1 / 4, False)
    (kept,) = [b for b in graph["largest"] if b["module"] == "keep"]
    assert kept["mb"] == 1 / 16 and kept["from_step"] < step < kept["to_step"]  # written before, read after
    assert {m["module"]: m["mb"] for m in graph["by_module"]}["keep"] == 1 / 16
    assert 1 / 4 + 1 / 16 <= graph["peak_mb"] < 1 / 4 + 1 / 16 + 1 / 8  # no second wide map on top
    assert "keep" in (out / "plan.txt").read_text() and "planned peak" in capsys.readouterr().out


def test_first_graph_only_stops_after_the_training_steps_forward(skip_model, tmp_path):
    """--phase train compiles a forward and a backward graph; --first-graph-only plans the forward and stops there
    (the step never runs), with exit code 0 and the one plan written."""
    script = load_script("memory_plan")
    out = tmp_path / "plan"
    argv = ["skip_test", "--dims", "2", "--side", "32", "--device", "cpu", "--no-amp", "--phase", "train"]
    assert script.main([*argv, "--batch", "2", "--first-graph-only", "--out", str(out)]) == 0
    (graph,) = json.loads((out / "plan.json").read_text())["graphs"]
    assert graph["peak_mb"] >= 2 * (1 / 4 + 1 / 16)  # batch 2: the saved wide and keep maps at least


def test_an_existing_out_folder_is_refused(tmp_path, capsys):
    script = load_script("memory_plan")
    with pytest.raises(SystemExit) as exit_info:
        script.main(["unet_test", "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and "exists; give a new folder" in capsys.readouterr().err
