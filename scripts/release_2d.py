"""Write released 2D models' cards and index entries from their training runs and CPU evaluations.

Usage (after the runs, e.g. `scripts/campaign.py --datasets ...` on a GPU, and for each NAME:
`rwkvseg predict CHECKPOINT VAL_IMAGES --out P && rwkvseg evaluate P VAL_GT --out EVALS/eval-NAME` on the int8
release written by `rwkvseg.released.export_release` into src/rwkvseg/weights/; `scripts/results_table.py` does
both for every name):
    python scripts/release_2d.py RUNS EVALS NAME... --hardware TEXT --command TEXT [--commit HASH] [--quality 90]
        [--weights-dir DIR] [--mirror-axes AXES --mirror-evidence TEXT] [--note NAME TEXT ...]
RUNS holds <dataset>-<arch>/ run folders (metrics.csv, config.json), EVALS holds eval-<name>/summary.json (the
shipped int8 weights) and, where measured, eval16-<name>/summary.json (the same run released as fp16) and
evaltta-<name>/summary.json (the int8 weights with flip TTA, `rwkvseg predict --mirror-axes 0,1`) and
evalpaper-<name>/summary.json (when the run went beyond the paper's recipe, e.g. `--set optim.ema=0.999`: the
paper-recipe run's release, which the card reports beside it). Each NAME
gets a card (<name>.md), a curves figure (<name>.curves.png: training loss and validation Dice per epoch) and its
index entry (replaced in place, or appended); the index's other entries are kept as they are.
--mirror-axes AXES (e.g. 0,1, chosen on validation: the evaltta row against the int8 one) records those test-time
flips as each release's default (`mirror_axes` in its sidecar's preprocessing.inference: `rwkvseg predict` applies
them unless given --mirror-axes) and names them in its card with --mirror-evidence (the measurement that chose them);
the index entry then adds `val_dice_flips`, the evaltta Dice (what `rwkvseg predict` gives by default).
--weights-dir DIR writes into DIR (default the package's weights folder, where the releases are exported).
--note NAME TEXT (repeatable) adds TEXT as a paragraph after NAME's validation table: what else was measured for
that release (a fine-tune that did not beat it, other TTA), kept when the card is written again.
Every input is read and checked before anything is written: a missing one is one error line and exit status 2,
with no file changed.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

from rwkvseg.bench.complexity import count_parameters
from rwkvseg.eval.evaluate import read_summary, summary_means
from rwkvseg.eval.report import plot_curves, read_run
from rwkvseg.models import create_model
from rwkvseg.released import ReleasedModel, add_note_option, card_notes, update_index, weights_dir

DATASETS = {  # release suffix -> (dataset folder, human name of the data, split)
    "kvasir": ("kvasir_seg", "Kvasir-SEG (colonoscopy, polyp)", "720 train / 180 val, seed 0"),
    "busi": ("busi", "BUSI (breast ultrasound, lesion)", "414 train / 104 val, seed 0, stratified"),
    "cvc": ("cvc_clinicdb", "CVC-ClinicDB (colonoscopy, polyp)", "424 train / 126 val frames, 7 whole sequences"),
    "isic2017": ("isic2017", "ISIC 2017 (dermoscopy, skin lesion)", "official 1600 train / 150 validation"),
    "ph2": ("ph2", "PH2 (dermoscopy, skin lesion)", "128 train / 32 val, seed 0, stratified by diagnosis"),
}
TITLES = {"urwkv": "U-RWKV", "urwkv_s": "U-RWKV-s"}
METRICS = ("dice", "iou", "precision", "recall", "specificity", "hd95")

CARD = """# {name}: {arch_title} trained on {data}

Released with rwkvseg {version}. Load it by name, offline: `rwkvseg predict --model {name} IMAGES --out MASKS`.

| | |
|---|---|
| architecture | `{arch}`{overrides} ({params:.3f} M parameters), 3-channel input resized to 256 x 256, 1 logit (sigmoid, threshold 0.5) |
| weights | int8 matrices and kernels (symmetric per output channel, fp32 scales), fp32 vectors (decay, bonus, token-shift mixes, norms, BatchNorm statistics) |
| data | training portion of {data} in `../shared/data/{dataset}`; split `splits/{dataset}.json` ({split}) |
| input prep | {input_prep} |
| recipe | `configs/{config}`: SGD momentum 0.9, weight decay 1e-4, lr 0.01 with poly decay (power 0.9) per iteration over the planned epochs, BCE + Dice, batch {batch}, random rot90 + flips, {arithmetic}, compile {compile}{beyond} |
{flips_row}| schedule | {schedule}; best validation epoch {best} (curves: `{name}.curves.png`) |
| hardware | {hardware}, {minutes:.1f} min of training and validation |
| command | {command} (code at commit {commit}) |

## Validation ({n} images of the split's validation list; these images chose the checkpoint, so the numbers are optimistic)

| where | Dice | IoU | precision | recall | specificity | HD95 (px) |
|---|---|---|---|---|---|---|
| during training, at 256 x 256 ({train_device}, fp32 weights) | {t_dice:.4f} | {t_iou:.4f} | {t_precision:.4f} | {t_recall:.4f} | {t_specificity:.4f} | - |
| these released weights (int8), original image size (CPU, `rwkvseg predict` + `rwkvseg evaluate`) | {dice:.4f} | {iou:.4f} | {precision:.4f} | {recall:.4f} | {specificity:.4f} | {hd95:.1f} |
{extra_rows}

{notes}Means over images; empty prediction and empty ground truth together count as perfect (`rwkvseg evaluate` policy
"perfect"). Held-out test sets were not available here.

## Limitations
{schedule_note} Compare with this project's targets in docs/targets.md. Research use only; not a medical device.
"""
PAPER_EPOCHS = 280
EXTRA_ROWS = (  # EVALS/<folder>-<name>/summary.json, where measured -> a row of the card's validation table
    ("eval16", "the same weights in fp16, same evaluation"),
    ("evaltta", "these released weights with flip TTA (`rwkvseg predict --mirror-axes 0,1`: 4 forward passes)"),
    ("evalpaper", "the paper's recipe alone (its own run, released earlier under this name: int8, original size)"),
)


def beyond_recipe(config: dict, name: str = "") -> str:
    """What the run (its config.json as a dict) added to the paper's recipe, for the card's recipe cell ("" when
    nothing): a start from existing weights (model.init), a weight EMA, other datasets' images in training
    (data.extra_train). name: the release the card is for."""
    optim, extra = config.get("optim", {}), config.get("data", {}).get("extra_train", [])
    init = config.get("model", {}).get("init", "")
    if not init:
        added = []
    elif init == name:  # the run continued the release this card replaces
        added = [f"fine-tuned from the earlier release of this name (model.init `{init}`, the paper's recipe)"]
    else:
        added = [f"fine-tuned from `{init}` (model.init: its weights are the starting point)"]
    if optim.get("ema"):
        start = f", copying the weights for the first {optim['ema_start']} steps" if optim.get("ema_start") else ""
        added.append(
            f"an exponential moving average of the weights (decay {optim['ema']}{start}), validated and released in "
            "place of the weights"
        )
    if extra:
        folders = ", ".join(f"`{folder}`" for folder in extra)
        added.append(f"every image of {folders} added to the training images (validation unchanged)")
    if not added:
        return ""
    return f"; beyond the paper's recipe: {'; '.join(added)} (the paper's-recipe row below is its own run)"


def precision_note(config: dict) -> str:
    """The card's words for the run's arithmetic: autocast (amp auto / bf16 on a GPU) or float32 (amp off, the CPU)."""
    amp, device = config.get("amp", "auto"), config.get("device", "auto")
    if amp == "off" or device == "cpu":
        return "float32 (no autocast" + (" on the CPU)" if device == "cpu" else ")")
    return "fp16 autocast with loss scaling" if amp == "fp16" else "bf16 autocast"


def overrides_note(overrides: dict) -> str:
    """The card's words for a run's model overrides ("" for the registered variant as it is)."""
    if not overrides:
        return ""
    settings = ", ".join(f"`{key}={json.dumps(value)}`" for key, value in sorted(overrides.items()))
    released = {"token_shift": "permutation", "dual_transpose_back": False}.items() <= overrides.items()
    return f" with {settings}" + (" (the network of the authors' released code)" if released else "")


def schedule_note(ran: int, init: str = "", name: str = "") -> str:
    """The card's limitation sentence about the schedule (init: the model.init it was fine-tuned from; name: the
    release the card is for, which replaces init when the run continued the release of its own name)."""
    if init and init == name:
        return (
            f"Fine-tuned for {ran} epochs from the earlier release of this name (its paper's-recipe run: the last row "
            "of the table above; its card is in the repository's history) on one split of the data available here: "
            "not the paper's protocol, which trains from scratch."
        )
    if init:
        return (
            f"Fine-tuned for {ran} epochs from `{init}` (its card gives how that model was trained) on one split of "
            "the data available here: not the paper's protocol, which trains from scratch."
        )
    if ran >= PAPER_EPOCHS:
        return f"The paper's full schedule ({ran} epochs) on one split of the data available here."
    return (
        f"A short schedule ({ran} epochs against the paper's {PAPER_EPOCHS}) on one split: below the paper's protocol."
    )


def input_prep(dataset: str, quality: int) -> str:
    """The card's input-prep cell: the compact2d copies of JPEG quality `quality` trained on, or (0) the originals."""
    if quality == 0:
        return f"none: the original files of `../shared/data/{dataset}`, resized to 256 x 256 by the loader"
    return (
        f"`rwkvseg compact2d ../shared/data/{dataset} DATA/{dataset} --quality {quality}` "
        f"(256 x 256 copies, JPEG q{quality}, masks merged)"
    )


def evaluation_row(summary: Path, label: str) -> str:
    """One row of the card's validation table from an `rwkvseg evaluate` summary.json; "" when it is absent."""
    if not summary.is_file():
        return ""
    scores = summary_means(json.loads(summary.read_text()))
    cells = " | ".join(f"{scores[k]:.{1 if k == 'hd95' else 4}f}" for k in METRICS)
    return f"| {label} | {cells} |"


def _run_summary(run: Path, name: str = "") -> dict:
    history = read_run(run)
    best = history.best
    return {
        "rows": history.rows,
        "ran": history.ran,
        "best": int(best["epoch"]),
        "schedule": history.schedule(),
        "batch": history.config["data"]["batch_size"],
        "compile": history.config.get("compile", "auto"),
        "arithmetic": precision_note(history.config),
        "train_device": "CPU" if history.config.get("device") == "cpu" else "GPU",
        "beyond": beyond_recipe(history.config, name),
        "init": history.config.get("model", {}).get("init", ""),
        "overrides": overrides_note(history.config.get("model", {}).get("overrides", {})),
        "minutes": history.minutes,
        **{f"t_{k}": best[f"val_{k}"] for k in ("dice", "iou", "precision", "recall", "specificity")},
    }


def _curves(rows: list[dict], title: str, path: Path) -> None:
    plot_curves(rows, path, title, {"val_dice": "validation Dice (256 x 256)"}, "training loss (BCE + Dice)")


def flips_row(axes: tuple[int, ...] | None, evidence: str) -> str:
    """The card's test-time flips row ('' without --mirror-axes)."""
    if axes is None:
        return ""
    if not axes:
        return f"| test-time flips | none by default (recorded as `preprocessing.inference.mirror_axes = []`), chosen on validation: {evidence} |\n"
    spelled = ",".join(map(str, axes))
    return (
        f"| test-time flips | the logits averaged over the flips of axes {spelled} by default ({2 ** len(axes)} forward "
        f"passes per image; recorded as `preprocessing.inference.mirror_axes` in the sidecar; `rwkvseg predict "
        f"--mirror-axes ''` turns them off), beyond the paper's recipe, chosen on validation: {evidence} |\n"
    )


def with_flips(sidecar: dict, axes: tuple[int, ...]) -> dict:
    """A release's sidecar JSON recording axes as its default test-time flips (its other inference defaults kept)."""
    pre = sidecar["preprocessing"]
    return {**sidecar, "preprocessing": {**pre, "inference": {**pre.get("inference", {}), "mirror_axes": list(axes)}}}


class Refused(Exception):
    """An input the cards cannot be written from: one line, no traceback."""


@dataclass(frozen=True)
class Release:
    """Everything one NAME's release writes, built (and so checked) before anything is written."""

    name: str
    card: str
    rows: list[dict]  # the run's metrics.csv rows, for the curves
    title: str  # the curves' title
    sidecar: dict | None  # the sidecar JSON with the recorded flips; None: the sidecar is left as it is
    entry: ReleasedModel


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from rwkvseg.cli.predict import mirror_axes
    from rwkvseg.infer.predict2d import check_mirror_axes

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", type=Path)
    p.add_argument("evals", type=Path)
    p.add_argument("names", nargs="+", help="releases to write, <arch>-<dataset>, e.g. urwkv-isic2017")
    p.add_argument("--hardware", required=True, help="where the runs trained, for the cards")
    p.add_argument("--command", required=True, help="the command that trained them, for the cards")
    p.add_argument("--commit", default="(not given)", help="the commit of the training code")
    p.add_argument(
        "--quality", type=int, default=95, help="JPEG quality of the compact2d copies trained on; 0: the original files"
    )
    p.add_argument("--weights-dir", type=Path, default=None, help="the released models' folder (default the package's)")
    p.add_argument(
        "--mirror-axes",
        default=None,
        metavar="AXES",
        help="record these test-time flips (e.g. 0,1; '' none) as each release's default (chosen on validation)",
    )
    p.add_argument("--mirror-evidence", default="", help="with --mirror-axes: the measurement that chose them")
    add_note_option(p)
    args = p.parse_args(argv)
    if bad := [n for n in args.names if n.partition("-")[0] not in TITLES or n.partition("-")[2] not in DATASETS]:
        p.error(
            f"{', '.join(bad)}: a release is named <arch>-<dataset> with arch one of {', '.join(TITLES)} and dataset "
            f"one of {', '.join(DATASETS)}"
        )
    args.notes = card_notes(p, args.note, args.names)
    args.flips = None
    if args.mirror_axes is not None:
        try:
            args.flips = check_mirror_axes(mirror_axes(args.mirror_axes))
        except ValueError as err:
            p.error(str(err))
        if not args.mirror_evidence.strip():
            p.error("--mirror-axes needs --mirror-evidence: the card names the measurement that chose them")
    return args


def release(name: str, args: argparse.Namespace, folder: Path) -> Release:
    """NAME's card, curves rows, sidecar and index entry from RUNS and EVALS; Refused naming what is missing."""
    from rwkvseg import __version__

    arch, short = name.split("-", 1)
    dataset, data, split = DATASETS[short]
    sidecar_path = folder / f"{name}.json"
    if args.flips is not None and not sidecar_path.is_file():
        raise Refused(f"--mirror-axes records into {sidecar_path}, which does not exist: export the release first")
    try:
        summary = read_summary(args.evals / f"eval-{name}")
        info = _run_summary(args.runs / f"{dataset}-{arch}", name)
    except FileNotFoundError as err:
        raise Refused(str(err)) from None
    means = summary_means(summary)
    scores = {k: means[k] for k in METRICS}
    extra_rows = "\n".join(
        row
        for folder_name, label in EXTRA_ROWS
        if (row := evaluation_row(args.evals / f"{folder_name}-{name}" / "summary.json", label))
    )
    rows = info.pop("rows")
    card = CARD.format(
        name=name,
        arch=arch,
        arch_title=TITLES[arch],
        data=data,
        dataset=dataset,
        params=count_parameters(create_model(arch, 3, 1)) / 1e6,
        split=split,
        config=f"urwkv_{short}.toml",
        input_prep=input_prep(dataset, args.quality),
        hardware=args.hardware,
        command=args.command,
        commit=args.commit,
        version=__version__,
        n=summary["cases"],
        schedule_note=schedule_note(info["ran"], info["init"], name),
        **info,
        extra_rows=extra_rows,
        notes=args.notes[name],
        flips_row=flips_row(args.flips, args.mirror_evidence),
        **scores,
    )
    sidecar = None
    if args.flips is not None:
        sidecar = with_flips(json.loads(sidecar_path.read_text(encoding="utf-8")), args.flips)
    metrics = {"val_dice": round(scores["dice"], 4), "val_iou": round(scores["iou"], 4), "epochs": info["ran"]}
    flipped = args.evals / f"evaltta-{name}" / "summary.json"
    if args.flips and flipped.is_file():  # what `rwkvseg predict` gives by default, beside the recipe's number
        metrics["val_dice_flips"] = round(summary_means(read_summary(flipped.parent))["dice"], 4)
    entry = ReleasedModel(name, arch, dataset, f"splits/{dataset}.json", metrics, f"card: {name}.md")
    return Release(name, card, rows, f"{name}: {TITLES[arch]} on {data}", sidecar, entry)


def main(argv: list[str] | None = None) -> int:
    """Every input is read and checked before anything is written: a missing one is one error line and exit status
    2, with no file changed."""
    from rwkvseg.files import atomic_write_text, write_json

    args = parse_args(argv)
    folder = args.weights_dir or weights_dir()
    try:
        if find_spec("matplotlib") is None:
            raise Refused("the curves need matplotlib: pip install 'rwkvseg[plots]'")
        if not folder.is_dir():
            raise Refused(f"--weights-dir {folder} is not a folder: give the released models' folder")
        releases = [release(name, args, folder) for name in args.names]
    except Refused as err:
        print(f"release_2d.py: error: {err}", file=sys.stderr)
        return 2
    for r in releases:
        _curves(r.rows, r.title, folder / f"{r.name}.curves.png")
        atomic_write_text(folder / f"{r.name}.md", r.card)
        if r.sidecar is not None:
            write_json(folder / f"{r.name}.json", r.sidecar)
        update_index(r.entry, folder)
        print(f"{r.name}: wrote {r.name}.md, {r.name}.curves.png and its index entry in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
