"""Parsers of command-line values shared by several commands (not a command itself)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..data.specs import DATASETS  # a stdlib-only module: cheap at parser time


def device_name(name: str) -> str:
    """--device resolved and checked (rwkvseg.devices.resolve_device): `auto` -> cuda or cpu."""
    from ..devices import resolve_device

    return str(resolve_device(name, "--device"))


def ints(text: str, name: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        raise ValueError(f"{name} {text!r} must be comma-separated integers like 0,1,2,4") from None


def floats3(text: str, name: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        raise ValueError(f"{name} {text!r} must be comma-separated numbers like 1,1,1") from None
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or min(values) <= 0:
        raise ValueError(f"{name} {text!r} needs one or three positive numbers (mm, file axis order x,y,z)")
    return values


def regions(text: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """'WT=1,2,4;TC=1,4;ET=4' -> (("WT", (1, 2, 4)), ...)."""
    out = []
    for part in filter(None, text.split(";")):
        name, sep, values = part.partition("=")
        if not sep:
            raise ValueError(f"--regions part {part!r} must look like NAME=1,2,4")
        out.append((name.strip(), ints(values, "--regions")))
    return tuple(out)


def add_dataset_arguments(p: argparse.ArgumentParser, default: str | None = "brats") -> None:
    p.add_argument("--dataset", choices=DATASETS, default=default, help="dataset layout and label preset")
    p.add_argument("--modalities", help="model channel order, e.g. t1,t1ce,t2,flair (file suffixes / channel names)")
    p.add_argument("--labels", help="label values in the files, background first, e.g. 0,1,2,4")
    p.add_argument("--regions", help="evaluation regions, e.g. 'WT=1,2,4;TC=1,4;ET=4'")


def spec_from_args(args: argparse.Namespace, root: Path | None = None):
    """The DatasetSpec a command line asks for (presets, or an nnU-Net dataset.json under root)."""
    from ..data.specs import resolve_spec

    return resolve_spec(
        args.dataset,
        modalities=tuple(m.strip() for m in args.modalities.split(",")) if args.modalities else (),
        label_values=ints(args.labels, "--labels") if args.labels else (),
        regions=regions(args.regions) if args.regions else (),
        root=root,
    )


def add_set_argument(p: argparse.ArgumentParser, example: str) -> None:
    """--set KEY=VALUE (repeatable): a config setting on top of the file, e.g. example."""
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=f"{example} (repeatable)"
    )


def add_run_arguments(p: argparse.ArgumentParser, example: str, data_help: str) -> None:
    """--set, --data and --out of the commands that run a config (train, federate)."""
    add_set_argument(p, example)
    p.add_argument("--data", help=f"{data_help} (same as --set data.root=...)")
    p.add_argument("--out", help="run folder (same as --set out=...)")


def run_overrides(args: argparse.Namespace) -> list[str]:
    """The --set settings with --data and --out turned into the settings they stand for."""
    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.root={args.data}")
    if args.out:
        overrides.append(f"out={args.out}")
    return overrides
