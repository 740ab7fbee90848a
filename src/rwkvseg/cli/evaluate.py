"""`rwkvseg evaluate`: predicted masks or label volumes against ground truth (rwkvseg.eval.evaluate_folders)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ._options import add_dataset_arguments

    p = sub.add_parser("evaluate", help="score predicted masks against ground truth (CSV per case + summary JSON)")
    p.add_argument("pred", help="folder of predicted masks (<name>.png)")
    p.add_argument("gt", help="folder of ground-truth masks, or a dataset folder in any known layout")
    p.add_argument("--out", help="write per_case.csv and summary.json here")
    p.add_argument("--num-classes", type=int, default=1, help="1 (binary) or the number of classes incl. background")
    p.add_argument("--spacing", help="pixel spacing 'dy,dx' (e.g. mm) for HD95; default pixels")
    p.add_argument(
        "--empty-policy",
        choices=("perfect", "undefined"),
        default="perfect",
        help="score of images whose prediction and ground truth are both empty (see eval/metrics.py)",
    )
    p.add_argument("--missing-as-empty", action="store_true", help="score missing predictions as empty masks")
    p.add_argument("--no-hd95", action="store_true", help="skip HD95 (faster)")
    hd = p.add_mutually_exclusive_group()
    hd.add_argument(
        "--hd95-empty",
        type=float,
        default=None,
        metavar="MM",
        help="(3D) HD95 of a region empty in exactly one of prediction and reference (default: the grid's diagonal)",
    )
    hd.add_argument(
        "--brats-hd95",
        action="store_true",
        help="(3D) BraTS-comparable HD95: 373.13 mm where exactly one mask is empty (same as --hd95-empty 373.13)",
    )
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--skip-non-images", action="store_true", help="skip (with a warning) files that are not images")
    g = p.add_argument_group("3D volumes (chosen when the folders hold NIfTI / ITK files)")
    add_dataset_arguments(g, default=None)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..data.volumes import holds_volumes
    from ..eval.evaluate import evaluate_folders
    from ..eval.metrics import BRATS_EMPTY_HD95, EmptyPolicy
    from ._options import spec_from_args

    spec = None
    if args.dataset or holds_volumes(args.gt) or holds_volumes(args.pred):  # per-region 3D evaluation
        if args.out is None:
            raise ValueError("3D evaluation writes per_case.csv and summary.json: pass --out FOLDER")
        args.dataset = args.dataset or "brats"
        spec = spec_from_args(args, Path(args.gt))
    spacing = None
    if args.spacing:
        try:
            spacing = [float(v) for v in args.spacing.split(",")]
        except ValueError:
            raise ValueError(f"--spacing {args.spacing!r} must be numbers like 0.5,0.5") from None
        if not all(0 < v < float("inf") for v in spacing):
            raise ValueError(f"--spacing {args.spacing!r} must be positive pixel / voxel sizes in mm, like 0.5,0.5")
    summary = evaluate_folders(
        args.pred,
        args.gt,
        args.out,
        spec=spec,
        num_classes=args.num_classes,
        spacing=spacing,
        policy=EmptyPolicy(args.empty_policy),
        missing_as_empty=args.missing_as_empty,
        overwrite=args.overwrite,
        skip_non_images=args.skip_non_images,
        with_hd95=not args.no_hd95,
        empty_hd95=BRATS_EMPTY_HD95 if args.brats_hd95 else args.hd95_empty,
    )
    if spec is not None:
        print(f"{summary['cases']} cases (empty policy: {summary['empty_policy']}; HD95 in mm)")
        for region, stats in summary["regions"].items():
            hd = f"  HD95 {stats['hd95']['mean']:.2f} mm" if "hd95" in stats and "mean" in stats["hd95"] else ""
            print(f"{region:4s} Dice {stats['dice'].get('mean', float('nan')):.4f}{hd}")
        confusion = summary["label_confusion"]
        labels = confusion["labels"]
        print("reference label: share of its voxels predicted as " + " / ".join(map(str, labels)))
        for label, shares in zip(labels, confusion["share_of_reference"], strict=True):
            if shares is not None:
                print(f"  {label}: " + " / ".join(f"{v:.3f}" for v in shares))
        return 0
    stats = summary.get("mean_over_classes") or {
        k: v["mean"] for k, v in summary.items() if isinstance(v, dict) and "mean" in v
    }
    print(f"{summary.get('cases', '')} cases (empty policy: {summary['empty_policy']})")
    for name, value in stats.items():
        print(f"{name:12s} {value:.4f}")
    return 0
