"""How many Triton Bi-WKV kernel variants a model's eager calls need compiled, and what makes them differ.

Triton compiles a kernel once per specialization: the values of its `tl.constexpr` parameters, and for every
other integer argument (tuples' elements too) whether it is 1 and whether it is a multiple of 16; for every tensor,
its dtype and whether its address is 16-byte aligned. On a fresh machine each new variant is a compilation of
seconds: session 27's GPU run (docs/speed.md, "Cost growth") saw MMSegRWKV's eager first call take 8-20 s at each
new input side (training 13-44 s) against 0.1-0.8 s for the CNN baselines. This script counts the variants without
a GPU: the Bi-WKV kernels are replaced by recorders (the wrappers' own host code runs, on CPU tensors, as
scripts/profile_wkv_host.py --stub-kernels does), the model runs forward (and backward for `train`) at each given
shape in turn, and it prints per shape the variants not seen before, then which arguments made the variants of
each kernel differ. The fused instance norms' kernels (CUDA only) are not counted.

    python scripts/triton_variants.py mmsegrwkv 64:1:infer 128:1:infer 160:1:infer [--set fused_norm=true]
        [--unspecialized dims orders NCB n] [--json OUT.json]

--unspecialized counts as if the kernels did not specialize those parameters' integers: what such a change would
leave to compile, before a GPU says whether the kernels keep their speed. For a scalar parameter that change is
naming it in `do_not_specialize`; a tuple parameter (`dims`, `layout`, `orders`) would first have to become scalar
parameters, because Triton specializes a tuple's elements whatever `do_not_specialize` says (its native specializer
recurses into tuples with the default flags: `native_specialize_impl(BaseBackend, (1, 32), False, False, True)`
returns `(('constexpr', 'i32'), (1, 'D'))` on Triton 3.9).

Each SHAPE is SIDE:BATCH:PHASE (PHASE infer or train); dims, channels and classes follow the model (3D: 4 -> 3,
2D: 3 -> 1, as `rwkvseg bench models`).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import torch

from rwkvseg.bench.models import PROBLEMS, model_dims
from rwkvseg.bench.wkv import replaced_wkv_kernels
from rwkvseg.files import write_json
from rwkvseg.models import create_model, list_models
from rwkvseg.train.config import apply_overrides


def specialization(value: object, specialize: bool = True) -> object:
    """What Triton tells variants apart by, for one non-constexpr argument (specialize=False: an argument in
    `do_not_specialize`, whose integers are not told apart)."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return ("int", value == 1, value % 16 == 0) if specialize else "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, tuple):
        return tuple(specialization(v, specialize) for v in value)
    if isinstance(value, torch.Tensor):
        return (str(value.dtype), value.data_ptr() % 16 == 0)
    return type(value).__name__


class Recorder:
    """Stands for one Triton kernel: `kernel[grid](*args, **options)` records the launch's variant key."""

    def __init__(self, name: str, kernel: object, seen: dict[str, set], unspecialized: frozenset[str]) -> None:
        self.name, self.seen, self.unspecialized = name, seen, unspecialized
        self.params = [(p.name, p.is_constexpr) for p in kernel.params]  # type: ignore[attr-defined]

    def __getitem__(self, grid: object):
        def launch(*args: object, **options: object) -> None:
            key = tuple(
                ("constexpr", value) if constexpr else specialization(value, name not in self.unspecialized)
                for (name, constexpr), value in zip(self.params, args, strict=True)
            )
            self.seen[self.name].add((*key, tuple(sorted(options.items()))))

        return launch


def kernel_params() -> dict[str, list[str]]:
    """Each Bi-WKV kernel's parameter names, in order."""
    kernels = importlib.import_module("rwkvseg.ops.bi_wkv.triton")
    return {name: [p.name for p in getattr(kernels, name).params] for name in kernels.KERNELS}


def check_unspecialized(unspecialized: frozenset[str]) -> None:
    """A ValueError naming the kernels' parameters when unspecialized names another."""
    known = {param for params in kernel_params().values() for param in params}
    unknown = sorted(unspecialized - known)
    if unknown:
        raise ValueError(f"--unspecialized {' '.join(unknown)}: no such kernel parameter; they are {sorted(known)}")


@contextlib.contextmanager
def recorded_kernels(seen: dict[str, set], unspecialized: frozenset[str] = frozenset()) -> Iterator[None]:
    """Inside: the Bi-WKV kernels record their launches into seen (kernel name -> variant keys), counting the
    integers of the arguments named in unspecialized as Triton's `do_not_specialize` would; the eager entry takes
    any tensor for a Triton input. Restored on exit."""
    with replaced_wkv_kernels(lambda name, kernel: Recorder(name, kernel, seen, unspecialized)):
        yield


def parse_shape(text: str) -> tuple[int, int, str]:
    """SIDE:BATCH:PHASE -> (side, batch, phase); ValueError names what is wrong."""
    try:
        side, batch, phase = text.split(":")
        shape = int(side), int(batch), phase
    except ValueError:
        raise ValueError(f"shape {text!r} must be SIDE:BATCH:PHASE, e.g. 64:1:infer") from None
    if phase not in ("infer", "train") or shape[0] < 8 or shape[1] < 1:
        raise ValueError(f"shape {text!r}: PHASE is infer or train, SIDE >= 8, BATCH >= 1")
    return shape


def count(
    model_name: str,
    shapes: list[tuple[int, int, str]],
    overrides: dict,
    unspecialized: frozenset[str] = frozenset(),
    dims: int | None = None,
) -> dict:
    """Per shape in turn, the variants it added per kernel; then per kernel the arguments its variants differ in
    (the arguments named in unspecialized counted as if the kernels did not specialize on their integers). dims:
    the model's (None: found by building it once)."""
    check_unspecialized(unspecialized)
    seen: dict[str, set] = defaultdict(set)
    dims = dims or model_dims(create_model(model_name, *PROBLEMS[2], **overrides))
    in_channels, num_classes = PROBLEMS[dims]
    steps = []
    with recorded_kernels(seen, unspecialized):
        for side, batch, phase in shapes:
            model = create_model(model_name, in_channels, num_classes, **overrides)
            x = torch.randn(batch, in_channels, *(side,) * dims)
            before = {kernel: set(keys) for kernel, keys in seen.items()}
            if phase == "train":
                model(x).float().mean().backward()
            else:
                with torch.no_grad():
                    model(x)
            new = {kernel: len(keys - before.get(kernel, set())) for kernel, keys in seen.items()}
            steps.append({"side": side, "batch": batch, "phase": phase, "new": sum(new.values()), "per_kernel": new})
    names = {kernel: [*params, "launch options"] for kernel, params in kernel_params().items()}
    differ = {}
    for kernel, keys in seen.items():
        keys = list(keys)
        varying = [i for i in range(len(keys[0])) if len({repr(k[i]) for k in keys}) > 1]
        differ[kernel] = {"variants": len(keys), "differ_in": [names[kernel][i] for i in varying]}
    return {
        "model": model_name,
        "overrides": overrides,
        "unspecialized": sorted(unspecialized),
        "steps": steps,
        "kernels": differ,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a registered model, e.g. mmsegrwkv")
    parser.add_argument("shapes", nargs="+", help="SIDE:BATCH:PHASE, measured in turn (e.g. 64:1:infer 64:2:train)")
    parser.add_argument(
        "--set", dest="settings", action="append", default=[], metavar="KEY=VALUE", help="a create_model setting"
    )
    parser.add_argument(
        "--unspecialized",
        nargs="+",
        default=[],
        metavar="PARAM",
        help="count as if the kernels did not specialize these parameters' integers (e.g. dims orders NCB n): "
        "do_not_specialize for a scalar; a tuple would have to become scalars first (Triton specializes its elements)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the counts here (a new file)")
    args = parser.parse_args(argv)
    if args.model not in list_models():
        parser.error(f"unknown model {args.model!r}; choose from {', '.join(list_models())}")
    if args.json is not None and args.json.exists():
        parser.error(f"--json {args.json} exists; choose a new file")
    unspecialized = frozenset(args.unspecialized)
    try:
        shapes = [parse_shape(text) for text in args.shapes]
        settings = apply_overrides({}, args.settings)  # read as bench models --override reads them
        check_unspecialized(unspecialized)
    except ValueError as err:
        parser.error(str(err))
    torch.set_num_threads(min(2, torch.get_num_threads()))
    try:  # an unknown or invalid setting: create_model names the valid ones
        dims = model_dims(create_model(args.model, *PROBLEMS[2], **settings))
    except ValueError as err:
        parser.error(f"--set: {err}")
    try:  # a shape the model refuses (too small for its downsampling, say)
        result = count(args.model, shapes, settings, unspecialized, dims)
    except ValueError as err:
        parser.error(f"{args.model}: {err}")
    for step in result["steps"]:
        per_kernel = ", ".join(f"{k} {n}" for k, n in step["per_kernel"].items() if n)
        print(f"{step['side']}:{step['batch']}:{step['phase']}: {step['new']} new variants ({per_kernel or 'none'})")
    total = sum(k["variants"] for k in result["kernels"].values())
    print(f"{total} variants in all")
    for kernel, info in result["kernels"].items():
        print(f"  {kernel}: {info['variants']}, differing in {', '.join(info['differ_in']) or 'nothing'}")
    if args.json is not None:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
