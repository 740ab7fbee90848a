"""`rwkvseg compare`: two evaluations of the same cases, case by case (rwkvseg.eval.compare)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="compare two evaluations of the same cases: mean difference, bootstrap and t CIs, Wilcoxon p, wins",
        description="B against A for every metric both evaluations hold: the mean difference B - A over the cases, "
        "its paired bootstrap confidence interval (BCa) and its Student's t interval (over few cases or groups the "
        "bootstrap's is too narrow: read the t interval), the two-sided Wilcoxon signed-rank p-value and the cases "
        "each one wins; with several regions also their mean Dice. With --groups the bootstrap resamples whole groups, "
        "the t interval takes a cluster-robust error over them, and the test and the wins count the groups' mean "
        "differences.",
    )
    p.add_argument("a", help="evaluation A: the --out folder of `rwkvseg evaluate`, or its per_case.csv")
    p.add_argument("b", help="evaluation B, of the same cases")
    p.add_argument("--names", nargs=2, metavar=("A", "B"), help="names for the table (default: A and B's folders)")
    p.add_argument(
        "--metrics",
        nargs="+",
        default=None,
        metavar="METRIC",
        help="metrics to compare: dice, iou, precision, recall, specificity, hd95 (default: dice hd95)",
    )
    p.add_argument("--confidence", type=float, default=0.95, help="confidence level of the intervals (0.95)")
    p.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples (10000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (0)")
    p.add_argument(
        "--groups",
        metavar="CSV",
        help="a CSV with the columns case and group (e.g. the video sequence of each frame: "
        "splits/cvc_clinicdb_sequences.csv): resample and test whole groups, whose cases are not independent",
    )
    p.add_argument("--out", help="also write the comparison as JSON to this file")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier `rwkvseg compare --out` file")
    p.set_defaults(func=run)


def _check_out(out: Path, inputs: list[Path], overwrite: bool) -> None:
    from ..files import check_apart, check_json_replaceable

    check_apart(out, inputs)
    if out.is_dir():
        raise IsADirectoryError(f"--out {out} is a folder; give a .json file to write")
    check_json_replaceable(out, overwrite, _is_comparison, "a comparison")


def _is_comparison(data: object) -> bool:
    return isinstance(data, dict) and data.get("written_by") == "rwkvseg compare"


def run(args: argparse.Namespace) -> int:
    from ..eval.compare import (
        DEFAULT_METRICS,
        compare_evaluations,
        comparison_record,
        comparison_table,
        per_case_path,
        read_groups,
        read_per_case,
    )
    from ..files import write_json

    paths = [per_case_path(args.a), per_case_path(args.b)]
    groups_path = Path(args.groups) if args.groups else None
    out = Path(args.out) if args.out else None
    if out is not None:
        _check_out(out, [*paths, *([groups_path] if groups_path else [])], args.overwrite)
    a, b = (read_per_case(p) for p in paths)
    groups = read_groups(groups_path) if groups_path else None
    metrics = tuple(args.metrics or DEFAULT_METRICS)
    comparisons = compare_evaluations(a, b, metrics, args.confidence, args.resamples, args.seed, groups)
    names = tuple(args.names) if args.names else tuple(p.parent.name or str(p) for p in paths)
    if names[0] == names[1]:
        names = ("A", "B")
    print("\n".join(comparison_table(comparisons, *names, args.confidence)))
    if out is not None:
        record = comparison_record(comparisons, a, b, names, args.confidence, args.resamples, args.seed, groups_path)
        write_json(out, record)
    return 0
