"""`rwkvseg split`: a seeded train/val(/test) split JSON for a 2D dataset folder (rwkvseg.data.splits.split_dataset)
or a 3D dataset: a preprocessed cache, or a raw folder with --dataset (split_volumes)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("split", help="write a seeded train/val split JSON for a dataset folder")
    p.add_argument(
        "data",
        help="dataset folder: 2D images (any known layout), a 3D cache from `rwkvseg preprocess`, or a raw 3D dataset "
        "with --dataset",
    )
    p.add_argument(
        "--dataset",
        default="",
        help="3D: the preset of a raw volume folder (brats, brats2023, msd_task01, nnunet)",
    )
    p.add_argument(
        "--strata",
        default=None,
        help="3D: a CSV of case,stratum for every case (e.g. splits/brats2018_grades.csv) to stratify by; without it "
        "3D splits are not stratified",
    )
    p.add_argument("--out", required=True, help="split JSON to write")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--folds", type=int, default=None, help="k-fold cross-validation instead of one split")
    p.add_argument("--test-fraction", type=float, default=0.0, help="hold out this fraction as a test list")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-stratify", action="store_true", help="ignore image labels (BUSI class, PH2 diagnosis)")
    p.add_argument("--official", action="store_true", help="use the dataset's train/ val/ (test/) folders")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--skip-non-images", action="store_true", help="skip (with a warning) files that are not images")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..data.preprocess3d import PLANS_FILE
    from ..data.splits import split_dataset, split_volumes, write_split
    from ..data.volumes import holds_volumes

    if args.dataset or (Path(args.data) / PLANS_FILE).is_file():
        options = {"--official": args.official, "--skip-non-images": args.skip_non_images}
        if given := [name for name, on in options.items() if on]:
            raise ValueError(f"{', '.join(given)}: for 2D image folders, and {args.data} is a 3D dataset: drop them")
        if args.strata is not None and args.no_stratify:
            raise ValueError("--strata and --no-stratify contradict each other: drop one")
        doc = split_volumes(
            args.data,
            args.dataset,
            val_fraction=args.val_fraction,
            folds=args.folds,
            test_fraction=args.test_fraction,
            seed=args.seed,
            strata=args.strata,
        )
    elif holds_volumes(args.data):
        raise ValueError(
            f"{args.data} holds 3D volumes: name the raw dataset's preset with --dataset (brats, brats2023, "
            "msd_task01, nnunet), or split the cache `rwkvseg preprocess` made of it"
        )
    else:
        if args.strata is not None:
            raise ValueError(
                f"--strata: for 3D datasets, and {args.data} holds 2D images, which are stratified by their own labels "
                "(BUSI class, PH2 diagnosis): drop it"
            )
        doc = split_dataset(
            args.data,
            val_fraction=args.val_fraction,
            folds=args.folds,
            test_fraction=args.test_fraction,
            seed=args.seed,
            stratify=not args.no_stratify,
            official=args.official,
            skip_non_images=args.skip_non_images,
        )
    path = write_split(args.out, doc, overwrite=args.overwrite)
    folds = doc["folds"]
    print(
        f"{path}: {doc['n_cases']} cases, {len(folds)} fold(s), fold 0: {len(folds[0]['train'])} train / "
        f"{len(folds[0]['val'])} val, {len(doc['test'])} test"
    )
    return 0
