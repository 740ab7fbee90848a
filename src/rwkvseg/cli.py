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


def _cmd_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .demo import DemoConfig, run_demo

    cfg = DemoConfig(
        Path(args.out),
        Path(args.data) if args.data else None,
        args.minutes_2d,
        args.minutes_3d,
        args.size,
        not args.no_3d,
        args.overwrite,
    )
    report = run_demo(cfg)
    print(f"report: {report}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rwkvseg", description="Medical image segmentation with RWKV models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("models", help="list the registered architectures and the released models")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("demo", help="the main job on built-in synthetic data: train, predict, evaluate, report")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--data", default=None, help="a real 2D dataset folder instead of the synthetic lesions")
    p.add_argument("--minutes-2d", type=float, default=3.0, help="2D training budget in minutes (default 3)")
    p.add_argument("--minutes-3d", type=float, default=2.0, help="3D training budget in minutes (default 2)")
    p.add_argument("--size", type=int, default=64, help="2D network input side (default 64)")
    p.add_argument("--no-3d", action="store_true", help="skip the 3D part")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=_cmd_demo)

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
