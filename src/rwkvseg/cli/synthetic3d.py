"""`rwkvseg synthetic3d`: synthetic BraTS-style phantoms (rwkvseg.data.synthetic3d.write_synthetic_volumes)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synthetic3d", help="write synthetic BraTS-style phantoms (the data of configs/demo3d.toml)")
    p.add_argument("out", help="folder for the case folders (must be empty or new)")
    p.add_argument("--cases", type=int, default=8)
    p.add_argument("--shape", default="44,52,40", help="voxels along the file axes x,y,z")
    p.add_argument("--spacing", type=float, default=2.0, help="isotropic voxel size in mm")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="write into a folder that is not empty")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..data.synthetic3d import write_synthetic_volumes

    try:
        shape = tuple(int(v) for v in args.shape.split(","))
    except ValueError:
        raise ValueError(f"--shape {args.shape!r} must be three integers like 44,52,40") from None
    folders = write_synthetic_volumes(args.out, args.cases, shape, args.spacing, args.seed, args.overwrite)
    print(f"{len(folders)} phantom cases ({'x'.join(map(str, shape))} voxels, {args.spacing:g} mm) in {args.out}")
    return 0
