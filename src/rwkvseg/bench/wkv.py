"""Bi-WKV benchmarks: speed and peak memory against the memory-bandwidth floor, and accuracy tables.

Speed on CUDA: the device's copy bandwidth is measured first; the forward floor of a shape is the 12 bytes per
element (fp32; 6 in bf16: read k and v, write y) at that bandwidth. The device's time is taken by replaying the
call from a CUDA graph with L2 flushed before each replay; eager calls (after an L2 flush, and back to back) are
timed beside it, since the host's launch time dominates small shapes when nothing captures the launches. On CPU
each measurement runs in a fresh subprocess so its peak resident memory (above the inputs) can be read from the OS.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import torch

from ..ops import bi_wkv, bi_wkv_reference


@contextlib.contextmanager
def replaced_wkv_kernels(make: Callable[[str, object], object]) -> Iterator[None]:
    """Inside: each Triton Bi-WKV kernel of rwkvseg.ops.bi_wkv.triton is replaced by make(name, kernel), and the
    eager entry takes any tensor (CPU ones too) for a Triton input, so what runs is exactly the wrappers' host code
    around the stand-ins (scripts/profile_wkv_host.py times it, scripts/triton_variants.py records the launches).
    The module globals are restored on exit."""
    path = importlib.import_module("rwkvseg.ops.bi_wkv.triton")
    entry = importlib.import_module("rwkvseg.ops.bi_wkv")  # the package (rwkvseg.ops.bi_wkv is the function)
    stubs = [(path, name, make(name, getattr(path, name))) for name in path.KERNELS]
    stubs += [(path, "_on_device", lambda x: contextlib.nullcontext()), (entry, "uses_triton", lambda k: True)]
    saved = [(module, name, getattr(module, name)) for module, name, _ in stubs]
    try:
        for module, name, stub in stubs:
            setattr(module, name, stub)
        yield
    finally:
        for module, name, original in saved:
            setattr(module, name, original)


SHAPES_CPU = ((8, 4096, 64), (2, 32768, 32), (1, 262144, 32))
SHAPES_GPU = ((64, 256, 256), (16, 8192, 32), (2, 32768, 32), (1, 262144, 32), (2, 262144, 48))
# Anchors measured on one H100 (docs/bi_wkv.md): Vision-RWKV's CUDA kernel and a torch.cumsum O(T) version, ms.
ANCHORS_H100_MS = {
    (64, 256, 256): {"vrwkv_fwd": 0.450, "vrwkv_fwdbwd": 1.72, "cumsum_fwd": 0.97, "cumsum_fwdbwd": 2.79},
    (16, 8192, 32): {"vrwkv_fwd": 1.41, "vrwkv_fwdbwd": 7.40, "cumsum_fwd": 10.1, "cumsum_fwdbwd": 22.9},
    (2, 32768, 32): {"vrwkv_fwd": 5.26, "vrwkv_fwdbwd": 28.7, "cumsum_fwd": 24.9, "cumsum_fwdbwd": 49.9},
    (1, 262144, 32): {"vrwkv_fwd": 41.0, "vrwkv_fwdbwd": 231.0, "cumsum_fwd": 355.0, "cumsum_fwdbwd": 680.0},
    (2, 262144, 48): {"vrwkv_fwd": 44.0, "vrwkv_fwdbwd": 252.0, "cumsum_fwd": 393.0, "cumsum_fwdbwd": 790.0},
}
ACCURACY_T = (1, 7, 64, 257, 4096, 8192)
W_RANGES = {"[-8, 8]": (-8.0, 8.0), "[-8, -4]": (-8.0, -4.0), "[4, 8]": (4.0, 8.0), "0": (0.0, 0.0)}


def parse_shapes(text: str) -> tuple[tuple[int, int, int], ...]:
    """'8,4096,64;2,32768,32' -> ((8, 4096, 64), (2, 32768, 32))."""
    shapes = []
    for part in text.split(";"):
        dims = tuple(int(d) for d in part.split(","))
        if len(dims) != 3 or min(dims) < 1:
            raise ValueError(f"shape {part!r} is not B,T,C with positive integers; e.g. --shapes '8,4096,64'")
        shapes.append(dims)
    return tuple(shapes)


def make_inputs(shape, device, dtype=torch.float32, seed=0, w_range=(-8.0, 8.0)):
    """w, u [C] scaled by 1/T as the layers pass them; k ~ N(0, 2^2), v ~ N(0, 1)."""
    B, T, C = shape
    g = torch.Generator().manual_seed(seed)
    lo, hi = w_range
    w = (torch.rand(C, generator=g) * (hi - lo) + lo) / T
    u = torch.randn(C, generator=g) / T
    k = torch.randn(B, T, C, generator=g) * 2
    v = torch.randn(B, T, C, generator=g)
    return w.to(device), u.to(device), k.to(device, dtype), v.to(device, dtype)


def _step(inputs, impl: str, backward: bool):
    if not backward:
        with torch.no_grad():
            return bi_wkv(*inputs, impl=impl)
    leaves = [t.detach().requires_grad_() for t in inputs]
    y = bi_wkv(*leaves, impl=impl)
    y.backward(torch.ones_like(y))
    return y


def time_graph(fn, device: torch.device, repeats: int, flush: torch.Tensor) -> float | None:
    """GPU milliseconds per call of fn replayed from a CUDA graph (no host launch time in it), median over
    repeats, each after flushing L2 by writing `flush`; None when fn cannot be captured (it syncs with the host)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        fn()  # capture needs a warm-up on a side stream
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError:
        return None
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for start, stop in events:
        flush.zero_()
        start.record()
        graph.replay()
        stop.record()
    torch.cuda.synchronize(device)
    ms = statistics.median(start.elapsed_time(stop) for start, stop in events)
    del graph
    return ms


def time_cuda(shape, impl: str, backward: bool, device: torch.device, repeats: int, dtype=torch.float32) -> dict:
    """Per call: GPU milliseconds replayed from a CUDA graph ("gpu_ms": what the device spends, the figure the
    floor is compared with), milliseconds of eager calls each after an L2 flush ("ms", timed with CUDA events;
    host launch time shows where it exceeds the flush), back-to-back eager milliseconds ("b2b_ms"), and peak
    allocated MB above the inputs. L2 is flushed with a 256 MB write before each timed call; eager inputs
    rotate over copies that together exceed L2."""
    B, T, C = shape
    copies = max(1, min(8, 2**28 // (8 * B * T * C) + 1))
    sets = [make_inputs(shape, device, dtype, seed=s) for s in range(copies)]
    calls = iter(range(10**9))

    def step():
        return _step(sets[next(calls) % copies], impl, backward)

    step()  # warm-up: compilation, allocator
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    peak_mb = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    flush = torch.empty(2**28, dtype=torch.int8, device=device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for start, stop in events:
        flush.zero_()
        start.record()
        step()
        stop.record()
    torch.cuda.synchronize(device)
    eager_ms = statistics.median(start.elapsed_time(stop) for start, stop in events)
    start, stop = events[0]
    start.record()
    for _ in range(repeats):
        step()
    stop.record()
    torch.cuda.synchronize(device)
    b2b_ms = start.elapsed_time(stop) / repeats
    gpu_ms = time_graph(lambda: _step(sets[0], impl, backward), device, repeats, flush)
    return {"gpu_ms": gpu_ms, "ms": eager_ms, "b2b_ms": b2b_ms, "peak_mb": peak_mb}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (4096 / 2**20)


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(spec: str) -> None:
    """Subprocess entry: one CPU measurement, printed as JSON (peak RSS above the inputs, median warm ms)."""
    cfg = json.loads(spec)
    torch.set_num_threads(cfg["threads"])
    shape = tuple(cfg["shape"])
    inputs = make_inputs(shape, torch.device("cpu"))
    base = _rss_mb()
    # the first (cold) call gives the peak memory; timing uses the calls after it
    _step(inputs, cfg["impl"], cfg["backward"])
    peak = _peak_rss_mb() - base
    times = []
    for _ in range(cfg["repeats"]):
        start = time.perf_counter()
        _step(inputs, cfg["impl"], cfg["backward"])
        times.append((time.perf_counter() - start) * 1e3)
    print(json.dumps({"ms": statistics.median(times), "peak_mb": peak}))


def time_in_subprocess(shape, impl: str, backward: bool, repeats: int, threads: int):
    spec = json.dumps({"shape": shape, "impl": impl, "backward": backward, "repeats": repeats, "threads": threads})
    out = subprocess.run(
        [sys.executable, "-c", f"from rwkvseg.bench.wkv import _child; _child({spec!r})"],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"benchmark subprocess failed for {shape} {impl}:\n{out.stderr[-2000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["ms"], result["peak_mb"]


def measure_copy_bandwidth(device: torch.device, mbytes: int = 1024, repeats: int = 20) -> float:
    """Device-to-device copy rate in bytes/s (read + write counted), median over repeats."""
    n = mbytes * 2**20 // 4
    src = torch.empty(n, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        stop.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(stop) / 1e3)
    return 2 * n * 4 / statistics.median(times)


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        try:
            import triton

            env["triton"] = triton.__version__
        except ImportError:
            env["triton"] = None
    else:
        env["device_name"] = platform.processor() or platform.machine()
        env["threads"] = torch.get_num_threads()
    return env


def speed_rows(
    shapes, impls, device: torch.device, repeats: int, threads: int = 2, dtype=torch.float32
) -> tuple[list[dict], dict]:
    """One row per (shape, impl): fwd and fwd+bwd ms and peak MiB; on CUDA also back-to-back ms (host launch time
    included), floor fractions and the anchors of docs/bi_wkv.md."""
    info = environment(device)
    bandwidth = None
    if device.type == "cuda":
        bandwidth = measure_copy_bandwidth(device)
        info["copy_bandwidth_tb_s"] = bandwidth / 1e12
        info["dtype"] = str(dtype).removeprefix("torch.")
    else:
        info["threads"] = threads
    rows = []
    for shape in shapes:
        B, T, C = shape
        # the floor: read k, v and write y once at the copy rate
        floor_ms = 3 * dtype.itemsize * B * T * C / bandwidth * 1e3 if bandwidth else None
        for impl in impls:
            row = {"shape": f"{B}x{T}x{C}", "impl": impl}
            for backward, tag in ((False, "fwd"), (True, "fwdbwd")):
                if device.type == "cuda":
                    m = time_cuda(shape, impl, backward, device, repeats, dtype)
                    row[f"{tag}_gpu_ms"], row[f"{tag}_ms"], row[f"{tag}_b2b_ms"] = m["gpu_ms"], m["ms"], m["b2b_ms"]
                    row[f"{tag}_peak_mb"] = m["peak_mb"]
                else:
                    ms, peak = time_in_subprocess(shape, impl, backward, repeats, threads)
                    row[f"{tag}_ms"], row[f"{tag}_peak_mb"] = ms, peak
            if floor_ms:
                # the device's time (graph replay) against the floor and the anchors; the eager ratios beside it
                fwd, fwdbwd = (row[f"{t}_gpu_ms"] or row[f"{t}_ms"] for t in ("fwd", "fwdbwd"))
                row["floor_fwd_ms"] = floor_ms
                row["fwd_x_floor"] = fwd / floor_ms
                row["fwdbwd_x_floor"] = fwdbwd / floor_ms
                row["fwd_x_floor_eager"] = row["fwd_ms"] / floor_ms
                row["fwdbwd_x_floor_eager"] = row["fwdbwd_ms"] / floor_ms
                anchors = ANCHORS_H100_MS.get(shape)
                if anchors:
                    row["vrwkv_fwd_ms"] = anchors["vrwkv_fwd"]
                    row["speedup_vs_vrwkv_fwd"] = anchors["vrwkv_fwd"] / fwd
                    row["speedup_vs_vrwkv_fwdbwd"] = anchors["vrwkv_fwdbwd"] / fwdbwd
                    row["speedup_vs_vrwkv_fwd_eager"] = anchors["vrwkv_fwd"] / row["fwd_ms"]
                    row["speedup_vs_vrwkv_fwdbwd_eager"] = anchors["vrwkv_fwdbwd"] / row["fwdbwd_ms"]
            rows.append(row)
    return rows, info


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    scale = ref.norm()
    diff = (x.double() - ref.double()).norm()
    return (diff / scale).item() if scale > 0 else diff.item()


def _with_grads(fn, inputs, gy):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    y = fn(*leaves)
    y.backward(gy)
    return [y.detach(), *(t.grad for t in leaves)]


def _error_row(T: int, label: str, inputs, gy, reference, against: str) -> dict:
    fast = _with_grads(bi_wkv, inputs, gy)
    ref = _with_grads(reference, [t.double() for t in inputs], gy.double())
    errors = [_rel(a, b) for a, b in zip(fast, ref, strict=True)]
    return {"T": T, "w_raw": label, "against": against, **dict(zip(("y", "dw", "du", "dk", "dv"), errors, strict=True))}


def accuracy_rows(lengths=ACCURACY_T, batch: int = 1, channels: int = 8) -> list[dict]:
    """Relative error (norm of difference / norm of reference) of the fp32 O(T) path vs the fp64 brute force."""
    rows = []
    for T in lengths:
        for label, w_range in W_RANGES.items():
            inputs = make_inputs((batch, T, channels), torch.device("cpu"), seed=T, w_range=w_range)
            gy = torch.randn(batch, T, channels, generator=torch.Generator().manual_seed(1))
            rows.append(_error_row(T, label, inputs, gy, bi_wkv_reference, "fp64 brute force"))
    return rows


def long_accuracy_rows(T: int = 262144, channels: int = 32) -> list[dict]:
    """fp32 O(T) path against the same O(T) path in float64, at a length the brute force cannot reach."""
    rows = []
    for label, w_range in W_RANGES.items():
        inputs = make_inputs((1, T, channels), torch.device("cpu"), seed=7, w_range=w_range)
        gy = torch.randn(1, T, channels, generator=torch.Generator().manual_seed(2))
        rows.append(_error_row(T, label, inputs, gy, bi_wkv, "fp64 O(T) path"))
    return rows
