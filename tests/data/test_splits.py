import json

import numpy as np
import pytest

from rwkvseg.data.splits import make_split, read_split, split_from_groups, write_split

CASES = [f"c{i:02d}" for i in range(23)]
LABELS = ["a"] * 15 + ["b"] * 8


def test_random_split_is_deterministic_and_stratified(tmp_path):
    one = make_split(CASES, LABELS, val_fraction=0.25, seed=3)
    assert one == make_split(list(reversed(CASES)), list(reversed(LABELS)), val_fraction=0.25, seed=3)
    assert one != make_split(CASES, LABELS, val_fraction=0.25, seed=4)
    fold = one["folds"][0]
    assert sorted(fold["train"] + fold["val"]) == CASES and not set(fold["train"]) & set(fold["val"])
    label = dict(zip(CASES, LABELS, strict=True))
    assert sorted(label[c] for c in fold["val"]) == ["a"] * 4 + ["b"] * 2
    write_split(tmp_path / "s.json", one)
    split = read_split(tmp_path / "s.json", available=CASES)
    assert split.val == tuple(fold["val"]) and split.test == ()
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_split(tmp_path / "s.json", one)


def test_kfold_validates_every_case_once_and_holds_out_test():
    doc = make_split(CASES, LABELS, folds=4, seed=0, test_fraction=0.2)
    test = set(doc["test"])
    assert len(test) == 5  # round(0.2 * 15) + round(0.2 * 8)
    vals = [c for f in doc["folds"] for c in f["val"]]
    assert sorted(vals) == sorted(set(CASES) - test)
    for f in doc["folds"]:
        assert set(f["train"]) | set(f["val"]) == set(CASES) - test
        assert not test & set(f["train"])
    sizes = [len(f["val"]) for f in doc["folds"]]
    assert max(sizes) - min(sizes) <= 1


def test_official_groups():
    doc = split_from_groups(["train/a", "train/b", "val/c"], ["train", "train", "val"])
    assert doc["folds"] == [{"train": ["train/a", "train/b"], "val": ["val/c"]}]
    with pytest.raises(ValueError, match="names no subset"):
        split_from_groups(["x"], ["benign"])


def test_bad_split_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="rwkvseg split"):
        read_split(tmp_path / "none.json")
    path = tmp_path / "s.json"
    path.write_text(json.dumps(make_split(CASES, folds=3)))
    with pytest.raises(ValueError, match=r"folds 0\.\.2, fold 5"):
        read_split(path, fold=5)
    with pytest.raises(ValueError, match=r"names \d+ cases not found in the dataset"):
        read_split(path, fold=1, available=CASES[:10])
    path.write_text("[1, 2")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_split(path)


def test_rwkvseg_split_writes_3d_splits_from_a_raw_folder_or_its_cache(tmp_path, capsys):
    """A raw BraTS folder (--dataset brats) and the cache `rwkvseg preprocess` made of it give the same split, whose
    case ids training accepts (read_split against the cache's cases)."""
    from rwkvseg.cli import main
    from rwkvseg.data.preprocess3d import PreprocessConfig, load_plans, preprocess_dataset
    from rwkvseg.data.specs import dataset_spec
    from writers import write_phantoms_as

    write_phantoms_as(tmp_path / "raw", ["a1", "b2", "c3"], (16, 16, 16))
    preprocess_dataset(tmp_path / "raw", dataset_spec("brats"), tmp_path / "cache", PreprocessConfig())
    cases = sorted(load_plans(tmp_path / "cache")["cases"])
    assert (
        main(["split", str(tmp_path / "raw"), "--dataset", "brats", "--folds", "3", "--out", str(tmp_path / "r.json")])
        == 0
    )
    assert main(["split", str(tmp_path / "cache"), "--folds", "3", "--out", str(tmp_path / "c.json")]) == 0
    assert "3 cases, 3 fold(s), fold 0: 2 train / 1 val, 0 test" in capsys.readouterr().out
    raw, cache = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("r", "c"))
    assert raw["folds"] == cache["folds"] and raw["method"] == "kfold" and not raw["stratified"]
    assert sorted(c for f in raw["folds"] for c in f["val"]) == cases  # each case validated once
    for fold in range(3):
        split = read_split(tmp_path / "c.json", fold, cases)
        assert sorted(split.train + split.val) == cases and len(split.val) == 1


def test_rwkvseg_split_says_how_to_split_volumes(tmp_path, capsys):
    from rwkvseg.cli import main
    from writers import write_phantoms_as

    write_phantoms_as(tmp_path / "raw", ["a1"], (16, 16, 16))
    out = tmp_path / "s.json"
    assert main(["split", str(tmp_path / "raw"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "raw holds 3D volumes: name the raw dataset's preset with --dataset" in err
    assert main(["split", str(tmp_path / "raw"), "--dataset", "brats", "--official", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--official: for 2D image folders" in err
    assert not out.exists()


def write_strata(path, rows, header="case,stratum"):
    path.write_text("\n".join([header, *(f"{case},{stratum}" for case, stratum in rows)]) + "\n")
    return path


def test_rwkvseg_split_stratifies_3d_by_a_strata_file(tmp_path, capsys):
    """--strata: every fold validates one of the two rare cases, as make_split with those labels does; the document
    names its strata file."""
    from rwkvseg.cli import main
    from writers import write_phantoms_as

    cases = ["a1", "b2", "c3", "d4", "e5", "f6"]
    write_phantoms_as(tmp_path / "raw", cases, (16, 16, 16))
    grades = {c: "LGG" if c in ("b2", "e5") else "HGG" for c in cases}
    strata = write_strata(tmp_path / "grades.csv", sorted(grades.items(), reverse=True))  # any row order
    strata.write_bytes(b"\xef\xbb\xbf" + strata.read_bytes())  # as a spreadsheet saves it: a byte-order mark
    out = tmp_path / "s.json"
    args = ["split", str(tmp_path / "raw"), "--dataset", "brats", "--folds", "2", "--strata", str(strata)]
    assert main([*args, "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["stratified"] and doc["strata"] == str(strata)
    assert doc["folds"] == make_split(cases, [grades[c] for c in cases], folds=2, seed=0)["folds"]
    assert [sum(grades[c] == "LGG" for c in f["val"]) for f in doc["folds"]] == [1, 1]
    assert (
        main(["split", str(tmp_path / "raw"), "--dataset", "brats", "--folds", "2", "--out", str(tmp_path / "u.json")])
        == 0
    )
    plain = json.loads((tmp_path / "u.json").read_text())
    assert not plain["stratified"] and "strata" not in plain


def test_the_committed_brats_splits_come_from_rwkvseg_split(brats_2mm, tmp_path):
    """splits/brats2018_2mm.json and splits/brats2018_2mm_5fold.json, made by make_split with each case's grade,
    are what `rwkvseg split --strata splits/brats2018_grades.csv` writes (splits/README.md)."""
    from pathlib import Path

    from rwkvseg.cli import main

    splits = Path(__file__).resolve().parents[2] / "splits"
    for name, options in (("brats2018_2mm", ["--val-fraction", "0.28"]), ("brats2018_2mm_5fold", ["--folds", "5"])):
        out = tmp_path / f"{name}.json"
        args = ["split", str(brats_2mm), "--dataset", "brats", "--strata", str(splits / "brats2018_grades.csv")]
        assert main([*args, *options, "--seed", "0", "--out", str(out)]) == 0
        made, committed = json.loads(out.read_text()), json.loads((splits / f"{name}.json").read_text())
        assert (made["folds"], made["test"], made["stratified"]) == (committed["folds"], committed["test"], True)


@pytest.mark.parametrize(
    "damage",
    ["missing case", "unknown case", "twice", "no header", "empty stratum", "no file", "a folder", "2D", "no-stratify"],
)
def test_rwkvseg_split_refuses_a_bad_strata_file_in_one_line(tmp_path, capsys, damage):
    from rwkvseg.cli import main
    from writers import save_png, write_phantoms_as

    cases = ["a1", "b2", "c3", "d4"]
    data = write_phantoms_as(tmp_path / "raw", cases, (16, 16, 16))
    rows = [(c, "x" if c == "a1" else "y") for c in cases]
    strata = tmp_path / "strata.csv"
    extra: list[str] = []
    if damage == "missing case":
        write_strata(strata, rows[1:])
        message = "has no stratum for the cases ['a1'] (1); list every case"
    elif damage == "unknown case":
        write_strata(strata, [*rows, ("z9", "y")])
        message = "lists cases the dataset does not have: ['z9'] (1)"
    elif damage == "twice":
        write_strata(strata, [*rows, ("b2", "x")])
        message = "line 6: case 'b2' is listed twice"
    elif damage == "no header":
        write_strata(strata, rows, header="id,grade")
        message = "needs the columns case and stratum"
    elif damage == "empty stratum":
        write_strata(strata, [*rows[:2], ("c3", ""), rows[3]])
        message = "line 4: case 'c3' has no stratum"
    elif damage == "no file":
        message = "strata.csv not found: give a CSV of case,stratum for every case"
    elif damage == "a folder":
        strata.mkdir()
        message = "strata.csv cannot be read ("
    elif damage == "2D":
        write_strata(strata, rows)
        data = tmp_path / "images"
        save_png(data / "a.png", np.zeros((8, 8), np.uint8))
        message = "--strata: for 3D datasets, and"
    else:
        write_strata(strata, rows)
        extra = ["--no-stratify"]
        message = "--strata and --no-stratify contradict each other: drop one"
    out = tmp_path / "s.json"
    args = ["split", str(data), "--folds", "2", "--strata", str(strata), "--out", str(out), *extra]
    assert main([*args, *(["--dataset", "brats"] if damage != "2D" else [])]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not out.exists()


def test_the_committed_cvc_sequences_file_groups_the_split_by_its_sequences(tmp_path, capsys, monkeypatch):
    """splits/cvc_clinicdb_sequences.csv (`rwkvseg compare --groups`) gives every frame of splits/cvc_clinicdb.json
    the sequence its number falls in, and the validation frames the split's validation sequences; where the data is
    present, scripts/split_cvc_sequences.py writes both files again byte for byte."""
    import csv
    from pathlib import Path

    from writers import SHARED_DATA, load_script

    splits = Path(__file__).resolve().parents[2] / "splits"
    split = json.loads((splits / "cvc_clinicdb.json").read_text())
    with (splits / "cvc_clinicdb_sequences.csv").open(newline="") as f:
        groups = {row["case"]: row["group"] for row in csv.DictReader(f)}
    fold = split["folds"][0]
    assert sorted(groups, key=int) == sorted(fold["train"] + fold["val"], key=int)
    firsts = split["sequences"]["first_frames"]
    for case, group in groups.items():
        assert group == f"seq{max(i for i, first in enumerate(firsts) if first <= int(case)):02d}"
    assert sorted({int(groups[c][3:]) for c in fold["val"]}) == split["sequences"]["val"]
    assert not {groups[c] for c in fold["val"]} & {groups[c] for c in fold["train"]}  # whole sequences
    data = SHARED_DATA / "cvc_clinicdb"
    if not data.is_dir():
        pytest.skip("shared CVC-ClinicDB data not present: the committed files checked against each other only")
    script = load_script("split_cvc_sequences")
    out, groups_out = tmp_path / "split.json", tmp_path / "groups.csv"
    monkeypatch.setattr("sys.argv", ["split_cvc_sequences.py", str(data), str(out), "--groups-out", str(groups_out)])
    script.main()
    assert groups_out.read_bytes() == (splits / "cvc_clinicdb_sequences.csv").read_bytes()
    made = json.loads(out.read_text())
    assert (made["folds"], made["sequences"]) == (split["folds"], split["sequences"])
    assert "126 val frames" in capsys.readouterr().out


def test_the_committed_random_cvc_frame_split_is_what_rwkvseg_split_writes(tmp_path):
    """splits/cvc_clinicdb_random_frames.json, the published protocol kept to measure what it adds: 440 / 110 frames
    with validation frames in 28 of the 29 sequences; where the data is present, `rwkvseg split` writes it again."""
    import csv
    from pathlib import Path

    from rwkvseg.cli import main
    from writers import SHARED_DATA

    splits = Path(__file__).resolve().parents[2] / "splits"
    committed = read_split(splits / "cvc_clinicdb_random_frames.json")
    assert (len(committed.train), len(committed.val)) == (440, 110)
    with (splits / "cvc_clinicdb_sequences.csv").open(newline="") as f:
        sequence = {row["case"]: row["group"] for row in csv.DictReader(f)}
    assert len({sequence[c] for c in committed.val}) == 28
    data = SHARED_DATA / "cvc_clinicdb"
    if not data.is_dir():
        pytest.skip("shared CVC-ClinicDB data not present: the committed split checked on its own")
    out = tmp_path / "random.json"
    assert main(["split", str(data), "--out", str(out), "--val-fraction", "0.2", "--seed", "0"]) == 0
    made = json.loads(out.read_text())
    assert made["folds"] == json.loads((splits / "cvc_clinicdb_random_frames.json").read_text())["folds"]
