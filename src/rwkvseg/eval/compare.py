"""Two evaluations of the same cases, compared case by case (`rwkvseg compare`).

Each evaluation is a `per_case.csv` written by `rwkvseg evaluate` (or its folder). For every metric both hold, the
comparison gives the mean of each, the mean difference B - A over the cases where both are defined, two confidence
intervals of it (a paired bootstrap, BCa with scipy.stats.bootstrap over the per-case differences, and Student's t),
the two-sided Wilcoxon signed-rank p-value (scipy.stats.wilcoxon) and how many cases each one wins. With several
Dice columns (the regions of a 3D evaluation, the classes of a 2D one) it adds their per-case mean, the number
cross-validation tables report. On 18 BraTS cases a difference of 0.01 mean Dice is well inside the noise; this
says how far inside.

Cases are not always independent: the frames of one CVC-ClinicDB video sequence are near-copies of each other, so
126 frames from 7 sequences are closer to 7 samples than to 126. Given each case's group (`read_groups`), the
interval resamples whole groups (a cluster bootstrap: BCa over the groups' sums and case counts, the statistic still
the mean over cases), the t interval takes a cluster-robust standard error with t on groups - 1 degrees of freedom,
and the Wilcoxon test and the wins count the groups' mean differences.

Why two intervals: a bootstrap over few units is too narrow. Simulated with a known difference
(`scripts/interval_coverage.py`, 400 draws a scenario, session 56; `docs/metrics.md`), the 95 % BCa interval held
it in 85.3 % of the draws over 7 groups of 10-25 cases (CVC-ClinicDB's 7 validation sequences), 90.5 % over 20
groups and 90.0 % over 18 independent cases with heavy-tailed differences (the BraTS 2018 cross-validation), the t
interval in 97.0 %, 96.5 % and 95.3 %. With a few large failures among 18 cases neither holds
(78.0 % and 80.5 %). Read the t interval over few units; where the two disagree on whether zero is inside, the cases
do not settle the sign.
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..data.splits import read_case_labels
from .evaluate import PER_CASE_FILE

# metric name -> whether a higher value is better; the columns of per_case.csv are <metric> (2D) or
# <region>_<metric> (3D)
METRICS = {"dice": True, "iou": True, "precision": True, "recall": True, "specificity": True, "hd95": False}
DEFAULT_METRICS = ("dice", "hd95")
MEAN_DICE = "mean dice"  # per case over the regions (3D) or classes (2D)


@dataclass(frozen=True)
class PairedComparison:
    """One metric of two evaluations over the cases where both define it; difference = mean of (B - A)."""

    column: str
    metric: str
    higher_is_better: bool
    cases: int
    mean_a: float
    mean_b: float
    difference: float
    ci_low: float
    ci_high: float
    p_value: float  # two-sided Wilcoxon signed-rank; 1.0 when every difference is 0, nan below 2 cases (groups)
    b_better: int  # cases, or groups where groups were given
    ties: int
    a_better: int
    groups: int = 0  # the groups among these cases that were resampled and tested as units; 0: each case is one
    t_low: float = math.nan  # Student's t interval of the difference (cluster-robust over groups; _t_interval)
    t_high: float = math.nan


@dataclass(frozen=True)
class PerCase:
    """The metric columns of one per_case.csv, by case name (nan where a metric is undefined)."""

    path: Path
    cases: tuple[str, ...]
    columns: dict[str, np.ndarray]


def per_case_path(source: str | Path) -> Path:
    """source itself when it is a file, else its per_case.csv; FileNotFoundError saying how to write one."""
    source = Path(source)
    path = source / PER_CASE_FILE if source.is_dir() else source
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: give a per_case.csv or the folder of `rwkvseg evaluate PRED GT --out FOLDER`"
        )
    return path


def metric_of(column: str) -> str | None:
    """The metric of a per_case.csv column (`dice`, `WT_dice` -> dice), None for other columns (counts, flags)."""
    name = column.rsplit("_", 1)[-1]
    return name if name in METRICS else None


def read_per_case(source: str | Path) -> PerCase:
    """The metric columns of an evaluation; ValueError naming the file when it has no case column, a case twice
    or a value that is not a number. A multi-class 2D evaluation (a `class` column, one row per case and class)
    gives one column per class and metric, `<class>_<metric>`."""
    path = per_case_path(source)
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or "case" not in rows[0]:
        raise ValueError(f"{path} has no rows with a 'case' column: is it a per_case.csv from `rwkvseg evaluate`?")
    keys = [(row["case"], row.get("class", "")) for row in rows]
    if twice := sorted({k[0] for k, n in Counter(keys).items() if n > 1}):
        raise ValueError(f"{path} lists cases more than once ({twice[:3]}); evaluate each case once")
    cases = tuple(dict.fromkeys(k[0] for k in keys))  # in file order
    index = {c: i for i, c in enumerate(cases)}
    classes = tuple(dict.fromkeys(k[1] for k in keys))  # ("",) without a class column
    columns: dict[str, np.ndarray] = {}
    for column in rows[0]:
        if metric_of(column) is None:
            continue
        for k in classes:
            values = np.full(len(cases), math.nan)  # a case without a row of this class: undefined
            for row, (case, cls) in zip(rows, keys, strict=True):
                if cls != k or row[column] == "":
                    continue
                try:
                    values[index[case]] = float(row[column])
                except ValueError:
                    raise ValueError(f"{path}: column {column!r} holds a value that is not a number") from None
            columns[f"{k}_{column}" if k else column] = values
    return PerCase(path, cases, columns)


def read_groups(source: str | Path) -> dict[str, str]:
    """Each case's group from a CSV with the columns `case` and `group` (e.g. the video sequence of each frame),
    checked as every case-labelling file is (rwkvseg.data.splits.read_case_labels)."""
    return read_case_labels(source, "group")


def _paired(
    column: str,
    a: np.ndarray,
    b: np.ndarray,
    confidence: float,
    resamples: int,
    seed: int,
    groups: np.ndarray | None = None,
) -> PairedComparison:
    from scipy import stats

    metric = MEAN_DICE if column == MEAN_DICE else metric_of(column)
    higher = METRICS["dice" if column == MEAN_DICE else metric]
    both = np.isfinite(a) & np.isfinite(b)
    a, b = a[both], b[both]
    d = b - a  # [cases]
    units, samples, statistic = d, (d,), np.mean  # what is resampled and tested: each case
    sums, counts = d, np.ones_like(d)  # [units]: each unit's sum of differences and its cases
    if groups is not None:  # each group: its cases' sum and count, resampled together
        _, first, index = np.unique(groups[both], return_index=True, return_inverse=True)
        index = np.argsort(np.argsort(first))[index]  # groups numbered in the order their cases come
        sums = np.bincount(index, weights=d, minlength=len(first))  # [groups]
        counts = np.bincount(index, minlength=len(first)).astype(float)  # [groups]
        units, samples, statistic = sums / counts, (sums, counts), _mean_over_cases  # units: each group's mean
    sign = 1 if higher else -1
    nan = math.nan
    ci_low = ci_high = p = t_low = t_high = nan
    if len(units) >= 2:
        t_low, t_high = _t_interval(sums, counts, confidence)
        if np.ptp(units) == 0:  # one difference for every case or group: no spread to resample
            ci_low = ci_high = float(d.mean())
        else:
            rng = np.random.default_rng(seed)
            res = stats.bootstrap(
                samples,
                statistic,
                paired=groups is not None,
                confidence_level=confidence,
                n_resamples=resamples,
                rng=rng,
            )
            ci_low, ci_high = float(res.confidence_interval.low), float(res.confidence_interval.high)
        p = float(stats.wilcoxon(units).pvalue) if np.any(units != 0) else 1.0
    return PairedComparison(
        column=column,
        metric=metric,
        higher_is_better=higher,
        cases=len(d),
        mean_a=float(a.mean()) if len(a) else nan,
        mean_b=float(b.mean()) if len(b) else nan,
        difference=float(d.mean()) if len(d) else nan,
        ci_low=ci_low,
        ci_high=ci_high,
        p_value=p,
        b_better=int(np.sum(sign * units > 0)),
        ties=int(np.sum(units == 0)),
        a_better=int(np.sum(sign * units < 0)),
        groups=len(units) if groups is not None else 0,
        t_low=t_low,
        t_high=t_high,
    )


def _t_interval(sums: np.ndarray, counts: np.ndarray, confidence: float) -> tuple[float, float]:
    """Student's t interval of the mean over cases, sum(sums) / sum(counts), from G >= 2 units (each case, or each
    group of cases: sums and counts [G]): the standard error from the units' residuals with the small-sample factor
    G / (G - 1) (a cluster-robust CR1 error), and t with G - 1 degrees of freedom. With one case a unit it is the
    one-sample t interval (scipy.stats.ttest_1samp's); with equal groups, the t interval over the groups' means."""
    from scipy import stats

    g, total = len(sums), counts.sum()
    mean = sums.sum() / total
    scores = (sums - counts * mean) / total  # [G]: each unit's share of the deviation of the mean
    half = float(stats.t.ppf(0.5 + confidence / 2, g - 1)) * math.sqrt(g / (g - 1) * float(np.sum(scores**2)))
    return float(mean - half), float(mean + half)


def _mean_over_cases(sums: np.ndarray, counts: np.ndarray, axis: int = -1) -> np.ndarray:
    """The mean difference over the cases of resampled groups, from each group's sum and count."""
    return sums.sum(axis=axis) / counts.sum(axis=axis)


def compare_evaluations(
    a: PerCase,
    b: PerCase,
    metrics: Sequence[str] = DEFAULT_METRICS,
    confidence: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
    groups: Mapping[str, str] | None = None,
) -> list[PairedComparison]:
    """Every column of the given metrics that both evaluations hold, B against A, matched by case name; ValueError
    when they score different cases or share no such column. With groups (case -> group, `read_groups`), whole
    groups are resampled and tested; ValueError when a case has no group or all cases share one."""
    if unknown := [m for m in metrics if m not in METRICS]:
        raise ValueError(f"unknown metrics {unknown}; choose from {sorted(METRICS)}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence {confidence} must be between 0 and 1, e.g. 0.95")
    if resamples < 100:
        raise ValueError(f"resamples {resamples}: use at least 100 bootstrap resamples (10000 by default)")
    only_a, only_b = sorted(set(a.cases) - set(b.cases)), sorted(set(b.cases) - set(a.cases))
    if only_a or only_b:
        raise ValueError(
            f"{a.path} and {b.path} score different cases ({len(only_a)} only in the first, e.g. {only_a[:3]}; "
            f"{len(only_b)} only in the second, e.g. {only_b[:3]}): evaluate both against the same ground truth"
        )
    group_of = None
    if groups is not None:
        if missing := [c for c in a.cases if c not in groups]:
            raise ValueError(
                f"{len(missing)} of the {len(a.cases)} cases have no group (e.g. {missing[:3]}): list every case "
                "of the evaluations in the groups file"
            )
        group_of = np.array([groups[c] for c in a.cases])  # [cases], in a's order
        if len(set(group_of)) < 2:
            raise ValueError(
                f"all {len(a.cases)} cases are in one group ({str(group_of[0])!r}): nothing to resample between "
                "groups; compare without groups or give each independent unit its own group"
            )
    position = {c: i for i, c in enumerate(b.cases)}
    order = [position[c] for c in a.cases]  # b's rows in a's case order
    shared = [c for c in a.columns if c in b.columns and metric_of(c) in metrics]
    if not shared:
        raise ValueError(
            f"{a.path} and {b.path} share no column of the metrics {list(metrics)} "
            f"(first: {sorted(a.columns)}, second: {sorted(b.columns)})"
        )
    pairs = {c: (a.columns[c], b.columns[c][order]) for c in shared}
    dice = [c for c in shared if metric_of(c) == "dice"]
    if len(dice) > 1:  # regions: their per-case mean, undefined where one region is
        pairs[MEAN_DICE] = tuple(np.mean([pairs[c][i] for c in dice], axis=0) for i in (0, 1))  # (A, B)
    return [_paired(c, x, y, confidence, resamples, seed, group_of) for c, (x, y) in pairs.items()]


def comparison_table(comparisons: Sequence[PairedComparison], name_a: str, name_b: str, confidence: float) -> list[str]:
    """A Markdown table of the comparisons, one row per column; with groups, the intervals, the test and the wins
    are over groups (the header says so and each row gives its cases and groups)."""
    level = f"{confidence:.0%}"
    grouped = any(c.groups for c in comparisons)
    over, unit = (" over groups", "groups ") if grouped else ("", "")
    lines = [
        f"| metric | cases{' (groups)' if grouped else ''} | {name_a} | {name_b} | {name_b} - {name_a} | "
        f"{level} CI, bootstrap{over} | {level} CI, t{over} | Wilcoxon p{over} | "
        f"{unit}{name_b} better / tie / {name_a} better |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in comparisons:
        cases = f"{c.cases} ({c.groups})" if grouped else f"{c.cases}"
        lines.append(
            f"| {c.column} | {cases} | {c.mean_a:.4f} | {c.mean_b:.4f} | {c.difference:+.4f} | "
            f"[{c.ci_low:+.4f}, {c.ci_high:+.4f}] | [{c.t_low:+.4f}, {c.t_high:+.4f}] | {c.p_value:.3g} | "
            f"{c.b_better} / {c.ties} / {c.a_better} |"
        )
    return lines


def comparison_record(
    comparisons: Sequence[PairedComparison],
    a: PerCase,
    b: PerCase,
    names: tuple[str, str],
    confidence: float,
    resamples: int,
    seed: int,
    groups: str | Path | None = None,
) -> dict[str, Any]:
    """The JSON record `rwkvseg compare --out` writes; groups: the groups file the comparison resampled by."""
    unit = "group" if groups is not None else "case"
    return {
        "written_by": "rwkvseg compare",
        "a": {"name": names[0], "per_case": str(a.path)},
        "b": {"name": names[1], "per_case": str(b.path)},
        "difference": "mean over cases of (b - a)",
        "confidence": confidence,
        "groups": None if groups is None else str(groups),
        "bootstrap": {"method": "BCa", "resamples": resamples, "seed": seed, "resampled": unit},
        "t_interval": "Student's t with "
        + (
            "groups - 1 degrees of freedom, cluster-robust (CR1) standard error over the groups"
            if groups is not None
            else "cases - 1 degrees of freedom (the one-sample t interval)"
        ),
        "test": "two-sided Wilcoxon signed-rank (scipy.stats.wilcoxon) over "
        + ("each group's mean difference" if groups is not None else "the per-case differences"),
        "metrics": [as_json(c) for c in comparisons],
    }


def as_json(comparison: PairedComparison) -> dict[str, Any]:
    """A comparison as a JSON object: undefined numbers (nan) as null, so strict JSON readers take the file."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in asdict(comparison).items()}
