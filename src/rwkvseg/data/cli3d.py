"""Console wiring of the 3D stages: `rwkvseg preprocess`, and the 3D branches of `predict` and `evaluate`.

`predict` and `evaluate` are shared with 2D: their parsers call `add_*3d_arguments` and dispatch here when the
checkpoint is 3D (its sidecar's preprocessing.dims == 3) or the folders hold NIfTI / ITK volumes.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)

DATASET_CHOICES = ("brats", "brats2023", "msd_task01", "nnunet")


def _ints(text: str, name: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        raise ValueError(f"{name} {text!r} must be comma-separated integers like 0,1,2,4") from None


def _floats(text: str, name: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        raise ValueError(f"{name} {text!r} must be comma-separated numbers like 1,1,1") from None
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or min(values) <= 0:
        raise ValueError(f"{name} {text!r} needs one or three positive numbers (mm, file axis order x,y,z)")
    return values


def _regions(text: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """'WT=1,2,4;TC=1,4;ET=4' -> (("WT", (1, 2, 4)), ...)."""
    regions = []
    for part in filter(None, text.split(";")):
        name, sep, values = part.partition("=")
        if not sep:
            raise ValueError(f"--regions part {part!r} must look like NAME=1,2,4")
        regions.append((name.strip(), _ints(values, "--regions")))
    return tuple(regions)


def add_dataset_arguments(p: argparse.ArgumentParser, default: str | None = "brats") -> None:
    p.add_argument("--dataset", choices=DATASET_CHOICES, default=default, help="dataset layout and label preset")
    p.add_argument("--modalities", help="model channel order, e.g. t1,t1ce,t2,flair (file suffixes / channel names)")
    p.add_argument("--labels", help="label values in the files, background first, e.g. 0,1,2,4")
    p.add_argument("--regions", help="evaluation regions, e.g. 'WT=1,2,4;TC=1,4;ET=4'")


def spec_from_args(args: argparse.Namespace, root: Path | None = None):
    """The DatasetSpec a command line asks for (presets, or an nnU-Net dataset.json under root)."""
    from .volumes import dataset_spec, spec_from_dataset_json

    overrides = {}
    if args.modalities:
        overrides["modalities"] = tuple(m.strip() for m in args.modalities.split(","))
    if args.labels:
        overrides["label_values"] = _ints(args.labels, "--labels")
    if args.regions:
        overrides["regions"] = _regions(args.regions)
    if args.dataset == "nnunet":
        if root is None:
            raise ValueError("--dataset nnunet needs the dataset folder with its dataset.json")
        spec = spec_from_dataset_json(root / "dataset.json", dict(overrides.pop("regions", ())) or None)
        from dataclasses import replace

        return replace(spec, **overrides)
    return dataset_spec(args.dataset, **overrides)


def add_preprocess_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("preprocess", help="3D volumes -> compact training cache (crop, z-score, resample)")
    p.add_argument("data", help="dataset folder (BraTS case folders, or an MSD / nnU-Net raw dataset)")
    p.add_argument("--out", required=True, help="cache folder (plans.json + one .npz per case)")
    add_dataset_arguments(p)
    p.add_argument("--spacing", help="target spacing in mm, x,y,z file order (default: the dataset median)")
    p.add_argument("--no-crop", action="store_true", help="keep the full grid instead of cropping to nonzero")
    p.add_argument("--fg-samples", type=int, default=10000, help="foreground locations stored per class")
    p.set_defaults(func=run_preprocess)


def run_preprocess(args: argparse.Namespace) -> int:
    from .preprocess3d import PreprocessConfig, preprocess_dataset

    root = Path(args.data)
    spacing = None if args.spacing is None else _floats(args.spacing, "--spacing")[::-1]  # x,y,z -> k,j,i
    config = PreprocessConfig(
        target_spacing=spacing, crop_nonzero=not args.no_crop, fg_samples_per_class=args.fg_samples
    )
    plans = preprocess_dataset(root, spec_from_args(args, root), args.out, config)
    spacing_xyz = ", ".join(f"{s:g}" for s in plans["target_spacing"][::-1])
    print(
        f"{len(plans['cases'])} cases -> {args.out}: {plans['cache_bytes'] / 2**20:.1f} MiB, "
        f"spacing {spacing_xyz} mm (x, y, z)"
    )
    return 0


def add_predict3d_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `rwkvseg predict` that only 3D checkpoints use."""
    g = p.add_argument_group("3D volumes (checkpoints trained with `rwkvseg preprocess`)")
    g.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap (3D)")
    g.add_argument("--mirror-axes", default="0,1,2", help="axes flipped for TTA, '' for none (3D)")
    g.add_argument("--sw-batch-size", type=int, default=1, help="windows per forward pass (3D)")
    g.add_argument(
        "--more-modalities",
        nargs="+",
        default=(),
        metavar="FILE",
        help="(3D) when INPUT is the first of one 3-D file per modality: the other files, in the model's order",
    )


def is_3d_checkpoint(checkpoint: str | Path) -> bool:
    from ..checkpoint import read_meta

    return read_meta(checkpoint).preprocessing.get("dims") == 3


def run_predict3d(args: argparse.Namespace) -> int:
    from ..infer.predict3d import PredictOptions, predict_paths

    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    mirror = () if not args.mirror_axes.strip() else _ints(args.mirror_axes, "--mirror-axes")
    options = PredictOptions(overlap=args.overlap, mirror_axes=mirror, sw_batch_size=args.sw_batch_size, device=device)
    inputs = [args.input, *getattr(args, "more_modalities", ())]
    written = predict_paths(args.checkpoint, inputs, args.out, options, overwrite=args.overwrite)
    print(f"wrote {len(written)} label volumes to {args.out}")
    return 0


def add_evaluate3d_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `rwkvseg evaluate` for 3D label volumes (NIfTI / NRRD / MHA)."""
    g = p.add_argument_group("3D volumes (chosen when the folders hold NIfTI / ITK files)")
    add_dataset_arguments(g, default=None)


def _holds_volumes(folder: str | Path) -> bool:
    from .volumes import is_volume_file

    folder = Path(folder)
    return folder.is_dir() and any(is_volume_file(p) for p in folder.rglob("*"))


def is_3d_evaluation(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "dataset", None)) or _holds_volumes(args.gt) or _holds_volumes(args.pred)


def run_evaluate3d(args: argparse.Namespace) -> int:
    from ..eval.evaluate3d import evaluate_folders
    from ..eval.metrics import EmptyPolicy

    if args.out is None:
        raise ValueError("3D evaluation writes per_case.csv and summary.json: pass --out FOLDER")
    out = Path(args.out)
    if not getattr(args, "overwrite", False) and any((out / n).exists() for n in ("per_case.csv", "summary.json")):
        raise FileExistsError(f"{out} already holds an evaluation; choose another --out or pass --overwrite")
    args.dataset = args.dataset or "brats"
    spec = spec_from_args(args, Path(args.gt))
    summary = evaluate_folders(
        args.pred, args.gt, spec, out, EmptyPolicy(args.empty_policy), with_hd95=not args.no_hd95
    )
    print(f"{summary['cases']} cases (empty policy: {summary['empty_policy']}; HD95 in mm)")
    for region, stats in summary["regions"].items():
        hd = f"  HD95 {stats['hd95']['mean']:.2f} mm" if "hd95" in stats and "mean" in stats["hd95"] else ""
        print(f"{region:4s} Dice {stats['dice'].get('mean', float('nan')):.4f}{hd}")
    return 0
