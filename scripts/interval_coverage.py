"""How often `rwkvseg compare`'s two intervals hold the true difference: a simulation of paired per-case
differences with a known mean, each draw compared through `rwkvseg.eval.compare.compare_evaluations` (the bootstrap
BCa interval and the t interval, with and without groups), counting the draws whose interval holds the truth.

    python scripts/interval_coverage.py [--draws 400] [--resamples 1000] [--confidence 0.95] [--seed 0]
                                        [--json OUT.json]

Scenarios (every difference B - A of a Dice-like score, A drawn uniform in [0.6, 0.9]):
- groups G of 10-25 near-copies each, like CVC-ClinicDB's video sequences (7 in its validation split): each
  group's effect normal with sd 0.05 times 1 + an exponential draw (heavy tails), and each case its group's effect
  plus normal noise of sd 0.03; the true mean over cases is 0; compared with the groups given.
- independent cases n, like the 18 cases of the BraTS 2018 cross-validation, three shapes of difference: `heavy`
  (symmetric, the same scale mixture), `skewed` (0.05 x (exponential - 1)), `failures` (a tenth of the cases lose
  0.3 +- 0.1, the rest gain 0.03 +- 0.03; true mean -0.003).

Prints a table of coverage and mean width per scenario and interval; --json writes them with the settings (a new
file). Session 56's run with the defaults is in docs/metrics.md ("How far to trust an interval").
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from rwkvseg.bench.table import format_table
from rwkvseg.eval.compare import PerCase, compare_evaluations
from rwkvseg.files import write_json

GROUP_COUNTS = (4, 5, 7, 10, 15, 20, 30)
CASE_COUNTS = (5, 10, 18, 30, 100)
FAILURE_SHARE, FAILURE_LOSS, GAIN = 0.1, 0.3, 0.03


def heavy(rng: np.random.Generator, n: int) -> np.ndarray:
    """Symmetric, heavy-tailed: normal with sd 0.05 scaled by 1 + an exponential draw; mean 0."""
    return rng.normal(0, 0.05, n) * (1 + rng.standard_exponential(n))


def skewed(rng: np.random.Generator, n: int) -> np.ndarray:
    """Right-skewed (skewness 2): 0.05 x (exponential - 1); mean 0."""
    return 0.05 * (rng.standard_exponential(n) - 1)


def failures(rng: np.random.Generator, n: int) -> np.ndarray:
    """A tenth of the cases fail (lose 0.3 +- 0.1), the rest gain 0.03 +- 0.03."""
    failed = rng.random(n) < FAILURE_SHARE
    return np.where(failed, rng.normal(-FAILURE_LOSS, 0.1, n), rng.normal(GAIN, 0.03, n))


Shape = Callable[[np.random.Generator, int], np.ndarray]  # (rng, n) -> n differences
SHAPES: dict[str, tuple[Shape, float]] = {  # name -> (its draws, their true mean)
    "heavy": (heavy, 0.0),
    "skewed": (skewed, 0.0),
    "failures": (failures, (1 - FAILURE_SHARE) * GAIN - FAILURE_SHARE * FAILURE_LOSS),
}


def grouped_draw(rng: np.random.Generator, groups: int) -> tuple[np.ndarray, dict[str, str]]:
    """Differences [cases] of `groups` groups of 10-25 cases and each case's group."""
    sizes = rng.integers(10, 26, groups)
    effects = heavy(rng, groups)  # [groups]
    d = np.concatenate([e + rng.normal(0, 0.03, s) for e, s in zip(effects, sizes, strict=True)])  # [cases]
    group_of = {f"c{i}": f"g{g}" for i, g in enumerate(np.repeat(np.arange(groups), sizes))}
    return d, group_of


def covered(
    d: np.ndarray,
    groups: dict[str, str] | None,
    truth: float,
    args: argparse.Namespace,
    rng: np.random.Generator,
) -> tuple[bool, bool, float, float]:
    """(bootstrap holds truth, t holds truth, bootstrap width, t width) of one draw through compare_evaluations."""
    cases = tuple(f"c{i}" for i in range(len(d)))
    a = rng.uniform(0.6, 0.9, len(d))
    first = PerCase(Path("A"), cases, {"dice": a})
    second = PerCase(Path("B"), cases, {"dice": a + d})
    seed = int(rng.integers(2**31))
    (c,) = compare_evaluations(first, second, ("dice",), args.confidence, args.resamples, seed, groups)
    return (
        c.ci_low <= truth <= c.ci_high,
        c.t_low <= truth <= c.t_high,
        c.ci_high - c.ci_low,
        c.t_high - c.t_low,
    )


Draw = Callable[[], tuple[np.ndarray, dict[str, str] | None]]  # one draw: differences [cases], groups or None


def scenario(name: str, draw: Draw, truth: float, args: argparse.Namespace, rng: np.random.Generator) -> dict[str, Any]:
    """Coverage and mean width of both intervals over args.draws draws of one scenario."""
    results = np.array([covered(*draw(), truth, args, rng) for _ in range(args.draws)], dtype=float)  # [draws, 4]
    boot, t, boot_width, t_width = results.mean(axis=0)
    return {
        "scenario": name,
        "draws": args.draws,
        "bootstrap": float(boot),
        "t": float(t),
        "bootstrap_width": float(boot_width),
        "t_width": float(t_width),
    }


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    rng = np.random.default_rng(args.seed)
    rows = [scenario(f"{g} groups of 10-25 cases", partial(grouped_draw, rng, g), 0.0, args, rng) for g in args.groups]
    for shape, (make, truth) in SHAPES.items():
        for n in args.cases:
            rows.append(scenario(f"{n} cases, {shape}", lambda make=make, n=n: (make(rng, n), None), truth, args, rng))
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--draws", type=int, default=400, help="simulated comparisons per scenario (400)")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples per comparison (1000)")
    p.add_argument("--confidence", type=float, default=0.95, help="confidence level of both intervals (0.95)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--groups", type=int, nargs="+", default=list(GROUP_COUNTS), help="group counts to simulate")
    p.add_argument("--cases", type=int, nargs="+", default=list(CASE_COUNTS), help="case counts to simulate")
    p.add_argument("--json", type=Path, help="also write the rows and settings here (a new file)")
    args = p.parse_args(argv)
    if args.draws < 1:
        p.error(f"--draws {args.draws}: simulate at least one comparison per scenario")
    if min(args.groups + args.cases) < 2:
        p.error("--groups and --cases need at least 2 units each: an interval needs two")
    if args.json is not None and args.json.exists():
        p.error(f"--json {args.json} exists; choose a new file")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = run(args)
    shown = [{**r, **{k: f"{r[k]:.3f}" for k in ("bootstrap", "t")}} for r in rows]  # coverage to 3 decimals
    columns = [
        ("scenario", "scenario"),
        ("bootstrap", f"BCa holds the truth (of {args.confidence:.0%})"),
        ("t", "t holds it"),
        ("bootstrap_width", "mean width, BCa"),
        ("t_width", "mean width, t"),
    ]
    print(format_table(shown, columns))
    if args.json is not None:
        settings = {k: v for k, v in vars(args).items() if k != "json"}
        write_json(args.json, {"written_by": "scripts/interval_coverage.py", "settings": settings, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
