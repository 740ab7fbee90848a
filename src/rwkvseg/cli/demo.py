"""`rwkvseg demo`: the main job on built-in synthetic data (rwkvseg.demo.run_demo)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the main job on built-in synthetic data: train, predict, evaluate, report")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--data", default=None, help="a real 2D dataset folder instead of the synthetic lesions")
    p.add_argument("--minutes-2d", type=float, default=3.0, help="2D training budget in minutes (default 3)")
    p.add_argument("--minutes-3d", type=float, default=2.0, help="3D training budget in minutes (default 2)")
    p.add_argument("--size", type=int, default=64, help="2D network input side (default 64)")
    p.add_argument("--no-3d", action="store_true", help="skip the 3D part")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..demo import DemoConfig, run_demo

    cfg = DemoConfig(
        out=Path(args.out),
        data=Path(args.data) if args.data else None,
        minutes_2d=args.minutes_2d,
        minutes_3d=args.minutes_3d,
        size=args.size,
        with_3d=not args.no_3d,
        overwrite=args.overwrite,
    )
    report = run_demo(cfg)
    print(f"report: {report}")
    return 0
