"""scripts/memory_trace.py: the allocator's trace replayed to its peak, and what was live there, by the line that
allocated it."""

import json

import pytest
import torch

from writers import load_script

MiB = 2**20


def _alloc(addr, mb, filename="/cache/ab/cab.py", line=7, **frame):
    return {
        "action": "alloc",
        "addr": addr,
        "size": int(mb * MiB),
        "frames": [{"filename": filename, "line": line, "name": "call", **frame}],
    }


def _free(addr, mb, action="free_completed"):
    return {"action": action, "addr": addr, "size": int(mb * MiB), "frames": []}


def test_the_peak_is_where_the_most_bytes_were_live_and_lists_them():
    """Block 2 (8 MiB) is only requested free when block 3 (6 MiB) comes: its memory is not reusable yet, so the
    peak is blocks 1-3 (18 MiB), not block 4's moment after 2's free completed (4 + 6 + 5). The free of a block
    from before the trace (64 MiB) is skipped."""
    script = load_script("memory_trace")
    trace = [
        _free(99, 64),
        _alloc(1, 4, line=3),
        _alloc(2, 8, line=4),
        _free(2, 8, "free_requested"),
        _alloc(3, 6, line=5),
        _free(2, 8),
        _alloc(4, 5, line=6),
    ]
    peak, index, live = script.peak_of(trace)
    assert (peak, index, sorted(b["addr"] for b in live)) == (18 * MiB, 4, [1, 2, 3])
    assert script.peak_of([]) == (0, -1, [])


def test_from_a_later_entry_the_blocks_still_live_count():
    """The steady calls' peak (from the entry after the first call): block 1 (4 MiB), allocated before and still
    live, counts under block 3 (10 MiB); block 2's larger moment (12 MiB) came before the start."""
    script = load_script("memory_trace")
    trace = [_alloc(1, 4), _alloc(2, 8), _free(2, 8), _alloc(4, 0.001), _alloc(3, 10)]
    peak, index, live = script.peak_of(trace, start=3)
    assert (peak, index, sorted(b["addr"] for b in live)) == (int(14.001 * MiB), 4, [1, 3, 4])
    # nothing allocated after the start: the state there is the peak
    assert script.peak_of(trace[:4], start=3)[:2] == (4 * MiB + int(0.001 * MiB), 3)


def test_call_starts_finds_the_markers_in_order():
    script = load_script("memory_trace")
    trace = [_alloc(5, 1), _alloc(7, 0.001), _free(5, 1), _alloc(5, 1), _alloc(9, 0.001)]
    assert script.call_starts(trace, [7, 9]) == [1, 4]
    assert script.call_starts(trace, [9, 7]) == [4]  # 7 is not after 9: the list ends
    assert script.call_starts(trace, [3]) == []


def test_sites_name_the_models_line_the_generated_line_or_torch(tmp_path):
    """FX-annotated frames give the model's source line; generated code without them its own source line; torch's
    own frames are skipped (and named only when no other frame exists)."""
    script = load_script("memory_trace")
    torch_file = f"{script.TORCH_DIR}/_inductor/runtime/x.py"
    generated = tmp_path / "cab.py"
    generated.write_text("def call(args):\n    buf3 = empty_strided_cuda((1, 32, 8), (256, 8, 1), torch.bfloat16)\n")
    annotated = {"filename": str(generated), "line": 2, "name": "call", "fx_node_name": "convolution_3"}
    annotated["fx_original_trace"] = 'File "mmsegrwkv.py", line 207, in forward\n    enc1 = self.enc1(x)\n'
    torch_frame = {"filename": torch_file, "line": 11, "name": "bench"}
    assert script.site_of([torch_frame, annotated]) == "cab.py:2 convolution_3: enc1 = self.enc1(x)"
    plain = {"filename": str(generated), "line": 2, "name": "call"}
    assert (
        script.site_of([torch_frame, plain])
        == "cab.py:2 buf3 = empty_strided_cuda((1, 32, 8), (256, 8, 1), torch.bfloat16)"
    )
    assert script.site_of([torch_frame]) == "torch x.py:11 bench"
    assert script.site_of([]) == "?"


def test_the_report_sums_the_live_blocks_by_site(tmp_path):
    script = load_script("memory_trace")
    trace = [_alloc(1, 4, line=3), _alloc(2, 8, line=4), _alloc(3, 2, line=3)]
    report = script.report_of(trace, top=5)
    assert report["peak_mb"] == 14 and report["live_blocks"] == 3
    assert [(s["site"], s["mb"]) for s in report["by_site"]] == [("cab.py:4", 8), ("cab.py:3", 6)]
    assert [b["mb"] for b in report["largest"]] == [8, 4, 2]
    text = script.format_report("steady calls", report)
    assert text.startswith("steady calls: peak 14.0 MiB") and "cab.py:3" in text


def test_the_cpu_is_refused_with_what_to_do(tmp_path, capsys):
    script = load_script("memory_trace")
    with pytest.raises(SystemExit) as exit_info:
        script.main(["unet_test", "--device", "cpu", "--out", str(tmp_path / "trace")])
    assert exit_info.value.code == 2 and "run on a GPU" in capsys.readouterr().err
    assert not (tmp_path / "trace").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_compiled_models_trace_on_cuda(tmp_path):
    """The compiled U-Net test model under CUDA graphs: the steady calls' peak is found after the first call and
    the live blocks add up to it, each with a site."""
    script = load_script("memory_trace")
    out = tmp_path / "trace"
    argv = ["unet_test", "--dims", "2", "--side", "64", "--compile-mode", "reduce-overhead", "--calls", "3"]
    assert script.main([*argv, "--out", str(out)]) == 0
    doc = json.loads((out / "trace.json").read_text())
    assert len(doc["call_starts"]) == 3
    steady = doc["reports"]["steady calls"]
    assert steady["from_entry"] == doc["call_starts"][0] and steady["peak_mb"] > 0
    assert all(s["site"] != "?" for s in steady["by_site"])
