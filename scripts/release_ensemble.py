"""Release the fold models of a 3D cross-validation campaign as one ensemble model, with its card and index entry.

Usage:
    python scripts/release_ensemble.py RUNS CV NAME --variant VARIANT --dataset FOLDER --hardware TEXT --command TEXT
        [--members-from DIR] [--postprocess SPEC --postprocess-evidence TEXT] [--weights-dir DIR] [--commit HASH]
        [--note TEXT]

RUNS is the campaign folder of `scripts/campaign.py DATA RUNS --configs ... --folds K ...`: one run folder
RUNS/VARIANT-fold<K> per fold (metrics.csv, config.json, split.json, best.json; VARIANT is <dataset>-<arch>, e.g.
brats2018-mmsegrwkv_small) and RUNS/campaign.json. CV is a folder written by `scripts/cv_eval.py RUNS DATA CV ...`:
its cv.json holds VARIANT's cross-validation score (each fold's best checkpoint on its own validation cases, every
case once). That score is the release's validation metric: every case of the dataset trained all but one member, so
the ensemble itself has no held-out cases here, and the card says so.

The members are int8 weights (`rwkvseg.released.export_release`), one per fold, written to the weights folder (default
the package's) as NAME-k<K>.safetensors + .json, from each fold's best checkpoint: RUNS/VARIANT-fold<K>/best, or,
with --members-from DIR, the one file in DIR whose name ends in fold<K>.safetensors (int8 exports made where the
runs trained, when the fp32 checkpoints cannot travel). --postprocess SPEC (a `rwkvseg predict --postprocess`
spelling) is recorded in every member's sidecar as the release's default, named in the card with
--postprocess-evidence. NAME gets a card (NAME.md: members, recipe, the cross-validation table per fold and over
all, how to use it), its curves (NAME.curves.png: each fold's validation Dice, their mean and the training loss per
epoch) and an index entry listing its members (`rwkvseg models`; `rwkvseg predict --model NAME` averages the
members' probabilities).

Every input is read and checked before anything is written; a missing or mismatched input, or a NAME whose files
or index entry exist already (nothing is replaced), is one error line and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from textwrap import fill
from typing import Any

from rwkvseg.checkpoint import checkpoint_paths, with_digest
from rwkvseg.cli.predict import postprocess_option
from rwkvseg.data.specs import DatasetSpec
from rwkvseg.eval.report import RunHistory, plot_fold_curves, read_run
from rwkvseg.files import write_json
from rwkvseg.infer.ensemble import check_members
from rwkvseg.infer.postprocess import PostProcess, check_postprocess
from rwkvseg.released import ReleasedModel, export_release, fold_export, released_models, update_index, weights_dir

sys.path.insert(0, str(Path(__file__).resolve().parent))  # cv_eval: what its cv.json means, kept there once
from cv_eval import REGIONS, index_metrics, settings_text


class Refused(Exception):
    """An input the release cannot be written from: one line, exit status 2, nothing written."""


@dataclass(frozen=True)
class Fold:
    fold: int
    run: Path
    source: Path  # the member's weights file: the run's best.safetensors, or an int8 export
    val: tuple[str, ...]
    history: RunHistory  # metrics.csv and config.json of the fold's run


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise Refused(f"{path} not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise Refused(f"{path} is not JSON ({err}); give the file the campaign wrote") from None


def member_source(run: Path, fold: int, members_from: Path | None) -> Path:
    """The weights file (its sidecar beside it) that becomes fold's member."""
    if members_from is None:
        source = run / "best.safetensors"
    else:
        try:
            source = fold_export(members_from, fold)
        except ValueError as err:
            raise Refused(f"--members-from {err}") from None
    weights, sidecar = checkpoint_paths(source)
    if not (weights.is_file() and sidecar.is_file()):
        raise Refused(f"fold {fold}: {weights} or {sidecar} not found; give the fold's best checkpoint")
    return source


def read_folds(runs: Path, variant: str, folds: list[int], members_from: Path | None) -> list[Fold]:
    out = []
    for fold in folds:
        run = runs / f"{variant}-fold{fold}"
        if not run.is_dir():
            raise Refused(f"{run} not found: cv.json scores fold {fold} of {variant}, RUNS has no such run")
        try:
            history = read_run(run)
        except FileNotFoundError as err:
            raise Refused(str(err)) from None
        trained = history.config.get("data", {}).get("fold")
        if trained != fold:
            raise Refused(f"{run}: its config.json trained fold {trained}, not {fold}")
        try:
            val = tuple(read_json(run / "split.json")["folds"][fold]["val"])
        except (KeyError, IndexError, TypeError):
            raise Refused(f"{run / 'split.json'} holds no fold {fold}; give the split the run trained on") from None
        source = member_source(run, fold, members_from)
        if history.best is None:
            raise Refused(f"{run / 'metrics.csv'} holds no validated epoch; give the run's training history")
        out.append(Fold(fold, run, source, val, history))
    if len({json.dumps(f.history.config.get("model"), sort_keys=True) for f in out}) > 1:
        raise Refused(f"the folds of {variant} trained different models; an ensemble's members share one")
    return out


def check_name(name: str, folder: Path, folds: list[Fold]) -> list[str]:
    """The member names; Refused when NAME or a member exists already."""
    members = [f"{name}-k{f.fold}" for f in folds]
    if name in {m.name for m in released_models(folder)}:
        raise Refused(f"{folder / 'index.json'} lists {name} already; release under a new name (nothing is replaced)")
    taken = [
        str(p)
        for stem in (name, *members)
        for p in (*checkpoint_paths(folder / stem), folder / f"{stem}.md", folder / f"{stem}.curves.png")
        if p.exists()
    ]
    if taken:
        raise Refused(f"{taken[0]} exists; release under a new name (nothing is replaced)")
    return members


def card_text(
    name: str,
    variant: str,
    folds: list[Fold],
    members: list[str],
    cv: dict[str, Any],
    settings: dict[str, Any],
    args: argparse.Namespace,
    postprocess: PostProcess | None,
) -> str:
    config = folds[0].history.config
    data, optim, loss = config["data"], config["optim"], config.get("loss", {})
    all_ = cv["all"]
    rows = []
    for f in folds:
        best = f.history.best
        score = cv["per_fold"][str(f.fold)]
        rows.append(
            f"| {f.fold} | {len(f.val)} | {int(best['epoch'])} of {f.history.ran} "
            f"({config.get('epochs')} planned) | {best['val_dice']:.4f} | "
            + " / ".join(f"{score[f'dice_{r}']:.4f}" for r in REGIONS)
            + f" ({score['dice']:.4f}) | "
            + " / ".join(f"{score[f'hd95_{r}']:.1f}" for r in REGIONS)
            + " |"
        )
    overall = " / ".join(f"{all_[f'dice_{r}']:.4f}" for r in REGIONS) + f" (**{all_['dice']:.4f}**)"
    hd95 = " / ".join(f"{all_[f'hd95_{r}']:.1f}" for r in REGIONS)
    predict = settings_text(settings)
    pp = ""
    if postprocess is not None:
        pp = (
            f"| recorded default post-processing | `{postprocess.spelling()}` (each member's sidecar; `rwkvseg predict "
            f"--postprocess none` turns it off): {args.postprocess_evidence} |\n"
        )
    notes = "".join(f"{fill(text.strip(), width=118)}\n\n" for text in args.note)
    split = Path(data["split"]).name
    intro = fill(
        f"An ensemble of {len(folds)} {config['model']['name']} models (`{variant}`), one per fold of the "
        f"cross-validation split `splits/{split}`: `rwkvseg predict --model {name} INPUT` averages the members' "
        "probabilities and predicts with them as one model (sliding window, flips, threshold and post-processing as "
        "for one checkpoint).",
        width=118,
    )
    method = fill(
        f"Each member predicts the validation cases of its own fold (it never trained on them), {predict}; "
        "`rwkvseg evaluate` scores them against the original files, and the cases of every fold together give the "
        "cross-validation score (a mean over cases). **The ensemble itself has no held-out cases here**: each case "
        "trained all but one of its members, so its score on these cases would be optimistic and is not reported. "
        "Checkpoints were chosen on each fold's validation Dice at 0.5 during training.",
        width=118,
    )
    return f"""# {name}

{intro}

| | |
|---|---|
| members | {", ".join(f"`{m}`" for m in members)} (int8 weights, per output channel) |
| architecture | `{config["model"]["name"]}`, overrides {json.dumps(config["model"].get("overrides") or {})} |
| data | the cases of `{args.dataset}`, split `splits/{split}` (each fold trains on the others' cases) |
| recipe | {config.get("epochs")} epochs planned, {data["patches"]["samples_per_epoch"]} patches of {data["patches"]["patch_size"]} per epoch (batch {data["batch_size"]}, foreground fraction {data["patches"]["fg_fraction"]}), target {data.get("target")}, loss {loss.get("name")}, {optim["name"]} lr {optim["lr"]} {optim.get("schedule")}, EMA {optim.get("ema")} from step {optim.get("ema_start")}, validated every {config.get("val_every")} epochs |
{pp}| hardware | {args.hardware} |
| command | `{args.command}` |
| commit | {args.commit} |

## Cross-validation (the release's validation)

{method}

| fold | validation cases | best epoch (of run) | training validation Dice at 0.5 | WT / TC / ET Dice (mean) | HD95 WT / TC / ET mm |
|---|---|---|---|---|---|
{chr(10).join(rows)}
| **all {cv["cases"]} cases** | {cv["cases"]} | | | {overall} | {hd95} |

![validation curves]({name}.curves.png)

{notes}## Use

```bash
rwkvseg predict --model {name} CASE_OR_FOLDER --out PRED     # all members, averaged
rwkvseg evaluate PRED REFERENCE_FOLDER --out EVAL
```

Serving, ONNX export and fine-tuning take one checkpoint: give them one member's file
(`{members[0]}.safetensors`).
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="release the fold models of a 3D cross-validation as one ensemble")
    p.add_argument("runs", type=Path, help="the campaign folder with <variant>-fold<K> runs")
    p.add_argument("cv", type=Path, help="a scripts/cv_eval.py output folder (cv.json) over those runs")
    p.add_argument("name", help="the release's name, e.g. mmsegrwkv_small-brats2018-5fold")
    p.add_argument("--variant", required=True, help="<dataset>-<arch> of the runs, e.g. brats2018-mmsegrwkv_small")
    p.add_argument("--dataset", required=True, help="the dataset's folder under the data root, e.g. brats2018_4mod_2mm")
    p.add_argument("--members-from", type=Path, help="a folder of int8 exports, one ending in fold<K> per fold")
    p.add_argument("--postprocess", type=postprocess_option, help="the members' recorded default post-processing")
    p.add_argument("--postprocess-evidence", default="", help="the measurement that chose --postprocess")
    p.add_argument(
        "--weights-dir", type=Path, default=None, help="the released models' folder (default: the package's)"
    )
    p.add_argument("--hardware", required=True, help="where the runs trained, for the card")
    p.add_argument("--command", required=True, help="the campaign's command, for the card")
    p.add_argument("--commit", default="not recorded", help="the code commit the runs trained at")
    p.add_argument("--note", action="append", default=[], help="a paragraph for the card after its table")
    args = p.parse_args(argv)
    if args.postprocess is not None and not args.postprocess_evidence:
        p.error("--postprocess needs --postprocess-evidence: name the measurement that chose it")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    folder = args.weights_dir or weights_dir()
    try:
        if find_spec("matplotlib") is None:
            raise Refused("the curves need matplotlib: pip install 'rwkvseg[plots]'")
        report = read_json(args.cv / "cv.json")
        if args.variant not in report.get("models", {}):
            raise Refused(f"{args.cv / 'cv.json'} has no {args.variant}; give the cv_eval.py output over its runs")
        cv = report["models"][args.variant]
        folds = read_folds(args.runs, args.variant, cv["folds"], args.members_from)
        members = check_name(args.name, folder, folds)
        try:  # the members must predict as one ensemble (rwkvseg predict checks the same when loading them)
            meta = check_members([f.source for f in folds], ())
        except ValueError as err:
            raise Refused(f"the fold checkpoints cannot form one ensemble: {err}") from None
        spec = DatasetSpec.from_dict(meta.preprocessing["dataset"])
        if args.postprocess is not None:
            try:
                check_postprocess(args.postprocess, spec.num_classes - 1, spec)
            except ValueError as err:
                raise Refused(f"--postprocess: {err}") from None
    except Refused as err:
        print(f"release_ensemble.py: error: {err}", file=sys.stderr)
        return 2
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as staging:  # every file written beside, then moved in
        stage = Path(staging)
        for fold, member in zip(folds, members, strict=True):
            weights = export_release(fold.source, member, stage, precision="int8")
            if args.postprocess is not None:
                _, sidecar = checkpoint_paths(weights)
                record = json.loads(sidecar.read_text(encoding="utf-8"))
                pre = record["preprocessing"]
                record["preprocessing"] = {
                    **pre,
                    "inference": {**pre.get("inference", {}), "postprocess": args.postprocess.spelling()},
                }
                write_json(sidecar, with_digest(record, weights))
        title = f"{args.name}: {len(folds)} folds of {args.variant}"
        plot_fold_curves({f.fold: f.history for f in folds}, stage / f"{args.name}.curves.png", title)
        card = card_text(
            args.name, args.variant, folds, members, cv, report.get("settings", {}), args, args.postprocess
        )
        (stage / f"{args.name}.md").write_text(card, encoding="utf-8")
        for path in sorted(stage.iterdir()):
            shutil.move(path, folder / path.name)
    metrics = index_metrics(cv, report.get("settings", {}))
    split = Path(folds[0].history.config["data"]["split"])
    entry = ReleasedModel(
        args.name,
        folds[0].history.config["model"]["name"],
        args.dataset,
        f"splits/{split.name}",
        metrics,
        f"card: {args.name}.md; cross-validation of the members, each on its own fold",
        tuple(members),
    )
    update_index(entry, folder)
    print(f"released {args.name}: {len(members)} members, cross-validation Dice {metrics['cv_dice']:.4f} -> {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
