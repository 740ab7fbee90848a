"""Train runs side by side on one GPU (the accuracy campaigns): 2D dataset x model pairs, or 3D configs.

Usage:
    python scripts/campaign.py DATA RUNS --datasets kvasir_seg ph2 --models urwkv urwkv_s unet cmunext
        [--epochs 280 | --epochs kvasir_seg=60 ph2=250] [--minutes 7.5] [--set key=value ...]
    python scripts/campaign.py DATA RUNS --configs configs/brats2018_{mmsegrwkv,mmsegrwkv_small,segresnet,dynunet}.toml
        [--epochs 200] [--minutes 9] [--folds 0 1 2 3 4] [--tag TAG] [--set key=value ...]

2D (--datasets, --models): DATA holds one folder per dataset (the originals, or `rwkvseg compact2d` copies at
256 x 256); each run reads configs/urwkv_<dataset>.toml (the paper's recipe for that dataset) with
`--set model.name=MODEL`, the committed split splits/<dataset>.json and the same epochs for every model of a
dataset (the same budget), into RUNS/<dataset>-<model>.
3D (--configs): one run per config file <dataset>_<variant>.toml (configs/brats2018_*.toml: the same recipe, only
the model differs) into RUNS/<dataset>-<variant> (e.g. brats2018-mmsegrwkv_small), all on DATA (a raw dataset
folder, preprocessed into each run, or better one cache from `rwkvseg preprocess DATA --out CACHE`), with the
dataset's committed split (SPLITS_3D: splits/brats2018_2mm.json), the config's epochs (or --epochs N) and an equal
share of the CPU cores for each run's patch loaders (data.num_workers; --set data.num_workers=N overrides it).
--folds K ... (3D) runs each config on those folds of the dataset's committed cross-validation split instead
(FOLDS_3D: splits/brats2018_2mm_5fold.json, every case validated once) into RUNS/<dataset>-<variant>-fold<K>: the
members of a cross-validated ensemble (`rwkvseg predict FOLD0/best.safetensors ... CASES`).
A run folder that already holds a training state is continued exactly (`rwkvseg train --resume`), so a campaign
longer than one device call is the same command again with the run folders carried back. `--minutes` is each
run's wall-clock budget (`max_minutes`): a run stops after a validated epoch and resumes later from there.
`--set fit_schedule=true` (with --minutes) fits each new run to its budget instead: fewer epochs, its schedule
finished (TrainConfig.fit_schedule); a resumed run keeps the setting of its own config.json.
Each run logs to RUNS/logs/<run>.log; at the end a table is printed and written to RUNS/campaign.json: epochs done of
planned (and `fitted`: the epochs a run fitted to its budget ends after), the best validation Dice (the mean over
regions in 3D) with its epoch and, in 3D, the Dice of each region at that epoch, the last validated Dice, whether the
curve has levelled off (`late_gain`: the best of the last third of the validations minus the best before them; `trend`
rising, level or declining: a best that came early and was never reached again is `declining`; `val_noise`: the median
change from one validation to the next, against which to read late_gain: a gain or a loss within it is the validation
set's noise, not the curve's shape; `late_rise`: the rise of a least-squares line through the last half of the
validations, and `plateau`, the test that reads it against that noise: `yes` when even its one-sided 95 % upper bound
rises by at most PLATEAU_DICE, `no` when its lower bound rises by more, `unclear` when the noise leaves both open), the
best checkpoint's Dice with mirror TTA (`tta_val_dice`, from final_val.json, 3D) and seconds per epoch. Under the
table a line names each run whose median steady epoch waited a tenth of its time or more for batches (its loaders
limited it: more `data.num_workers`, or fewer runs at once). Validation scores Dice only: HD95 comes from `rwkvseg
predict` + `rwkvseg evaluate` of the best checkpoint. Each run's curves (training loss, validation Dice per region,
the best epoch dotted) are drawn into RUNS/<run>.curves.png.
`--set train_all=true` trains each run on every case of its split, validation cases included (the final models
of a recipe whose epochs cross-validation chose): its row says train_all, has no validation columns and ends with
the last training loss; its curves show the loss alone.
Ctrl-C (or SIGINT from `timeout -s INT`, also when the campaign started as a script's background job, with SIGINT
ignored) is passed on to every run, which stops as `rwkvseg train` does, and the table is still written: once at
once, as the run folders stand, with the runs still stopping named in its `stopping` list and their exit null (so a
caller that kills the campaign when its grace runs out still has it), and again when they have ended.
`--compile-cache DIR` keeps one torch.compile cache per 2D model or 3D variant (DIR/<model>.bin,
rwkvseg.train.compile_cache) for the next call.
`--retries N` (default 1): a run that fails (a non-zero exit that is not a stop on purpose: SIGINT, SIGTERM or the
exit 130 of a stopped `rwkvseg train`) after finishing at least one more epoch than it had at its start is resumed
from its training state, with what is left of --minutes, up to N times (session 41: a DataLoader worker that dies
stops a run that can go on exactly). A run that fails again without finishing an epoch is not retried. Its log
says why each retry came; the table's `retries` column counts them.
`--tag TAG` appends -TAG to every run's name and compile cache (RUNS/<dataset>-<variant>-TAG[-fold<K>]): an arm with
its own --set values (e.g. `--tag stem2 --set model.overrides.stem_stride=2`) then sits beside the plain config's
runs in one RUNS folder, and `scripts/cv_eval.py` scores and compares it as a variant of its own.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from scipy import stats

from rwkvseg.cli import listen_to_sigint
from rwkvseg.eval.report import RunHistory, read_metrics_csv, read_run, write_run_curves
from rwkvseg.files import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {  # 2D dataset folder -> the recipe's config
    "kvasir_seg": "urwkv_kvasir.toml",
    "cvc_clinicdb": "urwkv_cvc.toml",
    "busi": "urwkv_busi.toml",
    "isic2017": "urwkv_isic2017.toml",
    "ph2": "urwkv_ph2.toml",
}
SPLITS_3D = {"brats2018": "brats2018_2mm.json"}  # the <dataset> of a 3D config's name -> its committed split
FOLDS_3D = {"brats2018": "brats2018_2mm_5fold.json"}  # ... -> its committed cross-validation split
PLATEAU_DICE = 0.005  # a rise at or below this (half a Dice point) over the late validations: levelled off
POLL_SECONDS = 1.0  # how often the campaign looks for runs that ended


def planned_epochs(values: list[str], datasets: list[str]) -> dict[str, int]:
    """--epochs N (every dataset) or DATASET=N ... (each dataset named once)."""
    if len(values) == 1 and "=" not in values[0]:
        return dict.fromkeys(datasets, int(values[0]))
    epochs = {key: int(value) for key, _, value in (v.partition("=") for v in values)}
    if sorted(epochs) != sorted(datasets):
        raise SystemExit(f"--epochs names {sorted(epochs)}; give one DATASET=N for each of {sorted(datasets)}")
    return epochs


def _sets(settings: list[str]) -> list[str]:
    return [x for s in settings for x in ("--set", s)]


def train_command(
    out: Path, config: Path, data: Path, model: str, settings: list[str], args: argparse.Namespace
) -> list[str]:
    """`rwkvseg train` of one run: continued exactly when out holds a training state (only the time budget and
    compile cache are set again), else started from config with settings, then the campaign's --set."""
    command = [sys.executable, "-m", "rwkvseg.cli", "train"]
    # one compile cache per model, shared by its runs (same graphs at every dataset): carried between calls
    cache = [f"compile_cache={args.compile_cache / (model + '.bin')}"] if args.compile_cache else []
    if (out / "state.pt").is_file():
        return resume_command(out, args.minutes, cache)
    settings = [*cache, *settings, f"max_minutes={args.minutes}", *args.set]
    return [*command, str(config), "--data", str(data), "--out", str(out), "--no-progress", *_sets(settings)]


def resume_command(out: Path, minutes: float, cache: list[str]) -> list[str]:
    """`rwkvseg train --resume` of the run in out, with a wall-clock budget of `minutes` (0: none) and the compile
    cache setting (["compile_cache=PATH"] or [])."""
    command = [sys.executable, "-m", "rwkvseg.cli", "train", "--resume", "--out", str(out), "--no-progress"]
    return [*command, *_sets([f"max_minutes={minutes}", *cache])]


def retried_command(out: Path, command: list[str], minutes: float) -> list[str]:
    """The command that continues a failed run of `command` (new or resumed) from out's training state: its own
    compile cache, `minutes` of budget."""
    return resume_command(out, minutes, [s for s in command if s.startswith("compile_cache=")])


def retry_reason(
    code: int, retried: int, retries: int, epochs_before: int, history: RunHistory, minutes_left: float | None
) -> str | None:
    """Why a run that exited with `code` is resumed (a line for its log), or None: it succeeded, was stopped on
    purpose (SIGINT, SIGTERM, or exit 130), used its `retries`, finished no epoch since its last start
    (epochs_before, against its history now: the same failure would come again), or has less of its budget left
    (minutes_left; None without a budget) than its longest epoch so far took, compilation included."""
    stopped = code in (130, -signal.SIGINT, -signal.SIGTERM)
    if code == 0 or stopped or retried >= retries or history.ran <= epochs_before:
        return None
    longest = max(r.get("train_seconds", 0.0) + r.get("val_seconds", 0.0) for r in history.rows) / 60
    if minutes_left is not None and minutes_left < longest:
        return None
    budget = "" if minutes_left is None else f", {minutes_left:.2f} minutes of its budget left"
    return (
        f"campaign: the run exited with {code} after epoch {history.ran} (it started at epoch {epochs_before}); "
        f"resuming it from its training state, retry {retried + 1} of {retries}{budget}"
    )


def run_command(data: Path, runs: Path, dataset: str, model: str, epochs: int, args: argparse.Namespace) -> list[str]:
    """The command of the 2D run <dataset>-<model>."""
    settings = [
        f"model.name={model}",
        f"data.split={ROOT / 'splits' / (dataset + '.json')}",
        f"epochs={epochs}",
        "data.num_workers=1",
    ]
    config = ROOT / "configs" / CONFIGS[dataset]
    name = tagged(f"{dataset}-{model}", args.tag)
    return train_command(runs / name, config, data / dataset, tagged(model, args.tag), settings, args)


def tagged(name: str, tag: str | None) -> str:
    """name with the campaign's --tag appended (name-TAG), or name alone."""
    return f"{name}-{tag}" if tag else name


def config_run(config: Path) -> tuple[str, str]:
    """(dataset, variant) of a 3D config <dataset>_<variant>.toml; its run is <dataset>-<variant>."""
    dataset, _, variant = config.stem.partition("_")
    if not variant or dataset not in SPLITS_3D:
        raise SystemExit(
            f"--configs {config}: name a 3D config <dataset>_<variant>.toml with a committed split, "
            f"dataset one of {sorted(SPLITS_3D)}"
        )
    return dataset, variant


def run_command_3d(
    data: Path, runs: Path, config: Path, epochs: int | None, workers: int, args: argparse.Namespace, fold: int | None
) -> list[str]:
    """The command of the 3D run of config (run_name): the committed split (fold None), or that fold of the
    committed cross-validation split; the config's epochs unless given."""
    dataset, variant = config_run(config)
    if fold is None:
        settings = [f"data.split={ROOT / 'splits' / SPLITS_3D[dataset]}"]
    else:
        settings = [f"data.split={ROOT / 'splits' / FOLDS_3D[dataset]}", f"data.fold={fold}"]
    settings += [f"data.num_workers={workers}"] + ([f"epochs={epochs}"] if epochs is not None else [])
    name = run_name(config, fold, args.tag)
    return train_command(runs / name, config, data, tagged(variant, args.tag), settings, args)


def run_name(config: Path, fold: int | None, tag: str | None = None) -> str:
    """<dataset>-<variant> of a 3D config, then -TAG (--tag) and -fold<K> for a fold of the cross-validation
    split."""
    name = tagged("-".join(config_run(config)), tag)
    return name if fold is None else f"{name}-fold{fold}"


def check_folds(folds: list[int], configs: list[Path]) -> None:
    """SystemExit unless every config's dataset has a committed cross-validation split holding each fold."""
    for config in configs:
        dataset, _ = config_run(config)
        if dataset not in FOLDS_3D:
            raise SystemExit(f"--folds: {dataset} has no committed cross-validation split; drop --folds")
        count = len(json.loads((ROOT / "splits" / FOLDS_3D[dataset]).read_text(encoding="utf-8"))["folds"])
        if bad := [k for k in folds if not 0 <= k < count]:
            raise SystemExit(f"--folds {bad}: splits/{FOLDS_3D[dataset]} has folds 0 to {count - 1}")
    if len(set(folds)) < len(folds):
        raise SystemExit(f"--folds {folds}: name each fold once")


def plan(args: argparse.Namespace) -> dict[str, list[str]]:
    """Run name -> its command, for the 2D (--datasets) or the 3D (--configs) form."""
    if args.datasets:
        if args.folds is not None:
            raise SystemExit("--folds runs 3D configs on folds of their cross-validation split: use it with --configs")
        epochs = planned_epochs(args.epochs or ["280"], args.datasets)
        return {
            tagged(f"{dataset}-{model}", args.tag): run_command(
                args.data, args.runs, dataset, model, epochs[dataset], args
            )
            for dataset in args.datasets
            for model in args.models or ["urwkv", "urwkv_s", "unet", "cmunext"]
        }
    if args.models:
        raise SystemExit("--models picks the models of --datasets; with --configs each config names its model")
    if args.epochs and (len(args.epochs) > 1 or "=" in args.epochs[0]):
        raise SystemExit(f"--epochs {' '.join(args.epochs)}: with --configs give one N for every run (or none)")
    names = ["-".join(config_run(config)) for config in args.configs]
    if len(set(names)) < len(names):
        raise SystemExit(f"--configs gives runs {names}; name each config once")
    missing = [str(c) for c in args.configs if not c.is_file()]
    if missing:
        raise SystemExit(f"--configs: {', '.join(missing)} not found (paths from the current folder)")
    epochs = int(args.epochs[0]) if args.epochs else None
    folds: list[int | None] = [None]
    if args.folds is not None:
        check_folds(args.folds, args.configs)
        folds = list(args.folds)
    runs = [(config, fold) for config in args.configs for fold in folds]
    workers = max(1, (os.cpu_count() or 1) // len(runs) - 1)  # a core per run for its main process
    return {
        run_name(config, fold, args.tag): run_command_3d(args.data, args.runs, config, epochs, workers, args, fold)
        for config, fold in runs
    }


def late_rise(dice: list[float]) -> tuple[float, float, float] | None:
    """(rise, lower, upper): the rise from the first to the last of the last half of the validations along their
    least-squares line (scipy.stats.linregress), with its one-sided 95 % bounds (Student's t, n - 2 degrees of
    freedom); None with fewer than 3 validations in that half (no noise to estimate)."""
    half = dice[len(dice) // 2 :]
    if len(half) < 3:
        return None
    fit = stats.linregress(range(len(half)), half)
    steps = len(half) - 1
    margin = float(stats.t.ppf(0.95, len(half) - 2) * fit.stderr * steps)
    rise = float(fit.slope * steps)
    return rise, rise - margin, rise + margin


def plateau(validated: list[dict]) -> dict:
    """late_gain: the best validation Dice of the last third of the validations minus the best before them; trend:
    "rising" above PLATEAU_DICE, "declining" below -PLATEAU_DICE (the best came early and the later validations
    stay under it: overfitting or a noisy validation set, not a level curve), else "level"; val_noise: the median
    absolute change between consecutive validations (session 26: MMSegRWKV on 5 BraTS cases swung 0.03-0.12 from
    one validation to the next, while its late_gain was -0.054). late_gain compares maxima, which that noise moves
    as much as the curve does; the plateau test reads the trend of the last half against the noise instead
    (`late_rise`): plateau "yes" when its upper bound rises by at most PLATEAU_DICE, "no" when its lower bound rises
    by more, else "unclear" (also with fewer than 5 validations). Nothing before the third validation."""
    dice = [r["val_dice"] for r in validated]
    if len(dice) < 3:
        return {}
    tail = len(dice) // 3
    gain = max(dice[-tail:]) - max(dice[:-tail])
    trend = "rising" if gain > PLATEAU_DICE else "declining" if gain < -PLATEAU_DICE else "level"
    noise = statistics.median(abs(b - a) for a, b in itertools.pairwise(dice))
    row = {"late_gain": gain, "trend": trend, "val_noise": noise, "plateau": "unclear"}
    fit = late_rise(dice)
    if fit is not None:
        rise, lower, upper = fit
        row |= {
            "late_rise": rise,
            "plateau": "yes" if upper <= PLATEAU_DICE else "no" if lower > PLATEAU_DICE else "unclear",
        }
    return row


def load_history(run: Path) -> RunHistory:
    """A run folder's metrics.csv and config.json, read once for its table row and its curves; a run that stopped
    before writing them (a failed start) gets what is there."""
    metrics, config = run / "metrics.csv", run / "config.json"
    if metrics.is_file() and config.is_file():
        return read_run(run)
    rows = read_metrics_csv(metrics) if metrics.is_file() else []
    return RunHistory(run.name, rows, json.loads(config.read_text()) if config.is_file() else {})


def summary(run: Path, history: RunHistory | None = None) -> dict:
    """A run's row of the campaign table from its folder (its history: metrics.csv and config.json, read here
    unless given; final_val.json)."""
    history = load_history(run) if history is None else history
    rows = history.rows
    row = {"run": run.name, "planned": history.config.get("epochs"), "epochs": history.ran}
    if history.fit is not None:  # fit_schedule: the run was fitted to its budget, to end after these epochs
        row["fitted"] = history.fit["epochs"]
    if not rows:
        return row
    validated = history.validated  # val_every > 1: the other epochs have no val_* columns; train_all: none have
    if history.config.get("train_all"):
        row["train_all"] = True
    if validated:
        best = history.best  # the first best, as the loop keeps it
        row |= {"best_epoch": int(best["epoch"])}
        row |= {f"best_{k}": v for k, v in best.items() if k.startswith("val_") and k != "val_seconds"}
        row |= {"last_val_dice": validated[-1]["val_dice"], **plateau(validated)}
    final = run / "final_val.json"
    if final.is_file():
        row["tta_val_dice"] = json.loads(final.read_text())["dice"]
    row |= {
        "last_train_loss": rows[-1]["train_loss"],
        "median_epoch_s": statistics.median(r["train_seconds"] + r.get("val_seconds", 0.0) for r in rows),
        "first_epoch_s": rows[0]["train_seconds"],
    }
    waits = [r["data_wait_seconds"] for r in rows[1:] if r.get("data_wait_seconds") is not None]
    if waits:  # how much of a steady epoch waited for batches: the loader's share when runs share a machine
        row["median_data_wait_s"] = statistics.median(waits)
    return row


# a run whose steady epochs wait this share of their time or more for batches is limited by its data loaders
LOADER_SHARE = 0.1


def loader_notes(rows: list[dict], histories: dict[str, RunHistory]) -> list[str]:
    """A line for each run of the table whose median steady epoch waited LOADER_SHARE or more of its time for
    batches (session 55: five 3D runs with the strong augmentation and two loader workers each waited 5-6 s of
    every 24 s epoch), with what to change."""
    notes = []
    for row in rows:
        wait, epoch = row.get("median_data_wait_s"), row.get("median_epoch_s")
        if wait is None or not epoch or wait < LOADER_SHARE * epoch:
            continue
        workers = histories[row["run"]].config.get("data", {}).get("num_workers", "?")
        notes.append(
            f"{row['run']}: waited {wait:.1f} s of its {epoch:.1f} s epochs for batches ({wait / epoch:.0%}), its "
            f"data loaders limited it: raise data.num_workers (it had {workers}) or run fewer runs at once"
        )
    return notes


def _cell(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4f}"
    return "-" if value is None else str(value)


def table(rows: list[dict]) -> list[str]:
    """The campaign table's lines: a header, then one line per run."""
    regions = [k for k in dict.fromkeys(k for r in rows for k in r) if k.startswith("best_val_dice_")]
    keys = ["run", "exit", *(["retries"] if any(r.get("retries") for r in rows) else [])]
    keys += ["train_all"] if any(r.get("train_all") for r in rows) else []
    keys += ["planned", *(["fitted"] if any("fitted" in r for r in rows) else []), "epochs"]
    keys += ["best_val_dice", "best_epoch", *regions, "last_val_dice"]
    keys += ["late_gain", "trend", "val_noise", "late_rise", "plateau"]
    keys += ["tta_val_dice"] if any("tta_val_dice" in r for r in rows) else []
    keys += ["last_train_loss", "median_epoch_s"]
    keys += ["median_data_wait_s"] if any("median_data_wait_s" in r for r in rows) else []
    return [" | ".join(keys), *(" | ".join(_cell(row.get(k)) for k in keys) for row in rows)]


def table_rows(
    runs: Path,
    commands: dict[str, list[str]],
    codes: dict[str, int],
    retried: dict[str, int],
    histories: dict[str, RunHistory] | None = None,
) -> list[dict]:
    """The campaign table's rows in the order of the plan: each run's summary (its history from histories, where
    it was read when the run ended, else from its folder now), its exit code (None while it still runs or stops)
    and its retries."""
    histories = histories or {}
    return [
        {**summary(runs / name, histories.get(name)), "exit": codes.get(name), "retries": retried[name]}
        for name in commands
    ]


def write_table(runs: Path, wall_s: float, rows: list[dict], stopping: list[str] | None = None) -> None:
    """RUNS/campaign.json, written atomically. stopping: the runs still stopping after a Ctrl-C when it was
    written (their rows as their folders stood then, exit null); the file is written again once they end."""
    doc = {"wall_s": wall_s, **({"stopping": stopping} if stopping else {}), "runs": rows}
    atomic_write_text(runs / "campaign.json", json.dumps(doc, indent=1))


def tag_option(text: str) -> str:
    """--tag: letters, digits and underscores, so a run's name still parses as <dataset>-<variant>-TAG-fold<K>."""
    if not re.fullmatch(r"[A-Za-z0-9_]+", text):
        raise argparse.ArgumentTypeError(f"{text!r}: use letters, digits and underscores only, e.g. stem2")
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", type=Path, help="2D: a folder with one subfolder per dataset; 3D: the data of every config")
    p.add_argument("runs", type=Path, help="campaign folder (run folders, logs, curves, campaign.json)")
    form = p.add_mutually_exclusive_group(required=True)
    form.add_argument("--datasets", nargs="+", choices=sorted(CONFIGS), help="2D: the datasets of the campaign")
    form.add_argument("--configs", nargs="+", type=Path, help="3D: one run per config <dataset>_<variant>.toml")
    p.add_argument("--models", nargs="+", help="2D: the models of each dataset (default urwkv urwkv_s unet cmunext)")
    p.add_argument(
        "--epochs", nargs="+", help="planned epochs: N, or (2D) DATASET=N each (default: 280 in 2D, the config's in 3D)"
    )
    p.add_argument("--minutes", type=float, default=0.0, help="wall-clock budget of each run now (0: none)")
    p.add_argument(
        "--folds",
        nargs="+",
        type=int,
        help="3D: run each config on these folds of the committed cross-validation split (runs <name>-fold<K>)",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a setting for every new run")
    p.add_argument(
        "--retries",
        type=int,
        default=1,
        metavar="N",
        help="resume a run that failed after finishing an epoch more, up to N times (0: never)",
    )
    p.add_argument(
        "--tag",
        type=tag_option,
        help="append -TAG to every run's name and compile cache (an arm with its own --set values; letters, digits, _)",
    )
    p.add_argument(
        "--compile-cache",
        type=Path,
        metavar="DIR",
        help="keep each model's (3D: variant's) torch.compile cache as DIR/<model>.bin (read before compiling, written after the "
        "first step): carry DIR to the next call and its runs skip compilation",
    )
    args = p.parse_args(argv)
    if args.retries < 0:
        p.error(f"--retries {args.retries}: give 0 (never) or more")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    listen_to_sigint()
    commands = plan(args)
    logs = args.runs / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    start = time.time()

    def launch(name: str, command: list[str]) -> subprocess.Popen:
        with (logs / f"{name}.log").open("a") as log:
            return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

    started = {name: load_history(args.runs / name).ran for name in commands}  # epochs done at each (re)start
    jobs = {name: launch(name, command) for name, command in commands.items()}
    retried = dict.fromkeys(commands, 0)
    codes: dict[str, int] = {}
    histories: dict[str, RunHistory] = {}  # of the runs that ended, read when they did
    try:
        while jobs:
            for name, job in list(jobs.items()):
                if (code := job.poll()) is None:
                    continue
                history = load_history(args.runs / name)
                left = args.minutes - (time.time() - start) / 60 if args.minutes else None
                reason = retry_reason(code, retried[name], args.retries, started[name], history, left)
                if reason is None:
                    codes[name], histories[name] = code, history
                    del jobs[name]
                    continue
                with (logs / f"{name}.log").open("a") as log:
                    log.write(reason + "\n")
                print(f"{name}: {reason.removeprefix('campaign: ')}", flush=True)
                retried[name], started[name] = retried[name] + 1, history.ran
                jobs[name] = launch(name, retried_command(args.runs / name, commands[name], left or 0.0))
            time.sleep(POLL_SECONDS if jobs else 0)
    except KeyboardInterrupt:
        for job in jobs.values():
            job.send_signal(signal.SIGINT)
        # the table as it stands, before waiting for the runs to stop: a campaign killed while they stop (a
        # caller's grace ran out) still leaves every run's epochs and best in campaign.json
        rows = table_rows(args.runs, commands, codes, retried, histories)
        write_table(args.runs, time.time() - start, rows, stopping=list(jobs))
        codes |= {name: job.wait() for name, job in jobs.items()}
    # the runs stopped by Ctrl-C: their histories as they ended
    histories |= {name: load_history(args.runs / name) for name in commands if name not in histories}
    rows = table_rows(args.runs, commands, codes, retried, histories)
    write_table(args.runs, time.time() - start, rows)
    print("\n".join(table(rows) + loader_notes(rows, histories)))
    for row in rows:
        if histories[row["run"]].rows:  # a run that trained an epoch has curves (train_all: its loss alone)
            try:
                write_run_curves(histories[row["run"]], args.runs / f"{row['run']}.curves.png")
            except ValueError as err:  # no matplotlib: the table is the campaign's result
                print(f"{row['run']}: no curves ({err})")
    print(f"wall {time.time() - start:.0f} s")
    return int(any(codes.values()))


if __name__ == "__main__":
    sys.exit(main())
