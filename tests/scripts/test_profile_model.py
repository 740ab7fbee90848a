"""scripts/profile_model.py: where a model's step goes, per category and operator, from torch.profiler."""

import gzip
import json
from types import SimpleNamespace

import pytest
from torch.autograd import DeviceType

from writers import load_script


@pytest.fixture(scope="module")
def script():
    return load_script("profile_model")


def test_a_kernel_takes_the_category_of_the_op_it_ran_in(script):
    assert script.category(["aten::copy_", "ChunkedBiWKV", "rwkvseg::bi_wkv_ordered"]) == "bi_wkv"
    assert script.category(["aten::empty", "aten::cudnn_convolution", "aten::conv3d"]) == "conv"
    assert script.category(["sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc"]) == "conv"
    assert script.category(["_fwd_chunk_scan_kernel"]) == "bi_wkv"  # by name where no operator is known
    assert script.category(["triton_red_fused__native_batch_norm_legit_functional_0"]) == "norm"
    assert script.category(["aten::add_", "Optimizer.step#SGD.step"]) == "optimizer"
    assert script.category(["aten::gelu_backward"]) == "elementwise"
    assert script.category(["aten::view"]) == "view"
    assert script.category(["some_new_kernel"]) == "uncategorized"


def _kernel(name, us, link, annotation=False):
    elapsed = SimpleNamespace(elapsed_us=lambda: us)
    kernel = SimpleNamespace(name=name, device_type=DeviceType.CUDA, is_async=False, time_range=elapsed, id=0)
    kernel.linked_correlation_id, kernel.is_user_annotation = link, annotation
    return kernel


def _op(name, op_id, parent=None, link=0):
    return SimpleNamespace(
        name=name,
        device_type=DeviceType.CPU,
        is_async=False,
        id=op_id,
        cpu_parent=parent,
        linked_correlation_id=link,
        self_cpu_time_total=1.0,
    )


def test_cuda_kernels_are_attributed_through_their_launching_operator(script):
    """The profiler links a kernel to the operator that launched it (linked_correlation_id); a graph replay's
    kernels come with no operator and are known by name alone."""
    wkv = _op("rwkvseg::bi_wkv", 1)
    copy = _op("aten::copy_", 2, parent=wkv)
    conv = _op("aten::cudnn_convolution", 3, parent=_op("aten::conv3d", 4))
    events = [wkv, copy, conv, _op("cudaLaunchKernel", 9, link=3), _op("cudaGraphLaunch", 10, link=0)]
    events += [_kernel("_fwd_summary_kernel", 30.0, 1), _kernel("elementwise_kernel<copy>", 10.0, 2)]
    events += [_kernel("nchwToNhwcKernel", 20.0, 3), _kernel("Memcpy DtoD (Device -> Device)", 15.0, 2)]
    events += [_kernel("triton_poi_fused_add_0", 25.0, 0)]  # replayed from a graph: no operator
    events += [_kernel("ProfilerStep#1", 500.0, 0, annotation=True)]  # a span on the device's timeline
    summary = script.summarize(events, cuda=True, steps=2, top=10)
    shares = {c["category"]: c["share"] for c in summary["categories"]}
    assert shares["bi_wkv"] == pytest.approx(55 / 100)  # the kernel, the copy and the memcpy inside the op
    assert shares["conv"] == pytest.approx(0.2) and shares["elementwise"] == pytest.approx(0.25)
    assert sum(shares.values()) == pytest.approx(1.0)
    assert summary["profiled_ms_per_step"] == pytest.approx(0.05)
    assert summary["kernels_per_step"] == 2 and summary["graph_launches_per_step"] == 0.5  # the memcpy is no kernel
    assert summary["untied_ms_per_step"] == pytest.approx(0.0125)
    assert summary["top"][0]["name"] == "_fwd_summary_kernel"


@pytest.mark.parametrize("phase", ["infer", "train"])
def test_profile_of_a_small_model_on_the_cpu(script, tmp_path, capsys, phase):
    out = tmp_path / "out"
    argv = ["urwkv_test", "--device", "cpu", "--phase", phase, "--side", "16", "--batch", "2"]
    argv += ["--steps", "2", "--warmup", "1", "--set", "dual=false", "--out", str(out)]
    layout = "channels_last" if phase == "train" else "contiguous"  # each layout once, without a third profile
    assert script.main([*argv, "--memory-format", layout]) == 0
    printed = capsys.readouterr().out
    assert "CPU time per category" in printed and "top " in printed
    assert sorted(p.name for p in out.iterdir()) == ["profile.json", "profile.txt", "trace.json.gz"]
    assert (out / "profile.txt").read_text().strip() == printed.strip()
    result = json.loads((out / "profile.json").read_text())
    assert result["run"]["settings"] == {"dual": False} and result["run"]["shape"] == [2, 3, 16, 16]
    assert result["run"]["memory_format"] == layout and f"memory_format={layout}" in printed
    shares = {c["category"]: c["share"] for c in result["categories"]}
    assert {"bi_wkv", "norm", "conv", "uncategorized", "outside operators"} <= shares.keys()
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-9)
    assert shares["conv"] > 0 and shares["bi_wkv"] > 0
    per_category_ms = sum(c["ms_per_step"] for c in result["categories"])
    assert per_category_ms == pytest.approx(result["profiled_ms_per_step"])
    # The categories are the timed calls' CPU time, all of it and once: they sum to the calls' spans in the trace,
    # and each span holds its call's host time. (Compared with the host time within a tolerance, the profile
    # failed on a loaded machine: a thread preempted between a span's edge and the clock reading lengthens only
    # the span, by milliseconds against steps of 4 ms.)
    trace = json.loads(gzip.decompress((out / "trace.json.gz").read_bytes()))
    spans_ms = [e["dur"] / 1e3 for e in trace["traceEvents"] if e.get("name") == script.STEP_SPAN]
    assert len(spans_ms) == 2  # the profiled steps; the warm-up's is not recorded
    assert result["profiled_ms_per_step"] == pytest.approx(sum(spans_ms) / 2, rel=1e-4)
    assert result["per_step"]["host_ms"] <= sum(spans_ms) / 2 * (1 + 1e-3)  # the median of two steps is their mean
    assert (shares["optimizer"] > 0) == (phase == "train")
    top = result["top"]
    assert top and [r["ms_per_step"] for r in top] == sorted((r["ms_per_step"] for r in top), reverse=True)
    assert result["per_step"]["wall_ms"] > 0 and result["per_step"]["device_busy_ms"] is None
    assert any(e.get("name", "").startswith("ProfilerStep") for e in trace["traceEvents"])


def test_an_existing_out_is_refused(script, tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("earlier run")
    with pytest.raises(SystemExit) as exit_:
        script.main(["urwkv_test", "--device", "cpu", "--out", str(tmp_path)])
    assert exit_.value.code == 2
    assert f"--out {tmp_path} exists; give a new folder" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
