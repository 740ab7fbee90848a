"""Which cases belong to which site: a sites file, checked against the dataset, and two ways to make one.

File format (format 1, JSON):
    {"format": 1, "method": "institution" | "random" | "manual", "seed": 0,
     "sites": {"CBICA": ["Brats18_CBICA_ABM_1", ...], "TCIA01": {"train": [...], "val": [...]}, ...}}
A site is a list of case ids (its train/validation split is then made from the run's seed and val_fraction) or a
table with its own train and val lists. A case belongs to at most one site; cases of the dataset in no site are
not used. BraTS 2018 case ids name their institution (Brats18_<institution>_<patient>_<scan>): institution_sites
groups them; any dataset can be split into N seeded sites of near-equal size (random_sites).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data.splits import make_split
from ..files import write_json

SITES_FORMAT = 1
OTHER_SITE = "other"
_BRATS_ID = re.compile(r"^Brats\d*_([A-Za-z0-9]+)_")
_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class Site:
    """One site's cases: trained on locally (train) and scored locally (val)."""

    name: str
    train: tuple[str, ...]
    val: tuple[str, ...]


def institution(case_id: str) -> str:
    """The institution a BraTS case id names: Brats18_CBICA_ABM_1 -> CBICA, Brats18_2013_10_1 -> 2013."""
    match = _BRATS_ID.match(case_id)
    if match is None:
        raise ValueError(
            f"case id {case_id!r} does not name an institution (BraTS ids look like Brats18_CBICA_ABM_1); "
            "use random sites (--by random) or write the sites file by hand"
        )
    return match.group(1)


def institution_sites(cases: Sequence[str], min_cases: int = 2) -> dict[str, list[str]]:
    """Cases grouped by the institution in their BraTS id; institutions with fewer than min_cases cases (too few
    to train and validate on) are pooled into one site named "other" (kept only if it reaches min_cases too)."""
    groups: dict[str, list[str]] = {}
    for case in sorted(cases):
        groups.setdefault(institution(case), []).append(case)
    sites = {name: members for name, members in sorted(groups.items()) if len(members) >= min_cases}
    small = sorted(c for name, members in groups.items() if len(members) < min_cases for c in members)
    if small:
        if len(small) < min_cases:
            raise ValueError(
                f"{len(small)} case(s) of small institutions ({', '.join(small)}) make no site of {min_cases} cases; "
                "lower --min-cases or write the sites file by hand"
            )
        if OTHER_SITE in sites:
            raise ValueError(f"an institution is named {OTHER_SITE!r}; write the sites file by hand")
        sites[OTHER_SITE] = small
    return sites


def random_sites(cases: Sequence[str], num_sites: int, seed: int = 0) -> dict[str, list[str]]:
    """A seeded split of the cases into num_sites sites of near-equal size, named site1 .. siteN."""
    if num_sites < 1 or num_sites > len(cases):
        raise ValueError(f"cannot split {len(cases)} cases into {num_sites} sites; choose 1 .. {len(cases)} sites")
    order = sorted(cases)
    random.Random(seed).shuffle(order)
    return {f"site{i + 1}": sorted(order[i::num_sites]) for i in range(num_sites)}


def sites_document(sites: Mapping[str, Any], method: str = "manual", seed: int | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {"format": SITES_FORMAT, "method": method}
    if seed is not None:
        doc["seed"] = seed
    doc["sites"] = {name: value for name, value in sites.items()}
    return doc


def write_sites(path: str | Path, doc: Mapping[str, Any], overwrite: bool = False) -> Path:
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"sites file {path} exists; choose another name or delete it first")
    write_json(path, dict(doc), indent=1)
    return path


def read_sites(path: str | Path) -> dict[str, Any]:
    """The `sites` table of a sites file (format checked; the cases are checked by check_sites)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"sites file {path} not found; make one with `rwkvseg federate --sites-from DATA --sites-out {path}`"
        )
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"sites file {path} is not valid JSON ({err})") from None
    if not isinstance(doc, dict) or doc.get("format") != SITES_FORMAT or not isinstance(doc.get("sites"), dict):
        raise ValueError(f"sites file {path} is not an rwkvseg sites file (format {SITES_FORMAT} with a sites table)")
    return doc["sites"]


def _members(name: str, value: Any, source: str) -> tuple[list[str], list[str] | None]:
    """(all cases, val cases or None) of one site entry: a list of ids, or a table {train: [...], val: [...]}."""
    if isinstance(value, list):
        return value, None
    if isinstance(value, dict) and set(value) == {"train", "val"}:
        if not all(isinstance(value[k], list) for k in ("train", "val")):
            raise ValueError(f"{source}: site {name!r} train and val must be lists of case ids")
        return [*value["train"], *value["val"]], value["val"]
    raise ValueError(f"{source}: site {name!r} must be a list of case ids or a table with train and val lists")


def check_sites(sites: Mapping[str, Any], available: Sequence[str], source: str = "sites") -> None:
    """Every site has a usable name and cases, every case exists in the dataset and belongs to one site only."""
    if len(sites) < 1:
        raise ValueError(f"{source} defines no sites")
    known = set(available)
    owner: dict[str, str] = {}
    for name, value in sites.items():
        if not _SITE_NAME.match(name):
            raise ValueError(f"{source}: site name {name!r} must be letters, digits, '_', '-' or '.'")
        members, val = _members(name, value, source)
        if not members:
            raise ValueError(f"{source}: site {name!r} has no cases")
        if not all(isinstance(c, str) for c in members):
            raise ValueError(f"{source}: site {name!r} lists something that is not a case id")
        unknown = sorted(set(members) - known)
        if unknown:
            raise ValueError(
                f"{source}: site {name!r} names {len(unknown)} case(s) not in the dataset ({', '.join(unknown[:5])}); "
                "point data.root to the dataset the sites were made for, or fix the sites file"
            )
        for case in members:
            if case in owner:
                where = f"both sites {owner[case]!r} and {name!r}" if owner[case] != name else f"site {name!r} twice"
                raise ValueError(f"{source}: case {case!r} is in {where}; a case belongs to one site only")
            owner[case] = name
        if val is not None and not val:
            raise ValueError(f"{source}: site {name!r} has no validation cases")
        if val is not None and len(val) == len(members):
            raise ValueError(f"{source}: site {name!r} has no training cases")
        if val is None and len(members) < 2:
            raise ValueError(
                f"{source}: site {name!r} has {len(members)} case; a site needs at least 2 (one to train, one to "
                "validate): merge it into another site"
            )


def resolve_sites(
    sites: Mapping[str, Any], available: Sequence[str], val_fraction: float, seed: int, source: str = "sites"
) -> tuple[Site, ...]:
    """The checked sites, each with its train/val split (made from seed and val_fraction where not given)."""
    check_sites(sites, available, source)
    out = []
    for name in sorted(sites):
        members, val = _members(name, sites[name], source)
        if val is None:
            fold = make_split(members, None, val_fraction, seed)["folds"][0]
            train, val = fold["train"], fold["val"]
        else:
            train = [c for c in members if c not in set(val)]
        out.append(Site(name, tuple(sorted(train)), tuple(sorted(val))))
    return tuple(out)


def sites_to_json(sites: Sequence[Site]) -> dict[str, Any]:
    """The resolved sites as a sites document (explicit train/val per site): what a run keeps in its folder."""
    return sites_document({s.name: {"train": list(s.train), "val": list(s.val)} for s in sites}, "resolved")
