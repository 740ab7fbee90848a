"""Train/validation(/test) splits kept in a JSON file, so every result names the exact cases behind it.

File format (format 1):
    {"format": 1, "method": "random" | "kfold" | "groups", "seed": 0, "val_fraction": 0.2,
     "test_fraction": 0.0, "stratified": true, "n_cases": 900,
     "folds": [{"train": [...], "val": [...]}, ...], "test": [...]}
3D splits made by split_volumes also name their "dataset", and their "strata" file when stratified by one.
Cases are ids from dataset discovery (file stems, prefixed by their group when a dataset has several groups).
Splits are deterministic: the same cases, labels and seed give the same file on every machine.
"""

from __future__ import annotations

import csv
import json
import random
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..files import check_json_replaceable, write_json

SPLIT_FORMAT = 1
SPLIT_FILE = "split.json"  # the copy in a run folder
SPLIT_METHODS = ("random", "kfold", "groups")
# Groups whose name says which subset they are (an official split shipped with the data).
TRAIN_GROUPS = ("train", "training")
VAL_GROUPS = ("val", "valid", "validation")
TEST_GROUPS = ("test", "testing")


@dataclass(frozen=True)
class Split:
    """One fold: the cases to train on and to validate on (and a held-out test list, if any)."""

    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...] = ()


def _strata(cases: Sequence[str], labels: Sequence[str | None] | None) -> list[list[str]]:
    if labels is None:
        return [sorted(cases)]
    by_label: dict[str, list[str]] = {}
    for case, label in zip(cases, labels, strict=True):
        by_label.setdefault(str(label), []).append(case)
    return [sorted(by_label[k]) for k in sorted(by_label)]


def make_split(
    cases: Sequence[str],
    labels: Sequence[str | None] | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    folds: int | None = None,
    test_fraction: float = 0.0,
) -> dict[str, Any]:
    """A split document (see the module docstring); stratified per label when labels are given.

    folds=None: one random train/val split with val_fraction; folds=k: k-fold cross-validation (every case is
    validated exactly once). test_fraction cases are held out first and appear in no fold.
    """
    if len(set(cases)) != len(cases):
        raise ValueError("case ids repeat; every case needs a unique id")
    if not 0 <= test_fraction < 1 or not 0 < val_fraction < 1:
        raise ValueError(f"fractions must be in [0, 1): val {val_fraction}, test {test_fraction}")
    if folds is not None and folds < 2:
        raise ValueError(f"k-fold needs folds >= 2, got {folds}")
    rng = random.Random(seed)
    test: list[str] = []
    strata = []
    for stratum in _strata(cases, labels):
        rng.shuffle(stratum)
        n_test = round(test_fraction * len(stratum))
        test += stratum[:n_test]
        strata.append(stratum[n_test:])
    if folds is None:
        val: list[str] = []
        for stratum in strata:
            val += stratum[: max(1, round(val_fraction * len(stratum)))] if len(stratum) > 1 else []
        remaining = [c for s in strata for c in s]
        fold_list = [{"train": sorted(set(remaining) - set(val)), "val": sorted(val)}]
    else:
        assigned: list[list[str]] = [[] for _ in range(folds)]
        offset = 0
        for stratum in strata:
            for i, case in enumerate(stratum):
                assigned[(i + offset) % folds].append(case)
            offset += len(stratum)  # continue the round-robin so small strata do not all land in fold 0
        remaining = [c for s in strata for c in s]
        fold_list = [
            {"train": sorted(set(remaining) - set(assigned[k])), "val": sorted(assigned[k])} for k in range(folds)
        ]
    if any(not f["train"] or not f["val"] for f in fold_list):
        raise ValueError(f"{len(cases)} cases are too few for this split; use more cases or a larger val fraction")
    return {
        "format": SPLIT_FORMAT,
        "method": "random" if folds is None else "kfold",
        "seed": seed,
        "val_fraction": val_fraction if folds is None else 1 / folds,
        "test_fraction": test_fraction,
        "stratified": labels is not None,
        "n_cases": len(cases),
        "folds": fold_list,
        "test": sorted(test),
    }


def split_from_groups(cases: Sequence[str], groups: Sequence[str]) -> dict[str, Any]:
    """The official split of a dataset shipped as train/ val/ (test/) folders."""
    subsets = {"train": TRAIN_GROUPS, "val": VAL_GROUPS, "test": TEST_GROUPS}
    by: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for case, group in zip(cases, groups, strict=True):
        name = group.rsplit("/", 1)[-1].lower()
        key = next((k for k, names in subsets.items() if name in names), None)
        if key is None:
            raise ValueError(
                f"case {case} is in group {group!r}, which names no subset "
                f"({', '.join(n for names in subsets.values() for n in names)}); use a random or k-fold split instead"
            )
        by[key].append(case)
    if not by["train"] or not by["val"]:
        raise ValueError("the dataset's folders hold no train or no val subset; use a random or k-fold split")
    return {
        "format": SPLIT_FORMAT,
        "method": "groups",
        "seed": None,
        "n_cases": len(cases),
        "folds": [{"train": sorted(by["train"]), "val": sorted(by["val"])}],
        "test": sorted(by["test"]),
    }


def _is_split(data: Any) -> bool:
    return isinstance(data, dict) and data.get("format") == SPLIT_FORMAT and "folds" in data


def write_split(path: str | Path, split: dict[str, Any], overwrite: bool = False) -> Path:
    path = Path(path)
    check_json_replaceable(path, overwrite, _is_split, "a split file")  # never another file of that name
    write_json(path, split, indent=1)
    return path


def read_split(path: str | Path, fold: int = 0, available: Sequence[str] | None = None) -> Split:
    """One fold of a split file; with available (the discovered case ids), every listed case must exist."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file {path} not found; write one with `rwkvseg split DATA --out {path}`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"split file {path} is not valid JSON ({err})") from None
    if (
        not isinstance(data, dict)
        or data.get("format") != SPLIT_FORMAT
        or not isinstance(data.get("folds"), list)
        or not data["folds"]
    ):
        raise ValueError(f"split file {path} is not an rwkvseg split (format {SPLIT_FORMAT} with a folds list)")
    if not 0 <= fold < len(data["folds"]):
        raise ValueError(f"split file {path} has folds 0..{len(data['folds']) - 1}, fold {fold} was asked for")
    entry = data["folds"][fold]
    entry = entry if isinstance(entry, dict) else {}
    lists = {"train": entry.get("train"), "val": entry.get("val"), "test": data.get("test", [])}
    for name, ids in lists.items():
        if not isinstance(ids, list) or not all(isinstance(i, str) and i for i in ids):
            raise ValueError(
                f"split file {path} fold {fold}: {name!r} must be a list of case ids (strings), got {ids!r:.80}; "
                "write the split again with `rwkvseg split`"
            )
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        if repeated:
            raise ValueError(f"split file {path} lists case(s) {repeated[:5]} twice in {name!r}; list each case once")
    split = Split(tuple(lists["train"]), tuple(lists["val"]), tuple(lists["test"]))
    if not split.train or not split.val:
        raise ValueError(f"split file {path} fold {fold} has an empty train or val list; every fold needs both")
    for a, b in (("train", "val"), ("test", "val"), ("test", "train")):
        overlap = set(lists[a]) & set(lists[b])
        if overlap:
            raise ValueError(
                f"split file {path} fold {fold} has cases in both {a} and {b}: {sorted(overlap)[:5]}; "
                "a case belongs to one subset"
            )
    if available is not None:
        missing = sorted((set(split.train) | set(split.val)) - set(available))
        if missing:
            raise ValueError(
                f"split file {path} names {len(missing)} cases not found in the dataset ({missing[:5]}); "
                "point to the dataset the split was made for, or write a new split"
            )
    return split


def prepare_split(
    run_dir: Path,
    cases: Sequence[str],
    labels: Sequence[Any],
    *,
    split_file: str | Path = "",
    fold: int = 0,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> Path:
    """The split file a run uses, kept in its folder: a copy of split_file (checked first), or one made from the
    seed (stratified when any label is known) on the first start and reused by resumes."""
    target = Path(run_dir) / SPLIT_FILE
    if split_file:
        source = Path(split_file)
        if source.resolve() != target.resolve():
            read_split(source, fold, cases)  # check before copying
            shutil.copyfile(source, target)
        return target
    if not target.exists():
        stratify = list(labels) if any(label is not None for label in labels) else None
        write_split(target, make_split(cases, stratify, val_fraction, seed))
    return target


def split_dataset(
    root: str | Path,
    *,
    val_fraction: float = 0.2,
    folds: int | None = None,
    test_fraction: float = 0.0,
    seed: int = 0,
    stratify: bool = True,
    official: bool = False,
    skip_non_images: bool = False,
) -> dict[str, Any]:
    """The split document of a 2D dataset folder: its official train/ val/ (test/) folders, or a seeded split
    (stratified by image labels such as the BUSI class when stratify and the layout has them)."""
    from .images2d import discover_pairs

    samples = discover_pairs(root, skip_non_images)
    cases = [s.case for s in samples]
    if official:
        doc = split_from_groups(cases, [s.group for s in samples])
    else:
        labels = [s.label for s in samples]
        strata = None if not stratify or all(label is None for label in labels) else labels
        doc = make_split(cases, strata, val_fraction, seed, folds, test_fraction)
    doc["dataset"] = str(root)
    return doc


def read_case_labels(path: str | Path, column: str) -> dict[str, str]:
    """Each case's value of `column` from a CSV file with the columns `case` and `column` (a case's stratum, its video
    sequence...); ValueError naming the file (and line) when it is missing or unreadable, lacks a column, or lists a
    case twice or without a value."""
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's byte-order mark
            reader = csv.DictReader(f)
            if not {"case", column} <= set(reader.fieldnames or ()):
                raise ValueError(f"{path} needs the columns case and {column} (a header line `case,{column}`)")
            rows = [(row["case"].strip(), (row[column] or "").strip()) for row in reader]
    except FileNotFoundError:
        raise ValueError(f"{path} not found: give a CSV of case,{column} for every case") from None
    except OSError as err:  # a folder, no permission
        raise ValueError(f"{path} cannot be read ({err.strerror}): give a CSV file of case,{column}") from None
    labels: dict[str, str] = {}
    for line, (case, label) in enumerate(rows, start=2):
        if not label:
            raise ValueError(f"{path} line {line}: case {case!r} has no {column}; give every case one")
        if case in labels:
            raise ValueError(f"{path} line {line}: case {case!r} is listed twice; list every case once")
        labels[case] = label
    return labels


def read_strata(path: str | Path, cases: Sequence[str]) -> list[str]:
    """The stratum of each case, in the order of cases, from a CSV file with the columns `case` and `stratum` (e.g.
    splits/brats2018_grades.csv: each BraTS case's grade); every case must be in it once, and nothing else."""
    strata = read_case_labels(path, "stratum")
    if missing := [c for c in cases if c not in strata]:
        raise ValueError(f"{path} has no stratum for the cases {missing[:5]} ({len(missing)}); list every case")
    if unknown := sorted(set(strata) - set(cases)):
        raise ValueError(
            f"{path} lists cases the dataset does not have: {unknown[:5]} ({len(unknown)}); is it its file?"
        )
    return [strata[c] for c in cases]


def split_volumes(
    root: str | Path,
    dataset: str = "",
    *,
    val_fraction: float = 0.2,
    folds: int | None = None,
    test_fraction: float = 0.0,
    seed: int = 0,
    strata: str | Path | None = None,
) -> dict[str, Any]:
    """The split document of a 3D dataset: a `rwkvseg preprocess` cache (its plans.json names the cases; dataset
    not needed) or a raw folder of the preset dataset (BraTS case folders, an MSD / nnU-Net raw dataset: the case
    ids preprocessing gives them). Volumes carry no class label, so it is stratified only by a strata file
    (read_strata: e.g. splits/brats2018_grades.csv, the grades of the BraTS 2018 cases), which the document names."""
    from .preprocess3d import PLANS_FILE, load_plans
    from .specs import resolve_spec
    from .volumes import discover_cases

    root = Path(root)
    if (root / PLANS_FILE).is_file():
        cases = list(load_plans(root)["cases"])
    elif not dataset:
        raise ValueError(
            f"{root} has no {PLANS_FILE}: name the raw 3D dataset's preset with --dataset (e.g. brats), or split the "
            "cache `rwkvseg preprocess` made of it"
        )
    else:
        cases = [c.case_id for c in discover_cases(root, resolve_spec(dataset, root=root))]
    labels = None if strata is None else read_strata(strata, cases)
    doc = make_split(cases, labels, val_fraction, seed, folds, test_fraction)
    doc["dataset"] = str(root)
    if strata is not None:
        doc["strata"] = str(strata)
    return doc
