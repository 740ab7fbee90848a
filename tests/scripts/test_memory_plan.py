"""scripts/memory_plan.py: the buffers that make a compiled model's planned memory peak, by module."""

import copy
import json

import pytest
import torch
from torch import nn

from rwkvseg.devices import cpu_has_native_bf16
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


class NormAct(nn.Module):
    """rwkvseg::instance_norm_act, an op with three outputs (y, mean, rstd), as the fused norms call it on CUDA."""

    def forward(self, x):
        return torch.ops.rwkvseg.instance_norm_act(x, None, None, 1e-5, 0.01)[0]


class OpSkip(nn.Module):
    """A residual whose 16-channel map, made by the three-output op (`norm`), is held across a 64-channel one."""

    def __init__(self, in_channels, num_classes):
        super().__init__()
        self.keep, self.norm = nn.Conv2d(in_channels, 16, 3, padding=1), NormAct()
        self.wide, self.narrow = nn.Conv2d(16, 64, 3, padding=1), nn.Conv2d(64, 16, 3, padding=1)
        self.head = nn.Conv2d(16, num_classes, 1)

    def forward(self, x):
        kept = self.norm(self.keep(x))  # [B, 16, H, W]: the op's first output, live until the sum
        return self.head(self.narrow(self.wide(kept)) + kept)  # wide: [B, 64, H, W]


@pytest.fixture
def skip_model(monkeypatch):
    builders = registry._builders()
    monkeypatch.setattr(registry, "_builders", lambda: {**builders, "skip_test": Skip, "op_skip_test": OpSkip})


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


def test_an_ops_outputs_are_counted_where_they_are_held(skip_model, tmp_path):
    """A multi-output op's buffer allocates its outputs at once and frees nothing; each output frees its part. The
    held map (the op's y, 16 x 32^2 float32 = 64 KiB) is listed at the peak with its own size, dtype and module, and
    the live buffers add up to the planned peak."""
    script = load_script("memory_plan")
    out = tmp_path / "plan"
    argv = ["op_skip_test", "--dims", "2", "--side", "32", "--device", "cpu", "--no-amp", "--out", str(out)]
    assert script.main(argv) == 0
    (graph,) = json.loads((out / "plan.json").read_text())["graphs"]
    assert graph["unattributed_mb"] == 0
    assert sum(m["mb"] for m in graph["by_module"]) == graph["peak_mb"]
    (kept,) = [b for b in graph["largest"] if b["module"] == "norm" and b["mb"] == 1 / 16]
    assert kept["dtype"] == "float32" and kept["from_step"] < graph["peak_step"] < kept["to_step"]
    assert graph["largest"][0]["module"] == "wide"


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


@pytest.mark.parametrize(
    ("inductor", "message"),
    [
        ("reorder_for_peak_memory=false", "Inductor then plans no memory to read"),
        ("reorder_for_peak_memroy=false", "no setting 'reorder_for_peak_memroy'"),
    ],
)
def test_inductor_options_that_leave_no_plan_or_do_not_exist_are_refused(inductor, message, tmp_path, capsys):
    script = load_script("memory_plan")
    with pytest.raises(SystemExit) as exit_info:
        script.main(["unet_test", "--device", "cpu", "--inductor", inductor, "--out", str(tmp_path / "plan")])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "plan").exists()


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bfloat16")
def test_bf16_weights_plan_holds_no_float32_weights(skip_model, tmp_path):
    """--bf16-weights (as bench models --bf16-weights): the inference step runs a copy with bf16 convolution
    weights under bf16 autocast; the plan says so, and the maps are bfloat16 either way."""
    script = load_script("memory_plan")
    argv = ["skip_test", "--dims", "2", "--side", "32", "--device", "cpu", "--cpu-bf16"]
    for held in (False, True):
        out = tmp_path / f"plan-{held}"
        assert script.main([*argv, *(["--bf16-weights"] if held else []), "--out", str(out)]) == 0
        doc = json.loads((out / "plan.json").read_text())
        assert doc["bf16_weights"] is held and ("bf16 weights" in (out / "plan.txt").read_text()) is held
        assert doc["graphs"][0]["largest"][0]["dtype"] == "bfloat16"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--phase", "train"], "--bf16-weights is for inference steps"),
        (["--no-amp", "--device", "cpu"], "no bf16 autocast"),
    ],
)
def test_bf16_weights_without_a_bf16_inference_step_is_refused(extra, message, tmp_path, capsys):
    script = load_script("memory_plan")
    with pytest.raises(SystemExit) as exit_info:
        script.main(["unet_test", "--bf16-weights", *extra, "--out", str(tmp_path / "plan")])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "plan").exists()


def test_norm_op_runs_the_fused_norms_through_their_operator(tmp_path, capsys):
    """--norm-op: the fused norms of mmsegrwkv_test call rwkvseg::instance_norm_act on the CPU too (the op's
    outputs appear in the plan under the norms' modules); a model without fused norms is refused."""
    script = load_script("memory_plan")
    argv = ["mmsegrwkv_test", "--side", "32", "--device", "cpu", "--no-amp", "--first-graph-only", "--norm-op"]
    out = tmp_path / "plan"
    assert script.main([*argv, "--set", "fused_norm=true", "--top", "400", "--out", str(out)]) == 0
    doc = json.loads((out / "plan.json").read_text())
    assert doc["norm_op"] is True and "norms as their operator" in (out / "plan.txt").read_text()
    (graph,) = doc["graphs"]
    assert graph["unattributed_mb"] == 0
    with pytest.raises(SystemExit) as exit_info:
        script.main([*argv, "--out", str(tmp_path / "plain")])
    assert exit_info.value.code == 2 and "has no fused instance norms" in capsys.readouterr().err
    assert not (tmp_path / "plain").exists()


def test_norm_ops_swaps_each_fused_norm_of_that_model_only():
    """norm_ops: every FusedInstanceNormAct of the model calls the registered operator (seen by the profiler),
    with the same outputs; another model built alike keeps the plain ops."""
    from rwkvseg.layers.norm import FusedInstanceNormAct
    from rwkvseg.models import create_model

    script = load_script("memory_plan")
    torch.manual_seed(0)
    model, other = (create_model("mmsegrwkv_test", 4, 3, fused_norm=True).eval() for _ in range(2))
    other.load_state_dict(model.state_dict())
    norms = sum(isinstance(m, FusedInstanceNormAct) for m in model.modules())
    assert norms > 0 and script.norm_ops(model) == norms
    x = torch.randn(1, 4, 32, 32, 32)
    for net, calls in ((model, norms), (other, 0)):
        with torch.no_grad(), torch.profiler.profile() as prof:
            y = net(x)
        assert sum(e.name == "rwkvseg::instance_norm_act" for e in prof.events()) == calls
    torch.testing.assert_close(y, model(x).detach())
    copied = copy.deepcopy(model)  # as --bf16-weights copies the model: its norms call the op with their own tensors
    fused = [m for m in copied.modules() if isinstance(m, FusedInstanceNormAct)]
    assert all(m.forward.__self__ is m for m in fused)
