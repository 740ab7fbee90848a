"""Profile a short real training run (`rwkvseg train`'s own loop, data loader and loss) with torch.profiler.

Answers "where does a training step go" where `rwkvseg bench models` (the model's forward + backward alone) and
the loop disagree: on an H200, MMSegRWKV-small's bench step was 66 ms and `rwkvseg train` ran at 160 ms per step
with the GPU 12 % busy (this profile showed 139 ms per step of main-thread time outside any operator: the patches
were MONAI MetaTensors, whose __torch_function__ ran with every op; fixed in data.patches3d). Prints the top
operators by self CPU time and by self device time, the wall time per step and the share of the profiled wall
time the device was busy; writes the tables and a Chrome trace (trace.json.gz, open in https://ui.perfetto.dev)
to OUT.

    python scripts/profile_train.py configs/centralized_brats2018_small.toml --data CACHE --out OUT \
        --steps 60 --set compile=off --set data.num_workers=6

The run trains one epoch of --steps steps (samples_per_epoch / max_steps_per_epoch are set for it) into OUT/run,
without validation; the first --skip steps (warm-up, loader start) are left out of the profile.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.profiler import ProfilerActivity, profile, schedule

from rwkvseg.bench.profiling import device_kernels


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="a training config (TOML / YAML)")
    parser.add_argument("--data", required=True, help="dataset folder or 3D cache")
    parser.add_argument("--out", required=True, help="a new folder for the tables, the trace and the run")
    parser.add_argument("--steps", type=int, default=60, help="training steps in all (default 60)")
    parser.add_argument("--skip", type=int, default=20, help="steps before the profile starts (default 20)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    if args.steps <= args.skip:
        parser.error(f"--steps {args.steps} must exceed --skip {args.skip}")
    out = Path(args.out)
    if out.exists():
        parser.error(f"--out {out} exists; give a new folder")

    from rwkvseg.train.config import load_config
    from rwkvseg.train.train import train

    run_settings = [
        *args.overrides,
        f"data.root={args.data}",
        f"out={out / 'run'}",
        "epochs=1",
        "val_every=2",  # past the only epoch: no validation
        f"max_steps_per_epoch={args.steps}",
    ]
    config = load_config(args.config, run_settings)
    if config.dims == 3:  # an epoch of exactly --steps patches batches, and no final evaluation
        samples = args.steps * config.data.batch_size
        config = load_config(
            args.config, [*run_settings, f"data.patches.samples_per_epoch={samples}", "infer.final_eval=false"]
        )
    cuda = torch.cuda.is_available() and config.device != "cpu"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    prof = profile(
        activities=activities,
        schedule=schedule(wait=args.skip, warmup=2, active=args.steps - args.skip - 2, repeat=1),
    )
    stamps: list[float] = []  # the loop has no step hook: a step ends where the optimizer steps (a global post-hook)

    def on_step(optimizer, *a, **k) -> None:
        stamps.append(time.perf_counter())
        prof.step()

    handle = register_optimizer_step_post_hook(on_step)
    try:
        with prof:
            train(config)
    finally:
        handle.remove()

    out.mkdir(parents=True, exist_ok=True)
    times = [b - a for a, b in itertools.pairwise(stamps)][args.skip :]  # wall seconds of each profiled step
    per_step = statistics.median(times) * 1e3 if times else float("nan")
    events = prof.key_averages()
    lines = [f"{len(stamps)} steps; median wall time per step after {args.skip}: {per_step:.1f} ms"]
    if cuda:
        # kernels only: an operator's row repeats its kernels' time, and a device-side annotation spans them
        busy_us = sum(e.time_range.elapsed_us() for e in device_kernels(prof.events()))
        wall_us = sum(times[2:]) * 1e6 if len(times) > 2 else float("nan")
        lines.append(f"device busy {busy_us / 1e3:.1f} ms of {wall_us / 1e3:.1f} ms profiled ({busy_us / wall_us:.0%})")
        lines.append(events.table(sort_by="self_device_time_total", row_limit=25))
    lines.append(events.table(sort_by="self_cpu_time_total", row_limit=40))
    report = "\n".join(lines)
    (out / "profile.txt").write_text(report + "\n", encoding="utf-8")
    trace = out / "trace.json"
    prof.export_chrome_trace(str(trace))
    with open(trace, "rb") as src, gzip.open(out / "trace.json.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    trace.unlink()
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
