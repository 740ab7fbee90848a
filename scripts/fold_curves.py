"""The cross-validated training curve of fold runs, read at fixed epochs from their metrics.csv files: an honest
view beside the per-fold best that `scripts/cv_eval.py` scores.

Usage:
    python scripts/fold_curves.py NAME=GLOB [NAME=GLOB ...] [--metric val_dice] [--json OUT.json]

Each NAME=GLOB is one arm: GLOB matches the metrics.csv of each of its fold runs, one file per fold, e.g.
    dynunet='docs/campaigns/s44/brats2018-dynunet-ds2-e34-fold*.metrics.csv'
or RUNS/brats2018-dynunet-fold*/metrics.csv (the folds are named by the fold<K> in the paths, or by the files where
those do not tell them apart).
Per arm, on screen, a markdown table of the metric (default val_dice, the mean over regions; or a region's column,
e.g. val_dice_TC) read three ways (rwkvseg.eval.report.fold_curve), each with the means of the regions where the
files have region columns:
- per-fold best: the mean of each fold's best epoch (that of the `best` checkpoint cv_eval scores by default);
  optimistic, each fold's epoch chosen on the cases it scores;
- best common epoch: the epoch of the highest mean over the folds (the earliest of ties), one choice for all folds;
- last: each fold's last validated epoch (what a model trained on every case with train_all keeps);
then the curve itself: the mean at each epoch every fold validated. --json writes the same to a new file.
A malformed NAME=GLOB, two arms of one NAME, a GLOB matching nothing or one file, a file without an epoch column,
folds that never validated the metric or share no validated epoch, or an existing --json file: one error line and
exit status 2, nothing written.
"""

from __future__ import annotations

import argparse
import glob
import itertools
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from rwkvseg.eval.report import FoldCurve, fold_curve, read_metrics_csv
from rwkvseg.files import write_json

FOLD = re.compile(r"fold(\d+)")
READINGS = (
    ("per_fold_best", "per-fold best (optimistic: each fold's epoch chosen on its own cases)"),
    ("best", "best common epoch"),
    ("last", "last validated epoch"),
)


class Refused(Exception):
    """An input the curves cannot be read from: one line, no traceback."""


@dataclass(frozen=True)
class Arm:
    name: str
    pattern: str
    files: tuple[Path, ...]
    curve: FoldCurve


def parse_arm(spec: str) -> tuple[str, str]:
    name, sep, pattern = spec.partition("=")
    if not sep or not name or not pattern:
        raise Refused(f"{spec!r} is not NAME=GLOB; give e.g. dynunet='runs/brats2018-dynunet-fold*.metrics.csv'")
    return name, pattern


def fold_names(files: list[Path]) -> list[int | str]:
    """Each file's fold: the K of the last fold<K> in its path (x-fold3.metrics.csv, x-fold3/metrics.csv) when that
    tells every file apart, else the file."""
    numbers = [found[-1] if (found := FOLD.findall(f.as_posix())) else None for f in files]
    if None not in numbers and len(set(numbers)) == len(files):
        return [int(n) for n in numbers]
    return [str(f) for f in files]


def read_arm(name: str, pattern: str, metric: str) -> Arm:
    files = sorted(path for path in map(Path, glob.glob(pattern)) if path.is_file())
    if not files:
        raise Refused(f"{name}: {pattern} matches no file; give a glob of each fold's metrics.csv")
    if len(files) < 2:
        raise Refused(f"{name}: {pattern} matches {files[0]} alone; a cross-validation needs 2 or more folds")
    histories = {}
    for fold, path in zip(fold_names(files), files, strict=True):
        try:
            rows = read_metrics_csv(path)
        except ValueError as err:
            raise Refused(f"{path}: {err}; give the metrics.csv of a training run") from None
        if any("epoch" not in r for r in rows):
            raise Refused(f"{path} has no epoch column; give the metrics.csv of a training run")
        histories[fold] = rows
    try:
        return Arm(name, pattern, tuple(files), fold_curve(histories, metric))
    except ValueError as err:
        raise Refused(f"{name}: {err}") from None


def epochs_text(epochs: tuple[int, ...]) -> str:
    """'17 epochs: 2-34 every 2' for three or more evenly spaced epochs, else the count and each epoch."""
    steps = {b - a for a, b in itertools.pairwise(epochs)}
    if len(epochs) > 2 and len(steps) == 1:
        return f"{len(epochs)} epochs: {epochs[0]}-{epochs[-1]} every {steps.pop()}"
    return f"{len(epochs)} epoch{'s' * (len(epochs) > 1)}: {', '.join(map(str, epochs))}"


def each_fold(epochs: dict) -> str:
    """The epoch of every fold in fold order, or the one epoch they share."""
    values = set(epochs.values())
    return str(values.pop()) if len(values) == 1 else ", ".join(map(str, epochs.values()))


def arm_table(arm: Arm) -> list[str]:
    """The arm's folds and common epochs, its readings as a markdown table (a column of region means where the
    files have them) and its curve."""
    curve = arm.curve
    folds = f"{len(curve.folds)} folds ({', '.join(map(str, curve.folds))})"
    epochs = {"per_fold_best": each_fold(curve.per_fold_best_epochs), "best": str(curve.best_epoch)}
    epochs["last"] = each_fold(curve.last_epochs)
    columns = [arm.name, "epoch", curve.metric] + ([" / ".join(curve.regions)] if curve.regions else [])
    lines = [f"{arm.name}: {folds}, {curve.metric} validated by all at {epochs_text(curve.epochs)}", ""]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for key, label in READINGS:
        cells = [label, epochs[key], f"{getattr(curve, key):.4f}"]
        if curve.regions:
            cells.append(" / ".join(f"{v:.4f}" for v in getattr(curve, f"{key}_regions").values()))
        lines.append("| " + " | ".join(cells) + " |")
    points = ", ".join(f"{e} {m:.3f}" for e, m in zip(curve.epochs, curve.mean, strict=True))
    return [*lines, "", f"curve (epoch, mean {curve.metric}): {points}"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("arms", nargs="+", metavar="NAME=GLOB", help="an arm: a glob of its folds' metrics.csv files")
    p.add_argument("--metric", default="val_dice", help="a validation column (default val_dice; e.g. val_dice_TC)")
    p.add_argument("--json", type=Path, help="also write the readings and curves here (a new file)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.json is not None and args.json.exists():
            raise Refused(f"--json {args.json} exists; give a new file (nothing is overwritten)")
        specs = [parse_arm(spec) for spec in args.arms]
        if repeated := sorted({n for n, _ in specs if [m for m, _ in specs].count(n) > 1}):
            raise Refused(f"arms {repeated} are named twice; give each arm its own NAME")
        arms = [read_arm(name, pattern, args.metric) for name, pattern in specs]
    except Refused as err:
        print(f"fold_curves.py: error: {err}", file=sys.stderr)
        return 2
    print("\n\n".join("\n".join(arm_table(arm)) for arm in arms))
    if args.json is not None:
        record = {a.name: {"glob": a.pattern, "files": [str(f) for f in a.files], **a.curve.as_json()} for a in arms}
        write_json(args.json, {"metric": args.metric, "arms": record})
    return 0


if __name__ == "__main__":
    sys.exit(main())
