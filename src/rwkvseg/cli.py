"""The `rwkvseg` command: one entry point, a thin subcommand for each pipeline stage."""

from __future__ import annotations

import argparse
import logging
import sys


def _cmd_models(args: argparse.Namespace) -> int:
    from .bench.table import format_table
    from .models import list_models
    from .released import released_models

    print("architectures (create_model / model.name):")
    print("  " + ", ".join(list_models()))
    released = released_models()
    print("\nreleased models (rwkvseg predict --model NAME INPUT --out OUT):")
    if not released:
        print("  none installed")
        return 0
    rows = [
        {"name": m.name, "architecture": m.architecture, "dataset": m.dataset, "split": m.split, **m.metrics}
        for m in released
    ]
    metrics = list(dict.fromkeys(k for m in released for k in m.metrics))
    columns = [("name", "name"), ("architecture", "architecture"), ("dataset", "dataset"), ("split", "split")]
    print(format_table(rows, columns + [(k, k) for k in metrics]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rwkvseg", description="Medical image segmentation with RWKV models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("models", help="list the registered architectures and the released models")
    p.set_defaults(func=_cmd_models)

    from .bench.cli import add_bench_parser

    add_bench_parser(sub)

    from .data.cli_compact import add_compact_parser

    add_compact_parser(sub)

    from .data.cli3d import add_preprocess_parser

    add_preprocess_parser(sub)

    from .eval.cli_evaluate import add_evaluate_parser
    from .infer.cli_predict import add_predict_parser
    from .train.cli import add_train_parsers

    add_train_parsers(sub)
    add_predict_parser(sub)
    add_evaluate_parser(sub)
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
