"""The README's results table in one command: every released model on its split's validation cases, predicted with
the released checkpoint (on the CPU by default) and scored at the original image size, beside the published numbers.

    python scripts/results_table.py DATA_ROOT OUT [--names NAME ...] [--device cpu] [--threads 2] [--limit N]
                                    [--weights DIR] [--mirror-axes-2d AXES] [--postprocess SPEC]

For each released model of one checkpoint (weights/index.json; or the --names given), under OUT/<name>/ (an
ensemble of fold models, and a model trained on every case of its split (train_all), are left out, and refused by
name: they trained on these validation cases, so their score is a cross-validation, scripts/cv_eval.py, in the
card):
- data/: links to the validation cases (fold 0 of the model's split file) of DATA_ROOT/<dataset>: 2D images/ +
  masks/ (every mask file of an image, merged at scoring as in training), 3D the BraTS case folders. DATA_ROOT is
  only read; OUT must be a new folder outside it.
- pred/: what `rwkvseg predict --model NAME data/images --out pred` writes (masks at each input's own size; 3D label
  volumes on each case's own grid), through the same function and the same defaults: each checkpoint's own
  post-processing (the released BraTS models record `largest`), or --postprocess SPEC for every model as
  `rwkvseg predict --postprocess SPEC` (none: off; each model must accept it, or nothing runs); each checkpoint's
  own test-time flips (2D releases record the ones chosen on validation; 3D ones apply on a GPU only), or
  --mirror-axes-2d AXES for every 2D model ('' for none); each 3D region release's recorded threshold (0.5 where
  none is recorded).
- eval/: what `rwkvseg evaluate pred data --out eval` writes (per_case.csv, summary.json), the same way.
Then OUT/results.md (the table, also printed) and OUT/results.json (the numbers, the settings, the environment).
--limit N takes the first N validation cases of each model: a quick check, and the table says so.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from rwkvseg import __version__
from rwkvseg.bench.complexity import count_parameters
from rwkvseg.bench.wkv import environment as bench_environment
from rwkvseg.checkpoint import load_checkpoint, read_meta
from rwkvseg.cli.predict import mirror_axes, postprocess_option
from rwkvseg.data.images2d import discover_pairs
from rwkvseg.data.specs import DatasetSpec
from rwkvseg.data.splits import read_split
from rwkvseg.data.volumes import discover_cases
from rwkvseg.eval.evaluate import SUMMARY_FILE, evaluate_folders
from rwkvseg.eval.images import ground_truth_cases
from rwkvseg.files import check_apart, write_json
from rwkvseg.infer.postprocess import PostProcess, check_postprocess, chosen_postprocess
from rwkvseg.infer.predict import PredictConfig, predict
from rwkvseg.infer.predict2d import recorded_mirror_axes
from rwkvseg.infer.predict3d import default_mirror_axes
from rwkvseg.released import ReleasedModel, released_checkpoint, released_models, weights_dir

ROOT = Path(__file__).resolve().parents[1]  # split paths in the index are relative to the repository root
log = logging.getLogger("results_table")

DATASET_TITLES = {
    "kvasir_seg": "Kvasir-SEG",
    "cvc_clinicdb": "CVC-ClinicDB",
    "busi": "BUSI",
    "isic2017": "ISIC 2017",
    "ph2": "PH2",
    "brats2018_4mod_2mm": "BraTS 2018 (2 mm)",
}
REGIONS = ("WT", "TC", "ET")
DEFAULT_POSTPROCESS = "each checkpoint's own"  # results.json's setting without --postprocess

# Published Dice per dataset, as fractions of the papers' percentages; each on its authors' own splits and
# schedules (280 epochs and more), so context for the rows, not the same experiment. Quoted as in README "Measured
# so far" and docs/targets.md ("Anchors behind the targets").
PUBLISHED = {
    # RWKV-UNet (Jiang et al., "RWKV-UNet: Improving UNet with Long-Range Cooperation for Effective Medical Image
    # Segmentation", arXiv 2501.08458): the tiny variant RWKV-UNet-T, 3.3 M parameters, the strongest lightweight peer
    "kvasir_seg": [("RWKV-UNet-T (3.3 M)", 0.913)],
    "cvc_clinicdb": [("RWKV-UNet-T (3.3 M)", 0.951)],
    "busi": [("RWKV-UNet-T (3.3 M)", 0.795)],
    # the same paper, RWKV-UNet (17.4 M) with its ImageNet-pretrained encoder
    "isic2017": [("RWKV-UNet (17.4 M, pretrained encoder)", 0.8532)],
}
# U-RWKV (Ye et al., MICCAI 2025, arXiv 2507.11415) publishes only a mean Dice over five datasets, no per-dataset
# figure: 88.15 % for U-RWKV (about 3 M), about 86.05 % for U-RWKV-s (about 0.5 M).
PAPER_MEANS = {"urwkv": ("U-RWKV", 0.8815), "urwkv_s": ("U-RWKV-s", 0.8605)}
PAPER_MEAN_DATASETS = ("busi", "kvasir_seg", "cvc_clinicdb", "isic2017")  # and ISIC 2018, whose masks are not here
# The project's accuracy targets (docs/targets.md, issue 14): Dice, and per region for BraTS.
TARGETS = {
    "kvasir_seg": {"Dice": 0.89},
    "cvc_clinicdb": {"Dice": 0.92},
    "busi": {"Dice": 0.80},
    "isic2017": {"Dice": 0.86},
    "ph2": {"Dice": 0.90},
    "brats2018_4mod_2mm": {"WT": 0.88, "TC": 0.80, "ET": 0.75},
}


class Refused(Exception):
    """A setting or an input the run cannot go ahead with: one line, no traceback."""


def split_path(model: ReleasedModel) -> Path:
    path = Path(model.split)
    return path if path.is_absolute() else ROOT / path


def _link(source: Path, link: Path) -> None:
    if os.path.lexists(link):
        raise ValueError(
            f"two validation files are both named {link.name} ({source} and {os.readlink(link)}); their links in "
            f"{link.parent} would collide: rename one of them"
        )
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(os.path.abspath(source), link)


def link_images(dataset: Path, split: Path, folder: Path, limit: int | None) -> tuple[int, int]:
    """Links to the validation images and their mask files under folder/images and folder/masks; (linked, all)."""
    by_case = {s.case: s for s in discover_pairs(dataset)}
    val = read_split(split, 0, list(by_case)).val
    chosen = [by_case[c] for c in val[:limit]]
    for sample in chosen:
        _link(sample.image, folder / "images" / sample.image.name)
        for mask in sample.masks:
            _link(mask, folder / "masks" / mask.name)
    # the links, read back as `rwkvseg evaluate` reads them, must pair each image with the same mask files
    expected = {s.image.stem: sorted(m.name for m in s.masks) for s in chosen}
    found = {case: sorted(p.name for p in masks) for case, masks in ground_truth_cases(folder).items()}
    if found != expected:
        wrong = sorted(c for c in expected.keys() | found.keys() if expected.get(c) != found.get(c))
        raise ValueError(f"the linked masks of {dataset} pair differently in {folder} (cases {wrong[:5]}); rename them")
    return len(chosen), len(val)


def link_volumes(dataset: Path, split: Path, folder: Path, spec: DatasetSpec, limit: int | None) -> tuple[int, int]:
    """Links to the validation case folders (BraTS layout) under folder; (linked, all)."""
    if spec.layout != "brats":
        raise ValueError(f"3D dataset layout {spec.layout!r} is not linked by this script; only BraTS case folders")
    cases = {c.case_id: c for c in discover_cases(dataset, spec, require_label=True)}
    val = read_split(split, 0, list(cases)).val
    for case in val[:limit]:
        case_folder = cases[case].label.parent
        _link(case_folder, folder / case_folder.name)
    return len(val[:limit]), len(val)


def score_row(summary: dict[str, Any], dims: int) -> dict[str, Any]:
    """The table's numbers from an evaluation summary: means over cases."""
    if dims == 3:
        regions = summary["regions"]
        return {
            "dice": {r: regions[r]["dice"].get("mean") for r in REGIONS},
            "hd95_mm": {r: regions[r].get("hd95", {}).get("mean") for r in REGIONS},
        }
    stats = summary.get("mean_over_classes") or {k: v.get("mean") for k, v in summary.items() if isinstance(v, dict)}
    return {"dice": stats.get("dice"), "iou": stats.get("iou"), "hd95_px": stats.get("hd95")}


def run_model(model: ReleasedModel, data_root: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Link, predict and score one released model; its row of results.json."""
    checkpoint = released_checkpoint(model.name, args.weights)
    network, meta = load_checkpoint(checkpoint)
    parameters = count_parameters(network)
    del network  # prediction loads its own copy, as `rwkvseg predict` does
    dims = 3 if meta.preprocessing.get("dims") == 3 else 2
    folder = out / model.name
    data, pred, scores = folder / "data", folder / "pred", folder / "eval"
    dataset = data_root / model.dataset
    spec = DatasetSpec.from_dict(meta.preprocessing["dataset"]) if dims == 3 else None
    if spec is None:
        cases, total = link_images(dataset, split_path(model), data, args.limit)
        inputs = data / "images"
    else:
        cases, total = link_volumes(dataset, split_path(model), data, spec, args.limit)
        inputs = data
    log.info("%s: predicting %d of %d validation cases of %s on %s", model.name, cases, total, dataset, args.device)
    start = time.perf_counter()
    inference = meta.preprocessing.get("inference")
    mirror = args.mirror_axes_2d if dims == 2 else None  # None: the predict defaults (3D: always)
    post = chosen_postprocess(args.postprocess, inference)  # what predict applies, as it resolves them
    flips = (
        recorded_mirror_axes(mirror, inference)
        if dims == 2
        else default_mirror_axes(None, inference or {}, torch.device(args.device))
    )
    predict(
        checkpoint, [inputs], pred, PredictConfig(device=args.device, mirror_axes=mirror, postprocess=args.postprocess)
    )
    predicted = time.perf_counter()
    summary = evaluate_folders(pred, data, scores, spec=spec, num_classes=meta.num_classes)
    log.info("%s: scored in %.1f s (prediction %.1f s)", model.name, time.perf_counter() - predicted, predicted - start)
    return {
        "name": model.name,
        "architecture": model.architecture,
        "dataset": model.dataset,
        "split": model.split,
        "dims": dims,
        "parameters": parameters,
        "cases": summary["cases"],
        "validation_cases": total,
        **score_row(summary, dims),
        "recorded": model.metrics,
        "postprocess": post.spelling(),
        "mirror_axes": list(flips),
        "threshold": (inference or {}).get("threshold") if dims == 3 else None,  # a 3D region release's recorded cut
        "seconds": {"predict": round(predicted - start, 2), "evaluate": round(time.perf_counter() - predicted, 2)},
        "summary": str(scores / SUMMARY_FILE),
    }


def _f(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _regions(values: dict[str, float | None], digits: int = 4) -> str:
    return " / ".join(_f(values.get(r), digits) for r in REGIONS)


def table_row(row: dict[str, Any]) -> str:
    dataset = row["dataset"]
    title = DATASET_TITLES.get(dataset, dataset)
    target = TARGETS.get(dataset, {})
    published = "; ".join(f"{who} {dice:.4g}" for who, dice in PUBLISHED.get(dataset, [])) or "-"
    if "error" in row:
        return f"| {row['name']} | - | {title} | - | failed: {row['error']} | | | | | {published} |"
    cases = (
        str(row["cases"]) if row["cases"] == row["validation_cases"] else f"{row['cases']} of {row['validation_cases']}"
    )
    params = f"{row['parameters'] / 1e6:.3f}"
    recorded = row["recorded"]
    if row["dims"] == 3:
        dice, iou, hd95 = f"WT / TC / ET {_regions(row['dice'])}", "-", f"{_regions(row['hd95_mm'], 1)} mm"
        target_text = "WT / TC / ET " + " / ".join(_f(target.get(r), 2) for r in REGIONS) if target else "-"
        recorded_text = _regions({r: recorded.get(f"val_dice_{r}") for r in REGIONS})
    else:
        dice, iou, hd95 = _f(row["dice"]), _f(row["iou"]), f"{_f(row['hd95_px'], 1)} px"
        target_text = _f(target.get("Dice"), 2) if target else "-"
        recorded_text = _f(recorded.get("val_dice"))
    return (
        f"| {row['name']} | {params} | {title} | {cases} | {dice} | {iou} | {hd95} | {recorded_text} | {target_text} "
        f"| {published} |"
    )


def paper_mean_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The U-RWKV paper's means, and this table's mean over the same datasets where every one of them is here."""
    lines = []
    for arch, (title, mean) in PAPER_MEANS.items():
        if not any(r["architecture"] == arch for r in rows):
            continue
        ours = {r["dataset"]: r["dice"] for r in rows if r["architecture"] == arch and "error" not in r}
        line = f"- {title}: the paper's mean Dice over BUSI, Kvasir-SEG, CVC-ClinicDB, ISIC 2017 and ISIC 2018 is "
        line += f"{'about ' if arch == 'urwkv_s' else ''}{mean:.4f} (no per-dataset figure is published)"
        if all(ours.get(d) is not None for d in PAPER_MEAN_DATASETS):
            here = sum(ours[d] for d in PAPER_MEAN_DATASETS) / len(PAPER_MEAN_DATASETS)
            line += f"; this table's mean over the four of them here (no ISIC 2018 masks): {here:.4f}"
        lines.append(line + ".")
    return lines


def results_markdown(rows: list[dict[str, Any]], settings: dict[str, Any]) -> str:
    env = settings["environment"]
    commit = env["commit"] or "unknown"
    lines = [
        "Released checkpoints on the validation cases of their split files (fold 0), predicted with `rwkvseg predict` "
        f"on {settings['device']} ({env['threads']} CPU thread{'s' if env['threads'] != 1 else ''}, torch "
        f"{env['torch']}) at each input's original size (2D) or on its own grid (3D) and scored with `rwkvseg "
        'evaluate` (means over cases; empty policy "perfect"; HD95 in pixels in 2D, mm in 3D); '
        f"rwkvseg {env['rwkvseg']}, commit {commit}{' with local changes' if env['dirty'] else ''}, "
        f"`{settings['command']}`.",
        "",
    ]
    flipped = [f"{r['name']}: {','.join(map(str, r['mirror_axes']))}" for r in rows if r.get("mirror_axes")]
    if flipped:
        how = "each checkpoint's own default" if settings.get("mirror_axes_2d") is None else "as given for 2D"
        lines += [
            f"Logits averaged over flips of these axes (test-time augmentation, `rwkvseg predict --mirror-axes`, "
            f"{how}; beyond the papers' recipes): {'; '.join(flipped)}. The Dice recorded at release is without them.",
            "",
        ]
    processed = [f"{r['name']}: {r['postprocess']}" for r in rows if r.get("postprocess", "none") != "none"]
    if processed:
        how = "as given" if settings.get("postprocess") != DEFAULT_POSTPROCESS else "each checkpoint's own default"
        lines += [
            f"Label maps post-processed before scoring (`rwkvseg predict --postprocess`, {how}; beyond the papers' "
            f"recipes): {'; '.join(processed)}. The Dice recorded at release is without it.",
            "",
        ]
    cut = [f"{r['name']}: {r['threshold']:g}" for r in rows if r.get("threshold") is not None]
    if cut:
        # the index records the cut its Dice were measured at (val_threshold) where it was not 0.5
        at = [f"{r['name']} at {r['recorded']['val_threshold']:g}" for r in rows if "val_threshold" in r["recorded"]]
        lines += [
            "Region probabilities cut at the threshold each checkpoint records (chosen on validation, beyond the "
            f"papers' recipes; 0.5 otherwise): {'; '.join(cut)}. The Dice recorded at release is at 0.5"
            f"{' (' + ', '.join(at) + ')' if at else ''}.",
            "",
        ]
    if settings["limit"]:
        lines += [
            f"**Quick check (--limit {settings['limit']}): only the first {settings['limit']} validation cases of "
            "each model, not the results.**",
            "",
        ]
    lines += [
        "| model | parameters (M) | dataset | validation cases | Dice | IoU | HD95 | Dice recorded at release | "
        "target | published (Dice) |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *(table_row(r) for r in rows),
        "",
        "The validation cases chose each checkpoint, so these numbers are optimistic; the published ones come from "
        "the papers' own splits and much longer schedules. Dice recorded at release: the model's entry in "
        "weights/index.json, as its card reports it. Targets: `docs/targets.md`. Published Dice as fractions:",
        "",
        *paper_mean_lines(rows),
        "- RWKV-UNet (arXiv 2501.08458): RWKV-UNet-T (3.3 M) Kvasir-SEG 0.913, CVC-ClinicDB 0.951, BUSI 0.795; "
        "RWKV-UNet (17.4 M, pretrained encoder) ISIC 2017 0.8532.",
    ]
    return "\n".join(lines) + "\n"


def environment(device: str) -> dict[str, Any]:
    def git(*command: str) -> str | None:
        try:
            done = subprocess.run(["git", *command], cwd=ROOT, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    return {  # the benchmarks' environment (torch, python, device and its name), then the package and its commit
        **bench_environment(torch.device(device)),
        "rwkvseg": __version__,
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "commit": commit,
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")) if commit else None,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_root", type=Path, help="folder holding one folder per dataset (read only)")
    parser.add_argument("out", type=Path, help="a new folder for the links, predictions, evaluations and tables")
    parser.add_argument("--names", nargs="+", metavar="NAME", help="released models to run (default: all)")
    parser.add_argument("--device", default="cpu", help="where to predict (default cpu)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--limit", type=int, help="only the first N validation cases of each model (a quick check)")
    parser.add_argument("--weights", type=Path, default=weights_dir(), help="released models' folder (index.json)")
    parser.add_argument(
        "--mirror-axes-2d",
        type=axes,
        default=None,
        metavar="AXES",
        help="2D test-time augmentation: logits averaged over the flips of these axes, e.g. 0,1, '' for none "
        "(default: each checkpoint's recorded flips, as predict)",
    )
    parser.add_argument(
        "--postprocess",
        type=postprocess_option,
        default=None,
        metavar="SPEC",
        help="post-process every label map as `rwkvseg predict --postprocess` does: none, largest, fill-holes, "
        "et-min-voxels=N, et-min-mm3=V, joined by commas (default: each checkpoint's own, as predict)",
    )
    return parser.parse_args(argv)


def check_postprocess_fits(model: ReleasedModel, given: PostProcess | None, weights: Path) -> None:
    """Refused when the post-processing does not apply to the model (as `rwkvseg predict` would refuse it)."""
    meta = read_meta(released_checkpoint(model.name, weights))
    spec = DatasetSpec.from_dict(meta.preprocessing["dataset"]) if meta.preprocessing.get("dims") == 3 else None
    try:
        config = chosen_postprocess(given, meta.preprocessing.get("inference"))
        check_postprocess(config, spec.num_classes - 1 if spec else max(meta.num_classes - 1, 1), spec)
    except ValueError as err:
        raise Refused(f"{model.name}: {err}") from None


def axes(text: str) -> tuple[int, ...]:
    """'0,1' -> (0, 1); '' -> (): the axes as `rwkvseg predict --mirror-axes` reads them."""
    try:
        return mirror_axes(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of axes such as 0,1") from None


def check(args: argparse.Namespace) -> list[ReleasedModel]:
    """The models to run, after every check that needs no prediction; Refused with one line otherwise."""
    if args.out.exists():
        raise Refused(f"OUT {args.out} exists; give a new folder (runs are never mixed)")
    if not args.data_root.is_dir():
        raise Refused(f"DATA_ROOT {args.data_root} is not a folder; give the folder holding the dataset folders")
    try:
        check_apart(args.out, [args.data_root], "OUT")
    except ValueError as err:
        raise Refused(str(err)) from None
    if args.threads < 1 or (args.limit is not None and args.limit < 1):
        raise Refused(f"--threads {args.threads} and --limit {args.limit} must be >= 1")
    try:
        torch.device(args.device)
    except RuntimeError:
        raise Refused(f"--device {args.device!r} is not a device; use cpu, cuda or cuda:1") from None
    models = released_models(args.weights)
    known = {m.name: m for m in models}
    unknown = [n for n in args.names or () if n not in known]
    if not models or unknown:
        choices = ", ".join(known) or f"none: {args.weights} has no index.json"
        raise Refused(f"unknown released model(s) {unknown}; choose from {choices}")
    chosen = [m for m in models if not args.names or m.name in args.names]
    trained_on_val = {  # no validation cases of their own: a cross-validation in the card scores them
        "an ensemble whose members trained on the split's validation cases (fold models)": [
            m.name for m in chosen if m.members
        ],
        "trained on every case of its split, the validation cases too (train_all)": [
            m.name for m in chosen if not m.members and read_meta(args.weights / m.name).training.get("train_all")
        ],
    }
    for why, names in trained_on_val.items():
        if not names:
            continue
        if args.names:
            raise Refused(f"{', '.join(names)}: {why}; its score is a cross-validation (its card)")
        log.info("leaving out %s: %s, scored by cross-validation in its card", ", ".join(names), why)
        chosen = [m for m in chosen if m.name not in names]
    for m in chosen:
        if not (args.data_root / m.dataset).is_dir():
            raise Refused(f"{m.name} needs dataset folder {args.data_root / m.dataset}, which does not exist")
        if not split_path(m).is_file():
            raise Refused(f"{m.name} names split file {m.split}, not found at {split_path(m)}")
        check_postprocess_fits(m, args.postprocess, args.weights)
    return chosen


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        models = check(args)
    except Refused as err:
        print(f"results_table.py: error: {err}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True)
    rows = []
    for model in models:
        try:
            rows.append(run_model(model, args.data_root, args.out, args))
        except Exception as err:  # one model's failure is its row; the others still run
            log.exception("%s failed", model.name)
            error = f"{type(err).__name__}: {err}".splitlines()[0]
            rows.append(
                {"name": model.name, "architecture": model.architecture, "dataset": model.dataset, "error": error}
            )
    settings = {
        "data_root": str(args.data_root),
        "device": args.device,
        "limit": args.limit,
        "weights": str(args.weights),
        "command": " ".join(["python scripts/results_table.py", *(sys.argv[1:] if argv is None else argv)]),
        "predict": "rwkvseg predict defaults: the checkpoint's threshold, 3D window, post-processing and flips "
        "(2D on every device, 3D on a GPU only)"
        + (f"; 2D mirror TTA over axes {list(args.mirror_axes_2d)}" if args.mirror_axes_2d is not None else "")
        + (f"; --postprocess {args.postprocess.spelling()}" if args.postprocess is not None else ""),
        "mirror_axes_2d": None if args.mirror_axes_2d is None else list(args.mirror_axes_2d),
        "postprocess": DEFAULT_POSTPROCESS if args.postprocess is None else args.postprocess.spelling(),
        "evaluate": "rwkvseg evaluate defaults (empty policy perfect, HD95 computed)",
        "environment": environment(args.device),
    }
    table = results_markdown(rows, settings)
    (args.out / "results.md").write_text(table, encoding="utf-8")
    write_json(
        args.out / "results.json",
        {
            **settings,
            "models": rows,
            "published": PUBLISHED,
            "paper_means": PAPER_MEANS,
            "targets": TARGETS,
        },
    )
    print(table, end="")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
