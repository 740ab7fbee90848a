"""`rwkvseg pack`: a run folder -> numbered parts of at most --part-mib MiB and a manifest, for carrying the run to
another machine (rwkvseg.train.travel.pack_run; `rwkvseg unpack` restores it)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pack", help="pack what --resume needs of a run folder into parts of at most --part-mib MiB")
    p.add_argument("run", help="run folder (the --out of rwkvseg train)")
    p.add_argument("out", help="folder for the parts (NAME.tar.000, ...) and NAME.manifest.json")
    p.add_argument("--part-mib", type=float, default=16.0, metavar="MIB", help="largest part in MiB (default 16)")
    p.add_argument("--name", help="pack name (default: the run folder's name)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from ..train.travel import MiB, pack_run

    path = pack_run(args.run, args.out, args.part_mib, args.name)
    manifest = json.loads(path.read_text(encoding="utf-8"))
    parts, progress = manifest["parts"], manifest["progress"]
    rebuilt = [f["path"] for f in manifest["files"] if "header" in f]
    print(
        f"packed {args.run} (epoch {progress['epoch']} of {progress['epochs']}): {len(manifest['files'])} files, "
        f"{manifest['files_bytes'] / MiB:.2f} MiB, in {len(parts)} part(s) of {manifest['total_bytes'] / MiB:.2f} MiB: "
        f"{parts[0]['name']} .. {parts[-1]['name']} and {path.name} in {path.parent}"
    )
    if rebuilt:
        print(f"rebuilt from state.pt on unpack: {', '.join(rebuilt)}")
    for item in manifest["left_out"]:
        print(f"left out: {item['path']} ({item['why']})")
    return 0
