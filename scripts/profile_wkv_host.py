"""Where the host time of an eager Bi-WKV call goes (issue 13: at most 30 us of host time per forward call).

`rwkvseg bench wkv --device cuda` shows that short eager calls are bound by the host (its b2b column). This
script splits that host time. Per shape it times back-to-back eager forwards of `bi_wkv` (the public entry:
input checks, then on CUDA the Triton kernels' autograd Function without the registered operator) on the host,
one synchronize after the last, then runs the same calls under cProfile and groups the functions' own time:

- rwkvseg: our Python (entry checks, the Function's forward, tile choice, launch arguments);
- triton: Triton's Python launcher (argument binding, specialization, cache lookup);
- allocation: `torch.empty` and friends; autograd: `Function.apply` and its bookkeeping;
- launch and other builtins: C calls that are not the above (the kernel launch itself), and everything else.

cProfile adds its own cost to every Python call, so the groups' shares matter more than their sum; the plain
timing is the number to hold against the target. With --stub-kernels the Triton kernels are replaced by no-ops
(the only way on a machine without a GPU): what is left is the wrapper's own host time, launches excluded.

    python scripts/profile_wkv_host.py --out OUT                  # on a CUDA machine
    python scripts/profile_wkv_host.py --stub-kernels --out OUT   # on the CPU: the wrappers alone

Writes OUT/host.json (OUT: a new folder) and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import pstats
import sys
import time
from pathlib import Path

import torch

from rwkvseg.bench.wkv import environment, make_inputs, parse_shapes, replaced_wkv_kernels
from rwkvseg.compiling import synchronize
from rwkvseg.ops import bi_wkv

SHAPES = ((64, 256, 256), (16, 8192, 32), (2, 32768, 32), (1, 262144, 32))
GROUPS = ("rwkvseg", "triton", "allocation", "autograd", "launch and other builtins", "other")
ALLOCATIONS = ("torch.empty", "torch.zeros", "torch.full", "empty_like", "new_empty")


class _NoLaunch:
    """A stand-in for a Triton kernel: `kernel[grid](...)` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def stubbed_kernels():
    """Inside: the Triton kernels are no-ops and the eager entry points take any tensor for a Triton input, so
    what runs is exactly the wrappers' host code (on the CPU too). The module globals are restored on exit."""
    return replaced_wkv_kernels(lambda name, kernel: _NoLaunch())


def group_of(filename: str, function: str) -> str:
    """The group of one cProfile entry: (file, function name) -> one of GROUPS."""
    path = filename.replace("\\", "/")
    if filename == "~":  # a builtin: "<built-in method torch.empty>", "<method 'apply' of ...>"
        if any(a in function for a in ALLOCATIONS):
            return "allocation"
        if "apply" in function:
            return "autograd"
        return "launch and other builtins"
    if "/rwkvseg/" in path:
        return "rwkvseg"
    if "/triton/" in path:
        return "triton"
    if "/torch/autograd/" in path or "/torch/_functorch/" in path:
        return "autograd"
    return "other"


def grouped(stats: pstats.Stats, calls: int) -> tuple[dict[str, float], list[tuple[str, float]]]:
    """Own time per call in microseconds per group, and the top functions by own time per call."""
    groups = dict.fromkeys(GROUPS, 0.0)
    entries = []
    for (filename, line, function), (_, _, own, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        us = own / calls * 1e6
        groups[group_of(filename, function)] += us
        entries.append((f"{Path(filename).name}:{line}({function})" if filename != "~" else function, us))
    entries.sort(key=lambda e: -e[1])
    return {k: round(v, 2) for k, v in groups.items()}, [(name, round(us, 2)) for name, us in entries[:12]]


def measure(shape: tuple[int, int, int], device: torch.device, calls: int, grad: bool) -> dict:
    """Host microseconds per back-to-back eager forward, the cProfile groups, and the top functions."""
    inputs = [t.requires_grad_(grad) for t in make_inputs(shape, device)]  # the inputs of `bench wkv`
    for _ in range(20):  # Triton's compile and cache lookups, the allocator's pool
        bi_wkv(*inputs)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        bi_wkv(*inputs)
    host = (time.perf_counter() - start) / calls * 1e6
    synchronize(device)
    wall = (time.perf_counter() - start) / calls * 1e6
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        bi_wkv(*inputs)
    profiler.disable()
    synchronize(device)
    groups, top = grouped(pstats.Stats(profiler), calls)
    return {
        "shape": "x".join(map(str, shape)),
        "grad": grad,
        "host_us": round(host, 2),
        "wall_us": round(wall, 2),
        "profiled_us": groups,
        "top": top,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="a new folder for host.json")
    parser.add_argument("--shapes", default="", help="'B,T,C;B,T,C' (default: the four short shapes of bench wkv)")
    parser.add_argument("--calls", type=int, default=500, help="calls per measurement (default 500)")
    parser.add_argument("--stub-kernels", action="store_true", help="no-op kernels: the wrappers alone (any device)")
    parser.add_argument("--device", default="", help="cuda (default where present) or cpu (needs --stub-kernels)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        print(f"profile_wkv_host: {out} exists; pass a new folder", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and not args.stub_kernels:
        print("profile_wkv_host: no CUDA device; pass --stub-kernels to time the wrappers alone", file=sys.stderr)
        return 2
    try:
        shapes = parse_shapes(args.shapes) if args.shapes else SHAPES
    except ValueError:
        print(f"profile_wkv_host: --shapes {args.shapes!r}; write 'B,T,C;B,T,C' with positive ints", file=sys.stderr)
        return 2
    with stubbed_kernels() if args.stub_kernels else contextlib.nullcontext():
        rows = [measure(shape, device, args.calls, grad) for shape in shapes for grad in (False, True)]
    env = {**environment(device), "stub_kernels": args.stub_kernels, "calls": args.calls}
    out.mkdir(parents=True)
    (out / "host.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1) + "\n")
    print(", ".join(f"{k}={v}" for k, v in env.items()))
    print(f"{'shape':>12} {'grad':>5} {'host us':>8} {'wall us':>8}  " + "  ".join(f"{g[:10]:>10}" for g in GROUPS))
    for r in rows:
        groups = "  ".join(f"{r['profiled_us'][g]:>10.1f}" for g in GROUPS)
        print(f"{r['shape']:>12} {r['grad']!s:>5} {r['host_us']:>8.1f} {r['wall_us']:>8.1f}  {groups}")
    print("own time per call under cProfile (us); top functions in host.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
