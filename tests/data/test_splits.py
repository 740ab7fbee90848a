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
