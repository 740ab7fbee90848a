"""The `rwkvseg` command: one entry point, one module per subcommand in this package.

Each command module has `add_parser(subparsers)` and `run(args)`, a thin call of a plain function of the Python
API; heavy imports happen inside `run`, so `rwkvseg --help` starts fast.
"""

from __future__ import annotations

import argparse
import logging
import sys

from . import bench, compact2d, demo, evaluate, federate, models, predict, preprocess, serve, split, synthetic3d, train

COMMANDS = (models, demo, bench, compact2d, preprocess, train, federate, split, synthetic3d, predict, evaluate, serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rwkvseg", description="Medical image segmentation with RWKV models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError) as err:
        print(f"rwkvseg: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
