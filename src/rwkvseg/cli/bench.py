"""`rwkvseg bench ...`: the benchmarks of rwkvseg.bench, printed as tables and written as JSON."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._options import add_set_argument


def add_parser(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="efficiency benchmarks (tables on screen, JSON out)")
    kinds = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")

    p = kinds.add_parser("wkv", help="Bi-WKV time and peak memory, forward and forward+backward")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument(
        "--impl",
        action="append",
        help="implementation to time, repeatable (default: chunked; on cuda: triton and chunked)",
    )
    p.add_argument("--shapes", default=None, help="'B,T,C;B,T,C' (default: the shapes of docs/bi_wkv.md)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (default: 5 cpu, 30 cuda)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (cpu only)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="k, v dtype (cuda only)")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.set_defaults(func=_run_wkv)

    p = kinds.add_parser("wkv-accuracy", help="relative error of the O(T) path against the float64 brute force")
    p.add_argument("--lengths", default=None, help="comma-separated T values (default: 1,7,64,257,4096,8192)")
    p.add_argument("--long", action="store_true", help="also T = 262144 against a float64 run of the O(T) path")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.set_defaults(func=_run_wkv_accuracy)

    p = kinds.add_parser(
        "complexity", help="parameters, MACs and input + output bytes (conv + linear) and latency of registered models"
    )
    p.add_argument("--models", nargs="+", default=["urwkv", "urwkv_s", "cmunext", "cmunext_s", "unet", "unet_small"])
    p.add_argument("--size", type=int, nargs="+", default=[256, 256], help="spatial size (2 or 3 numbers)")
    p.add_argument("--in-channels", type=int, default=3)
    p.add_argument("--num-classes", type=int, default=1)
    p.add_argument("--repeats", type=int, default=20, help="timed runs at batch 1 (0: skip latency)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for the latency")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--channels-last", action="store_true", help="time in channels-last memory format")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.set_defaults(func=_run_complexity)

    p = kinds.add_parser(
        "wkv-models", help="training step (fwd+bwd) time and memory of whole models per Bi-WKV implementation"
    )
    p.add_argument("--models", nargs="+", default=["urwkv", "mmsegrwkv"], help="cases of bench.wkv_models")
    p.add_argument("--impl", action="append", help="repeatable (default: triton and chunked)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per measurement (median reported)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (default: fp32)")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.set_defaults(func=_run_wkv_models)

    p = kinds.add_parser(
        "models",
        help="every registered model of a dimension, ours and the baselines, eager and compiled: inference and "
        "training step time and peak memory over input sizes, a table, JSON and a cost-growth figure",
    )
    p.add_argument("dims", type=int, choices=[2, 3], help="2 (images) or 3 (volumes)")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (small sizes, --threads threads)")
    p.add_argument("--models", nargs="+", default=None, help="default: every registered model of that dimension")
    p.add_argument("--sides", type=int, nargs="+", default=None, help="input sides (default per device and dims)")
    p.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    p.add_argument("--phases", nargs="+", default=["infer", "train"], choices=["infer", "train"])
    p.add_argument("--compile-mode", default="default", help="torch.compile mode, the same for every model")
    p.add_argument(
        "--dynamic",
        action="store_true",
        help="compile once for all sizes (torch.compile dynamic=True; default: a static graph per shape)",
    )
    p.add_argument("--fullgraph", action="store_true", help="torch.compile fullgraph=True (fails on graph breaks)")
    p.add_argument(
        "--freeze",
        action="store_true",
        help="compiled inference rows under Inductor's freezing (weights as graph constants: inference BatchNorms "
        "folded into their convolutions, weight layouts chosen once); training rows are not frozen",
    )
    p.add_argument(
        "--inductor",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an Inductor option for every compiled row, a setting of torch._inductor.config (repeatable), e.g. "
        "reorder_for_peak_memory=false",
    )
    p.add_argument(
        "--conv-layouts",
        default="inductor",
        choices=["inductor", "eager"],
        help="compiled rows: inductor (default) leaves the convolutions' layouts to Inductor, which lays out most 3D "
        "convolutions channels-first; eager keeps the channels-last layouts eager runs them in",
    )
    p.add_argument(
        "--cudnn-benchmark",
        action="store_true",
        help="every row with torch.backends.cudnn.benchmark on: cuDNN times its algorithms per convolution shape and "
        "keeps the fastest (default: cuDNN's heuristic choice, as training and prediction run)",
    )
    p.add_argument("--no-amp", action="store_true", help="float32 on CUDA (default: bf16 autocast)")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per row (median and min reported)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (cpu only)")
    p.add_argument(
        "--cpu-bf16",
        action="store_true",
        help="CPU rows under bf16 autocast, as `rwkvseg predict --precision bf16` (a CPU with native bfloat16: "
        "AVX512-BF16 or AMX); default float32 there",
    )
    p.add_argument(
        "--bf16-weights",
        action="store_true",
        help="inference rows with every model's convolution and linear weights held in bfloat16, as `rwkvseg "
        "predict --precision bf16` holds them (the same outputs as autocast's casts; rows under bf16 autocast only)",
    )
    p.add_argument(
        "--memory-format",
        default="contiguous",
        choices=["contiguous", "channels_last"],
        help="layout of the parameters and the input, every row (default: contiguous; channels_last: NHWC / NDHWC, "
        "cuDNN's layout for bf16 convolutions)",
    )
    p.add_argument(
        "--cpu-convs",
        default="onednn",
        choices=["onednn", "stock"],
        help="CPU rows: onednn (default, as rwkvseg predict runs) sends the 3D convolutions that PyTorch would run on "
        "its slow reference path (batch 1, few channels) to oneDNN, for every model; stock leaves PyTorch's choice",
    )
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="MODEL:KEY=VALUE",
        help="a model setting, e.g. mmsegrwkv:fused_norm=true (repeatable)",
    )
    p.add_argument(
        "--json",
        default=None,
        help="write the rows, growth exponents and environment here (a new file, rewritten after every row)",
    )
    p.add_argument("--png", default=None, help="write the cost-growth figure here (needs matplotlib)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted run whose --json file this is (same options, same machine): measure only "
        "the rows it lacks",
    )
    p.set_defaults(func=_run_models)

    p = kinds.add_parser(
        "show",
        help="the table, growth exponents and figure of a bench models JSON file (measured here or elsewhere, "
        "finished or cut short); the file is only read",
    )
    p.add_argument("file", help="the --json file of a bench models run")
    p.add_argument("--png", default=None, help="write its cost-growth figure here (needs matplotlib)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --png figure")
    p.set_defaults(func=_run_show)

    p = kinds.add_parser(
        "epoch",
        help="2D training epoch time of the paper recipe (U-RWKV, batch 4, 256^2) with and without a compiled "
        "step and GPU-resident data, on a dataset folder",
    )
    p.add_argument("data", help="2D dataset folder (e.g. a Kvasir-SEG folder)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per variant (the first one compiles; default 3)")
    p.add_argument("--compile", nargs="+", default=["off", "on"], help="compile settings to time (default: off on)")
    p.add_argument(
        "--resident", nargs="+", default=["off", "on"], help="data.gpu_resident settings to time (default: off on)"
    )
    add_set_argument(
        p, "a training setting on top of the recipe, e.g. --set model.name=urwkv_s --set data.num_workers=4"
    )
    p.add_argument("--config", default=None, help="a training config as the recipe (default: TrainConfig's)")
    p.add_argument("--out", default=None, help="keep the run folders here (default: a temporary folder)")
    p.add_argument("--json", default=None, help="write the rows and the environment to this JSON file")
    p.set_defaults(func=_run_epoch)


def _run_wkv(args: argparse.Namespace) -> int:
    import torch

    from ..bench.table import format_table
    from ..bench.wkv import SHAPES_CPU, SHAPES_GPU, parse_shapes, speed_rows
    from ..files import write_json

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
    impls = args.impl or (["triton", "chunked"] if device.type == "cuda" else ["chunked"])
    shapes = parse_shapes(args.shapes) if args.shapes else (SHAPES_GPU if device.type == "cuda" else SHAPES_CPU)
    if args.dtype != "float32" and device.type != "cuda":
        raise ValueError(f"--dtype {args.dtype} is for --device cuda; the CPU benchmark runs float32")
    repeats = args.repeats or (30 if device.type == "cuda" else 5)
    rows, info = speed_rows(shapes, impls, device, repeats, args.threads, getattr(torch, args.dtype))
    print(", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items()))
    columns = [
        ("shape", "B x T x C"),
        ("impl", "impl"),
        ("fwd_ms", "fwd ms"),
        ("fwd_peak_mb", "fwd MiB"),
        ("fwdbwd_ms", "fwd+bwd ms"),
        ("fwdbwd_peak_mb", "fwd+bwd MiB"),
    ]
    if device.type == "cuda":
        columns = [
            ("shape", "B x T x C"),
            ("impl", "impl"),
            ("fwd_gpu_ms", "fwd GPU ms"),
            ("fwd_ms", "fwd ms"),
            ("fwd_b2b_ms", "fwd b2b ms"),
            ("fwd_peak_mb", "fwd MiB"),
            ("fwdbwd_gpu_ms", "f+b GPU ms"),
            ("fwdbwd_ms", "f+b ms"),
            ("fwdbwd_b2b_ms", "f+b b2b ms"),
            ("fwdbwd_peak_mb", "f+b MiB"),
        ]
        columns += [
            ("floor_fwd_ms", "floor ms"),
            ("fwd_x_floor", "fwd/floor"),
            ("fwdbwd_x_floor", "f+b/floor"),
            ("speedup_vs_vrwkv_fwd", "x VRWKV fwd"),
            ("speedup_vs_vrwkv_fwdbwd", "x VRWKV f+b"),
        ]
    print(format_table(rows, columns))
    if args.json:
        write_json(args.json, {"environment": info, "rows": rows})
    return 0


def _run_wkv_accuracy(args: argparse.Namespace) -> int:
    from ..bench.table import format_table
    from ..bench.wkv import ACCURACY_T, accuracy_rows, long_accuracy_rows
    from ..files import write_json

    lengths = tuple(int(t) for t in args.lengths.split(",")) if args.lengths else ACCURACY_T
    rows = accuracy_rows(lengths)
    if args.long:
        rows += long_accuracy_rows()
    columns = [
        ("T", "T"),
        ("w_raw", "w_raw"),
        ("against", "reference"),
        ("y", "y"),
        ("dw", "dw"),
        ("du", "du"),
        ("dk", "dk"),
        ("dv", "dv"),
    ]
    print("relative error = |fp32 O(T) - reference| / |reference| (Frobenius), fp32 inputs, B=1")
    print(format_table(rows, columns))
    worst = max(max(r[c] for c in ("y", "dw", "du", "dk", "dv")) for r in rows if r["T"] <= 8192)
    print(f"worst relative error for T <= 8192: {worst:.2e} (target <= 1e-5)")
    if args.json:
        write_json(args.json, {"rows": rows})
    return 0


def _run_complexity(args: argparse.Namespace) -> int:
    import os

    import torch

    from ..bench.complexity import complexity_row
    from ..bench.table import format_table
    from ..files import write_json
    from ..models import create_model

    shape = (1, args.in_channels, *args.size)
    info = {"torch": torch.__version__, "device": args.device, "threads": args.threads, "input": list(shape)}
    info["channels_last"] = args.channels_last
    if hasattr(os, "getloadavg"):
        info["load_avg_1min"] = os.getloadavg()[0]  # latency on a shared machine is only as good as this
    rows = []
    for name in args.models:
        model = create_model(name, args.in_channels, args.num_classes).to(args.device)
        rows.append(
            complexity_row(
                name, model, shape, threads=args.threads, repeats=args.repeats, channels_last=args.channels_last
            )
        )
    print(", ".join(f"{k}={v}" for k, v in info.items()))
    columns = [("model", "model"), ("params_m", "params M"), ("gmacs", "GMACs"), ("layer_io_mib", "layer I/O MiB")]
    if args.repeats > 0:
        columns += [("median_ms", "median ms"), ("min_ms", "min ms")]
    print(format_table(rows, columns))
    if args.json:
        write_json(args.json, {"environment": info, "rows": rows})
    return 0


def _run_wkv_models(args: argparse.Namespace) -> int:
    import torch

    from ..bench.table import format_table
    from ..bench.wkv import environment
    from ..bench.wkv_models import MODEL_CASES, train_step_row
    from ..files import write_json
    from ..models import create_model

    if not torch.cuda.is_available():
        raise ValueError("bench wkv-models compares implementations on a GPU; torch sees no CUDA device")
    device = torch.device("cuda")
    unknown = sorted(set(args.models) - set(MODEL_CASES))
    if unknown:
        raise ValueError(f"bench wkv-models: no case for {unknown}; choose from {sorted(MODEL_CASES)}")
    info = environment(device)
    rows = []
    for name in args.models:
        in_channels, num_classes, shape = MODEL_CASES[name]
        torch.manual_seed(0)
        model = create_model(name, in_channels, num_classes).to(device)
        for impl in args.impl or ["triton", "chunked"]:
            rows.append({"model": name, **train_step_row(model, shape, impl, args.repeats, args.amp)})
        del model
        torch.cuda.empty_cache()
    print(", ".join(f"{k}={v}" for k, v in info.items()))
    columns = [("model", "model"), ("input", "input"), ("impl", "Bi-WKV"), ("step_ms", "fwd+bwd ms")]
    print(format_table(rows, [*columns, ("peak_mb", "peak MiB")]))
    if args.json:
        write_json(args.json, {"environment": info, "rows": rows})
    return 0


def model_overrides(items: list[str]) -> dict[str, dict]:
    """{model: settings} from --override MODEL:KEY=VALUE items (also read by scripts that take the option)."""
    from ..train.config import apply_overrides  # the value read as --set reads it (YAML: true, 3, [2, 2], text)

    overrides: dict[str, dict] = {}
    for item in items:
        model, sep, setting = item.partition(":")
        key, eq, _ = setting.partition("=")
        if not sep or not model or not eq or not key.strip():
            raise ValueError(f"--override {item!r} must look like MODEL:KEY=VALUE, e.g. mmsegrwkv:fused_norm=true")
        overrides[model] = apply_overrides(overrides.get(model, {}), [setting])
    return overrides


def inductor_settings(items: Sequence[str]) -> dict[str, Any]:
    """Extra Inductor options from --inductor KEY=VALUE items (also read by scripts that take the option): KEY a
    setting of torch._inductor.config (dotted for its sub-configs, e.g. triton.cudagraph_trees), the value read as
    --set reads it. ValueError naming the item and what to change."""
    from torch._inductor import config  # imports Inductor (about 1 s): only when settings are given

    from ..train.config import parse_value

    known = config.get_config_copy() if items else {}
    settings: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--inductor {item!r} must look like KEY=VALUE, e.g. reorder_for_peak_memory=false")
        if key not in known:
            raise ValueError(
                f"--inductor {item!r}: torch._inductor.config has no setting {key!r} in this torch; "
                "give one of its settings, e.g. reorder_for_peak_memory=false"
            )
        if key == "freezing":  # as an option alone it reaches Inductor but not Dynamo: nothing would freeze
            raise ValueError(f"--inductor {item!r}: use --freeze, which also freezes while Dynamo traces")
        settings[key] = parse_value(raw)
    return settings


def _run_models(args: argparse.Namespace) -> int:
    import torch

    from ..bench.models import ModelBenchConfig, bench_models, models_of_dims, row_key
    from ..bench.wkv import environment
    from ..files import write_json
    from ..models import create_model, list_models

    unknown = sorted(set(args.models or ()) - set(list_models()))
    if unknown:
        raise ValueError(f"bench models: unknown models {unknown}; choose from {', '.join(list_models())}")
    if args.resume and not args.json:
        raise ValueError("bench models --resume continues a --json file; give --json FILE of the interrupted run")
    if args.json and not args.resume and Path(args.json).exists():
        raise ValueError(f"bench models: {args.json} exists; pass --resume to continue that run, or choose a new file")
    if args.png and not args.resume and Path(args.png).exists():  # a resumed run draws its own figure again
        raise ValueError(f"bench models: --png {args.png} exists; choose a new file for the figure")
    config = ModelBenchConfig(
        dims=args.dims,
        device=args.device,
        models=tuple(args.models or models_of_dims(args.dims, list_models(), create_model)),
        sides=tuple(args.sides or ()),
        modes=tuple(args.modes),
        phases=tuple(args.phases),
        compile_mode=args.compile_mode,
        fullgraph=args.fullgraph,
        dynamic=args.dynamic,
        freeze=args.freeze,
        bf16_weights=args.bf16_weights,
        conv_layouts=args.conv_layouts,
        cudnn_benchmark=args.cudnn_benchmark,
        amp=not args.no_amp,
        repeats=args.repeats,
        threads=args.threads,
        memory_format=args.memory_format,
        cpu_convs=args.cpu_convs,
        cpu_bf16=args.cpu_bf16,
        overrides=model_overrides(args.override),
        inductor=inductor_settings(args.inductor),
    )
    device_type = torch.device(args.device).type
    info = {**environment(torch.device(args.device)), "compile_mode": args.compile_mode, "amp": config.amp}
    if "threads" in info:  # the CPU rows run with config.threads, whatever the process had before
        info["threads"] = config.threads
    # with the environment, what else makes rows comparable: --resume refuses a file measured otherwise
    info.update(fullgraph=config.fullgraph, dynamic=config.dynamic, repeats=config.repeats, overrides=config.overrides)
    info["memory_format"] = config.memory_format
    info["freeze"] = config.freeze
    info["bf16_weights"] = config.bf16_weights
    info["conv_layouts"] = config.conv_layouts
    info["cudnn_benchmark"] = config.cudnn_benchmark
    info["inductor"] = config.inductor
    if device_type == "cuda":  # steady calls' peaks, read from a settled allocator (bench.models.measure, settle)
        info["memory_baseline"] = "settled, steady calls"
    elif device_type == "cpu":  # CUDA rows do not depend on these (files from GPUs lack them)
        info["cpu_convs"] = config.cpu_convs
        info["cpu_bf16"] = config.cpu_bf16
    print(", ".join(f"{k}={v}" for k, v in info.items()))

    def progress(row: dict) -> None:  # one line per row as it is measured: a long run shows where it is
        memory = f", {row['peak_mb']:.0f} MiB" if row.get("peak_mb") is not None else ""
        timing = f"{row['ms']:.2f} ms{memory}" if "ms" in row else row.get("note", "")
        compiled = f", compile {row['compile_s']:.0f} s" if row.get("compile_s") is not None else ""
        print(
            f"  {row['model']} {row['mode']} {row['phase']} batch {row['batch']} side {row['side']}: {timing}{compiled}"
        )

    kept = _kept_rows(args, config, info) if args.resume else []
    if kept:
        print(f"  {len(kept)} rows kept from {args.json}")
    rows = list(kept)

    def record(row: dict) -> None:
        progress(row)
        rows.append(row)
        if args.json:  # an interrupted run keeps what it measured (continue it with --resume)
            write_json(args.json, {"environment": info, "rows": rows, "complete": False})

    bench_models(config, create_model, on_row=record, skip={row_key(r) for r in kept})
    growth = _print_models_report(rows, config.models, config.phases, config.modes, config.memory_format)
    if args.json:
        write_json(args.json, {"environment": info, "rows": rows, "growth": growth, "complete": True})
    if args.png:
        _plot_models(rows, info, args.dims, args.png)
    return 0


def _print_models_report(
    rows: list[dict], models: Sequence[str], phases: Sequence[str], modes: Sequence[str], memory_format: str
) -> list[dict]:
    """Print the table of bench models rows (one line per model, phase, batch and side; eager and compiled side by
    side) and their growth exponents; return the growth rows."""
    from ..bench.models import growth_rows
    from ..bench.table import format_table

    table: dict[tuple, dict] = {}
    notes: dict[str, int] = {}  # each distinct note once, under the table: a failure's note names where it was
    for r in rows:
        key = (r["model"], r["phase"], r["batch"], r["side"])
        cell = table.setdefault(key, dict(zip(("model", "phase", "batch", "side"), key, strict=True)))
        cell.update({f"{r['mode']}_{k}": r.get(k) for k in ("ms", "peak_mb", "compile_s")})
        if r.get("note"):
            ref = notes.setdefault(f"{r['mode']}: {r['note']}", len(notes) + 1)
            cell["note"] = f"{cell['note']} [{ref}]" if cell.get("note") else f"[{ref}]"
    columns = [("model", "model"), ("phase", "phase"), ("batch", "batch"), ("side", "side")]
    for mode in modes:
        columns += [(f"{mode}_ms", f"{mode} ms"), (f"{mode}_peak_mb", f"{mode} MiB")]
    if "compiled" in modes:
        columns.append(("compiled_compile_s", "compile s"))
    if memory_format != "contiguous":  # also in the line above the progress, far up in a long run
        print(f"parameters and inputs in {memory_format} memory format")
    rank = {name: i for i, name in enumerate(models)}  # rows come side by side; the table reads per model
    cells = sorted(table.values(), key=lambda c: (rank[c["model"]], phases.index(c["phase"]), c["batch"], c["side"]))
    print(format_table(cells, [*columns, ("note", "note")]))
    for text, ref in notes.items():
        print(f"[{ref}] {text}")
    growth = growth_rows(rows)
    print(
        "\ncost growth from the smallest side to the largest: exponent p of cost ~ tokens^p (1 = linear), and the line"
        " cost = fixed + slope x tokens (slope per million tokens):"
    )
    columns = [(k, k) for k in ("model", "mode", "phase", "batch", "time_exponent", "memory_exponent")]
    columns += [("time_per_mtoken", "ms/Mtoken"), ("time_fixed_ms", "fixed ms")]
    columns += [("memory_per_mtoken", "MiB/Mtoken"), ("memory_fixed_mib", "fixed MiB")]
    print(format_table(growth, columns))
    return growth


def _plot_models(rows: list[dict], info: dict, dims: int, png: str) -> None:
    """The cost-growth figure of bench models rows, titled with the machine and layout they were measured on."""
    from ..bench.models import plot_growth

    fmt = info.get("memory_format", "contiguous")
    layout = "" if fmt == "contiguous" else f", {fmt}"
    plot_growth(rows, png, f"{dims}D, {info.get('device_name')}, torch {info.get('torch')}{layout}")


def _read_models_file(path: Path, command: str, missing_fix: str) -> tuple[list[dict], dict, bool]:
    """(rows, environment, complete) of a bench models JSON file, each row with what the table, the figure and a
    resume read of it; a file that is missing or not such a file is one ValueError naming the command and path."""
    import json

    from ..bench.models import ROW_KEY

    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        rows, info = list(doc["rows"]), dict(doc["environment"])
        for row in rows:
            missing = [key for key in (*ROW_KEY, "tokens") if key not in row]
            if missing:
                raise KeyError(f"a row without {', '.join(missing)}")
    except FileNotFoundError:
        raise ValueError(f"{command}: {path} does not exist; {missing_fix}") from None
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{command}: {path} is not a bench models JSON file ({err})") from None
    return rows, info, bool(doc.get("complete", False))


def _run_show(args: argparse.Namespace) -> int:
    """`rwkvseg bench show FILE`: the table, growth and figure of a bench models JSON file, on any machine (a run
    measured on a GPU host, finished or cut short there); the file is only read."""
    path = Path(args.file)
    rows, info, complete = _read_models_file(path, "bench show", "give the --json file of a bench models run")
    if not rows:
        raise ValueError(f"bench show: {path} holds no measured rows yet; nothing to show")
    if args.png and Path(args.png).resolve() == path.resolve():
        raise ValueError(f"bench show: --png {args.png} is the input file; choose another path for the figure")
    if args.png and Path(args.png).exists() and not args.overwrite:
        raise ValueError(f"bench show: --png {args.png} exists; pass --overwrite to replace it, or choose a new file")

    def first_seen(key: str) -> list:  # a column's values in the order the run measured them
        return list(dict.fromkeys(r[key] for r in rows))

    print(", ".join(f"{k}={v}" for k, v in info.items()))
    if not complete:
        print(f"an interrupted run: {len(rows)} rows measured (continue it with --resume where it was measured)")
    modes = [m for m in ("eager", "compiled") if m in first_seen("mode")]
    _print_models_report(rows, first_seen("model"), first_seen("phase"), modes, info.get("memory_format", "contiguous"))
    if args.png:
        dims = 3 if rows[0]["tokens"] == rows[0]["side"] ** 3 else 2  # tokens: voxels or pixels of one sample
        _plot_models(rows, info, dims, args.png)
    return 0


# settings of the environment line that only the compiled rows depend on
COMPILE_ONLY_SETTINGS = ("compile_mode", "fullgraph", "dynamic", "freeze", "conv_layouts", "inductor")


def _kept_rows(args: argparse.Namespace, config, info: dict) -> list[dict]:
    """The rows of the interrupted run in args.json that this run (config, on this machine) would make."""
    from ..bench.models import planned_keys, row_key

    path = Path(args.json)
    rows, before, _ = _read_models_file(path, "bench models --resume", "run without --resume to start it")
    before.setdefault("memory_format", "contiguous")  # files from before the option measured contiguous maps
    before.setdefault("freeze", False)  # and did not freeze
    before.setdefault("bf16_weights", False)  # and autocast cast float32 weights
    before.setdefault("conv_layouts", "inductor")  # and left the convolutions' layouts to Inductor
    before.setdefault("cudnn_benchmark", False)  # and to cuDNN's heuristics
    before.setdefault("inductor", {})  # and set no other Inductor option
    if "memory_baseline" in info:  # CUDA files from before it read each row's baseline as earlier rows left it
        before.setdefault("memory_baseline", "as left")  # and "settled" ones counted the first call's peak too
    if "cpu_convs" in info:  # CPU files from before the option ran PyTorch's own convolution backends
        before.setdefault("cpu_convs", "stock")
        before.setdefault("cpu_bf16", False)  # and float32
    changed = sorted(k for k in {**before, **info} if before.get(k) != info.get(k))
    if not any(r["mode"] == "compiled" for r in rows):  # eager rows do not depend on how compiled rows compile
        changed = [k for k in changed if k not in COMPILE_ONLY_SETTINGS]
    if changed:
        raise ValueError(
            f"bench models --resume: {path} was measured with other settings or on another machine "
            f"({', '.join(changed)}: {[before.get(k) for k in changed]} there, {[info.get(k) for k in changed]} "
            "here); start a new file"
        )
    planned = set(planned_keys(config))
    foreign = [row_key(r) for r in rows if row_key(r) not in planned]
    if foreign:
        raise ValueError(
            f"bench models --resume: {path} holds rows this run would not make (e.g. {foreign[0]}); resume with the "
            "options of the interrupted run"
        )
    return rows


def _run_epoch(args: argparse.Namespace) -> int:
    import torch

    from ..bench.table import format_table
    from ..bench.wkv import environment
    from ..devices import resolve_device
    from ..files import write_json
    from ..train.timing import time_epochs

    device = resolve_device(next((o.split("=", 1)[1] for o in args.overrides if o.startswith("device=")), "auto"))
    info = environment(torch.device(device))
    print(", ".join(f"{k}={v}" for k, v in info.items()))
    rows = time_epochs(args.data, args.epochs, args.compile, args.resident, args.overrides, args.out, args.config)
    columns = [
        ("compile", "compile"),
        ("gpu_resident", "gpu_resident"),
        ("steps_per_epoch", "steps"),
        ("first_epoch_s", "first epoch s"),
        ("epoch_s", "epoch s"),
        ("setup_s", "setup s"),
        ("val_s", "val s"),
        ("final_loss", "loss"),
    ]
    print(format_table(rows, columns))
    if args.json:
        write_json(args.json, {"environment": info, "rows": rows})
    return 0
