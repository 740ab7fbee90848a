"""`rwkvseg train` and `rwkvseg split`: thin argparse wiring over train_2d and the split functions."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def add_train_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a 2D or 3D model (dims = 3) from a config file (TOML or YAML)")
    p.add_argument("config", nargs="?", help="config file; with --resume and no config: OUT/config.json")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting, e.g. --set optim.lr=0.001 --set data.size=[256,256] (repeatable)",
    )
    p.add_argument("--data", help="dataset folder (same as --set data.root=...)")
    p.add_argument("--out", help="run folder (same as --set out=...)")
    p.add_argument("--resume", action="store_true", help="continue the run in the output folder exactly")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    p.set_defaults(func=_run_train)

    p = sub.add_parser("split", help="write a seeded train/val split JSON for a dataset folder")
    p.add_argument("data", help="dataset folder (any known layout)")
    p.add_argument("--out", required=True, help="split JSON to write")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--folds", type=int, default=None, help="k-fold cross-validation instead of one split")
    p.add_argument("--test-fraction", type=float, default=0.0, help="hold out this fraction as a test list")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-stratify", action="store_true", help="ignore image labels (BUSI class, PH2 diagnosis)")
    p.add_argument("--official", action="store_true", help="use the dataset's train/ val/ (test/) folders")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--skip-non-images", action="store_true", help="skip (with a warning) files that are not images")
    p.set_defaults(func=_run_split)

    p = sub.add_parser("synthetic3d", help="write synthetic BraTS-style phantoms (the data of configs/demo3d.toml)")
    p.add_argument("out", help="folder for the case folders (must be empty or new)")
    p.add_argument("--cases", type=int, default=8)
    p.add_argument("--shape", default="44,52,40", help="voxels along the file axes x,y,z")
    p.add_argument("--spacing", type=float, default=2.0, help="isotropic voxel size in mm")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="write into a folder that is not empty")
    p.set_defaults(func=_run_synthetic3d)


def _run_train(args: argparse.Namespace) -> int:
    from .config import apply_overrides, load_config, read_config_file
    from .train2d import CONFIG_FILE, train_2d
    from .train3d import config_dims, load_config_3d, train_3d

    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.root={args.data}")
    if args.out:
        overrides.append(f"out={args.out}")
    config_path = args.config
    if config_path is None and args.resume:
        if not args.out:
            raise ValueError("--resume without a config file needs --out RUN_FOLDER")
        config_path = Path(args.out) / CONFIG_FILE
    if config_dims(apply_overrides(read_config_file(config_path) if config_path else {}, overrides)) == 3:
        config = load_config_3d(config_path, overrides)
        progress = train_3d(config, resume=args.resume, progress_bar=not args.no_progress)
    else:
        config = load_config(config_path, overrides)
        progress = train_2d(config, resume=args.resume, progress_bar=not args.no_progress)
    print(
        f"best validation {config.select_metric} {progress.best_metric:.4f} at epoch {progress.best_epoch}; "
        f"checkpoint {Path(config.out) / 'best.safetensors'}"
    )
    return 0


def _run_split(args: argparse.Namespace) -> int:
    from ..data.images2d import discover_pairs
    from ..data.splits import make_split, split_from_groups, write_split

    samples = discover_pairs(args.data, args.skip_non_images)
    cases = [s.case for s in samples]
    if args.official:
        doc = split_from_groups(cases, [s.group for s in samples])
    else:
        labels = [s.label for s in samples]
        stratify = None if args.no_stratify or all(label is None for label in labels) else labels
        doc = make_split(cases, stratify, args.val_fraction, args.seed, args.folds, args.test_fraction)
    doc["dataset"] = str(args.data)
    path = write_split(args.out, doc, overwrite=args.overwrite)
    folds = doc["folds"]
    print(
        f"{path}: {len(cases)} cases, {len(folds)} fold(s), fold 0: {len(folds[0]['train'])} train / "
        f"{len(folds[0]['val'])} val, {len(doc['test'])} test"
    )
    return 0


def _run_synthetic3d(args: argparse.Namespace) -> int:
    from ..data.synthetic3d import write_synthetic_volumes

    try:
        shape = tuple(int(v) for v in args.shape.split(","))
    except ValueError:
        raise ValueError(f"--shape {args.shape!r} must be three integers like 44,52,40") from None
    folders = write_synthetic_volumes(args.out, args.cases, shape, args.spacing, args.seed, args.overwrite)
    print(f"{len(folders)} phantom cases ({'x'.join(map(str, shape))} voxels, {args.spacing:g} mm) in {args.out}")
    return 0
