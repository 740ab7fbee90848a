"""`rwkvseg compact2d`: a resized copy of a 2D dataset for shipping (rwkvseg.data.compact2d.export_compact)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compact2d", help="write a resized copy of a 2D dataset (same names, generic layout)")
    p.add_argument("source", help="dataset folder (any layout rwkvseg reads)")
    p.add_argument("destination", help="new folder for the copy")
    p.add_argument("--size", type=int, default=256, help="side of the square copies (default 256)")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality of the images (default 95)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..data.compact2d import export_compact

    summary = export_compact(args.source, args.destination, args.size, args.quality, args.overwrite)
    groups = list(summary.groups)
    print(f"{summary.cases} cases, groups {groups}, {summary.bytes / 1e6:.1f} MB in {summary.destination}")
    return 0
