"""`rwkvseg preprocess`: 3D volumes -> a compact training cache (rwkvseg.data.preprocess3d.preprocess_dataset)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ._options import add_dataset_arguments

    p = sub.add_parser("preprocess", help="3D volumes -> compact training cache (crop, z-score, resample)")
    p.add_argument("data", help="dataset folder (BraTS case folders, or an MSD / nnU-Net raw dataset)")
    p.add_argument("--out", required=True, help="cache folder (plans.json + one .npz per case)")
    add_dataset_arguments(p)
    p.add_argument("--spacing", help="target spacing in mm, x,y,z file order (default: the dataset median)")
    p.add_argument("--no-crop", action="store_true", help="keep the full grid instead of cropping to nonzero")
    p.add_argument("--fg-samples", type=int, default=10000, help="foreground locations stored per class")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..data.preprocess3d import PreprocessConfig, preprocess_dataset
    from ._options import floats3, spec_from_args

    root = Path(args.data)
    spacing = None if args.spacing is None else floats3(args.spacing, "--spacing")[::-1]  # x,y,z -> k,j,i
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
