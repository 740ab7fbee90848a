"""Profile one registered model's inference call or training step with torch.profiler: where its time goes.

`rwkvseg bench models` measures a model's times; this explains one of its rows. It runs the bench's own step
(bench.models.make_step: the same input shape, bf16 autocast on CUDA, a training step of SGD on the mean of the
logits, the same torch.compile settings and memory format) on one device, and writes to OUT, a new folder:

- profile.txt: per step the wall, host and device-busy ms and the kernel launches; the share of the device time
  (CPU time on the CPU) per category (Bi-WKV, norm, convolution, matmul, ..., uncategorized); the top kernels by
  device time (operators by self CPU time on the CPU); torch's own operator table;
- profile.json: the same numbers;
- trace.json.gz: the Chrome trace (open in https://ui.perfetto.dev).

    python scripts/profile_model.py mmsegrwkv --dims 3 --side 128 --phase train --mode compiled \
        --set fused_norm=true --out OUT

The first call (compilation, cuDNN's choices) runs before the profile; then --warmup steps under the profiler's
warm-up and --steps profiled steps, each followed by a device synchronize as in the bench, so a step's wall time
is the bench's time. --compile-mode reduce-overhead replays CUDA graphs, whose kernels the profiler may not tie
to operators: profile with --compile-mode default for the categories.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function, schedule

from rwkvseg.bench.profiling import device_kernels

# (category, patterns): a kernel (CUDA) or an operator's self time (CPU) goes to the first category with a
# pattern (a regular expression, searched case-insensitively) in its own name or in the name of an operator it
# ran inside, so a copy inside rwkvseg::bi_wkv is Bi-WKV's and a layout kernel inside a convolution is the
# convolution's. Order matters: our ops first, then norms (cuDNN's batch norm kernels are "cudnn::bn_..."), then
# convolutions. Our Triton kernels are named by their step (_fwd_summary_kernel, _stats_kernel, ...), so they are
# matched by name too, for the launches the profiler ties to no operator (CUDA graph replays). Extend by adding
# patterns or categories; what matches none is "uncategorized", shown with the rest.
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("bi_wkv", (r"rwkvseg[:_]+bi_wkv", r"^_(fwd|bwd)_(summary|chunk_scan|output)_kernel$")),
    (
        "norm",  # instance norm (rwkvseg::instance_norm_act, aten::instance_norm) and the other normalizations
        (r"rwkvseg[:_]+instance_norm", r"norm", r"^_(stats|forward|backward_reduce|backward_dx)_kernel$", r"\bbn_"),
    ),
    (
        "conv",
        (r"conv", r"cudnn", r"implicit_?gemm", r"xmma", r"winograd", r"[dw]grad", r"fprop", r"im2col", r"col2im"),
    ),
    (
        "matmul",
        (
            r"gemm",
            r"matmul",
            r"aten::(mm|bmm|addmm|baddbmm|linear)$",
            r"cublas",
            r"cutlass",
            r"attention",
            r"MmBackward",
            r"triton_tem_",  # Inductor's matmul templates (max-autotune)
        ),
    ),
    ("optimizer", (r"^Optimizer\.", r"_foreach_", r"multi_tensor_apply", r"AccumulateGrad")),  # and .grad sums
    (
        "memory",  # copies, fills, layout changes, allocation
        (
            r"^memcpy",
            r"^memset",
            r"copy",
            r"aten::(clone|contiguous|cat|stack|flip|roll|pad|constant_pad_nd)$",
            r"aten::(fill_|zero_|zeros|zeros_like|empty|empty_like|empty_strided|resize_|slice_backward)$",
            r"(Cat|Stack|ConstantPadNd|Slice|Flip)Backward",
        ),
    ),
    (
        "elementwise",  # pointwise ops, reductions, pooling, resampling; Inductor's fused kernels
        (
            r"elementwise",
            r"vectorized",
            r"unrolled",
            r"reduce",
            r"triton_(poi|per|red)_",
            r"pool",
            r"upsample",
            r"aten::(add|sub|mul|div|neg|exp|log|sigmoid|tanh|relu|gelu|silu|leaky_relu|clamp|where)(_backward)?_?$",
            r"aten::(sum|mean|amax|max|min|softmax|_softmax|pow|sqrt|rsqrt|abs|lerp|addcmul|addcdiv|rsub)(_backward)?_?$",
            r"(add|sub|mul|div|neg|exp|sigmoid|tanh|relu|gelu|silu|clamp|where|sum|mean|pow|softmax)Backward",
        ),
    ),
    (
        "view",  # views and reshapes: no data moves, only the host's time per op (none on the device)
        (
            r"aten::(view|_unsafe_view|reshape|_reshape_alias|as_strided|slice|narrow|select|transpose|t|permute)$",
            r"aten::(unsqueeze|squeeze|flatten|unflatten|expand|split|split_with_sizes|chunk|unbind|detach|alias)$",
            r"\bTBackward",
            r"(View|Transpose|Permute|Unsqueeze|Squeeze|Split|SplitWithSizes|Expand|Select|ReshapeAlias)Backward",
        ),
    ),
    (
        "compiled",  # the rest of a compiled region: Inductor's wrapper code (and on the CPU its fused C++
        # kernels, which are no operators), dynamo's guards
        (r"CompiledFxGraph", r"Torch-Compiled Region", r"TorchDynamo", r"CompiledFunction", r"Pregraph bytecode"),
    ),
)
UNCATEGORIZED = "uncategorized"
OUTSIDE = "outside operators"  # CPU: time in a step but in no operator (Python, the module calls)
# The span around each timed call: the CPU categories count only what ran inside it. The profiler's own
# ProfilerStep spans also hold its step() bookkeeping and the loop's timing code, where on a loaded machine the
# thread was seen preempted for 4 to 16 ms, time that went to "outside operators" as if the model had spent it.
STEP_SPAN = "profile_model.step"
_MATCHERS = [(name, re.compile("|".join(patterns), re.IGNORECASE)) for name, patterns in CATEGORIES]
_GRAPH_LAUNCH = re.compile(r"cu(da)?GraphLaunch")
_COPY_OR_FILL = re.compile(r"^mem(cpy|set)", re.IGNORECASE)


def category(names: list[str]) -> str:
    """The first category of CATEGORIES with a pattern in any of names (a kernel's or operator's own name, then
    the operators it ran inside, innermost first)."""
    for name, matcher in _MATCHERS:
        if any(matcher.search(n) for n in names):
            return name
    return UNCATEGORIZED


def _ancestry(event) -> list[str]:
    names = []
    while event is not None:
        names.append(event.name)
        event = event.cpu_parent
    return names


def attribute(events, cuda: bool) -> list[tuple[str, str, float, bool]]:
    """(name, category, µs, tied to an operator) of each kernel's device time (cuda; memory copies and fills
    included) or of each operator's self CPU time inside a STEP_SPAN (the CPU, where the span's own time is
    OUTSIDE)."""
    cpu_events = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU and not e.is_async]
    if not cuda:
        found = []
        for e in cpu_events:
            names = _ancestry(e)
            if STEP_SPAN in names:
                kind = OUTSIDE if e.name == STEP_SPAN else category(names)
                found.append((e.name, kind, e.self_cpu_time_total, True))
        return found
    # a kernel's linked_correlation_id is the id of the operator that launched it (0: none known)
    launchers = {e.id: e for e in cpu_events if getattr(e, "linked_correlation_id", 0) == 0}
    found = []
    for e in device_kernels(events):
        link = getattr(e, "linked_correlation_id", 0)
        owner = launchers.get(link) if link else None
        names = [e.name, *_ancestry(owner)]
        found.append((e.name, category(names), e.time_range.elapsed_us(), owner is not None))
    return found


def summarize(events, cuda: bool, steps: int, top: int) -> dict:
    """Per step: the time of each category and its share of the profiled time (all of it: the shares sum to 1),
    the top (name, category) pairs, and on CUDA the kernels, graph launches and kernel time tied to no operator."""
    found = attribute(events, cuda)
    total = sum(us for _, _, us, _ in found) or float("nan")
    names = [name for name, _ in CATEGORIES] + [UNCATEGORIZED] + ([] if cuda else [OUTSIDE])
    per_category = dict.fromkeys(names, 0.0)
    grouped: dict[tuple[str, str], list[float]] = defaultdict(list)
    for name, kind, us, _ in found:
        per_category[kind] += us
        grouped[(name, kind)].append(us)
    categories = [
        {"category": k, "ms_per_step": us / 1e3 / steps, "share": us / total} for k, us in per_category.items()
    ]
    ranked = sorted(grouped.items(), key=lambda item: -sum(item[1]))
    rows = [
        {"name": name, "category": kind, "calls_per_step": len(t) / steps, "ms_per_step": sum(t) / 1e3 / steps}
        | {"share": sum(t) / total}
        for (name, kind), t in ranked[:top]
    ]
    summary = {"profiled_ms_per_step": total / 1e3 / steps, "categories": categories, "top": rows}
    summary.update(kernels_per_step=None, graph_launches_per_step=None, untied_ms_per_step=None)
    if cuda:
        summary["kernels_per_step"] = sum(1 for name, *_ in found if not _COPY_OR_FILL.match(name)) / steps
        summary["graph_launches_per_step"] = sum(1 for e in events if _GRAPH_LAUNCH.search(e.name)) / steps
        summary["untied_ms_per_step"] = sum(us for _, _, us, tied in found if not tied) / 1e3 / steps
    return summary


def _short(name: str, width: int = 90) -> str:
    """A kernel's C++ template name cut in the middle to width."""
    return name if len(name) <= width else name[: width - 30] + "..." + name[-27:]


def _profile(step, warmup: int, steps: int, device: torch.device):
    """(profiler, host seconds, wall seconds) of steps calls of step after warmup calls under the profiler's
    warm-up, each call inside a STEP_SPAN; each call is followed by a device synchronize (the host time ends where
    the call returns)."""
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    prof = profile(activities=activities, schedule=schedule(wait=0, warmup=warmup, active=steps, repeat=1))
    host, wall = [], []
    with prof:
        for _ in range(warmup + steps):
            with record_function(STEP_SPAN):
                start = time.perf_counter()
                step()
                returned = time.perf_counter()
            if cuda:
                torch.cuda.synchronize(device)
            wall.append(time.perf_counter() - start)
            host.append(returned - start)
            prof.step()
    return prof, host[warmup:], wall[warmup:]


def _report(run: dict, per_step: dict, summary: dict, notes: list[str], operator_table: str, cuda: bool) -> str:
    from rwkvseg.bench.table import format_table

    time_of = "device time" if cuda else "CPU time"
    lines = [", ".join(f"{k}={v}" for k, v in run.items()), *(f"NOTE: {n}" for n in notes)]
    lines.append(
        f"\nper step (median of {run['steps']}): wall {per_step['wall_ms']:.2f} ms, host {per_step['host_ms']:.2f} ms"
    )
    if cuda:
        lines[-1] += f", device busy {per_step['device_busy_ms']:.2f} ms ({per_step['device_busy_share']:.0%} of wall)"
        lines[-1] += f", {per_step['kernels']:.0f} kernels, {per_step['graph_launches']:.0f} graph launches"
        lines[-1] += f", {per_step['device_ms_tied_to_no_operator']:.3g} ms of kernels tied to no operator"
    lines.append(f"\n{time_of} per category ({summary['profiled_ms_per_step']:.3g} ms per step profiled):")
    rows = [{**c, "percent": 100 * c["share"]} for c in summary["categories"]]
    lines.append(format_table(rows, [("category", "category"), ("ms_per_step", "ms/step"), ("percent", "%")]))
    lines.append(f"\ntop {len(summary['top'])} {'kernels' if cuda else 'operators'} by {time_of}:")
    rows = [{**r, "name": _short(r["name"]), "percent": 100 * r["share"]} for r in summary["top"]]
    columns = [("name", "name"), ("category", "category"), ("calls_per_step", "calls/step")]
    lines.append(format_table(rows, [*columns, ("ms_per_step", "ms/step"), ("percent", "%")]) if rows else "(none)")
    lines.append(f"\ntorch.profiler's operator table ({run['steps']} steps):\n{operator_table}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from rwkvseg.bench.models import MODES, make_step
    from rwkvseg.bench.wkv import environment
    from rwkvseg.cli.bench_row import add_row_arguments, bench_row

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_row_arguments(parser, out_help="a new folder for the tables, the JSON and the trace")
    parser.add_argument("--mode", choices=MODES, default="eager")
    parser.add_argument("--fullgraph", action="store_true", help="torch.compile(fullgraph=True)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads on --device cpu (default 2, as the bench)")
    parser.add_argument("--steps", type=int, default=20, help="profiled steps (default 20)")
    parser.add_argument("--warmup", type=int, default=5, help="steps under the profiler's warm-up (default 5)")
    parser.add_argument("--top", type=int, default=30, help="rows of the top tables (default 30)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        parser.error(f"--out {out} exists; give a new folder")
    if min(args.steps, args.warmup, args.threads, args.top) < 1:
        parser.error("--steps, --warmup, --threads and --top must be >= 1 (the profiler needs a warm-up step)")
    row = bench_row(args, parser, fullgraph=args.fullgraph)
    model, dims, shape, settings, config = row.model, row.dims, row.shape, row.settings, row.config
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if not cuda:
        torch.set_num_threads(args.threads)
    step = make_step(model, args.phase, shape, config, args.mode == "compiled")
    start = time.perf_counter()
    step()  # compiles when compiled
    if cuda:
        torch.cuda.synchronize(device)
    first_s = time.perf_counter() - start
    prof, host, wall = _profile(step, args.warmup, args.steps, device)

    summary = summarize(prof.events(), cuda, args.steps, args.top)
    wall_ms = statistics.median(wall) * 1e3
    busy_ms = summary["profiled_ms_per_step"] if cuda else None
    per_step = {"wall_ms": wall_ms, "wall_ms_min": min(wall) * 1e3, "host_ms": statistics.median(host) * 1e3}
    per_step.update(device_busy_ms=busy_ms, device_busy_share=busy_ms / wall_ms if cuda else None)
    per_step.update(kernels=summary["kernels_per_step"], graph_launches=summary["graph_launches_per_step"])
    per_step["device_ms_tied_to_no_operator"] = summary["untied_ms_per_step"]
    notes = []
    if summary["graph_launches_per_step"]:
        notes.append(
            f"{summary['graph_launches_per_step']:.0f} CUDA graph launches per step (--compile-mode "
            f"{args.compile_mode}), {summary['untied_ms_per_step']:.3g} ms per step of kernels tied to no operator: "
            "the kernels a graph replays may be missing from the profile or known by name alone, so the categories "
            "are not the whole story; profile with --compile-mode default for them"
        )
    run = {"model": args.model, "dims": dims, "shape": list(shape), "phase": args.phase, "mode": args.mode}
    run.update(compile_mode=args.compile_mode, fullgraph=args.fullgraph, amp=config.amp and cuda, settings=settings)
    run["memory_format"] = args.memory_format
    run.update(steps=args.steps, warmup=args.warmup, first_call_s=round(first_s, 3))
    sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
    report = _report(
        run, per_step, summary, notes, prof.key_averages().table(sort_by=sort_by, row_limit=args.top), cuda
    )

    out.mkdir(parents=True)
    (out / "profile.txt").write_text(report + "\n", encoding="utf-8")
    result = {"run": run, "environment": environment(device), "notes": notes, "per_step": per_step}
    result.update({k: summary[k] for k in ("profiled_ms_per_step", "categories", "top")})
    (out / "profile.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    prof.export_chrome_trace(str(out / "trace.json.gz"))
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
