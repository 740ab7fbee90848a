"""`rwkvseg train`: a 2D or 3D run from a config file (rwkvseg.train.train.train); data-parallel under torchrun
(`torchrun --nproc-per-node N -m rwkvseg.cli train CONFIG`, docs/distributed.md)."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from ._options import add_run_arguments, run_overrides


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a 2D or 3D model (dims = 3) from a config file (TOML or YAML)")
    p.add_argument("config", nargs="?", help="config file; with --resume and no config: OUT/config.json")
    add_run_arguments(p, "override a setting, e.g. --set optim.lr=0.001 --set data.size=[256,256]", "dataset folder")
    p.add_argument("--resume", action="store_true", help="continue the run in the output folder exactly")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    p.add_argument(
        "--train-all",
        action="store_true",
        help="train on the fold's training and validation cases, validate none and keep the last epoch: the final "
        "model of a recipe whose epochs cross-validation chose (same as --set train_all=true)",
    )
    p.add_argument(
        "--dist-timeout",
        type=float,
        default=1800.0,
        metavar="SECONDS",
        help="under torchrun: how long a process waits for the others (a failed or hung rank ends the run after it)",
    )
    p.add_argument(
        "--compile",
        metavar="MODE",
        help="compile the training step: auto (on CUDA; the default), on, off, or a torch.compile mode "
        "(same as --set compile=...)",
    )
    p.add_argument("--compile-backend", metavar="NAME", help="inductor (default) or aot_eager")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..train.config import load_config
    from ..train.run import CONFIG_FILE
    from ..train.train import train

    overrides = run_overrides(args)
    if args.compile:
        overrides.append(f"compile={args.compile}")
    if args.compile_backend:
        overrides.append(f"compile_backend={args.compile_backend}")
    if args.train_all:
        overrides.append("train_all=true")
    config_path = args.config
    if config_path is None and args.resume:
        if not args.out:
            raise ValueError("--resume without a config file needs --out RUN_FOLDER")
        config_path = Path(args.out) / CONFIG_FILE
    config = load_config(config_path, overrides)
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 logs progress and reports
    if not main_rank:
        logging.getLogger().setLevel(logging.WARNING)
    progress = train(config, resume=args.resume, progress_bar=not args.no_progress, dist_timeout_s=args.dist_timeout)
    if not main_rank:
        return 0
    checkpoint = Path(config.out) / "best.safetensors"
    if config.train_all:
        print(
            f"trained on every case of the split, no validation: epoch {progress.epoch} kept; checkpoint {checkpoint}"
        )
    else:
        print(
            f"best validation {config.select_metric} {progress.best_metric:.4f} at epoch {progress.best_epoch}; "
            f"checkpoint {checkpoint}"
        )
    return 0
