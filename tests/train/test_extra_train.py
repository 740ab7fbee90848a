"""data.extra_train: another dataset's images join the training set only, and nothing lets validation images in."""

import json
import shutil

import pytest
import torch

from rwkvseg.cli import main
from rwkvseg.data.synthetic import write_synthetic_dataset
from rwkvseg.train.config import load_config
from rwkvseg.train.images import setup_images


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    base = tmp_path_factory.mktemp("two")
    write_synthetic_dataset(base / "primary", n=6, shape=(33, 35), seed=1)
    write_synthetic_dataset(base / "other", n=5, shape=(40, 30), seed=2)
    return base


def _config(root, run_dir, *extra, split=""):
    sets = [
        f"data.root={root}",
        f"out={run_dir}",
        "model.name=urwkv_test",
        "data.size=[32, 32]",
        "data.num_workers=0",
        "data.gpu_resident=off",
        "data.val_fraction=0.34",
        f"data.extra_train=[{', '.join(str(e) for e in extra)}]",
    ]
    if split:
        sets.append(f"data.split={split}")
    return load_config(None, sets)


def test_extra_images_train_and_validation_stays_on_root(datasets, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    plain = setup_images(_config(datasets / "primary", run_dir), run_dir, torch.device("cpu"))
    extra = setup_images(_config(datasets / "primary", run_dir, datasets / "other"), run_dir, torch.device("cpu"))
    split = json.loads((run_dir / "split.json").read_text())["folds"][0]
    assert len(plain.train_set) == len(split["train"]) == 4
    assert len(extra.train_set) == len(split["train"]) + 5  # every image of the other dataset, training only
    assert extra.meta.training["config"]["data"]["extra_train"] == [str(datasets / "other")]
    item = extra.train_set[len(extra.train_set) - 1]  # an extra image, at the network input
    assert item["case"] == "other/lesion_004"
    assert tuple(item["image"].shape) == (3, 32, 32) and tuple(item["mask"].shape) == (1, 32, 32)


def test_a_string_lists_several_folders():
    config = load_config(None, ["data.extra_train=a, b"])
    assert config.data.extra_train == ("a", "b")


@pytest.mark.parametrize("where", ["same", "inside", "around"])
def test_a_folder_that_overlaps_root_is_refused(datasets, tmp_path, where):
    root = datasets / "primary"
    extra = {"same": root, "inside": root / "images", "around": datasets}[where]
    with pytest.raises(ValueError, match=r"overlaps data\.root"):
        setup_images(_config(root, tmp_path, extra), tmp_path, torch.device("cpu"))


def test_a_copy_of_a_validation_image_is_refused(datasets, tmp_path):
    split = tmp_path / "split.json"
    assert main(["split", str(datasets / "primary"), "--out", str(split), "--val-fraction", "0.34"]) == 0
    name = json.loads(split.read_text())["folds"][0]["val"][0]
    copy = tmp_path / "copy"
    shutil.copytree(datasets / "other", copy)
    for sub in ("images", "masks"):
        shutil.copy(datasets / "primary" / sub / f"{name}.png", copy / sub / "copied.png")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with pytest.raises(ValueError, match=r"is the validation image .* byte for byte"):
        setup_images(_config(datasets / "primary", run_dir, copy, split=split), run_dir, torch.device("cpu"))


def test_unlabelled_extra_images_are_refused_from_the_command_line(datasets, tmp_path, capsys):
    bare = tmp_path / "bare"
    shutil.copytree(datasets / "other", bare)
    (bare / "masks" / "lesion_000.png").unlink()
    run_dir = tmp_path / "run"
    argv = ["train", "--data", str(datasets / "primary"), "--out", str(run_dir), "--no-progress"]
    argv += ["--set", "model.name=urwkv_test", "--set", f"data.extra_train=[{bare}]", "--set", "data.num_workers=0"]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and f"data.extra_train {bare}: no mask in {bare / 'masks'}" in err
    assert not (run_dir / "best.safetensors").exists() and not (run_dir / "state.pt").exists()
    argv[argv.index(f"data.extra_train=[{bare}]")] = f"data.extra_train=[{tmp_path / 'missing'}]"
    assert main(argv) == 2
    assert f"data.extra_train {tmp_path / 'missing'}: dataset folder" in capsys.readouterr().err
