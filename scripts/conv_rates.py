"""How fast each distinct convolution of a model runs alone, with cuDNN's heuristic choice and with its benchmarked
choice (`torch.backends.cudnn.benchmark`): which convolutions keep a model below the rate of its peers (issue 13).

`scripts/profile_model.py` puts MMSegRWKV's compiled channels-last inference at 11.6 ms of device time, 7.66 ms of
it in convolutions, about all of DynUNet's time for more multiply-adds. This script names the convolutions. It runs
one eager call of each model (bench.models: the bench's input, memory format and bf16 autocast on CUDA) with
autograd on, so that every convolution reaches a TorchDispatchMode as `aten.convolution` with all its arguments,
and groups the calls by (input shape and layout, weight shape, stride, padding, dilation, transposed, output
padding, groups, dtype, whether the input needs a gradient). Each group is then timed alone on fresh random tensors of the same shapes and layouts:
the forward (`aten.convolution`), or with --phase train the forward and `aten.convolution_backward` (the weight's
gradient, and the input's where the step needs it: not for convolutions of the model's input), the median of --repeats after --warmup calls, CUDA events on
CUDA (perf_counter on the CPU), first with cuDNN's heuristics (the default of every run of this project) and then,
on CUDA, with `cudnn.benchmark` (cuDNN times its algorithms on the first call of each shape and keeps the fastest).

    python scripts/conv_rates.py mmsegrwkv dynunet segresnet --dims 3 --side 128 --device cuda \
        --memory-format channels_last --override mmsegrwkv:fused_norm=true [--phase train] --json OUT.json

Prints per model a table, the most expensive group first (by heuristic time): calls, ms per call (heuristic,
benchmarked), the group's ms per model call and the rate (TFLOP/s, 2 FLOPs per multiply-add) with the faster
choice, GMACs per call (with --phase train three times the forward's, twice without the input's gradient: each
gradient costs one forward); then the model's convolution total under each choice. --json writes every group and the totals (a new file).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rwkvseg.bench.models import (
    PROBLEMS,
    TRAIN_BATCH,
    Clock,
    ModelBenchConfig,
    cudnn_benchmark,
    input_shape,
    make_step,
)
from rwkvseg.cli.bench import model_overrides
from rwkvseg.models import create_model

CONVOLUTION = torch.ops.aten.convolution.default


def layout(t: torch.Tensor) -> str:
    """channels_last when the channel stride is 1 and there is more than one channel and position, else contiguous
    (what the replayed tensor is made as)."""
    if t.dim() >= 4 and t.shape[1] > 1 and math.prod(t.shape[2:]) > 1 and t.stride(1) == 1:
        return "channels_last"
    return "contiguous"


class Signature(NamedTuple):
    """One aten.convolution call, as hashable as its replay needs it."""

    input: tuple[int, ...]
    input_layout: str
    weight: tuple[int, ...]
    weight_layout: str
    bias: bool
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    transposed: bool
    output_padding: tuple[int, ...]
    groups: int
    dtype: str
    input_grad: bool  # whether the step needs the input's gradient (not for a model's first convolutions)


def signature(args: tuple) -> Signature:
    """The signature of one aten.convolution call from its arguments."""
    x, weight, bias, stride, padding, dilation, transposed, output_padding, groups = args
    return Signature(
        tuple(x.shape),
        layout(x),
        tuple(weight.shape),
        layout(weight),
        bias is not None,
        tuple(stride),
        tuple(padding),
        tuple(dilation),
        bool(transposed),
        tuple(output_padding),
        int(groups),
        str(x.dtype).removeprefix("torch."),
        bool(x.requires_grad),
    )


class _Convolutions(TorchDispatchMode):
    """Counts the aten.convolution calls by signature."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[tuple] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is CONVOLUTION:
            self.calls[signature(tuple(args) + tuple((kwargs or {}).values()))] += 1
        return func(*args, **(kwargs or {}))


def convolutions(model: torch.nn.Module, dims: int, batch: int, side: int, config: ModelBenchConfig) -> Counter:
    """The convolution calls of the forward of one eager bench training step of model (eval mode) on the bench's
    input: with autograd on every convolution arrives as aten.convolution with all its arguments (under inference
    mode conv3d would arrive whole); the backward's convolution_backward calls are not counted."""
    step = make_step(model, "train", input_shape(dims, batch, side), config, compiled=False)
    model.eval()  # the same convolutions, without the optimizer step; make_step only set train mode
    mode = _Convolutions()
    with mode:
        step()
    return mode.calls


def macs(sig: Signature) -> int:
    """Multiply-adds of one call: every output (input, when transposed) position times a kernel's reach."""
    kernel = math.prod(sig.weight[2:])
    if sig.transposed:  # weight [C_in, C_out / groups, k...]: each input position scatters to every output channel
        return math.prod(sig.input) * sig.weight[1] * kernel
    out = [
        (n + 2 * p - d * (k - 1) - 1) // s + 1
        for n, p, d, k, s in zip(sig.input[2:], sig.padding, sig.dilation, sig.weight[2:], sig.stride, strict=True)
    ]
    return sig.input[0] * sig.weight[0] * math.prod(out) * (sig.weight[1] * kernel)  # weight [C_out, C_in / g, k...]


def _tensor(shape: tuple, fmt: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    t = torch.randn(shape, dtype=dtype, device=device)
    if fmt == "channels_last":
        t = t.to(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)
    return t


def replay(sig: Signature, phase: str, device: torch.device) -> Callable[[], Any]:
    """The call of one signature on fresh random tensors: forward, or forward and backward (the weight's
    gradient, the input's where the model's step needs it, the bias's where there is one)."""
    dtype = getattr(torch, sig.dtype)
    x, weight = (
        _tensor(sig.input, sig.input_layout, dtype, device),
        _tensor(sig.weight, sig.weight_layout, dtype, device),
    )
    channels = sig.weight[1] * sig.groups if sig.transposed else sig.weight[0]
    bias = torch.randn(channels, dtype=dtype, device=device) if sig.bias else None
    settings = (list(sig.stride), list(sig.padding), list(sig.dilation), sig.transposed, list(sig.output_padding))
    settings += (sig.groups,)

    def forward() -> torch.Tensor:
        return CONVOLUTION(x, weight, bias, *settings)

    if phase == "infer":
        return forward
    grad = torch.randn_like(forward())
    bias_sizes = [channels] if sig.bias else None

    def step() -> None:
        forward()
        torch.ops.aten.convolution_backward(grad, x, weight, bias_sizes, *settings, [sig.input_grad, True, sig.bias])

    return step


def time_call(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> float:
    """Median milliseconds of fn over repeats after warmup calls (the first call picks cuDNN's algorithm), timed as
    the bench times a row (CUDA events on CUDA, perf_counter on the CPU)."""
    clock = Clock(device)
    for _ in range(max(warmup, 1)):
        fn()
    return statistics.median(clock(fn) for _ in range(repeats))


def rates(calls: Counter, phase: str, device: torch.device, warmup: int, repeats: int) -> list[dict]:
    """One row per signature, timed with cuDNN's heuristics and (CUDA) benchmarked, most expensive first."""
    choices = (False, True) if device.type == "cuda" else (False,)
    rows = []
    for sig, count in calls.items():
        row: dict[str, Any] = {k: list(v) if isinstance(v, tuple) else v for k, v in sig._asdict().items()}
        row.pop("weight_layout")
        row["calls"] = count
        # the backward: the weight's gradient and, where needed, the input's, each as costly as the forward
        row["gmacs"] = macs(sig) / 1e9 * ((3 if sig.input_grad else 2) if phase == "train" else 1)
        for benchmark in choices:
            with cudnn_benchmark(benchmark):
                ms = time_call(replay(sig, phase, device), device, warmup, repeats)
            row["benchmark_ms" if benchmark else "heuristic_ms"] = ms
        best = min(row.get("benchmark_ms", math.inf), row["heuristic_ms"])
        row["tflops"] = 2 * row["gmacs"] / best if best > 0 else None  # GFLOP per ms = TFLOP/s
        rows.append(row)
    rows.sort(key=lambda r: -r["calls"] * r["heuristic_ms"])
    return rows


def _shape(values: list[int]) -> str:
    return "x".join(map(str, values))


def table(name: str, rows: list[dict]) -> list[str]:
    """The printed table of one model."""
    benchmarked = any("benchmark_ms" in r for r in rows)
    head = "calls | input (layout, dtype) | weight | stride / padding | groups | bias | heuristic ms"
    head += " | benchmarked ms" if benchmarked else ""
    count = sum(r["calls"] for r in rows)
    lines = [f"{name}: {count} convolutions in {len(rows)} shapes", head + " | ms per model call | GMACs | TFLOP/s"]
    for r in rows:
        kind = "T " if r["transposed"] else ""
        cells = [
            str(r["calls"]),
            f"{_shape(r['input'])} ({r['input_layout']}, {r['dtype']}{'' if r['input_grad'] else ', no grad'})",
            kind + _shape(r["weight"]),
            f"{_shape(r['stride'])} / {_shape(r['padding'])}",
            str(r["groups"]),
            "yes" if r["bias"] else "no",
            f"{r['heuristic_ms']:.3f}",
        ]
        if benchmarked:
            cells.append(f"{r['benchmark_ms']:.3f}")
        per_call = r["calls"] * min(r["heuristic_ms"], r.get("benchmark_ms", math.inf))
        tflops = "-" if r["tflops"] is None else f"{r['tflops']:.1f}"
        cells += [f"{per_call:.3f}", f"{r['gmacs']:.2f}", tflops]
        lines.append(" | ".join(cells))
    totals = totals_of(rows)
    line = f"total: heuristic {totals['heuristic_ms']:.3f} ms"
    if benchmarked:
        line += f", benchmarked {totals['benchmark_ms']:.3f} ms"
    lines.append(line + f", {totals['gmacs']:.1f} GMACs")
    return lines


def totals_of(rows: list[dict]) -> dict[str, float]:
    """A model's convolutions per call: ms under each choice and GMACs."""
    out = {"gmacs": sum(r["calls"] * r["gmacs"] for r in rows)}
    for key in ("heuristic_ms", "benchmark_ms"):
        if all(key in r for r in rows):
            out[key] = sum(r["calls"] * r[key] for r in rows)
    return out


def _overrides(items: list[str], models: list[str]) -> dict[str, dict]:
    """bench models' --override reading, for the models of this run only."""
    out = model_overrides(items)
    unknown = sorted(out.keys() - set(models))
    if unknown:
        raise ValueError(f"--override names {unknown}, not one of the models {models}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="registered models (rwkvseg models lists them)")
    parser.add_argument("--dims", type=int, choices=sorted(PROBLEMS), required=True)
    parser.add_argument("--side", type=int, required=True, help="input side")
    parser.add_argument("--batch", type=int, help="default: 1 for infer, the bench's training batch for train")
    parser.add_argument("--phase", choices=("infer", "train"), default="infer")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    parser.add_argument("--memory-format", default="channels_last", choices=("contiguous", "channels_last"))
    parser.add_argument("--no-amp", action="store_true", help="float32 on CUDA too (default: bf16 autocast)")
    parser.add_argument("--override", action="append", default=[], metavar="MODEL:KEY=VALUE")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", type=Path, default=None, help="write every group and the totals (a new file)")
    args = parser.parse_args(argv)
    if args.json is not None and args.json.exists():
        parser.error(f"{args.json} exists; choose a new file")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here; use --device cpu")
    try:
        overrides = _overrides(args.override, args.models)
    except ValueError as err:
        parser.error(str(err))
    batch = args.batch or (TRAIN_BATCH[args.dims] if args.phase == "train" else 1)
    device = torch.device(args.device)
    config = ModelBenchConfig(dims=args.dims, device=args.device, memory_format=args.memory_format, amp=not args.no_amp)
    in_channels, num_classes = PROBLEMS[args.dims]
    result: dict[str, Any] = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    result["settings"] |= {"batch": batch, "torch": torch.__version__}
    result["models"] = {}
    for name in args.models:
        torch.manual_seed(0)
        try:
            model = create_model(name, in_channels, num_classes, **overrides.get(name, {})).to(device)
        except (KeyError, ValueError) as err:
            parser.error(f"{name}: {err}")
        try:  # a size the model refuses: its own message says which sizes it takes
            calls = convolutions(model, args.dims, batch, args.side, config)
        except ValueError as err:
            parser.error(f"{name} at --side {args.side}: {err}")
        rows = rates(calls, args.phase, device, args.warmup, args.repeats)
        print("\n".join(table(name, rows)), end="\n\n")
        result["models"][name] = {"rows": rows, "totals": totals_of(rows)}
        del model
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
