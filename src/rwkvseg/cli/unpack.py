"""`rwkvseg unpack`: the parts of `rwkvseg pack` -> the run folder, checked part by part and file by file
(rwkvseg.train.travel.unpack_run)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("unpack", help="restore a run folder from the parts of rwkvseg pack (checked by sha256)")
    p.add_argument("parts", help="folder holding the parts and their manifest (or the manifest file)")
    p.add_argument("run", help="run folder to create (must not exist, or be empty)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..train.travel import read_manifest, unpack_run

    manifest, _ = read_manifest(args.parts)
    dest = unpack_run(args.parts, args.run)
    progress = manifest["progress"]
    print(
        f"unpacked run {manifest['run']} (epoch {progress['epoch']} of {progress['epochs']}) into {dest}; "
        f"continue it with: rwkvseg train --resume --out {dest} [--data DATASET]"
    )
    return 0
