"""Train 2D runs side by side on one GPU (the accuracy campaign): every dataset x model pair at once.

Usage:
    python scripts/campaign.py DATA RUNS --datasets kvasir_seg ph2 --models urwkv urwkv_s unet cmunext
        [--epochs 280 | --epochs kvasir_seg=60 ph2=250] [--minutes 7.5] [--set key=value ...]

DATA holds one folder per dataset (the originals, or `rwkvseg compact2d` copies at 256 x 256); each run reads
configs/urwkv_<dataset>.toml (the paper's recipe for that dataset) with `--set model.name=MODEL`, the committed
split splits/<dataset>.json and the same epochs for every model of a dataset (the same budget), into
RUNS/<dataset>-<model>.
A run folder that already holds a training state is continued exactly (`rwkvseg train --resume`), so a campaign
longer than one device call is the same command again with the run folders carried back. `--minutes` is each
run's wall-clock budget (`max_minutes`): a run stops after a validated epoch and resumes later from there.
Each run logs to RUNS/logs/<dataset>-<model>.log; at the end a table (epochs done, best validation Dice and its
epoch, seconds per epoch) is printed and written to RUNS/campaign.json. Ctrl-C (or SIGINT from `timeout -s INT`)
is passed on to every run, which stops as `rwkvseg train` does, and the table is still written.
`--compile-cache DIR` keeps one torch.compile cache per model (rwkvseg.train.compile_cache) for the next call.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from rwkvseg.eval.report import read_metrics_csv

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {  # dataset folder -> the recipe's config
    "kvasir_seg": "urwkv_kvasir.toml",
    "cvc_clinicdb": "urwkv_cvc.toml",
    "busi": "urwkv_busi.toml",
    "isic2017": "urwkv_isic2017.toml",
    "ph2": "urwkv_ph2.toml",
}


def planned_epochs(values: list[str], datasets: list[str]) -> dict[str, int]:
    """--epochs N (every dataset) or DATASET=N ... (each dataset named once)."""
    if len(values) == 1 and "=" not in values[0]:
        return dict.fromkeys(datasets, int(values[0]))
    epochs = {key: int(value) for key, _, value in (v.partition("=") for v in values)}
    if sorted(epochs) != sorted(datasets):
        raise SystemExit(f"--epochs names {sorted(epochs)}; give one DATASET=N for each of {sorted(datasets)}")
    return epochs


def run_command(data: Path, runs: Path, dataset: str, model: str, epochs: int, args: argparse.Namespace) -> list[str]:
    out = runs / f"{dataset}-{model}"
    command = [sys.executable, "-m", "rwkvseg.cli", "train"]
    # one compile cache per model, shared by its runs (same graphs at every dataset): carried between calls
    cache = [f"compile_cache={args.compile_cache / (model + '.bin')}"] if args.compile_cache else []
    if (out / "state.pt").is_file():
        resumed = [f"max_minutes={args.minutes}", *cache]
        return [*command, "--resume", "--out", str(out), "--no-progress", *(x for s in resumed for x in ("--set", s))]
    settings = [
        *cache,
        f"model.name={model}",
        f"data.split={ROOT / 'splits' / (dataset + '.json')}",
        f"epochs={epochs}",
        f"max_minutes={args.minutes}",
        "data.num_workers=1",
        *args.set,
    ]
    command += [str(ROOT / "configs" / CONFIGS[dataset]), "--data", str(data / dataset), "--out", str(out)]
    return [*command, "--no-progress", *(x for s in settings for x in ("--set", s))]


def summary(run: Path) -> dict:
    metrics = run / "metrics.csv"
    rows = read_metrics_csv(metrics) if metrics.is_file() else []
    config = json.loads((run / "config.json").read_text()) if (run / "config.json").is_file() else {}
    validated = [r for r in rows if "val_dice" in r]  # val_every > 1: the other epochs have no val_* columns
    if not validated:
        return {"run": run.name, "planned": config.get("epochs"), "epochs": len(rows)}
    best = max(validated, key=lambda r: r["val_dice"])
    return {
        "run": run.name,
        "planned": config.get("epochs"),
        "epochs": len(rows),
        "best_epoch": int(best["epoch"]),
        "best_val_dice": best["val_dice"],
        "best_val_iou": best["val_iou"],
        "last_val_dice": validated[-1]["val_dice"],
        "median_epoch_s": statistics.median(r["train_seconds"] + r.get("val_seconds", 0.0) for r in rows),
        "first_epoch_s": rows[0]["train_seconds"],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", type=Path, help="folder with one subfolder per dataset")
    p.add_argument("runs", type=Path, help="campaign folder (run folders and logs)")
    p.add_argument("--datasets", nargs="+", required=True, choices=sorted(CONFIGS))
    p.add_argument("--models", nargs="+", default=["urwkv", "urwkv_s", "unet", "cmunext"])
    p.add_argument("--epochs", nargs="+", default=["280"], help="planned epochs: N, or DATASET=N each (default 280)")
    p.add_argument("--minutes", type=float, default=0.0, help="wall-clock budget of each run now (0: none)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a setting for every new run")
    p.add_argument(
        "--compile-cache",
        type=Path,
        metavar="DIR",
        help="keep each model's torch.compile cache as DIR/<model>.bin (read before compiling, written after the "
        "first step): carry DIR to the next call and its runs skip compilation",
    )
    args = p.parse_args()

    epochs = planned_epochs(args.epochs, args.datasets)
    logs = args.runs / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    start = time.time()
    jobs = {}
    for dataset in args.datasets:
        for model in args.models:
            name = f"{dataset}-{model}"
            with (logs / f"{name}.log").open("a") as log:
                command = run_command(args.data, args.runs, dataset, model, epochs[dataset], args)
                jobs[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        codes = {name: job.wait() for name, job in jobs.items()}
    except KeyboardInterrupt:
        for job in jobs.values():
            job.send_signal(signal.SIGINT)
        codes = {name: job.wait() for name, job in jobs.items()}
    rows = [{**summary(args.runs / name), "exit": code} for name, code in codes.items()]
    (args.runs / "campaign.json").write_text(json.dumps({"wall_s": time.time() - start, "runs": rows}, indent=1))
    keys = ["run", "exit", "planned", "epochs", "best_val_dice", "best_epoch", "last_val_dice", "median_epoch_s"]
    print(" | ".join(keys))
    for row in rows:
        print(" | ".join(f"{row.get(k):.4f}" if isinstance(row.get(k), float) else str(row.get(k)) for k in keys))
    print(f"wall {time.time() - start:.0f} s")
    return int(any(codes.values()))


if __name__ == "__main__":
    sys.exit(main())
