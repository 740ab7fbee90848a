"""What a compiled model's memory peak is made of: Inductor's own memory plan, buffer by buffer.

`rwkvseg bench models` measures a compiled row's peak; this shows which buffers make it. It compiles the bench's own
step (bench.models.make_step: the same input shape, precision, torch.compile settings and memory format) and reads
each graph's plan as Inductor schedules it (`torch._inductor.memory`, the estimate behind its
`reorder_for_peak_memory` pass: every buffer from the step that writes it to its last reader, in the order chosen).
For each compiled graph it reports the planned peak, the step where it falls, and the buffers live there, summed by
the module that made them and listed largest first, with their element types and lifetimes (the outputs of an op
with several, such as the fused instance norm's, each with its own part). Written to OUT, a new folder: plan.txt
and plan.json. --bf16-weights plans the inference step with the convolution and linear weights held in bfloat16,
as `bench models --bf16-weights` runs it. --norm-op runs the fused instance norms (`--set fused_norm=true`) on the
CPU through their registered operator, as the CUDA graph runs them (one opaque op writing its map in the input's
dtype and layout), instead of the plain ops that Inductor decomposes on the CPU with float32 temporaries.

    python scripts/memory_plan.py mmsegrwkv --dims 3 --side 128 --set fused_norm=true --set gemm_convs=true --out OUT

The plan is Inductor's estimate, not the allocator's peak: it leaves out what runs outside the graph (cuDNN and
cuBLAS workspaces, CUDA graph pools, the caching allocator's rounding), and a buffer that fusion removes is still
counted. The graphs compile afresh, into an empty Inductor cache removed after. The precision is the bench's: bf16
autocast on CUDA, float32 on the CPU (--no-amp: float32 on CUDA too; --cpu-bf16: bf16 autocast on the CPU too,
where the CPU has native bfloat16). On the CPU the graphs differ from CUDA's
where lowerings differ (this project's Triton kernels, the convolutions' layouts), so compare models on one device.
--first-graph-only stops after the first graph is planned (the forward: on the CPU it spares running a large step;
`--phase train` then shows no backward). The plan needs `torch._inductor.config.reorder_for_peak_memory` (on by
default); this script reads private Inductor functions and says so when a torch release has moved them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path
from types import MethodType

import torch

MiB = 2**20


class _Planned(Exception):
    """Raised out of the compilation once the first graph is planned (--first-graph-only)."""


def _planned_stop(err: BaseException | None) -> bool:
    """Whether err is, or was raised from, the stop after the first plan (_Planned)."""
    for _ in range(8):  # torch.compile's wrappers: a few exceptions deep
        if err is None:
            return False
        if isinstance(err, _Planned):
            return True
        err = err.__cause__ or err.__context__
    return False


def module_of(buffer) -> str:
    """The deepest module path among the FX nodes that made an Inductor buffer ("?" for graph inputs)."""
    origins = set(getattr(getattr(buffer, "node", None), "origins", ()) or ())  # the IR buffer's own FX nodes
    if not origins:  # or those of the (possibly fused) scheduler node that writes it
        for snode in getattr(getattr(buffer, "defining_op", None), "get_nodes", lambda: ())():
            origins |= set(getattr(getattr(snode, "node", None), "origins", ()) or ())
    paths = []
    for origin in origins:
        stack = origin.meta.get("nn_module_stack") or {}
        if stack:
            paths.append(list(stack.values())[-1][0])
    if not paths:  # no FX node (a graph input), or ops of the model's own forward (no submodule on the stack)
        return "(model)" if origins else "?"
    path = max(paths, key=len)
    return path.replace("L['self'].", "").replace("L['self']", "(model)")


def dtype_of(buffer) -> str:
    """An Inductor buffer's element type, e.g. "bfloat16" ("?" where it has none of its own)."""
    try:
        return str(buffer.node.get_dtype()).removeprefix("torch.")
    except (AttributeError, NotImplementedError):  # a multi-output op's own buffer, a graph input without a node
        return "?"


def held_bytes(info) -> int:
    """What a buffer holds while it lives, in Inductor's timeline: its allocation, except for the outputs of an op
    with several (a custom op such as rwkvseg::instance_norm_act): the op's buffer allocates them all at once and
    frees nothing, each output allocates nothing and frees its own part. Those parts are the outputs' (size_free);
    the op's buffer holds nothing of its own."""
    if info.size_alloc == 0:  # an output of a multi-output op (or a rename of a mutated buffer: 0 freed too)
        return info.size_free
    if info.size_free == 0:  # the multi-output op's own buffer: its outputs hold it
        return 0
    return info.size_alloc


def plan_of(memory, order, name_to_buf, name_to_fused_node, graph_inputs, graph_outputs, top: int) -> dict:
    """One graph's plan: peak, step, the live buffers at the peak summed by module and the largest of them, and
    what of the peak no live buffer accounts for (unattributed_mb: 0 but where a multi-output op's outputs are
    not yet split off at the peak step)."""
    _, freeable = memory.prepare_planning_info(order, name_to_buf, name_to_fused_node, graph_inputs, graph_outputs)
    infos, _, _ = memory.compute_memory_timeline(order, freeable, graph_outputs)
    peak, timeline = memory.peak_memory_from_buf_info_list(infos, len(order))
    step = timeline.index(peak)
    live = [b for b in infos if b.start_step <= step and (b.end_step == -1 or b.end_step >= step) and held_bytes(b)]
    by_module: Counter[str] = Counter()
    for b in live:
        by_module[module_of(b.buffer)] += held_bytes(b)
    largest = sorted(live, key=lambda b: -held_bytes(b))[:top]
    return {
        "nodes": len(order),
        "peak_mb": peak / MiB,
        "peak_step": step,
        "live_buffers": len(live),
        "unattributed_mb": (peak - sum(by_module.values())) / MiB,
        "by_module": [{"module": m, "mb": size / MiB} for m, size in by_module.most_common(top)],
        "largest": [
            {
                "mb": held_bytes(b) / MiB,
                "dtype": dtype_of(b.buffer),
                "module": module_of(b.buffer),
                "from_step": b.start_step,
                "to_step": b.end_step,  # -1: a graph output
                "graph_input": isinstance(b.buffer, memory.FreeableInputBuffer),
            }
            for b in largest
        ],
    }


def format_plan(index: int, plan: dict) -> str:
    lines = [
        f"graph {index}: {plan['nodes']} scheduled nodes; planned peak {plan['peak_mb']:.1f} MiB at step "
        f"{plan['peak_step']}, {plan['live_buffers']} buffers live there",
        "  live at the peak, by the module that made them:",
    ]
    lines += [f"    {m['mb']:9.1f} MiB  {m['module']}" for m in plan["by_module"]]
    if abs(plan["unattributed_mb"]) >= 0.05:
        lines.append(f"    {plan['unattributed_mb']:9.1f} MiB  (no live buffer: a multi-output op's outputs)")
    lines.append("  the largest live buffers (steps: written .. last read; -1 = a graph output):")
    for b in plan["largest"]:
        kind = " (a graph input)" if b["graph_input"] else ""
        lines.append(
            f"    {b['mb']:9.1f} MiB  {b['dtype']:>8}  steps {b['from_step']}..{b['to_step']}  {b['module']}{kind}"
        )
    return "\n".join(lines)


def norm_ops(model) -> int:
    """In place, for this model only: each FusedInstanceNormAct calls rwkvseg::instance_norm_act on every device, as
    it does on CUDA (off CUDA the module runs the plain ops, which Inductor decomposes and fuses, with float32
    temporaries the CUDA op does not have; the operator's own CPU implementation is the same computation). Returns
    how many were swapped."""
    from rwkvseg.layers.norm import FusedInstanceNormAct

    def through_op(norm: FusedInstanceNormAct, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.rwkvseg.instance_norm_act(x, norm.weight, norm.bias, norm.eps, norm.slope)[0]

    norms = [m for m in model.modules() if isinstance(m, FusedInstanceNormAct)]
    for norm in norms:  # a bound method: a deep copy of the model (--bf16-weights) binds its own norms
        norm.forward = MethodType(through_op, norm)
    return len(norms)


def main(argv: list[str] | None = None) -> int:
    from rwkvseg.bench.models import make_step
    from rwkvseg.bench.wkv import environment
    from rwkvseg.cli.bench_row import add_row_arguments, bench_row

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_row_arguments(parser, out_help="a new folder for plan.txt and plan.json")
    parser.add_argument("--cpu-bf16", action="store_true", help="bf16 autocast on the CPU too, as on CUDA")
    parser.add_argument("--first-graph-only", action="store_true", help="stop once the first graph is planned")
    parser.add_argument(
        "--norm-op",
        action="store_true",
        help="on the CPU, the fused instance norms (fused_norm=true) through their registered operator, as on CUDA",
    )
    parser.add_argument("--top", type=int, default=12, help="rows per table (default 12)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        parser.error(f"--out {out} exists; give a new folder")
    if args.top < 1:
        parser.error("--top must be >= 1")
    try:
        import torch._inductor.config as inductor_config
        import torch._inductor.memory as memory

        original = memory.reorder_for_peak_memory
        needed = ("prepare_planning_info", "compute_memory_timeline", "peak_memory_from_buf_info_list")
        missing = [name for name in needed if not hasattr(memory, name)]
    except (ImportError, AttributeError) as err:
        missing = [str(err)]
    if missing:
        parser.error(
            f"this torch ({torch.__version__}) lacks Inductor's memory planner as this script reads it: {missing}"
        )
    # fullgraph: one graph per compiled function (a graph break would split the plan); a CPU without native
    # bfloat16 refuses --cpu-bf16
    row = bench_row(args, parser, fullgraph=True, cpu_bf16=args.cpu_bf16)
    if not row.config.inductor.get("reorder_for_peak_memory", inductor_config.reorder_for_peak_memory):
        parser.error(
            "reorder_for_peak_memory is off (in torch._inductor.config or --inductor): Inductor then plans no memory to read"
        )
    model, shape, settings, config = row.model, row.shape, row.settings, row.config
    if args.norm_op:
        swapped = norm_ops(model)
        if not swapped:
            parser.error("--norm-op: this model has no fused instance norms; add --set fused_norm=true or drop it")
    plans: list[dict] = []

    def planned(nodes, name_to_buf, name_to_fused_node, graph_inputs, graph_outputs, *rest, **kwargs):
        order = original(nodes, name_to_buf, name_to_fused_node, graph_inputs, graph_outputs, *rest, **kwargs)
        plans.append(plan_of(memory, order, name_to_buf, name_to_fused_node, graph_inputs, graph_outputs, args.top))
        if args.first_graph_only:
            raise _Planned
        return order

    memory.reorder_for_peak_memory = planned
    previous_cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    try:  # compiled afresh into an empty cache: a graph loaded from Inductor's caches is not scheduled, so not planned
        with tempfile.TemporaryDirectory(prefix="memory_plan-") as cache:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
            make_step(model, args.phase, shape, config, compiled=True)()
    except Exception as err:  # torch.compile wraps _Planned in its own exception
        if not _planned_stop(err):
            raise
    finally:
        memory.reorder_for_peak_memory = original
        torch._dynamo.reset()
        if previous_cache is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous_cache
    if not plans:
        print("memory_plan: Inductor planned no graph (nothing compiled?)", file=sys.stderr)
        return 1
    header = row.title(args) + (", norms as their operator" if args.norm_op else "")
    report = "\n\n".join([header, *(format_plan(i, p) for i, p in enumerate(plans))]) + "\n"
    print(report, end="")
    out.mkdir(parents=True)
    (out / "plan.txt").write_text(report)
    doc = {"environment": environment(torch.device(args.device)), "model": args.model, "phase": args.phase}
    doc.update(input=list(shape), settings=settings, compile_mode=args.compile_mode, bf16_weights=config.bf16_weights)
    doc["norm_op"] = args.norm_op
    doc["graphs"] = plans
    (out / "plan.json").write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
