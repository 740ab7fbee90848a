"""`rwkvseg evaluate`: thin argparse wiring over evaluate_folders."""

from __future__ import annotations

import argparse

from .metrics import EmptyPolicy


def add_evaluate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="score predicted masks against ground truth (CSV per image + summary JSON)")
    p.add_argument("pred", help="folder of predicted masks (<name>.png)")
    p.add_argument("gt", help="folder of ground-truth masks, or a dataset folder in any known layout")
    p.add_argument("--out", help="write per_image.csv and summary.json here")
    p.add_argument("--num-classes", type=int, default=1, help="1 (binary) or the number of classes incl. background")
    p.add_argument("--spacing", help="pixel spacing 'dy,dx' (e.g. mm) for HD95; default pixels")
    p.add_argument(
        "--empty-policy",
        choices=[e.value for e in EmptyPolicy],
        default=EmptyPolicy.PERFECT.value,
        help="score of images whose prediction and ground truth are both empty (see eval/metrics.py)",
    )
    p.add_argument("--missing-as-empty", action="store_true", help="score missing predictions as empty masks")
    p.add_argument("--no-hd95", action="store_true", help="skip HD95 (faster)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--skip-non-images", action="store_true", help="skip (with a warning) files that are not images")
    from ..data.cli3d import add_evaluate3d_arguments

    add_evaluate3d_arguments(p)
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from ..data.cli3d import is_3d_evaluation, run_evaluate3d

    if is_3d_evaluation(args):  # NIfTI / ITK label volumes: per-region 3D evaluation
        return run_evaluate3d(args)
    from .evaluate import evaluate_folders

    spacing = None
    if args.spacing:
        try:
            spacing = [float(v) for v in args.spacing.split(",")]
        except ValueError:
            raise ValueError(f"--spacing {args.spacing!r} must be numbers like 0.5,0.5") from None
    summary = evaluate_folders(
        args.pred,
        args.gt,
        args.out,
        num_classes=args.num_classes,
        spacing=spacing,
        policy=EmptyPolicy(args.empty_policy),
        missing_as_empty=args.missing_as_empty,
        overwrite=args.overwrite,
        skip_non_images=args.skip_non_images,
        with_hd95=not args.no_hd95,
    )
    stats = summary.get("mean_over_classes") or {
        k: v["mean"] for k, v in summary.items() if isinstance(v, dict) and "mean" in v
    }
    print(f"{summary.get('cases', '')} cases (empty policy: {summary['empty_policy']})")
    for name, value in stats.items():
        print(f"{name:12s} {value:.4f}")
    return 0
