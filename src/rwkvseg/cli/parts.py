"""`rwkvseg parts`: the parts of a pack with their state (ok, missing, damaged), or a copy of some of them with the
manifest, for sending a pack over several transfers (rwkvseg.train.travel.parts_status, copy_parts)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("parts", help="list the parts of a pack (ok / missing / damaged) or copy some of them")
    p.add_argument("parts", help="folder holding the parts and their manifest (or the manifest file)")
    p.add_argument("--copy", metavar="PARTS", help="copy these parts and the manifest, e.g. 0-3 or 0,2,5 (needs --to)")
    p.add_argument("--to", metavar="DIR", help="folder to copy into (existing files are never replaced)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..train.travel import MiB, copy_parts, manifest_parts, part_indices, parts_status, read_manifest

    manifest, path = read_manifest(args.parts)
    if args.copy or args.to:
        if not (args.copy and args.to):
            raise ValueError("--copy PARTS and --to DIR go together, e.g. --copy 0-3 --to OUT")
        copied = copy_parts(path, args.to, part_indices(args.copy, len(manifest_parts(manifest))))
        size = sum(p.stat().st_size for p in copied)
        print(f"copied {len(copied) - 1} part(s) and the manifest ({size / MiB:.2f} MiB) to {args.to}")
        return 0
    status = parts_status(path)
    for i, (part, state) in enumerate(status):
        print(f"{i:4d}  {part.name}  {part.size / MiB:8.2f} MiB  {state}")
    ok = sum(state == "ok" for _, state in status)
    print(f"{ok} of {len(status)} parts ok ({manifest['total_bytes'] / MiB:.2f} MiB) for run {manifest['run']}")
    return 0 if ok == len(status) else 1
