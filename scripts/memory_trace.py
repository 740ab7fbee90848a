"""What a compiled model's CUDA memory holds at its peak: the caching allocator's own trace, allocation by allocation.

`rwkvseg bench models` measures a row's peak; `scripts/memory_plan.py` shows Inductor's plan of it, which leaves out
what runs outside the graph. This records the allocator's history (`torch.cuda.memory._record_memory_history`)
while the bench's own compiled step (bench.models.make_step: the same input, precision, torch.compile settings and
memory format) runs --calls times from cold (compilation, CUDA graph capture, steady replays), replays the trace of
allocations and frees to find the moment the most memory was allocated, and lists what was live then: each
allocation with its size and the line that made it (with torch's FX annotations, the model's own source line; else
the line of Inductor's generated code, e.g. `buf3 = empty_strided_cuda(...)` or a convolution's call, whose
workspace shows as a second allocation at the same line), summed by that line, largest first. Written to OUT, a
new folder: trace.txt and trace.json (and with --snapshot, snapshot.pickle for https://pytorch.org/memory_viz).

    python scripts/memory_trace.py mmsegrwkv --dims 3 --side 128 --set fused_norm=true --set gemm_convs=true \
        --memory-format channels_last --compile-mode reduce-overhead --out OUT

Only what the recorded calls allocate is in the trace: the model's weights, made before, are not (as the bench's
peak, read against a base taken before the first call, leaves them out). Under CUDA graphs
(--compile-mode reduce-overhead) the graph's buffers are allocated once, at capture, into its private pool; the
steady replays allocate nothing but their outputs. CUDA only.
"""

from __future__ import annotations

import argparse
import json
import linecache
import pickle
import sys
from collections import Counter
from pathlib import Path

import torch

MiB = 2**20
TORCH_DIR = str(Path(torch.__file__).resolve().parent)
ENTRIES = 500_000  # history kept: enough for a cold compiled 3D step (each entry a few KB with its frames)


def peak_of(trace: list[dict], start: int = 0) -> tuple[int, int, list[dict]]:
    """Replays an allocator trace (one device's TraceEntry list): an "alloc" makes a block live, its
    "free_completed" ends it (frees of blocks allocated before the trace began are skipped). Returns the peak of
    the live bytes from entry `start` on (blocks allocated before it and still live count), the index of the entry
    that reached it (start itself when nothing after it allocated more; -1 for an empty trace) and the blocks
    live there."""
    live: dict[int, dict] = {}
    total = peak = 0
    peak_at, peak_live = -1, []
    for i, entry in enumerate(trace):
        if i == start:  # the state the later entries start from is a candidate too
            peak, peak_at, peak_live = total, i, list(live.values())
        if entry["action"] == "alloc":
            live[entry["addr"]] = entry
            total += entry["size"]
            if i >= start and total > peak:
                peak, peak_at, peak_live = total, i, list(live.values())
        elif entry["action"] == "free_completed" and entry["addr"] in live:
            total -= live.pop(entry["addr"])["size"]
    return peak, peak_at, peak_live


def call_starts(trace: list[dict], marker_addrs: list[int]) -> list[int]:
    """The trace index of each marker's allocation, in order: markers are small tensors allocated (and kept)
    between the recorded calls, so the entries after marker k belong to call k + 2. A marker the trace does not
    hold (an overflowing history) ends the list."""
    starts, i = [], 0
    for addr in marker_addrs:
        while i < len(trace) and not (trace[i]["action"] == "alloc" and trace[i]["addr"] == addr):
            i += 1
        if i == len(trace):
            break
        starts.append(i)
        i += 1
    return starts


def site_of(frames: list[dict]) -> str:
    """Where an allocation was made: the innermost frame that is not torch's own code (Inductor's generated code,
    under its cache, counts as the model's), with the model's own source line when torch annotated the frame,
    else the frame's source line; where every frame is torch's (compilation, autotuning), "torch" and the
    innermost one. "?" without frames."""
    for frame in frames:
        filename = frame.get("filename", "")
        if filename.startswith(TORCH_DIR) or filename.startswith("<"):
            continue
        where = f"{Path(filename).name}:{frame.get('line', '?')}"
        original = (frame.get("fx_original_trace") or "").strip().splitlines()
        if original:
            return f"{where} {frame.get('fx_node_name', '')}: {original[-1].strip()}"
        source = linecache.getline(filename, frame.get("line", 0)).strip()
        return f"{where} {source}" if source else where
    if frames:
        inner = frames[0]
        return f"torch {Path(inner.get('filename', '?')).name}:{inner.get('line', '?')} {inner.get('name', '')}"
    return "?"


def report_of(trace: list[dict], top: int, start: int = 0) -> dict:
    """The peak of a device's trace from entry `start` on (peak_of), the blocks live there summed by site_of and
    the largest of them."""
    peak, index, live = peak_of(trace, start)
    by_site: Counter[str] = Counter()
    for block in live:
        by_site[site_of(block.get("frames", []))] += block["size"]
    largest = sorted(live, key=lambda b: -b["size"])[:top]
    return {
        "from_entry": start,
        "entries": len(trace),
        "peak_mb": peak / MiB,
        "peak_entry": index,
        "live_blocks": len(live),
        "pools": sorted({str(tuple(b.get("pool_id", ()))) for b in live}),
        "by_site": [{"site": s, "mb": size / MiB} for s, size in by_site.most_common(top)],
        "largest": [
            {"mb": b["size"] / MiB, "site": site_of(b.get("frames", [])), "pool": str(tuple(b.get("pool_id", ())))}
            for b in largest
        ],
    }


def format_report(title: str, report: dict) -> str:
    lines = [
        f"{title}: peak {report['peak_mb']:.1f} MiB allocated at event {report['peak_entry']} of "
        f"{report['entries']} (from event {report['from_entry']}), {report['live_blocks']} blocks live there "
        f"(pools {', '.join(report['pools'])})",
        "  live at the peak, by the line that allocated them:",
    ]
    lines += [f"    {s['mb']:9.1f} MiB  {s['site']}" for s in report["by_site"]]
    lines.append("  the largest live blocks:")
    lines += [f"    {b['mb']:9.1f} MiB  pool {b['pool']}  {b['site']}" for b in report["largest"]]
    return "\n".join(lines) + "\n"


def snapshot() -> dict:
    """The allocator snapshot, with the FX annotations of generated code where this torch has them."""
    try:
        return torch.cuda.memory._snapshot(augment_with_fx_traces=True)
    except TypeError:  # an older torch: no FX annotations
        return torch.cuda.memory._snapshot()


def main(argv: list[str] | None = None) -> int:
    from rwkvseg.bench.models import make_step
    from rwkvseg.bench.wkv import environment
    from rwkvseg.cli.bench_row import add_row_arguments, bench_row

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_row_arguments(parser, out_help="a new folder for trace.txt and trace.json")
    parser.add_argument("--calls", type=int, default=4, help="calls recorded from cold (default 4)")
    parser.add_argument("--snapshot", action="store_true", help="also write snapshot.pickle (for memory_viz)")
    parser.add_argument("--top", type=int, default=15, help="rows per table (default 15)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        parser.error(f"--out {out} exists; give a new folder")
    if args.calls < 1 or args.top < 1:
        parser.error("--calls and --top must be >= 1")
    if args.device != "cuda":
        parser.error("the allocator's trace is CUDA's; run on a GPU (--device cuda), or see scripts/memory_plan.py")
    row = bench_row(args, parser)  # parser.error without a GPU
    step = make_step(row.model, args.phase, row.shape, row.config, compiled=True)
    torch.cuda.synchronize()
    markers = []  # one small allocation after each call: where the calls part in the trace
    torch.cuda.memory._record_memory_history(max_entries=ENTRIES, stacks="python")
    try:
        for _ in range(args.calls):
            step()
            torch.cuda.synchronize()
            markers.append(torch.empty(1, device="cuda"))
        shot = snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    trace = shot["device_traces"][torch.cuda.current_device()]
    starts = call_starts(trace, [m.data_ptr() for m in markers])
    reports = {"all calls": report_of(trace, args.top)}
    if args.calls > 1 and starts:  # the bench's peak: the calls after the first, what the first left counting
        reports["steady calls"] = report_of(trace, args.top, start=starts[0])
    header = f"{row.title(args)}, {args.calls} calls from cold"
    text = "\n".join([header, *(format_report(title, r) for title, r in reports.items())])
    if len(trace) >= ENTRIES:
        text += f"note: the trace kept only its last {ENTRIES} events: an earlier peak may be missing\n"
    print(text, end="")
    out.mkdir(parents=True)
    (out / "trace.txt").write_text(text)
    doc = {"environment": environment(torch.device("cuda")), "model": args.model, "phase": args.phase}
    doc.update(input=list(row.shape), settings=row.settings, compile_mode=args.compile_mode, calls=args.calls)
    doc.update(bf16_weights=row.config.bf16_weights, call_starts=starts, reports=reports)
    (out / "trace.json").write_text(json.dumps(doc, indent=1) + "\n")
    if args.snapshot:
        with open(out / "snapshot.pickle", "wb") as f:
            pickle.dump(shot, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
