"""Cross-validation scores of 3D fold runs: each fold's best checkpoint predicts the validation cases of its own
fold, and one model's predictions of every fold are scored together against the originals, every case once.

Usage:
    python scripts/cv_eval.py RUNS DATA OUT [--threshold T] [--postprocess SPEC] [--mirror-axes AXES] [--device auto]
        [--compile MODE] [--checkpoints-from DIR] [--checkpoint best|last]

RUNS holds the run folders `<dataset>-<variant>-fold<K>` of `scripts/campaign.py ... --folds K ...`, each with
best.safetensors (+ .json) and the split.json it trained on; DATA the dataset's original case folders by case id
(e.g. ../shared/data/brats2018_4mod_2mm), read in place. For each variant, under OUT/<variant>/:
- fold<K>/val: links to fold K's validation cases; fold<K>/pred: `rwkvseg predict RUN/best.safetensors
  fold<K>/val`; fold<K>/eval: `rwkvseg evaluate` of that fold alone;
- all/pred: links to every fold's predictions, all/eval: `rwkvseg evaluate all/pred` against the validation cases of
  every fold together: the cross-validation score (a mean over cases, not over folds).
Then OUT/cv.json (per variant: the folds, cases and means per region, per fold and over all, the label
confusion over all cases, and `training_curve`, below), a table on screen, and
OUT/<variant>.folds.curves.png: each fold's validation Dice during training, their mean and the mean training loss
(from the runs' metrics.csv; needs matplotlib, `pip install 'rwkvseg[plots]'`; --no-curves leaves them out).
`training_curve` (and a second table on screen) reads the same histories at fixed epochs, without matplotlib
(rwkvseg.eval.report.fold_curve, as `scripts/fold_curves.py` prints it): the training's validation Dice averaged over
the folds at each epoch every fold validated, the mean of each fold's own best epoch (optimistic: each chosen on the
cases it scores, as each run's best checkpoint is), the best common epoch (one choice for every fold) and each fold's
last validated epoch (what a model trained with train_all keeps), each with its regions' means; null, with a warning,
where the folds share no validated epoch.
With several variants, each one after the first (in name order) is compared with that first one case by case over
every case (`rwkvseg compare`: the mean difference, its 95 % bootstrap and t intervals, the Wilcoxon p-value and
wins, per region and for the mean Dice): a table each on screen, and cv.json's "comparisons".
--threshold, --postprocess, --mirror-axes, --device and --compile go to `rwkvseg predict` (defaults: each
checkpoint's recorded threshold and post-processing, no flips, not compiled; cv.json records them).
Every variant must have the same folds, each fold's validation cases must be in DATA, and no two folds may validate
one case; otherwise one error line and exit status 2, before anything is predicted. OUT must be a new folder.
--checkpoints-from DIR scores other checkpoints of the same runs instead of each RUN/best: for fold K the one file in
DIR whose name ends in fold<K>.safetensors (+ .json), e.g. the int8 exports of a campaign's fold models made where it
trained (`rwkvseg.released.export_release`), the members of an ensemble release; RUNS then holds one variant, whose
runs give the folds, validation cases and curves, and each checkpoint must be the model its fold's run trained.
--checkpoint last scores each run's last.safetensors (its last epoch, the weight average where the run kept one)
instead of its best: the rule of a model trained on every case (`train_all`), which keeps its last epoch, so the
cross-validation carries no choice made on the cases it scores.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rwkvseg.checkpoint import read_meta
from rwkvseg.cli.predict import mirror_axes, postprocess_option
from rwkvseg.data.specs import DatasetSpec
from rwkvseg.data.splits import read_split
from rwkvseg.devices import resolve_device
from rwkvseg.eval.compare import PairedComparison, as_json, compare_evaluations, comparison_table, read_per_case
from rwkvseg.eval.evaluate import evaluate_folders, summary_means
from rwkvseg.eval.report import RunHistory, fold_curve, plot_fold_curves, read_run
from rwkvseg.files import write_json
from rwkvseg.infer.predict import PredictConfig, predict
from rwkvseg.released import fold_export

FOLD_RUN = re.compile(r"^(?P<variant>.+)-fold(?P<fold>\d+)$")
REGIONS = ("WT", "TC", "ET")
CONFIDENCE = 0.95  # of the comparisons' intervals, in cv.json and on screen
log = logging.getLogger("cv_eval")


def settings_text(settings: dict) -> str:
    """How a cv.json's predictions were made, in words for a card: its `settings` (None: each checkpoint's record)."""
    cut, post = settings.get("threshold"), settings.get("postprocess")
    cut_text = "each checkpoint's recorded region cut" if cut is None else f"region cut {cut:g}"
    post_text = "each checkpoint's recorded post-processing" if post is None else f"post-processing `{post}`"
    text = f"{cut_text}, {post_text}, mirror TTA {settings.get('mirror_axes') or 'none'}, on {settings.get('device')}"
    return text + ("; each fold's last-epoch checkpoint" if scored_checkpoint(settings) == "last" else "")


def scored_checkpoint(settings: dict) -> str:
    """Which checkpoint of each fold run a cv.json scored: "best" or "last" (files written before cv_eval recorded
    it: each run's best)."""
    return settings.get("checkpoint") or "best"


def index_metrics(model: dict, settings: dict) -> dict[str, float]:
    """The index entry's metrics of one cv.json model: cv_dice (mean over regions), cv_dice_<region>, cv_cases, and
    val_threshold when its predictions were cut at a threshold other than 0.5."""
    scores = model["all"]
    metrics = {
        "cv_dice": round(scores["dice"], 4),
        **{f"cv_dice_{r}": round(scores[f"dice_{r}"], 4) for r in REGIONS},
        "cv_cases": model["cases"],
    }
    threshold = settings.get("threshold")
    if threshold is not None and threshold != 0.5:
        metrics["val_threshold"] = threshold
    return metrics


class Refused(Exception):
    """An input the evaluation cannot run from: one line, no traceback."""


@dataclass(frozen=True)
class FoldRun:
    variant: str  # <dataset>-<variant>, e.g. brats2018-mmsegrwkv
    fold: int
    folder: Path
    val: tuple[str, ...]
    history: RunHistory  # metrics.csv and config.json
    checkpoint: Path  # what predicts the fold's cases: folder/best.safetensors, or --checkpoints-from's file


def fold_checkpoint(
    folder: Path, fold: int, history: RunHistory, checkpoints_from: Path | None, which: str = "best"
) -> Path:
    """The weights file that predicts a fold run's cases: its best (or, which = "last", its last epoch's), or the
    one in checkpoints_from for that fold, which must be the model the run trained (architecture and overrides)."""
    if checkpoints_from is None:
        own = folder / f"{which}.safetensors"
        if not own.is_file():
            why = "the run has not validated yet" if which == "best" else "the run has not finished an epoch"
            raise Refused(f"{own} not found: {why}, or its checkpoint was not carried back")
        return own
    try:
        source = fold_export(checkpoints_from, fold)
    except ValueError as err:
        raise Refused(f"--checkpoints-from {err}") from None
    meta, model = read_meta(source), history.config.get("model", {})
    trained = (model.get("name"), model.get("overrides") or {})
    if (meta.model, meta.model_overrides or {}) != trained:
        raise Refused(
            f"{source} is {meta.model} {meta.model_overrides}, but {folder} trained {trained[0]} "
            f"{trained[1]}; give the exports of these runs"
        )
    return source


def fold_runs(
    runs: Path, data: Path, checkpoints_from: Path | None = None, which: str = "best"
) -> dict[str, list[FoldRun]]:
    """Variant -> its fold runs in fold order, each with its `which` checkpoint (best or last), checked (see the
    module docstring)."""
    found: dict[str, list[FoldRun]] = {}
    for folder in sorted(p for p in runs.iterdir() if p.is_dir()):
        match = FOLD_RUN.match(folder.name)
        if match is None:
            continue
        fold = int(match["fold"])
        history = read_run(folder)
        if history.config["data"]["fold"] != fold:
            raise Refused(
                f"{folder}: its config.json trained fold {history.config['data']['fold']}, its name says {fold}"
            )
        checkpoint = fold_checkpoint(folder, fold, history, checkpoints_from, which)
        split = read_split(folder / "split.json", fold)
        run = FoldRun(match["variant"], fold, folder, split.val, history, checkpoint)
        found.setdefault(match["variant"], []).append(run)
    if not found:
        raise Refused(f"no <dataset>-<variant>-fold<K> runs in {runs}; train them with scripts/campaign.py --folds")
    if checkpoints_from is not None and len(found) > 1:
        raise Refused(
            f"--checkpoints-from holds one checkpoint per fold, and {runs} has {len(found)} variants "
            f"({', '.join(found)}); give a folder with the runs of one"
        )
    folds = {variant: sorted(r.fold for r in rs) for variant, rs in found.items()}
    if len({tuple(f) for f in folds.values()}) > 1:
        raise Refused(f"the variants have different folds ({folds}); evaluate the same folds of each")
    for variant, rs in found.items():
        rs.sort(key=lambda r: r.fold)
        cases = [c for r in rs for c in r.val]
        if repeated := sorted({c for c in cases if cases.count(c) > 1}):
            raise Refused(f"{variant}: cases {repeated[:5]} are validated by two folds; give the runs of one split")
        if missing := [c for c in cases if not (data / c).is_dir()]:
            raise Refused(f"{data} lacks the validation cases {missing[:5]}; point DATA to the original case folders")
    return found


def link_cases(folder: Path, data: Path, cases: Sequence[str]) -> Path:
    folder.mkdir(parents=True)
    for case in cases:
        (folder / case).symlink_to((data / case).resolve(), target_is_directory=True)
    return folder


def evaluate_variant(variant: str, runs: list[FoldRun], data: Path, out: Path, config: PredictConfig) -> dict:
    """Predict and score each fold, then every fold together; the means per fold and over all cases."""
    folder = out / variant
    merged = folder / "all" / "pred"
    merged.mkdir(parents=True)
    per_fold = {}
    for run in runs:
        here = folder / f"fold{run.fold}"
        val = link_cases(here / "val", data, run.val)
        spec = DatasetSpec.from_dict(read_meta(run.checkpoint).preprocessing["dataset"])  # the regions it scores
        labels = predict(run.checkpoint, [val], here / "pred", config)
        per_fold[run.fold] = summary_means(evaluate_folders(here / "pred", val, here / "eval", spec=spec))
        for label in labels:
            (merged / label.name).symlink_to(label.resolve())
    every = link_cases(folder / "all" / "val", data, [c for r in runs for c in r.val])
    summary = evaluate_folders(merged, every, folder / "all" / "eval", spec=spec)
    return {
        "folds": [r.fold for r in runs],
        "cases": summary["cases"],
        "all": summary_means(summary),
        "per_fold": per_fold,
        "label_confusion": summary["label_confusion"],  # over every case: where each reference label went
    }


def compare_variants(out: Path, variants: Sequence[str]) -> dict[str, list[PairedComparison]]:
    """Each variant after the first against the first (variants[0]), case by case over every case, by variant."""
    if len(variants) < 2:
        return {}
    first = read_per_case(out / variants[0] / "all" / "eval")
    return {
        v: compare_evaluations(first, read_per_case(out / v / "all" / "eval"), confidence=CONFIDENCE)
        for v in variants[1:]
    }


def training_curve(variant: str, runs: Sequence[FoldRun]) -> dict | None:
    """cv.json's training_curve of a variant's fold runs (FoldCurve.as_json); None, with a warning, where their
    histories cannot be read at fixed epochs (no epoch validated by every fold): the scores do not depend on it."""
    try:
        return fold_curve({r.fold: r.history.rows for r in runs}).as_json()
    except ValueError as err:
        log.warning("%s: no training_curve in cv.json: %s", variant, err)
        return None


def curve_table(results: dict[str, dict]) -> list[str]:
    """The training_curve of each variant: its validation Dice during training read at fixed epochs."""
    lines = [
        "| model | epochs validated by all folds | per-fold best (optimistic) | best common epoch | last validated |",
        "|---|---|---|---|---|",
    ]
    for variant, r in results.items():
        if (curve := r["training_curve"]) is None:
            lines.append(f"| {variant} | none | - | - | - |")
            continue
        epochs = [int(e) for e in curve["curve"]]
        common = f"{len(epochs)} ({epochs[0]}-{epochs[-1]})" if len(epochs) > 1 else str(epochs[0])
        best, last = curve["best_common_epoch"], curve["last"]
        last_epochs = ", ".join(map(str, sorted(set(last["epochs"].values()))))
        own = f"{curve['per_fold_best']['mean']:.4f}"
        lines.append(
            f"| {variant} | {common} | {own} | epoch {best['epoch']}: {best['mean']:.4f} "
            f"| epoch {last_epochs}: {last['mean']:.4f} |"
        )
    return lines


def table(results: dict[str, dict]) -> list[str]:
    lines = ["| model | folds | cases | WT / TC / ET Dice (mean) | HD95 WT / TC / ET (mm) | per-fold mean Dice |"]
    lines.append("|---|---|---|---|---|---|")
    for variant, r in results.items():
        m = r["all"]
        dice = " / ".join(f"{m[f'dice_{x}']:.4f}" for x in REGIONS)
        hd95 = " / ".join(f"{m[f'hd95_{x}']:.1f}" for x in REGIONS)
        folds = ", ".join(f"{k}: {v['dice']:.4f}" for k, v in r["per_fold"].items())
        lines.append(f"| {variant} | {len(r['folds'])} | {r['cases']} | {dice} ({m['dice']:.4f}) | {hd95} | {folds} |")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", type=Path, help="the campaign folder with <dataset>-<variant>-fold<K> runs")
    p.add_argument("data", type=Path, help="the original case folders, by case id")
    p.add_argument("out", type=Path, help="a new folder for predictions, evaluations and cv.json")
    p.add_argument("--threshold", type=float, default=None, help="region cut (default: each checkpoint's record)")
    p.add_argument("--mirror-axes", default="", help="test-time flips for `rwkvseg predict` (default '': none)")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (rwkvseg predict)")
    p.add_argument(
        "--postprocess",
        type=postprocess_option,
        default=None,
        help="rwkvseg predict --postprocess, e.g. largest or none (default: each checkpoint's record)",
    )
    p.add_argument(
        "--compile",
        default="off",
        help="rwkvseg predict --compile (default off: one model per fold, each compiled once for a few cases)",
    )
    p.add_argument("--no-curves", action="store_true", help="leave out OUT/<variant>.folds.curves.png")
    p.add_argument(
        "--checkpoints-from",
        type=Path,
        default=None,
        help="a folder with one checkpoint per fold, named ...fold<K>.safetensors, to score instead of each run's best",
    )
    p.add_argument(
        "--checkpoint",
        choices=("best", "last"),
        default="best",
        help="which checkpoint of each fold run predicts its cases: best (chosen on the fold's own validation cases, "
        "the default) or last (its last epoch: what a model trained on every case with train_all keeps)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        if args.out.exists():
            raise Refused(f"{args.out} exists; give a new folder (nothing is overwritten)")
        if not args.no_curves and importlib.util.find_spec("matplotlib") is None:
            raise Refused("the fold curves need matplotlib: pip install 'rwkvseg[plots]', or pass --no-curves")
        if args.checkpoint == "last" and args.checkpoints_from is not None:
            raise Refused("--checkpoint last scores each run's own last epoch; drop --checkpoints-from or it")
        found = fold_runs(args.runs, args.data, args.checkpoints_from, args.checkpoint)
        config = PredictConfig(
            device=str(resolve_device(args.device, "--device")),
            threshold=args.threshold,
            mirror_axes=mirror_axes(args.mirror_axes),
            postprocess=args.postprocess,
            compile=args.compile,
        )
        curves = {variant: training_curve(variant, runs) for variant, runs in found.items()}
        results = {
            variant: evaluate_variant(variant, runs, args.data, args.out, config) | {"training_curve": curves[variant]}
            for variant, runs in found.items()
        }
        comparisons = compare_variants(args.out, list(results))
        for variant, runs in found.items():
            if not args.no_curves:  # the runs' training histories, beside the scores
                curves = args.out / f"{variant}.folds.curves.png"
                plot_fold_curves({r.fold: r.history for r in runs}, curves, f"{variant}: {len(runs)} folds")
    except (Refused, ValueError, FileNotFoundError) as err:  # bad inputs, and what prediction refuses
        print(f"cv_eval.py: error: {err}", file=sys.stderr)
        return 2
    settings = {
        "threshold": args.threshold,
        "mirror_axes": args.mirror_axes,
        "postprocess": None if args.postprocess is None else args.postprocess.spelling(),
        "device": args.device,
        "compile": args.compile,
        "checkpoints_from": None if args.checkpoints_from is None else str(args.checkpoints_from),
        "checkpoint": args.checkpoint,
    }
    record = {"settings": settings, "models": results}
    first = next(iter(results))
    if comparisons:
        record["comparisons"] = {f"{v} - {first}": [as_json(c) for c in rows] for v, rows in comparisons.items()}
    write_json(args.out / "cv.json", record)
    print("\n".join(table(results)))
    print("\ntraining's validation Dice (val_dice), mean over the folds:\n" + "\n".join(curve_table(results)))
    for variant, rows in comparisons.items():
        print("\n" + "\n".join(comparison_table(rows, first, variant, CONFIDENCE)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
