"""Write released 3D models' cards, curves and index entries from the BraTS campaign's runs and evaluations.

Usage:
    python scripts/release_3d.py RUNS EVALS NAME... --hardware TEXT --command TEXT [--commit HASH]
        [--eval-mirror-axes AXES] [--eval-threshold T] [--weights-dir DIR] [--postprocess SPEC --postprocess-evidence TEXT]
        [--mirror-axes AXES --mirror-evidence TEXT] [--threshold T --threshold-evidence TEXT] [--note NAME TEXT ...]
        [--cv CV_JSON --cv-evidence TEXT [--cv-model KEY] [--int8-cv FP32_CV INT8_CV --int8-cv-evidence TEXT]]

NAME is <arch>-<dataset> (mmsegrwkv_small-brats2018, mmsegrwkv-brats2018), trained in the run RUNS/<dataset>-<arch>
of `scripts/campaign.py DATA RUNS --configs configs/brats2018_{mmsegrwkv_small,segresnet,dynunet,mmsegrwkv}.toml`
(config.json, metrics.csv, best.json, final_val.json, split.json; RUNS/campaign.json beside the runs) and released
from that run's best checkpoint as int8 weights in the weights folder (default the package's) by
`rwkvseg.released.export_release(RUNS/<dataset>-<arch>/best, NAME, WEIGHTS, precision="int8")`. EVALS holds one
evaluation per run of the campaign and per release, all predicted the same way on the split's validation cases VAL
(`--eval-mirror-axes` names the TTA they used, e.g. 0,1,2 for `rwkvseg predict --device cuda`, which takes the
checkpoint's axes; default none, what `rwkvseg predict` does on the CPU; `--eval-threshold` the region cut they used,
default 0.5; summary.json records neither):
    rwkvseg predict RUNS/brats2018-VARIANT/best.safetensors VAL --out P && rwkvseg evaluate P VAL --out EVALS/eval-VARIANT
    rwkvseg predict --model NAME VAL --out Q && rwkvseg evaluate Q VAL --out EVALS/eval-NAME
Each NAME gets a card (<name>.md: model, data, recipe, schedule; Dice and HD95 per region during training, with
mirror TTA at the end of training, of the fp32 checkpoint and of the shipped int8 weights; every run of the campaign
side by side; the limitations, with the project's targets), its curves (<name>.curves.png: training loss and
validation Dice per region per epoch, the best epoch dotted) and its index entry (replaced in place, or appended).
--postprocess SPEC (a `rwkvseg predict --postprocess` spelling, chosen on validation, e.g. with `python
scripts/results_table.py ... --postprocess SPEC`) is recorded as each release's default (`postprocess` in its
sidecar's preprocessing.inference: `rwkvseg predict` applies it unless given --postprocess) and named in its card
with --postprocess-evidence (the measurement that chose it). --mirror-axes AXES ('' for none) likewise replaces
the training's test-time flips (`mirror_axes` there, which `rwkvseg predict` applies on a GPU) with the ones
chosen on validation, named in the card with --mirror-evidence. --threshold T (region models) records T as each
release's cut of the region probabilities (`threshold` in the sidecar's preprocessing.inference: `rwkvseg predict`
applies it unless given --threshold; 0.5 where none is recorded), named in its card with --threshold-evidence.
--note NAME TEXT (repeatable) adds TEXT as a paragraph after NAME's validation table: what else was measured for
that release (TTA, post-processing, the release it replaces), kept when the card is written again.
A run trained on every case (`train_all`: the final model of a recipe whose epochs cross-validation chose) has no
validation of its own: its card takes --cv CV_JSON (`scripts/cv_eval.py` of the same recipe's fold models; its
model --cv-model KEY when it holds several; one release per call) and --cv-evidence TEXT (which runs, recipe and
epochs), shows that cross-validation in place of the validation table, and its index entry holds cv_* metrics;
EVALS is not read for it. Such weights hold no case out to measure their int8 change on; --int8-cv FP32_CV INT8_CV
(with --int8-cv-evidence) measures it on fold models of the same recipe: their cross-validation in fp32 and that of
their int8 exports (`scripts/cv_eval.py --checkpoints-from`, e.g. `scripts/brats_arms.sh final` with INT8_CV), and
the card gives the change per region.
Every input is read and checked before anything is written: a missing or mismatched one is one error line and exit
status 2, with no file changed.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import load_file

from rwkvseg.bench.complexity import count_parameters
from rwkvseg.checkpoint import INT8_SCALE
from rwkvseg.cli.predict import mirror_axes, postprocess_option
from rwkvseg.data.specs import DatasetSpec
from rwkvseg.eval.evaluate import read_summary, summary_means
from rwkvseg.eval.report import RunHistory, read_run, write_run_curves
from rwkvseg.files import atomic_write_text, write_json
from rwkvseg.infer.postprocess import check_postprocess
from rwkvseg.models import create_model
from rwkvseg.released import ReleasedModel, add_note_option, card_notes, update_index, weights_dir
from rwkvseg.train.config import config_from_dict
from rwkvseg.train.loop import LAST_EPOCH
from rwkvseg.train.run import changed_settings

sys.path.insert(0, str(Path(__file__).resolve().parent))  # cv_eval: what its cv.json means, kept there once
from cv_eval import index_metrics, scored_checkpoint, settings_text

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Dataset3D:
    folder: str  # under ../shared/data; the index's dataset
    title: str
    split: str  # under splits/
    targets: dict[str, float]  # Dice per region, docs/targets.md (full-resolution held-out cases)


DATASETS = {  # release suffix (the <dataset> of the campaign's run names) -> its data
    "brats2018": Dataset3D(
        "brats2018_4mod_2mm",
        "BraTS 2018 (brain tumour, 4 MRI sequences)",
        "brats2018_2mm.json",
        {"WT": 0.88, "TC": 0.80, "ET": 0.75},
    ),
}
TITLES = {"mmsegrwkv": "MMSegRWKV (paper configuration)", "mmsegrwkv_small": "MMSegRWKV (small)"}
NNUNET_ITERATIONS = 250_000  # nnU-Net's default schedule: 1,000 epochs of 250 iterations
PACKAGE_MB = 20  # what one released model may add to the package (configs/brats2018_mmsegrwkv_small.toml)

CARD_HEAD = """Released with rwkvseg {version}. Load it by name, offline:
`rwkvseg predict --model {name} CASE_FOLDERS --out PRED` (BraTS case folders or NIfTI files; any voxel spacing: inputs
are cropped, z-scored and resampled to {spacing} mm, and the labels {labels} are written on each input's own grid with
its exact affine).

| | |
|---|---|
| architecture | {architecture} ({params:.2f} M parameters) |
| input | {modalities} (in that order), {spacing} mm, {window} sliding window (overlap {overlap:g}, Gaussian), {tta} |
| output | {output} over labels {labels}; regions {regions} |
| weights | int8 matrices and kernels (symmetric per output channel, fp32 scales), fp32 vectors (biases, norms; in the RWKV blocks decay, bonus, token-shift mixes); {size_mb:.1f} MB (fp16 would be {fp16_mb:.1f} MB{too_large}); {int8_change} |
{postprocess_row}{threshold_row}"""  # the cards' common start: loading, the model, its weights and defaults

CARD = (
    "# {name}: {arch_title} trained on {data_title}\n\n"
    + CARD_HEAD
    + """| data | the {n_cases} cases of `../shared/data/{folder}` (at {spacing} mm); split `splits/{split}` ({n_train} train / {n_val} val{split_note}) |
| recipe | `configs/{config}`: {recipe} |
| schedule | {schedule}; {iterations:,} iterations ({per_epoch} per epoch); best validation epoch {best} (curves: `{name}.curves.png`) |
| hardware | {hardware}, {minutes:.1f} min of training and validation (median {epoch_s:.1f} s per epoch) |
| command | {command} (code at commit {commit}) |

## Validation ({cases_text}; they chose the checkpoint, so the numbers are optimistic)

- training: the best epoch's validation, whole volumes by sliding window on the preprocessed grid (cropped, at the
  training spacing), no TTA (`best.json`);
- mirror TTA: {final_text};
- fp32 and int8: `rwkvseg predict` ({eval_tta}) and `rwkvseg evaluate` on each case's original files;
  fp32 is the run's best checkpoint, int8 these released weights, the change is int8 minus fp32.

| region | training, epoch {best} | mirror TTA | fp32 Dice | fp32 HD95 (mm) | int8 Dice | change | int8 HD95 (mm) | change |
|---|---|---|---|---|---|---|---|---|
{validation_rows}

{notes}Dice and HD95 are means over cases ({policy}).

## The campaign's runs (trained side by side by `scripts/campaign.py`, the same data and time budget)

Settings of the runs' config.json that differ besides the model: {differences}. Best validation Dice during training
per region (no TTA), the best checkpoint's mean Dice with mirror TTA, HD95 of the fp32 best checkpoint from
`rwkvseg predict` + `rwkvseg evaluate` as above, and the median time per epoch.

| run | parameters (M) | epochs | best epoch | WT | TC | ET | mean | mean, mirror TTA | HD95 WT (mm) | HD95 TC | HD95 ET | s per epoch |
|---|---|---|---|---|---|---|---|---|---|---|---|---|
{campaign_rows}

## Limitations
{n_train} training and {n_val} validation cases at 2 mm, {iterations:,} training iterations against nnU-Net's
{nnunet:,} (1,000 epochs of 250). This project's targets (docs/targets.md) are Dice on full-resolution held-out
cases; on the validation cases at 2 mm these weights reach {targets}. Published BraTS results are measured at 1 mm on
hundreds of cases. Research use only; not a medical device.
"""
)


CARD_ALL = (
    "# {name}: {arch_title} trained on {data_title}, every case\n\n"
    + CARD_HEAD
    + """| data | every one of the {n_train} cases of `../shared/data/{folder}` (at {spacing} mm): the training and validation cases of `splits/{split}` together (`train_all`), none held out |
| recipe | `configs/{config}`: {recipe} |
| schedule | {schedule}; {iterations:,} iterations ({per_epoch} per epoch); the last epoch is kept, as nothing is left to choose a checkpoint on, and the number of epochs is the cross-validated recipe's (curves: `{name}.curves.png`, the training loss) |
| hardware | {hardware}, {minutes:.1f} min of training (median {epoch_s:.1f} s per epoch) |
| command | {command} (code at commit {commit}) |

## Accuracy: the recipe's cross-validation (these weights have no held-out case of their own)

Every case trained these weights, so none can score them. The same recipe trained on the folds of the
cross-validation split instead, and each case was scored by the fold model that never trained on it: {cv_evidence}.
{cv_settings}.

| region | Dice | HD95 (mm) | target |
|---|---|---|---|
{cv_rows}

Per fold, mean Dice: {per_fold}.

{notes}{fold_choice}

## Limitations
{n_train} cases at 2 mm, {iterations:,} training iterations against nnU-Net's {nnunet:,} (1,000 epochs of 250). This
project's targets (docs/targets.md) are Dice on full-resolution held-out cases; the cross-validation above reaches
{targets}. Published BraTS results are measured at 1 mm on hundreds of cases. Research use only; not a medical
device.
"""
)


class Refused(Exception):
    """An input the cards cannot be written from: one line, no traceback."""


def read_json(path: Path, hint: str) -> dict[str, Any]:
    if not path.is_file():
        raise Refused(f"{path} not found; {hint}")
    return json.loads(path.read_text(encoding="utf-8"))


def evaluation(evals: Path, name: str, what: str, regions: dict[str, float]) -> dict[str, Any]:
    """The means of EVALS/eval-<name>/summary.json per region (`dice_WT`, `hd95_WT`, ...), their means (`dice`,
    `hd95`), the number of cases and the empty-mask policy."""
    try:
        summary = read_summary(evals / f"eval-{name}")
    except FileNotFoundError as err:
        raise Refused(f"{err} ({what})") from None
    means = summary_means(summary)
    missing = [f"{m}_{r}" for m in ("dice", "hd95") for r in regions if f"{m}_{r}" not in means]
    if missing:
        raise Refused(
            f"{evals / f'eval-{name}'}: no {', '.join(missing)}; evaluate {what} with HD95 (without --no-hd95) "
            f"on the regions {', '.join(regions)}"
        )
    hd95 = statistics.fmean(v for k, v in means.items() if k.startswith("hd95_"))
    return {**means, "hd95": hd95, "cases": summary["cases"], "policy": summary.get("empty_policy_text", "")}


def parameters(config: dict[str, Any], meta: dict[str, Any]) -> int:
    model = config["model"]
    network = create_model(model["name"], meta["in_channels"], meta["num_classes"], **model.get("overrides", {}))
    return count_parameters(network)


def architecture(model: dict[str, Any]) -> str:
    overrides = model.get("overrides") or {}
    if not overrides:
        return f"`{model['name']}` in the registry's configuration"
    values = ", ".join(f"{k} {'/'.join(map(str, v)) if isinstance(v, list) else v}" for k, v in overrides.items())
    return f"`{model['name']}` with {values}"


def window(size: list[int]) -> str:
    return f"{size[0]}^3" if len(set(size)) == 1 else " x ".join(map(str, size))


def recipe(config: dict[str, Any]) -> str:
    data, patches, optim = config["data"], config["data"]["patches"], config["optim"]
    text = f"{window(patches['patch_size'])} patches, {patches['fg_fraction']:.0%} foreground oversampling, "
    text += "nnU-Net-like augmentation (MONAI), " if patches["augment"] else "no augmentation, "
    text += f"loss `{config['loss']['name']}`, {optim['name'].upper()} lr {optim['lr']:g}"
    if optim["name"] == "sgd":
        text += f" momentum {optim['momentum']:g}" + (" Nesterov" if optim["nesterov"] else "")
    text += f", weight decay {optim['weight_decay']:g}, {optim['schedule']} schedule"
    text += f" (power {optim['power']:g})" if optim["schedule"] == "poly" else ""
    text += f", gradient clip {optim['grad_clip']:g}" if optim.get("grad_clip") else ""
    text += f", EMA of the weights (decay {optim['ema']:g})" if optim.get("ema") else ""
    return text + f", batch {data['batch_size']}, amp {config['amp']}, compile {config['compile']}"


def weights_sizes(weights: Path) -> tuple[float, float]:
    """(file MB, MB of the same tensors in fp16) of int8 release weights; Refused when they are not int8."""
    with safe_open(str(weights), "pt") as f:
        precision = (f.metadata() or {}).get("precision")
    if precision != "int8":
        raise Refused(f"{weights} holds {precision} weights; these cards describe int8 releases (export_release int8)")
    state = load_file(str(weights))
    fp16 = sum(
        v.numel() * (2 if k + INT8_SCALE in state else v.element_size())
        for k, v in state.items()
        if not k.endswith(INT8_SCALE)
    )
    return weights.stat().st_size / 1e6, fp16 / 1e6


def targets_text(scores: dict[str, float], targets: dict[str, float]) -> str:
    missed = [r for r, t in targets.items() if scores[f"dice_{r}"] < t]
    parts = ", ".join(
        f"{r} {scores[f'dice_{r}']:.4f} (target {t:.2f}: {'missed' if r in missed else 'met here'})"
        for r, t in targets.items()
    )
    if missed:
        return f"{parts}: {len(missed)} of {len(targets)} targets missed"
    return f"{parts}, which is not yet a target met: that needs full-resolution held-out cases"


@functools.cache
def campaign_rows(runs: Path, evals: Path, dataset: str) -> tuple[dict[str, str], str]:
    """The card's table of every run of RUNS/campaign.json (run name -> its row after the run's cell), and the
    settings in which the runs differ besides the model (and where their files went). Built once for every
    release of the campaign."""
    rows = read_json(runs / "campaign.json", "give the RUNS folder of scripts/campaign.py")["runs"]
    lines, configs = {}, {}
    for row in rows:
        run = runs / row["run"]
        if "best_epoch" not in row:
            raise Refused(f"run {row['run']} of {runs / 'campaign.json'} has no validation yet; train it on")
        variant = row["run"].removeprefix(f"{dataset}-")
        scores = evaluation(evals, variant, f"the fp32 best checkpoint of {run}", DATASETS[dataset].targets)
        meta = read_json(run / "best.json", f"the run {run} has no best checkpoint")
        try:
            history = read_run(run)
        except FileNotFoundError as err:
            raise Refused(str(err)) from None
        configs[row["run"]] = history.config
        params = parameters(history.config, meta) / 1e6
        # the run's own status (summary.json) over the process's exit code: a run that had finished can still be
        # signalled while it exits when the campaign's time limit ends it; no summary.json: the exit code tells
        status = history.status
        stopped = f" ({status})" if status not in (None, "complete") else ""
        stopped = f" (exit {row['exit']})" if status is None and row.get("exit") else stopped
        epochs = f"{history.epochs_text()}{stopped}"
        tta = f"{row['tta_val_dice']:.4f}" if "tta_val_dice" in row else "-"
        dice = " | ".join(f"{row[f'best_val_dice_{r}']:.4f}" for r in DATASETS[dataset].targets)
        hd95 = " | ".join(f"{scores[f'hd95_{r}']:.2f}" for r in DATASETS[dataset].targets)
        lines[row["run"]] = (
            f"{params:.2f} | {epochs} | {row['best_epoch']} | {dice} | {row['best_val_dice']:.4f} | {tta} "
            f"| {hd95} | {row['median_epoch_s']:.1f} |"
        )
    return lines, settings_that_differ(configs)


def settings_that_differ(configs: dict[str, dict[str, Any]]) -> str:
    """The dotted names of the settings that differ between the runs' configs, the model and the files aside."""
    first, *others = (config_from_dict(c) for c in configs.values())
    changed = dict.fromkeys(k for other in others for k in changed_settings(first, other))
    shown = [k for k in changed if not k.startswith("model.") and k != "compile_cache"]
    return ", ".join(f"`{k}`" for k in shown) or "none"


def validation_rows(
    best: dict[str, float], final: dict[str, float] | None, fp32: dict, int8: dict, regions: dict[str, float]
) -> list[str]:
    """The card's validation table: per region and their mean, training to int8 weights (no mirror TTA column
    value when the run was interrupted before its final evaluation: final is None)."""
    lines = []
    for r in [*regions, None]:
        dice, hd95 = ("dice", "hd95") if r is None else (f"dice_{r}", f"hd95_{r}")
        cells = [
            best[f"val_{dice}"],
            "-" if final is None else final[dice],
            fp32[dice],
            f"{fp32[hd95]:.2f}",
            int8[dice],
            f"{int8[dice] - fp32[dice]:+.4f}",
            f"{int8[hd95]:.2f}",
            f"{int8[hd95] - fp32[hd95]:+.2f}",
        ]
        text = " | ".join(c if isinstance(c, str) else f"{c:.4f}" for c in cells)
        lines.append(f"| {r or 'mean'} | {text} |")
    return lines


@dataclass(frozen=True)
class Release:
    """What one release writes: the card's text, the run drawn as curves, the index entry."""

    card: str
    history: RunHistory
    entry: ReleasedModel
    sidecar: dict[str, Any]  # the shipped sidecar, with the post-processing default when one is given


def release(name: str, args: argparse.Namespace, folder: Path) -> Release:
    """Read and check every input of one release; Refused with one line at the first that is missing or off."""
    arch, _, short = name.partition("-")
    if short not in DATASETS:
        raise Refused(f"release {name!r}: name it <arch>-<dataset> with dataset one of {sorted(DATASETS)}")
    ds = DATASETS[short]
    run = args.runs / f"{short}-{arch}"
    try:
        history = read_run(run)
    except FileNotFoundError as err:
        raise Refused(str(err)) from None
    config = history.config
    if config.get("train_all"):
        return release_all(name, args, folder, run, history)
    meta = read_json(run / "best.json", "the run has no best checkpoint")
    best = meta.get("training", {}).get("best")
    if not best:
        raise Refused(f"{run / 'best.json'} records no best epoch (training.best); is it the sidecar of best?")
    if history.best is None or int(history.best["epoch"]) != best["epoch"]:
        raise Refused(f"{run}: best.json is epoch {best['epoch']}, metrics.csv's best another; give one run's files")
    final = None  # an interrupted run never reached its final evaluation: the fp32 row is its only TTA score
    if (run / "final_val.json").is_file() or history.status != "interrupted":
        final = read_json(run / "final_val.json", "the run's final evaluation (infer.final_eval) is missing")
    if final is not None and final["epoch"] != best["epoch"]:
        raise Refused(f"{run}/final_val.json scored epoch {final['epoch']}, the best checkpoint is {best['epoch']}")
    shipped, (size_mb, fp16_mb) = shipped_release(folder, name, run, best)
    split, fold = committed_fold(run, config, ds)

    fp32 = evaluation(args.evals, arch, f"the fp32 best checkpoint of {run}", ds.targets)
    int8 = evaluation(args.evals, name, f"the released int8 weights {name}", ds.targets)
    if fp32["cases"] != int8["cases"]:
        raise Refused(f"eval-{arch} scored {fp32['cases']} cases, eval-{name} {int8['cases']}: score the same cases")
    campaign, differences = campaign_rows(args.runs, args.evals, short)
    if run.name not in campaign:
        raise Refused(f"{args.runs / 'campaign.json'} has no run {run.name}; give the campaign that trained it")

    pre = meta["preprocessing"]
    n = int8["cases"]
    card = CARD.format(
        **card_fields(name, args, history, meta, (size_mb, fp16_mb)),
        eval_tta=eval_text(args),
        int8_change=f"against the fp32 checkpoint: mean Dice {int8['dice'] - fp32['dice']:+.4f}, mean HD95 "
        f"{int8['hd95'] - fp32['hd95']:+.2f} mm (table below)",
        n_cases=split["n_cases"],
        n_train=len(fold["train"]),
        n_val=len(fold["val"]),
        split_note=(", stratified" if split.get("stratified") else "") + f", seed {split['seed']}",
        best=best["epoch"],
        cases_text=f"the {n} validation cases of the split at 2 mm"
        if n == len(fold["val"])
        else f"{n} of the split's {len(fold['val'])} validation cases at 2 mm",
        final_text=(
            "the best checkpoint at the end of training, mirror TTA on axes "
            f"{','.join(map(str, final['mirror_axes'])) or 'none'}, same grid\n  (`final_val.json`)"
        )
        if final
        else "not run (the run was interrupted before its final evaluation: `final_val.json` is missing)",
        validation_rows="\n".join(validation_rows(best, final, fp32, int8, ds.targets)),
        policy=int8["policy"],
        campaign_rows="\n".join(
            f"| {name}{' (these weights)' if name == run.name else ''} | {line}" for name, line in campaign.items()
        ),
        differences=differences,
        targets=targets_text(int8, ds.targets),
    )
    metrics = {"val_dice": round(int8["dice"], 4), **{f"val_dice_{r}": round(int8[f"dice_{r}"], 4) for r in ds.targets}}
    if args.eval_threshold != 0.5:  # the cut these Dice were measured at (0.5 where not recorded)
        metrics["val_threshold"] = args.eval_threshold
    entry = ReleasedModel(
        name,
        config["model"]["name"],
        ds.folder,
        f"splits/{ds.split}",
        {**metrics, "epochs": history.ran},
        f"card: {name}.md",
    )
    if args.eval_threshold != 0.5 and pre["target"] != "regions":
        raise Refused(
            f"{name}: --eval-threshold {args.eval_threshold:g} names a cut of region probabilities, and this model "
            "predicts labels (argmax over classes): drop --eval-threshold"
        )
    return Release(card, history, entry, chosen_sidecar(name, args, shipped, pre))


def card_fields(
    name: str, args: argparse.Namespace, history: RunHistory, meta: dict[str, Any], sizes: tuple[float, float]
) -> dict[str, Any]:
    """The fields both cards share: the model, its input and output, its weights ((MB, fp16 MB)), the data files,
    the recipe, the schedule, where and how it trained, and the prediction defaults chosen here."""
    from rwkvseg import __version__

    arch, _, short = name.partition("-")
    ds, config, pre = DATASETS[short], history.config, meta["preprocessing"]
    spec, inference = pre["dataset"], pre["inference"]
    iterations = int(history.rows[-1]["step"])
    size_mb, fp16_mb = sizes
    return {
        "name": name,
        "notes": args.notes[name],
        "arch_title": TITLES.get(arch, arch),
        "data_title": ds.title,
        "version": __version__,
        "spacing": " x ".join(f"{s:g}" for s in dict.fromkeys(pre["target_spacing"])),
        "labels": ", ".join(map(str, spec["label_values"])),
        "architecture": architecture(config["model"]),
        "params": parameters(config, meta) / 1e6,
        "modalities": ", ".join(spec["modalities"]),
        "window": window(pre["patch_size"]),
        "overlap": inference["overlap"],
        "output": "softmax" if pre["target"] == "labels" else "sigmoid per region",
        "tta": tta_text(
            inference["mirror_axes"] if args.mirror_axes is None else args.mirror_axes, args.mirror_evidence
        ),
        "regions": ", ".join(f"{r} = {{{', '.join(map(str, v))}}}" for r, v in spec["regions"].items()),
        "size_mb": size_mb,
        "fp16_mb": fp16_mb,
        "too_large": ", too large to ship in the package, so only int8 is released" if fp16_mb > PACKAGE_MB else "",
        "folder": ds.folder,
        "split": ds.split,
        "config": f"{short}_{arch}.toml",
        "recipe": recipe(config),
        "schedule": history.schedule(),
        "iterations": iterations,
        "per_epoch": iterations // history.ran,
        "hardware": args.hardware,
        "minutes": history.minutes,
        "epoch_s": statistics.median(r["train_seconds"] + r.get("val_seconds", 0.0) for r in history.rows),
        "command": args.command,
        "commit": args.commit,
        "nnunet": NNUNET_ITERATIONS,
        "postprocess_row": postprocess_row(args),
        "threshold_row": threshold_row(args),
    }


def shipped_release(folder: Path, name: str, run: Path, best: dict[str, Any]) -> tuple[dict[str, Any], tuple]:
    """The shipped sidecar of release name in folder and (MB, fp16 MB) of its int8 weights; Refused unless they
    were exported from the run's best checkpoint (the same training.best)."""
    weights = folder / f"{name}.safetensors"
    how = f"export it with rwkvseg.released.export_release({run / 'best'}, {name!r}, {folder}, precision='int8')"
    shipped = read_json(folder / f"{name}.json", how)
    if not weights.is_file() or shipped["training"].get("best") != best:
        raise Refused(f"{weights} is missing or not exported from {run / 'best'}; {how}")
    return shipped, weights_sizes(weights)


def committed_fold(run: Path, config: dict[str, Any], ds: Dataset3D) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the committed split document, the run's fold of it); Refused when the run's split.json differs."""
    split = json.loads((ROOT / "splits" / ds.split).read_text(encoding="utf-8"))
    fold = split["folds"][config["data"]["fold"]]
    used = read_json(run / "split.json", "the run has no split.json")["folds"][config["data"]["fold"]]
    if used != fold:
        raise Refused(f"{run / 'split.json'} differs from splits/{ds.split}: the card would name the wrong split")
    return split, fold


def chosen_sidecar(name: str, args: argparse.Namespace, shipped: dict[str, Any], pre: dict[str, Any]) -> dict[str, Any]:
    """The shipped sidecar with the prediction defaults of --postprocess, --mirror-axes and --threshold."""
    spec, inference = pre["dataset"], pre["inference"]
    chosen = dict(inference)
    if args.postprocess is not None:
        dataset = DatasetSpec.from_dict(spec)
        try:
            check_postprocess(args.postprocess, dataset.num_classes - 1, dataset)
        except ValueError as err:
            raise Refused(f"{name}: {err}") from None
        chosen["postprocess"] = args.postprocess.spelling()
    if args.mirror_axes is not None:
        chosen["mirror_axes"] = list(args.mirror_axes)
    if args.threshold is not None:
        if pre["target"] != "regions":
            raise Refused(
                f"{name}: --threshold {args.threshold:g} cuts region probabilities, and this model predicts labels "
                "(argmax over classes): drop --threshold"
            )
        chosen["threshold"] = args.threshold
    return shipped if chosen == inference else {**shipped, "preprocessing": {**pre, "inference": chosen}}


def release_all(name: str, args: argparse.Namespace, folder: Path, run: Path, history: RunHistory) -> Release:
    """One release of a run trained on every case (train_all): the recipe's cross-validation (--cv) stands in for
    the validation it cannot have; Refused with one line at the first input that is missing or off."""
    ds, config = DATASETS[name.partition("-")[2]], history.config
    if args.cv is None:
        raise Refused(
            f"{run} trained on every case (train_all), so nothing validates it: give --cv, the cross-validation of "
            "the same recipe's fold models (scripts/cv_eval.py), and --cv-evidence"
        )
    meta = read_json(run / "best.json", "the run has no best checkpoint")
    best = meta.get("training", {}).get("best") or {}
    if best.get("selection") != LAST_EPOCH or best.get("epoch") != history.ran:
        raise Refused(f"{run / 'best.json'} is not the last epoch ({history.ran}) of a train_all run; give its files")
    shipped, (size_mb, fp16_mb) = shipped_release(folder, name, run, best)
    _, fold = committed_fold(run, config, ds)
    n_train = len(fold["train"]) + len(fold["val"])
    if meta["training"].get("train_cases") != n_train:
        raise Refused(
            f"{run / 'best.json'} trained {meta['training'].get('train_cases')} cases, not the {n_train} of the split"
        )
    what = "give the cv.json that scripts/cv_eval.py wrote for the recipe's fold models"
    cv = cross_validation(read_cv(args.cv, what), args.cv, args.cv_model, ds.targets)
    if args.int8_cv is None:
        int8_change = (
            "the int8 change against the fp32 checkpoint is not measured for these weights (no case is held out from "
            "them)"
        )
    else:
        int8_change = int8_cv_change(*args.int8_cv, args.cv_model, ds.targets, args.int8_cv_evidence)
    card = CARD_ALL.format(
        **card_fields(name, args, history, meta, (size_mb, fp16_mb)),
        n_train=n_train,
        int8_change=int8_change,
        cv_evidence=args.cv_evidence,
        cv_settings=cv["settings"],
        cv_rows="\n".join(cv["rows"]),
        per_fold=cv["per_fold"],
        fold_choice=fold_choice_text(cv["checkpoint"], n_train),
        targets=targets_text(cv["all"], ds.targets),
    )
    metrics = {**cv["metrics"], "epochs": history.ran, "train_cases": n_train}
    notes = f"card: {name}.md; trained on every case (train_all); cv_*: the same recipe's fold models"
    entry = ReleasedModel(name, config["model"]["name"], ds.folder, f"splits/{ds.split}", metrics, notes)
    return Release(card, history, entry, chosen_sidecar(name, args, shipped, meta["preprocessing"]))


def read_cv(path: Path, what: str) -> dict[str, Any]:
    """A `scripts/cv_eval.py` file (what: the fix named when it is missing); Refused when it holds no models."""
    doc = read_json(path, what)
    models = doc.get("models") if isinstance(doc, dict) else None
    if not isinstance(models, dict) or not models:
        raise Refused(f"{path} is not a scripts/cv_eval.py file (no models)")
    return doc


def cross_validation(doc: dict[str, Any], path: Path, model: str | None, regions: dict[str, float]) -> dict[str, Any]:
    """One model of a `scripts/cv_eval.py` file (doc, read from path by read_cv): its means over all cases (`all`),
    its folds and number of cases, the checkpoint of each fold it scored, and the card's settings sentence, table
    rows and per-fold text; Refused when the model is not there or lacks a region."""
    models = doc["models"]
    if model is None and len(models) > 1:
        raise Refused(f"{path} holds the models {sorted(models)}: name one with --cv-model")
    key = model or next(iter(models))
    if key not in models:
        raise Refused(f"{path} has no model {key!r}; it holds {sorted(models)}")
    entry, settings = models[key], doc.get("settings", {})
    scores = entry["all"]
    missing = [f"{m}_{r}" for m in ("dice", "hd95") for r in regions if f"{m}_{r}" not in scores]
    if missing:
        raise Refused(f"{path} model {key}: no {', '.join(missing)}; cross-validate with HD95 on {', '.join(regions)}")
    rows = [f"| {r} | {scores[f'dice_{r}']:.4f} | {scores[f'hd95_{r}']:.2f} | {t:.2f} |" for r, t in regions.items()]
    hd95 = statistics.fmean(scores[f"hd95_{r}"] for r in regions)
    rows.append(f"| mean | {scores['dice']:.4f} | {hd95:.2f} | |")
    text = f"`{key}`, {len(entry['folds'])} folds, {entry['cases']} cases; {settings_text(settings)}"
    per_fold = ", ".join(f"{k}: {v['dice']:.4f}" for k, v in entry["per_fold"].items())
    return {
        "all": scores,
        "folds": entry["folds"],
        "cases": entry["cases"],
        "metrics": index_metrics(entry, settings),
        "settings": text,
        "rows": rows,
        "per_fold": per_fold,
        "checkpoint": scored_checkpoint(settings),
    }


def fold_choice_text(checkpoint: str, n_train: int) -> str:
    """The card's sentence on which checkpoint of each fold run the cross-validation scored."""
    if checkpoint == "last":
        return (
            "Each fold model was its run's last epoch, the rule these weights follow, so no choice made on the cases "
            f"it scored is in these numbers; these weights trained on {n_train} cases instead of a fold's share."
        )
    return (
        "Each fold model was the best checkpoint of its own validation cases, which makes these numbers somewhat\n"
        f"optimistic for fold models; these weights trained on {n_train} cases instead of a fold's share and kept "
        "their last\nepoch."
    )


def int8_cv_change(fp32: Path, int8: Path, model: str | None, regions: dict[str, float], evidence: str) -> str:
    """The card's words on the int8 change of a train_all release, measured where it can be: the same recipe's fold
    models cross-validated in fp32 (fp32) and as their int8 exports (int8: scripts/cv_eval.py --checkpoints-from) on
    the same held-out cases; Refused when the two files are not that pair."""
    docs = {}
    for path, kind in ((fp32, "fp32"), (int8, "int8")):
        docs[kind] = read_cv(path, f"give the cv.json of the fold models' {kind} cross-validation")
        if "settings" not in docs[kind]:
            raise Refused(f"{path} is not a scripts/cv_eval.py file (no settings)")
    if docs["fp32"]["settings"].get("checkpoints_from") is not None:
        raise Refused(
            f"{fp32} scored other checkpoints (--checkpoints-from): give the fold runs' own fp32 scores first"
        )
    # a file of cv_eval from before it recorded checkpoints_from (session 45's, whose int8 exports stood in for each
    # fold's best) has no such key; one that records none scored the runs' own checkpoints
    settings = docs["int8"]["settings"]
    if fp32.resolve() == int8.resolve() or ("checkpoints_from" in settings and settings["checkpoints_from"] is None):
        raise Refused(
            f"{int8} scored the runs' own checkpoints: give the cross-validation of their int8 exports second"
        )
    same = ("threshold", "mirror_axes", "postprocess")
    first = docs["fp32"]["settings"]
    if any(first.get(k) != settings.get(k) for k in same) or scored_checkpoint(first) != scored_checkpoint(settings):
        raise Refused(
            f"{fp32} and {int8} were predicted differently ({', '.join(same)}, checkpoint): score both the same way"
        )
    if docs["fp32"]["models"].keys() != docs["int8"]["models"].keys():
        raise Refused(f"{fp32} and {int8} hold different models: give two scorings of the same fold runs")
    if model not in docs["fp32"]["models"]:  # --cv-model names a model of --cv, whose runs may differ from these
        model = None
    before, after = (
        cross_validation(docs[kind], path, model, regions) for kind, path in (("fp32", fp32), ("int8", int8))
    )
    if (before["folds"], before["cases"]) != (after["folds"], after["cases"]):
        raise Refused(f"{fp32} and {int8} scored different folds or cases: give two scorings of the same fold runs")
    a, b = before["all"], after["all"]
    per_region = ", ".join(f"{r} {b[f'dice_{r}'] - a[f'dice_{r}']:+.4f}" for r in regions)
    hd95 = statistics.fmean(b[f"hd95_{r}"] - a[f"hd95_{r}"] for r in regions)
    return (
        f"the int8 change (int8 minus fp32), measured on the same recipe's {len(before['folds'])} fold models on their "
        f"{before['cases']} held-out cases ({evidence}): mean Dice {b['dice'] - a['dice']:+.4f} ({per_region}), mean "
        f"HD95 {hd95:+.2f} mm; these weights hold no case out to measure it on themselves"
    )


def tta_text(axes: list[int] | tuple[int, ...], evidence: str) -> str:
    """The card's words on test-time flips: the default axes (the training's, or --mirror-axes with its evidence)."""
    chosen = f", chosen on validation: {evidence}" if evidence else ""
    if not axes:
        return f"no mirror TTA by default (`--mirror-axes 0,1,2` asks for it){chosen}"
    spelled = ",".join(map(str, axes))
    return f"mirror TTA on axes {spelled} by default on a GPU (none on the CPU unless `--mirror-axes`){chosen}"


def eval_text(args: argparse.Namespace) -> str:
    """How EVALS were predicted, for the card: the flips and, when not 0.5, the region threshold."""
    text = f"mirror TTA on axes {args.eval_mirror_axes}" if args.eval_mirror_axes else "no TTA"
    return text if args.eval_threshold == 0.5 else f"{text}, region threshold {args.eval_threshold:g}"


def postprocess_row(args: argparse.Namespace) -> str:
    """The card's post-processing row ('' without --postprocess)."""
    if args.postprocess is None:
        return ""
    return (
        f"| post-processing | `{args.postprocess.spelling()}` by default (recorded as `preprocessing.inference.postprocess` "
        f"in the sidecar; `rwkvseg predict --postprocess none` turns it off), beyond the paper's recipe: "
        f"{args.postprocess_evidence} |\n"
    )


def threshold_row(args: argparse.Namespace) -> str:
    """The card's threshold row ('' without --threshold)."""
    if args.threshold is None:
        return ""
    return (
        f"| threshold | each region's sigmoid cut at {args.threshold:g} by default (recorded as "
        "`preprocessing.inference.threshold` in the sidecar; `rwkvseg predict --threshold 0.5` gives the plain cut), "
        f"beyond the paper's recipe: {args.threshold_evidence} |\n"
    )


def threshold_option(text: str) -> float:
    """--threshold read as a probability in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--threshold {text!r} is not a number") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"--threshold {text} must be in [0, 1] (a probability)")
    return value


def axes_option(text: str) -> tuple[int, ...]:
    """--mirror-axes read as `rwkvseg predict` reads it ('' none), spatial axes 0, 1, 2 each at most once."""
    try:
        axes = mirror_axes(text) or ()
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if any(a not in (0, 1, 2) for a in axes) or len(set(axes)) != len(axes):
        raise argparse.ArgumentTypeError(f"--mirror-axes {text!r} must name each of the axes 0, 1, 2 at most once")
    return axes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", type=Path, help="the campaign's folder (run folders and campaign.json)")
    p.add_argument("evals", type=Path, help="eval-<variant>/ and eval-<name>/ of `rwkvseg evaluate`")
    p.add_argument("names", nargs="+", help="releases to write, <arch>-<dataset>, e.g. mmsegrwkv_small-brats2018")
    p.add_argument("--hardware", required=True, help="where the runs trained, for the cards")
    p.add_argument("--command", required=True, help="the command that trained them, for the cards")
    p.add_argument("--commit", default="(not given)", help="the commit of the training code")
    p.add_argument(
        "--eval-mirror-axes",
        default="",
        help="the --mirror-axes the evaluations were predicted with, e.g. 0,1,2 (default: none, `rwkvseg predict`'s "
        "choice on the CPU); the card says so, as summary.json does not record it",
    )
    p.add_argument(
        "--eval-threshold",
        type=threshold_option,
        default=0.5,
        help="the --threshold the evaluations were predicted with (region models; default 0.5); the card says so",
    )
    p.add_argument("--weights-dir", type=Path, default=None, help="the released models' folder (default the package's)")
    p.add_argument(
        "--postprocess",
        type=postprocess_option,
        default=None,
        metavar="SPEC",
        help="record this `rwkvseg predict --postprocess` spelling as each release's default (chosen on validation)",
    )
    p.add_argument("--postprocess-evidence", default="", help="with --postprocess: the measurement that chose it")
    p.add_argument(
        "--mirror-axes",
        type=axes_option,
        default=None,
        metavar="AXES",
        help="record these test-time flips (e.g. 0,1,2; '' none) as each release's default instead of the "
        "training's (chosen on validation)",
    )
    p.add_argument("--mirror-evidence", default="", help="with --mirror-axes: the measurement that chose them")
    p.add_argument(
        "--threshold",
        type=threshold_option,
        default=None,
        metavar="T",
        help="record this cut of each region's sigmoid as each release's default instead of 0.5 (region models; "
        "chosen on validation)",
    )
    p.add_argument("--threshold-evidence", default="", help="with --threshold: the measurement that chose it")
    p.add_argument(
        "--cv",
        type=Path,
        default=None,
        metavar="CV_JSON",
        help="for a run trained on every case (train_all): the cross-validation of the same recipe's fold models "
        "(scripts/cv_eval.py's cv.json), shown in place of a validation",
    )
    p.add_argument("--cv-model", default=None, metavar="KEY", help="with --cv: the model of the file (when several)")
    p.add_argument("--cv-evidence", default="", help="with --cv: which runs, recipe and epochs it scored")
    p.add_argument(
        "--int8-cv",
        type=Path,
        nargs=2,
        default=None,
        metavar=("FP32_CV", "INT8_CV"),
        help="with --cv: the int8 change of the recipe, measured on fold models of it: their cross-validation in fp32 "
        "and that of their int8 exports (scripts/cv_eval.py --checkpoints-from), on the same held-out cases",
    )
    p.add_argument("--int8-cv-evidence", default="", help="with --int8-cv: which fold runs, session and recipe")
    add_note_option(p)
    args = p.parse_args(argv)
    args.notes = card_notes(p, args.note, args.names)
    if args.mirror_axes is not None and not args.mirror_evidence.strip():
        p.error("--mirror-axes needs --mirror-evidence: the card names the measurement that chose them")
    if args.postprocess is not None and not args.postprocess_evidence.strip():
        p.error("--postprocess needs --postprocess-evidence: the card names the measurement that chose it")
    if args.cv is not None and not args.cv_evidence.strip():
        p.error("--cv needs --cv-evidence: the card names the runs and recipe it cross-validated")
    if args.cv is not None and len(args.names) > 1:
        p.error("--cv is one recipe's cross-validation: release one model per call when you give it")
    if args.int8_cv is not None and (args.cv is None or not args.int8_cv_evidence.strip()):
        p.error("--int8-cv goes with --cv (a train_all release) and --int8-cv-evidence (which fold runs it scored)")
    if args.threshold is not None and not args.threshold_evidence.strip():
        p.error("--threshold needs --threshold-evidence: the card names the measurement that chose it")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    folder = args.weights_dir or weights_dir()
    try:
        if find_spec("matplotlib") is None:
            raise Refused("the curves need matplotlib: pip install 'rwkvseg[plots]'")
        releases = {name: release(name, args, folder) for name in args.names}
    except Refused as err:
        print(f"release_3d.py: error: {err}", file=sys.stderr)
        return 2
    for name, r in releases.items():
        write_run_curves(r.history, folder / f"{name}.curves.png", name=name)
        atomic_write_text(folder / f"{name}.md", r.card)
        if args.postprocess is not None or args.mirror_axes is not None or args.threshold is not None:
            write_json(folder / f"{name}.json", r.sidecar)
        update_index(r.entry, folder)
        print(f"{name}: wrote {name}.md, {name}.curves.png and its index entry in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
