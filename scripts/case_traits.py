"""Which cases a change wins or loses, beside what they hold: the per-case difference of one metric between two
evaluations of the same cases, set against each case's reference composition read from its label file, with the
Spearman rank correlation of the difference with each trait over the cases.

Usage:
    python scripts/case_traits.py A B DATA [--dataset brats] [--metric TC_dice] [--json OUT.json]

A and B: `rwkvseg evaluate` outputs (their folders or per_case.csv files; e.g. `scripts/cv_eval.py`'s
OUT/<variant>/all/eval or the committed `docs/campaigns/*/per_case/*.csv`). DATA: the dataset's case folders with
their label files (e.g. ../shared/data/brats2018_4mod_2mm), read in place; --dataset names its spec (`brats`, the
default, or another preset of rwkvseg.data.specs). The traits of a case, on its label file's grid: the voxels of
each region (`WT_voxels`, ...) and, for a region made of several labels, the share of each label in it (`1_in_TC`:
label 1's voxels over TC's; undefined where the region is empty). The difference is B - A. On screen: every case
sorted by the difference, then each trait's Spearman rho and two-sided p-value (scipy.stats.spearmanr) over the cases
where both are defined; --json writes both. A case of A or B missing from the other or from DATA: one error line and
exit status 2.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from rwkvseg.bench.table import format_table
from rwkvseg.data.specs import DATASETS, DatasetSpec, dataset_spec
from rwkvseg.data.volumes import discover_cases, read_volume
from rwkvseg.eval.compare import read_per_case
from rwkvseg.files import write_json


class Refused(Exception):
    """An input the analysis cannot run from: one line, no traceback."""


def case_traits(data: Path, spec: DatasetSpec, cases: list[str]) -> dict[str, dict[str, float]]:
    """{case: {trait: value}} for the given cases, from their label files under data."""
    found = {c.case_id: c for c in discover_cases(data, spec)}
    if missing := [c for c in cases if c not in found]:
        raise Refused(f"{data} holds no labelled case {missing[:3]} of the evaluations; give the dataset they scored")
    traits: dict[str, dict[str, float]] = {}
    for case_id in cases:
        values = read_volume(found[case_id].label).array  # label values as in the file, [K, J, I]
        counts = {int(v): int(n) for v, n in zip(*np.unique(values, return_counts=True), strict=True)}
        row: dict[str, float] = {}
        for name, labels in spec.regions:
            voxels = sum(counts.get(int(v), 0) for v in labels)
            row[f"{name}_voxels"] = voxels  # an int: shown whole
            if len(labels) > 1:
                for v in labels:
                    row[f"{v}_in_{name}"] = counts.get(int(v), 0) / voxels if voxels else math.nan
        traits[case_id] = row
    return traits


def correlations(difference: dict[str, float], traits: dict[str, dict[str, float]]) -> list[dict[str, float | str]]:
    """Per trait: Spearman's rho of the difference with it, its two-sided p-value and the cases both define."""
    out: list[dict[str, float | str]] = []
    for trait in next(iter(traits.values())):
        pairs = [(difference[c], t[trait]) for c, t in traits.items() if math.isfinite(t[trait])]
        pairs = [(d, t) for d, t in pairs if math.isfinite(d)]
        rho, p = spearmanr(*zip(*pairs, strict=True)) if len(pairs) >= 3 else (math.nan, math.nan)
        out.append({"trait": trait, "rho": float(rho), "p": float(p), "cases": len(pairs)})
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("a", help="evaluation A: an `rwkvseg evaluate` folder or its per_case.csv")
    p.add_argument("b", help="evaluation B of the same cases (the difference is B - A)")
    p.add_argument("data", type=Path, help="the dataset's case folders with label files")
    p.add_argument("--dataset", default="brats", choices=[d for d in DATASETS if d != "nnunet"], help="its spec")
    p.add_argument("--metric", default="TC_dice", help="a per_case.csv column (default TC_dice)")
    p.add_argument("--json", type=Path, help="also write the table and the correlations here (a new file)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.json is not None and args.json.exists():
            raise Refused(f"--json {args.json} exists; give a new file (nothing is overwritten)")
        a, b = read_per_case(args.a), read_per_case(args.b)
        if set(a.cases) != set(b.cases):
            raise Refused(f"{a.path} and {b.path} score different cases; compare evaluations of the same cases")
        for ev in (a, b):
            if args.metric not in ev.columns:
                raise Refused(f"{ev.path} has no column {args.metric!r}; choose one of {', '.join(ev.columns)}")
        cases = sorted(a.cases)
        value = {name: dict(zip(ev.cases, ev.columns[args.metric], strict=True)) for name, ev in (("a", a), ("b", b))}
        difference = {c: float(value["b"][c] - value["a"][c]) for c in cases}
        traits = case_traits(args.data, dataset_spec(args.dataset), cases)
    except (Refused, ValueError, FileNotFoundError) as err:
        print(f"case_traits.py: error: {err}", file=sys.stderr)
        return 2
    names = list(next(iter(traits.values())))
    rows = [
        {"case": c, "a": value["a"][c], "b": value["b"][c], "b - a": difference[c], **traits[c]}
        for c in sorted(cases, key=lambda c: difference[c])
    ]
    print(format_table(rows, [(k, k) for k in ("case", "a", "b", "b - a", *names)]))
    found = correlations(difference, traits)
    print(f"\nSpearman rank correlation of {args.metric} (B - A) with each trait, over the cases:")
    print(format_table(found, [(k, k) for k in ("trait", "rho", "p", "cases")]))
    if args.json is not None:
        write_json(
            args.json, {"a": str(a.path), "b": str(b.path), "metric": args.metric, "cases": rows, "correlations": found}
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
