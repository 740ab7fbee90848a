"""`rwkvseg bench ...` subcommands."""

from __future__ import annotations

import argparse


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="efficiency benchmarks (tables on screen, JSON out)")
    kinds = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")

    p = kinds.add_parser("wkv", help="Bi-WKV time and peak memory, forward and forward+backward")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--impl", action="append", help="implementations to compare (repeatable)")
    p.add_argument("--shapes", default=None, help="B,T,C;B,T,C... (default: the issue's shapes for the device)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None, help="write results here")
    p.set_defaults(func=_run_wkv)

    p = kinds.add_parser("wkv-accuracy", help="relative error of the O(T) path against the float64 brute force")
    p.add_argument("--json", default=None, help="write results here")
    p.add_argument("--long", action="store_true", help="also T = 262144 against a float64 run of the O(T) path")
    p.set_defaults(func=_run_wkv_accuracy)


def _run_wkv(args: argparse.Namespace) -> int:
    from .wkv import run_speed

    return run_speed(args)


def _run_wkv_accuracy(args: argparse.Namespace) -> int:
    from .wkv import run_accuracy

    return run_accuracy(args)
