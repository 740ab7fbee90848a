"""Whole-model cost, ours against the baselines, eager and compiled in one run: `rwkvseg bench models`.

For every model of one dimension and every input side: inference latency and peak memory (3D at batch 1, 2D at
batch 1 and 8) and one training step (forward, backward, SGD step) with its peak memory. Both sides run with the
same settings (bf16 autocast on CUDA, float32 on CPU) and, in the compiled rows, the same `torch.compile` mode, so
compiled is compared with compiled. Compilation time is measured apart from run time: it is the first call's time
less one steady call.

Times on CUDA come from CUDA events around each call (median over `repeats`); peak memory is the allocator's peak
in the calls after the first, above the model and its input, read from a settled allocator (`settle`: what earlier
rows left is freed first, so that a row's peak does not depend on the rows before it). The first call's own peak
is kept apart (`first_peak_mb`): it holds what compiling tunes once (Triton's autotuner benchmarks on copies of
the buffers a kernel writes, cold caches only) and cuDNN's trials, not what running the model needs; what the first
call leaves allocated (optimizer state, a CUDA graph's pool) stays counted. On the CPU the same table runs at small
sizes with a fixed thread count and no memory column (the allocator's peak is not observable there without a
subprocess per row).

memory_format "channels_last" runs a model's parameters and input in channels-last layout (NHWC / NDHWC), the one
cuDNN's bf16 convolutions run in: with NCHW activations each convolution transposes its input and output.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import logging
import math
import statistics
import time
import traceback
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..bf16_weights import hold_bf16_weights
from ..compiling import compile_callable
from ..cpu_convs import CPU_CONVS, use_onednn_convs
from ..devices import bf16_unsupported
from ..files import atomic_write
from ..memory_format import MEMORY_FORMATS, to_memory_format

log = logging.getLogger(__name__)

# build(name, in_channels, num_classes, **overrides) -> model: the registry's create_model, handed in by the
# command (benchmarks import no models)
Build = Callable[..., nn.Module]

MODES = ("eager", "compiled")
PHASES = ("infer", "train")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")
CONV_LAYOUTS = ("inductor", "eager")  # who lays out the compiled 3D convolutions (ModelBenchConfig.conv_layouts)
# Channels in and out of the problems the models are built for: RGB images with one foreground class; four MRI
# sequences with three tumour regions (BraTS).
PROBLEMS = {2: (3, 1), 3: (4, 3)}
SIDES = {("cuda", 2): (256, 512, 1024), ("cuda", 3): (64, 96, 128, 160), ("cpu", 2): (64, 128), ("cpu", 3): (64, 96)}
INFER_BATCHES = {2: (1, 8), 3: (1,)}
TRAIN_BATCH = {2: 8, 3: 2}


@dataclass(frozen=True)
class ModelBenchConfig:
    """One benchmark run of the named models (`models_of_dims` lists a registry's models of one dimension).

    sides: input side lengths (the input is a square / cube); empty: SIDES for the device. modes: eager and/or
    compiled; compile_mode, fullgraph, dynamic: torch.compile's settings, the same for every model (False, the
    default: a static graph per shape, as training and prediction compile; True compiles each (model, phase) once
    for all sizes; None is torch's own default, which recompiles a model's forward with symbolic sizes once a
    second shape arrives, so every later row of that model would run that dynamic graph). freeze: the
    compiled inference rows also under Inductor's `freezing` (the weights become constants of the graph: folded
    into neighbours such as an inference BatchNorm into its convolution, laid out once for the kernels that read
    them); the training rows cannot freeze and ignore it. conv_layouts: "inductor" (the default, as training and
    prediction compile) leaves the layouts of the compiled convolutions to Inductor (channels-first for most 3D
    ones), "eager" keeps the channels-last layouts that eager execution runs 3D convolutions in
    (rwkvseg.inductor_passes.KeepChannelsLast3d; on an H200 3.5 % faster MMSegRWKV inference for 60 MB more memory,
    docs/speed.md). cudnn_benchmark: every row with `torch.backends.cudnn.benchmark` on (cuDNN times its
    algorithms at each new convolution shape and keeps the fastest; the first call of a row pays for it) instead of
    cuDNN's heuristic choice, the default of torch and of this project's runs. phases: infer and/or train.
    memory_format: one of MEMORY_FORMATS, for every row (rwkvseg.memory_format.to_memory_format). cpu_convs
    (CPU rows): "onednn" (the default, as `rwkvseg predict` runs on the CPU) turns every model's plain 3-D
    convolutions into rwkvseg.cpu_convs.OneDnnConv3d, "stock" leaves PyTorch's backend choice, whose batch-1 3-D
    calls of few channels run its slow reference path; ours and the baselines alike either way. cpu_bf16 (CPU rows):
    bf16 autocast as on CUDA (`rwkvseg predict --precision bf16`; a CPU with native bfloat16 only), else float32.
    bf16_weights: the inference rows hold every model's convolution and linear weights in bfloat16
    (rwkvseg.bf16_weights, as `rwkvseg predict --precision bf16` does), on a copy of the model: the same outputs as
    autocast's casts of float32 weights, without the casts; only where the rows run under bf16 autocast. inductor:
    more Inductor options for every compiled row, e.g. {"reorder_for_peak_memory": False}
    (rwkvseg.cli.bench.inductor_settings reads them from --inductor KEY=VALUE), applied after the others.
    """

    dims: int
    device: str = "cpu"
    models: tuple[str, ...] = ()
    sides: tuple[int, ...] = ()
    infer_batches: tuple[int, ...] = ()
    train_batch: int = 0
    modes: tuple[str, ...] = MODES
    phases: tuple[str, ...] = PHASES
    compile_mode: str = "default"
    fullgraph: bool = False
    dynamic: bool | None = False
    freeze: bool = False
    conv_layouts: str = "inductor"
    cudnn_benchmark: bool = False
    amp: bool = True
    warmup: int = 3
    repeats: int = 10
    threads: int = 2
    memory_format: str = "contiguous"
    cpu_convs: str = "onednn"
    cpu_bf16: bool = False
    bf16_weights: bool = False
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    inductor: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.dims not in PROBLEMS:
            raise ValueError(f"bench models: dims = {self.dims}; choose 2 (images) or 3 (volumes)")
        for name, values, valid in (("modes", self.modes, MODES), ("phases", self.phases, PHASES)):
            bad = sorted(set(values) - set(valid))
            if bad or not values:
                raise ValueError(f"bench models: {name} {list(values)} must be a non-empty subset of {list(valid)}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"bench models: compile mode {self.compile_mode!r}; choose one of {COMPILE_MODES}")
        if self.memory_format not in MEMORY_FORMATS:
            raise ValueError(f"bench models: memory format {self.memory_format!r}; choose one of {MEMORY_FORMATS}")
        if self.cpu_convs not in CPU_CONVS:
            raise ValueError(f"bench models: cpu convs {self.cpu_convs!r}; choose one of {CPU_CONVS}")
        reason = bf16_unsupported("cpu") if self.cpu_bf16 and torch.device(self.device).type == "cpu" else None
        if reason:
            raise ValueError(f"bench models --cpu-bf16: {reason}; drop it")
        if self.conv_layouts not in CONV_LAYOUTS:
            raise ValueError(f"bench models: conv layouts {self.conv_layouts!r}; choose one of {CONV_LAYOUTS}")
        if self.bf16_weights and not bf16_autocast(self):
            raise ValueError("bench models --bf16-weights: these rows run in float32 (no bf16 autocast); drop it")
        if self.repeats < 1 or self.warmup < 0 or self.threads < 1:
            raise ValueError("bench models: repeats and threads must be >= 1 and warmup >= 0")
        if any(s < 8 for s in self.sides) or any(b < 1 for b in self.infer_batches) or self.train_batch < 0:
            raise ValueError("bench models: sides must be >= 8 and batch sizes >= 1")

    def resolved_sides(self) -> tuple[int, ...]:
        return self.sides or SIDES[(torch.device(self.device).type, self.dims)]


def model_dims(model: nn.Module) -> int:
    """Spatial dimension of a model: that of its first convolution (every registered model has one)."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Conv3d)):
            return 2 if isinstance(module, nn.Conv2d) else 3
    raise ValueError(f"{type(module).__name__} has no 2D or 3D convolution; cannot tell its dimension")


def models_of_dims(dims: int, names: Sequence[str], build: Build) -> list[str]:
    """The architectures among names of one spatial dimension, without the `*_test` sizes (each built once on the
    CPU: some MONAI constructors read tensor values, so the meta device cannot build them)."""
    found = []
    in_channels, num_classes = PROBLEMS[dims]
    for name in names:
        if name.endswith("_test"):
            continue
        if model_dims(build(name, in_channels, num_classes)) == dims:
            found.append(name)
    return found


class Clock:
    """Milliseconds of a callable: CUDA events on CUDA (device time of the queued work), perf_counter on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self, fn: Callable[[], Any]) -> float:
        if self.device.type != "cuda":
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize(self.device)
        return start.elapsed_time(stop)


@contextlib.contextmanager
def _threads(n: int, device: torch.device) -> Iterator[None]:
    previous = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def cudnn_benchmark(on: bool) -> Iterator[None]:
    """torch.backends.cudnn.benchmark set to on inside the block, restored after."""
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = on
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


def _autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)


def bf16_autocast(config: ModelBenchConfig) -> bool:
    """Whether config's rows run under bf16 autocast: on CUDA with amp, on the CPU with cpu_bf16."""
    return config.cpu_bf16 if torch.device(config.device).type == "cpu" else config.amp


def _step_fn(
    model: nn.Module, runner: Callable[..., Any], phase: str, x: torch.Tensor, device: torch.device, amp: bool
) -> Callable[[], Any]:
    """One inference call of runner (model itself, or model compiled), or one training step (loss = mean of the
    logits, summed over the outputs of a model with deep supervision; backward, SGD step on model's parameters)."""
    if phase == "infer":
        model.eval()

        def infer() -> torch.Tensor:
            with torch.inference_mode(), _autocast(device, amp):
                return runner(x)

        return infer
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.9)

    def train() -> None:
        with _autocast(device, amp):
            out = runner(x)
            loss = sum(o.float().mean() for o in (out if isinstance(out, tuple) else (out,)))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return train


def input_shape(dims: int, batch: int, side: int) -> tuple[int, ...]:
    """The benchmark input of a dims-D model: [batch, in_channels of PROBLEMS, side, side(, side)]."""
    return (batch, PROBLEMS[dims][0], *([side] * dims))


def make_step(
    model: nn.Module, phase: str, shape: Sequence[int], config: ModelBenchConfig, compiled: bool
) -> Callable[[], Any]:
    """The call `measure` times: one inference call or training step of model on a random input of shape on
    config.device (bf16 autocast where bf16_autocast(config)), model and input in config.memory_format (model
    converted in place; with config.bf16_weights an inference step runs a bf16-weight copy), through torch.compile
    with config's settings when compiled (the first call compiles)."""
    device = torch.device(config.device)
    if phase == "infer" and config.bf16_weights:  # a copy: the training rows and later rows keep float32 weights
        model = hold_bf16_weights(copy.deepcopy(model))
    x = to_memory_format(model, torch.randn(tuple(shape), device=device), config.memory_format)
    runner = model
    if compiled:  # frozen: every call of the compiled runner in rwkvseg.compiling.freezing
        runner = compile_callable(
            model,
            config.compile_mode,
            fullgraph=config.fullgraph,
            freeze=config.freeze and phase == "infer",
            dynamic=config.dynamic,
            keep_conv_layouts=config.conv_layouts == "eager",
            extra=config.inductor,
        )
    return _step_fn(model, runner, phase, x, device, bf16_autocast(config))


def measure(
    model: nn.Module, phase: str, shape: Sequence[int], config: ModelBenchConfig, compiled: bool
) -> dict[str, Any]:
    """Times (median / min ms over repeats), compile seconds and peak MiB of one (model, phase, input shape)."""
    device = torch.device(config.device)
    step = make_step(model, phase, shape, config, compiled)
    clock = Clock(device)
    if device.type == "cuda":
        settle(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    first_wall = time.perf_counter()
    first = clock(step)  # compiles when compiled; allocator and cuDNN choices otherwise
    first_wall = time.perf_counter() - first_wall
    first_peak = None
    if device.type == "cuda":  # the steady calls' peak starts here, from what the first call left allocated
        first_peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(config.warmup):
        clock(step)
    times = [clock(step) for _ in range(config.repeats)]
    median = statistics.median(times)
    row: dict[str, Any] = {
        "ms": median,
        "min_ms": min(times),
        "first_ms": first,
        "compile_s": max(first_wall - median / 1e3, 0.0) if compiled else None,
        "peak_mb": None,
    }
    if device.type == "cuda":
        row["peak_mb"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        row["first_peak_mb"] = first_peak
    return row


def settle(device: torch.device) -> None:
    """Frees on a CUDA device what earlier rows left allocated, before a row reads its memory baseline: garbage in
    reference cycles, and cuBLAS's workspaces (one per handle and stream, kept for the life of the process by the
    first matmul on it). CUDA-graph capture frees those workspaces itself (torch._inductor.cudagraph_trees clears
    them before warming up and recording), so a baseline read with the eager rows' workspaces in it undercounts a
    compiled row. On an H100 (session 29, before this function) both U-RWKVs' compiled 256^2 batch-1 rows peaked
    64 MiB lower after their eager rows than in a process of compiled rows alone: two workspaces of 32 MiB
    (PyTorch's size on Hopper), the forward's thread's and autograd's. The U-Nets' 50 MiB gaps (no matmuls) were
    the first call of a cold compilation (Triton's autotuning), which `measure` now keeps out of a row's peak
    (session 30). tests/bench/test_models_bench.py checks both on a GPU."""
    gc.collect()
    torch.cuda.synchronize(device)
    clear_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)  # private; absent on CPU builds
    if clear_workspaces is not None:
        clear_workspaces()
    torch.cuda.empty_cache()


def failure_note(err: BaseException) -> str:
    """A failed row's note on one line: the exception's type and message (its first line, and the next one where
    the first ends in a colon, as torch.compile's "backend='inductor' raised:" does), those of the exceptions it
    was raised from (`raise ... from`), and where the innermost of them was raised, e.g.
    `AssertionError at torch/_inductor/ir.py:1234 in realize` (an assert without a message says nothing else)."""
    chain = [err]
    while chain[-1].__cause__ is not None and len(chain) < 4:
        chain.append(chain[-1].__cause__)
    note = " <- ".join(_said(e) for e in chain)
    for e in reversed(chain):  # torch.compile strips the traceback of some causes
        frames = traceback.extract_tb(e.__traceback__)
        if frames:
            return f"{note} at {_short_path(frames[-1].filename)}:{frames[-1].lineno} in {frames[-1].name}"
    return note


def _said(err: BaseException, width: int = 160) -> str:
    lines = [text.strip() for text in str(err).splitlines() if text.strip()]
    said = " ".join(lines[:2]) if len(lines) > 1 and lines[0].endswith(":") else "".join(lines[:1])
    said = said if len(said) <= width else said[: width - 3] + "..."
    return f"{type(err).__name__}: {said}" if said else type(err).__name__


def _short_path(filename: str) -> str:
    """A source file's path from its package on: after site-packages / dist-packages, or from rwkvseg/ for ours,
    else its last three parts."""
    if not Path(filename).is_absolute():  # generated code: "<eval_with_key>.3"
        return filename
    parts = Path(filename).parts
    for root in ("site-packages", "dist-packages"):
        if root in parts:
            at = len(parts) - parts[::-1].index(root)
            return "/".join(parts[at:])
    ours = Path(__file__).resolve().parents[1]  # src/rwkvseg
    try:
        return Path(filename).resolve().relative_to(ours.parent).as_posix()
    except (ValueError, OSError):
        return "/".join(parts[-3:])


ROW_KEY = ("model", "mode", "phase", "batch", "side")


def row_key(row: dict[str, Any]) -> tuple:
    """What a row measures: (model, mode, phase, batch, side)."""
    return tuple(row[k] for k in ROW_KEY)


def planned_keys(config: ModelBenchConfig) -> list[tuple]:
    """The row_key of every row a run of config makes, in the order it makes them: side by side in the order the
    sides are given, every model at a side before the next side (a run cut short still compares every model at the
    sides it reached: give the side that matters most first)."""
    infer_batches = config.infer_batches or INFER_BATCHES[config.dims]
    train_batch = config.train_batch or TRAIN_BATCH[config.dims]
    return [
        (name, mode, phase, batch, side)
        for side in config.resolved_sides()
        for name in config.models
        for mode in config.modes
        for phase in config.phases
        for batch in (infer_batches if phase == "infer" else (train_batch,))
    ]


def bench_models(
    config: ModelBenchConfig,
    build: Build,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    skip: Collection[tuple] = (),
) -> list[dict]:
    """Every (model, mode, phase, batch, side) row of the benchmark for the models config names (built by build),
    except the row_keys in skip (rows an earlier, interrupted run measured); a failure (out of memory, a size the
    model refuses, a compile error) becomes a row with a note instead of ending the run. A compiled row that fails
    where its eager twin ran (the compiler's failure, not the model's: compiling costs up to minutes a row) is
    not tried again at the later sides of that (model, phase, batch): those rows get a note pointing to it. on_row
    sees each row as it is made (for progress output and incremental saving)."""
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("bench models --device cuda: torch sees no CUDA device; use --device cpu")
    if not config.models:
        raise ValueError("bench models: no models given; list them, e.g. with models_of_dims()")
    in_channels, num_classes = PROBLEMS[config.dims]
    done = set(skip)
    todo = [key for key in planned_keys(config) if key not in done]
    rows = []
    ran_eager: set[tuple] = set()  # (model, phase, batch, side) whose eager row measured
    compile_failed: dict[tuple, int] = {}  # (model, phase, batch) -> the side where compiling it failed
    # every (phase, batch, side) may add a compiled graph of one forward: past dynamo's default limit of 8 it
    # would fall back to eager without a word, and the "compiled" rows would not be compiled
    with (
        _threads(config.threads, device),
        cudnn_benchmark(config.cudnn_benchmark),
        torch._dynamo.config.patch(cache_size_limit=256),
    ):
        for side_now, name in dict.fromkeys((key[4], key[0]) for key in todo):  # planned_keys' order
            torch.manual_seed(0)  # the same initial weights at every side
            model = build(name, in_channels, num_classes, **config.overrides.get(name, {})).to(device)
            if device.type == "cpu" and config.cpu_convs == "onednn":
                use_onednn_convs(model)
            if model_dims(model) != config.dims:
                raise ValueError(f"bench models: {name} is a {model_dims(model)}D model; this run is {config.dims}D")
            params_m = sum(p.numel() for p in model.parameters()) / 1e6
            state = {k: v.clone() for k, v in model.state_dict().items()}  # training steps change the weights
            for _, mode, phase, batch, side in (key for key in todo if key[0] == name and key[4] == side_now):
                shape = input_shape(config.dims, batch, side)
                row = {"model": name, "params_m": params_m, "mode": mode, "phase": phase, "batch": batch}
                row.update(side=side, tokens=side**config.dims, memory_format=config.memory_format)
                failed_at = compile_failed.get((name, phase, batch)) if mode == "compiled" else None
                if failed_at is not None:
                    row["note"] = f"not measured: compiling it failed at side {failed_at} (that row's note)"
                else:
                    row.update(_measured_or_note(model, state, phase, shape, config, mode == "compiled"))
                if mode == "eager" and "ms" in row:
                    ran_eager.add((name, phase, batch, side))
                elif failed_at is None and row.get("note") not in (None, "out of memory"):
                    if mode == "compiled" and (name, phase, batch, side) in ran_eager:  # the compiler's failure
                        compile_failed[(name, phase, batch)] = side
                rows.append(row)
                if on_row is not None:
                    on_row(row)
            del model
            if "compiled" in config.modes:
                torch._dynamo.reset()  # each model's graphs and guards start afresh
    return rows


def _measured_or_note(
    model: nn.Module, state: dict, phase: str, shape: Sequence[int], config: ModelBenchConfig, compiled: bool
) -> dict[str, Any]:
    """measure() from the model's initial weights (state), or {"note": ...} for a failure: out of memory, a size
    the model refuses, a compile error."""
    model.load_state_dict(state)
    try:
        return measure(model, phase, shape, config, compiled)
    except torch.OutOfMemoryError:
        return {"note": "out of memory"}
    except Exception as err:  # a size the model refuses, a compile failure: report it
        return {"note": failure_note(err)}
    finally:
        if torch.device(config.device).type == "cuda":
            torch.cuda.empty_cache()


def _ends(rows: list[dict], model: str, mode: str, phase: str, batch: int, key: str) -> tuple | None:
    """The (tokens, cost) points of the smallest and largest side measured, or None with fewer than two sides."""
    points = sorted(
        (r["tokens"], r[key])
        for r in rows
        if r["model"] == model and r["mode"] == mode and r["phase"] == phase and r["batch"] == batch
        if r.get(key)
    )
    if len(points) < 2 or points[0][0] == points[-1][0]:
        return None
    return points[0], points[-1]


def growth_rows(rows: list[dict]) -> list[dict]:
    """Per (model, mode, phase, batch): time and memory growth from the smallest side measured to the largest: the
    exponent p of cost ~ tokens^p (1 = linear), and the line cost = fixed + slope * tokens through the two (slope
    per million tokens). The line says what the exponent hides: a model whose cost is almost all proportional to
    the tokens has an exponent near 1 however small its slope, and a large fixed part pulls an exponent down."""
    keys = sorted({(r["model"], r["mode"], r["phase"], r["batch"]) for r in rows})
    out = []
    for model, mode, phase, batch in keys:
        row = {"model": model, "mode": mode, "phase": phase, "batch": batch}
        for kind, key, unit in (("time", "ms", "ms"), ("memory", "peak_mb", "mib")):
            ends = _ends(rows, model, mode, phase, batch, key)
            exponent = slope = fixed = None
            if ends is not None:
                (t0, c0), (t1, c1) = ends
                exponent = math.log(c1 / c0) / math.log(t1 / t0)
                slope = (c1 - c0) / (t1 - t0)
                fixed = c0 - slope * t0
                slope *= 1e6
            row[f"{kind}_exponent"] = exponent
            row[f"{kind}_per_mtoken"], row[f"{kind}_fixed_{unit}"] = slope, fixed
        out.append(row)
    return out


def plot_growth(rows: list[dict], path: str, title: str) -> None:
    """PNG of time and peak memory against tokens (log-log), one line per (model, mode), batch-1 inference and
    training step; needs matplotlib (`pip install rwkvseg[plots]`)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullLocator
    except ImportError:
        raise ValueError("the cost-growth figure needs matplotlib: pip install 'rwkvseg[plots]'") from None
    panels = [("infer", "ms", "inference ms"), ("infer", "peak_mb", "inference peak MiB")]
    panels += [("train", "ms", "training step ms"), ("train", "peak_mb", "training peak MiB")]
    panels = [p for p in panels if any(r["phase"] == p[0] and r.get(p[1]) for r in rows)]
    if not panels:
        raise ValueError("no measured rows to plot")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4), squeeze=False)
    for ax, (phase, key, label) in zip(axes[0], panels, strict=True):
        batch = min(r["batch"] for r in rows if r["phase"] == phase)
        for model, mode in sorted({(r["model"], r["mode"]) for r in rows}):
            pts = sorted(
                (r["tokens"], r[key])
                for r in rows
                if (r["model"], r["mode"], r["phase"], r["batch"]) == (model, mode, phase, batch) and r.get(key)
            )
            if pts:
                style = "-" if mode == "compiled" else "--"
                ax.plot(*zip(*pts, strict=True), style, marker="o", label=f"{model} ({mode})")
        ax.set_xscale("log")
        ax.set_yscale("log")
        # the measured sizes as ticks (64^3 ...), not matplotlib's minor labels, which overlap over one decade
        sizes = sorted({(r["tokens"], r["side"]) for r in rows if r["phase"] == phase})
        ax.set_xticks([tokens for tokens, _ in sizes])
        ax.set_xticklabels([f"${side}^{round(math.log(tokens, side))}$" for tokens, side in sizes])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("tokens (pixels / voxels per sample)")
        ax.set_title(f"{label}, batch {batch}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)
