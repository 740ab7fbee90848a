import json

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
