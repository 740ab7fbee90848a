"""scripts/case_traits.py: per-case differences of two evaluations beside each case's label composition."""

import csv
import json

import nibabel as nib
import numpy as np
import pytest

from rwkvseg.data.synthetic3d import write_synthetic_volumes
from writers import load_script


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    write_synthetic_volumes(root, n=5, shape=(20, 22, 18), seed=3)
    return root


def _labels(root, case):
    return np.asarray(nib.load(root / case / f"{case}_seg.nii.gz").dataobj)


def _per_case(path, values):
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["case", "TC_dice", "WT_dice"])
        writer.writerows([case, tc, 0.9] for case, tc in values.items())
    return path


def test_traits_are_counted_from_the_label_files_and_correlated_with_the_difference(phantoms, tmp_path, capsys):
    script = load_script("case_traits")
    cases = sorted(p.name for p in phantoms.iterdir() if p.is_dir())
    share = {}  # label 1's share of the tumour core, counted here with numpy
    for case in cases:
        labels = _labels(phantoms, case)
        share[case] = np.isin(labels, [1]).sum() / np.isin(labels, [1, 4]).sum()
    assert len(set(share.values())) == len(cases) and min(share.values()) == 0  # a case without necrosis
    a = _per_case(tmp_path / "a.csv", dict.fromkeys(cases, 0.5))
    b = _per_case(tmp_path / "b.csv", {c: 0.5 - share[c] ** 2 for c in cases})  # B loses more, the more necrosis
    out = tmp_path / "traits.json"
    assert script.main([str(a), str(b), str(phantoms), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {r["case"]: r for r in result["cases"]}
    for case in cases:
        labels = _labels(phantoms, case)
        assert rows[case]["TC_voxels"] == np.isin(labels, [1, 4]).sum()
        assert rows[case]["WT_voxels"] == np.isin(labels, [1, 2, 4]).sum()
        assert rows[case]["1_in_TC"] == pytest.approx(share[case])
        assert rows[case]["b - a"] == pytest.approx(-(share[case] ** 2))
    assert [r["case"] for r in result["cases"]] == sorted(cases, key=lambda c: -share[c])  # by the difference
    rho = {c["trait"]: c for c in result["correlations"]}
    assert rho["1_in_TC"]["rho"] == pytest.approx(-1.0) and rho["4_in_TC"]["rho"] == pytest.approx(1.0)
    assert rho["1_in_TC"]["cases"] == len(cases)
    screen = capsys.readouterr().out
    assert "Spearman rank correlation of TC_dice (B - A)" in screen and "1_in_TC" in screen


def test_refusals_name_the_input(phantoms, tmp_path, capsys):
    script = load_script("case_traits")
    cases = sorted(p.name for p in phantoms.iterdir() if p.is_dir())
    a = _per_case(tmp_path / "a.csv", dict.fromkeys(cases, 0.5))
    fewer = _per_case(tmp_path / "fewer.csv", dict.fromkeys(cases[1:], 0.5))
    other = _per_case(tmp_path / "other.csv", {**dict.fromkeys(cases[1:], 0.5), "Brats18_X": 0.4})
    taken = tmp_path / "taken.json"
    taken.write_text("{}")
    for argv, message in [
        ([a, fewer, phantoms], "score different cases"),
        ([a, a, phantoms, "--metric", "ET_dice"], "has no column 'ET_dice'; choose one of TC_dice, WT_dice"),
        ([other, other, phantoms], "holds no labelled case ['Brats18_X']"),
        ([a, a, phantoms, "--json", taken], "exists; give a new file"),
    ]:
        assert script.main([str(x) for x in argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err
    assert taken.read_text() == "{}"
