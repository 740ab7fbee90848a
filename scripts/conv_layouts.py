"""Which convolutions of a model run on channels-first maps: the layout of every convolution's input, weight and
output, eager and in the compiled graph (issue 13: cuDNN's layout kernels in MMSegRWKV's channels-last profile).

`scripts/profile_model.py` shows cuDNN transposing maps inside the convolutions of a compiled channels-last model;
this script names the convolutions. It builds the bench's inference call (bench.models.make_step: the same input,
memory format and bf16 autocast on CUDA), runs it eagerly, then compiled, and records each convolution's
arguments: eagerly through a TorchDispatchMode on `aten.convolution`, compiled by wrapping the extern kernel that
Inductor's wrapper code calls for it (`torch._inductor.select_algorithm.extern_kernels.convolution`). A map is
`channels_last` when its channel stride is 1, `contiguous` when it is channels-first, `either` when it cannot tell
(one channel, or one voxel).

--conv-layouts picks who lays out the compiled convolutions: inductor (the default of training, prediction and the
bench: in torch 2.13 Inductor converts only 2D convolutions to channels-last, `kernel/conv.py`, and lays out the
others as the convolution would return a channels-first input) or eager (rwkvseg.inductor_passes.KeepChannelsLast3d
pins each 3D convolution's maps and weights to the channels-last strides eager execution gives them).

    python scripts/conv_layouts.py mmsegrwkv --dims 3 --side 128 --set fused_norm=true --device cuda \
        --memory-format channels_last [--conv-layouts eager] [--compile-mode default] --json OUT.json

Prints a count per (input, weight, output) layout for eager and compiled, and the compiled convolutions whose
input or output is channels-first; --json writes every call.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rwkvseg.bench.models import PROBLEMS, ModelBenchConfig, input_shape, make_step
from rwkvseg.models import create_model
from rwkvseg.train.config import apply_overrides


def layout(t: torch.Tensor | None) -> str:
    """channels_last, contiguous, either (one channel or one position: both at once) or other."""
    if t is None or t.dim() < 4:
        return "other"
    if t.shape[1] == 1 or math.prod(t.shape[2:]) == 1:
        return "either"
    if t.stride(1) == 1:
        return "channels_last"
    return "contiguous" if t.is_contiguous() else "other"


def record(calls: list[dict], x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, groups: int) -> None:
    calls.append(
        {
            "input_shape": list(x.shape),
            "weight_shape": list(weight.shape),
            "groups": groups,
            "input": layout(x),
            "weight": layout(weight),
            "output": layout(out),
        }
    )


class _EagerConvolutions(TorchDispatchMode):
    def __init__(self, calls: list[dict]) -> None:
        super().__init__()
        self.calls = calls
        # the position of `groups` in each convolution op's arguments: under inference_mode conv2d / conv3d (and the
        # transposed ones) reach the mode whole; with autograd they arrive as convolution
        aten = torch.ops.aten
        self.groups_at = {aten.convolution.default: 8, aten.conv2d.default: 6, aten.conv3d.default: 6}
        self.groups_at.update({aten.conv_transpose2d.input: 6, aten.conv_transpose3d.input: 6})

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        at = self.groups_at.get(func)
        if at is not None:
            groups = args[at] if len(args) > at else kwargs.get("groups", 1)
            record(self.calls, args[0], args[1], out, groups)
        return out


def compiled_convolutions(step, calls: list[dict]) -> None:
    """Runs the compiled step twice (the first compiles) and records the second run's convolutions."""
    from torch._inductor import select_algorithm

    original = select_algorithm.extern_kernels.convolution

    def spy(x, weight, *args, **kwargs):
        out = original(x, weight, *args, **kwargs)
        record(calls, x, weight, out, kwargs.get("groups", args[-1] if args else 1))
        return out

    select_algorithm.extern_kernels.convolution = spy
    try:
        step()
        calls.clear()
        step()
    finally:
        select_algorithm.extern_kernels.convolution = original


def summary(calls: list[dict]) -> dict[str, int]:
    counts = Counter(f"{c['input']} / {c['weight']} -> {c['output']}" for c in calls)
    return dict(counts.most_common())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--dims", type=int, choices=[2, 3], required=True)
    parser.add_argument("--side", type=int, required=True)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--memory-format", default="channels_last", choices=["contiguous", "channels_last"])
    parser.add_argument("--compile-mode", default="default")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a model setting")
    parser.add_argument(
        "--conv-layouts",
        default="inductor",
        choices=["inductor", "eager"],
        help="who lays out compiled 3D convolutions",
    )
    parser.add_argument("--json", type=Path, default=None, help="write every call here (a new file)")
    args = parser.parse_args()
    if args.json is not None and args.json.exists():
        parser.error(f"{args.json} exists; choose a new file")
    try:  # create_model settings, read as bench models --override reads them: fused_norm=true, depths=[1,1]
        overrides = apply_overrides({}, args.set)
    except ValueError as err:
        parser.error(f"--set: {err}")
    in_channels, num_classes = PROBLEMS[args.dims]
    torch.manual_seed(0)
    try:  # an unknown or invalid setting: create_model names the valid ones
        model = create_model(args.model, in_channels, num_classes, **overrides).to(args.device)
    except ValueError as err:
        parser.error(f"--set: {err}")
    config = ModelBenchConfig(
        dims=args.dims,
        device=args.device,
        memory_format=args.memory_format,
        compile_mode=args.compile_mode,
        conv_layouts=args.conv_layouts,
    )
    shape = input_shape(args.dims, args.batch, args.side)
    result: dict[str, list[dict]] = {"eager": [], "compiled": []}
    eager = make_step(model, "infer", shape, config, compiled=False)
    with _EagerConvolutions(result["eager"]):
        eager()
    compiled_convolutions(make_step(model, "infer", shape, config, compiled=True), result["compiled"])
    for mode, calls in result.items():
        print(f"{mode}: {len(calls)} convolutions, input / weight -> output: {summary(calls)}")
    print("compiled convolutions with a channels-first input or output:")
    for call in result["compiled"]:
        if "contiguous" in (call["input"], call["output"]):
            print(
                f"  input {call['input_shape']} {call['input']}, weight {call['weight_shape']} {call['weight']}, "
                f"groups {call['groups']} -> {call['output']}"
            )
    if args.json is not None:
        args.json.write_text(json.dumps({"settings": vars(args) | {"json": str(args.json)}, **result}, indent=1))


if __name__ == "__main__":
    main()
