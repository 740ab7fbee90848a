"""scripts/results_table.py: released models predicted and scored on their validation cases, one table."""

import hashlib
import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from rwkvseg.checkpoint import CheckpointMeta, save_checkpoint
from rwkvseg.data.preprocess3d import PreprocessConfig, preprocess_dataset
from rwkvseg.data.specs import dataset_spec
from rwkvseg.models import create_model
from rwkvseg.records import inference_metadata
from rwkvseg.released import ReleasedModel, export_release, index_entry, released_models, update_index
from writers import load_script, save_png, write_brats_case

# (height, width) of each image: odd and all different, so a mask at the network's 32 x 32 would show
SIZES = [(37, 45), (29, 52), (40, 33), (35, 35), (48, 31), (27, 44), (33, 39), (41, 28)]
VAL = ["c1", "c3", "c4", "c6"]  # c1 has two mask files


def write_split(path: Path, cases: list[str], val: list[str]) -> Path:
    doc = {"format": 1, "method": "random", "folds": [{"train": sorted(set(cases) - set(val)), "val": val}]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def release(base: Path, name: str, model: nn.Module, meta: CheckpointMeta, dataset: str, split: Path, metrics):
    """`name` released into base/weights from a checkpoint, as the package releases models, with its index."""
    save_checkpoint(base / "run" / name, model, meta)
    export_release(base / "run" / name, name, base / "weights")
    entry = ReleasedModel(name, meta.model, dataset, str(split), metrics)
    (base / "weights" / "index.json").write_text(json.dumps({"models": [index_entry(entry)]}))
    return base / "weights"


@pytest.fixture(scope="module")
def script():
    return load_script("results_table")


def write_dataset(root: Path) -> list[str]:
    """A generic images/ + masks/ dataset; case 'c1' has two mask files (merged when scored, as BUSI's)."""
    rng = np.random.default_rng(0)
    cases = []
    for i, (h, w) in enumerate(SIZES):
        case = f"c{i}"
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        mask = np.zeros((h, w), np.uint8)
        mask[h // 4 : h // 2, w // 3 : w - 3] = 255
        save_png(root / "images" / f"{case}.png", image)
        if case == "c1":
            half = mask.copy()
            half[:, : w // 2] = 0
            save_png(root / "masks" / f"{case}_mask.png", mask - half)
            save_png(root / "masks" / f"{case}_mask_1.png", half)
        else:
            save_png(root / "masks" / f"{case}.png", mask)
        cases.append(case)
    return cases


PRE = {"size": [32, 32], "resize": "resize", "channels": 3, "normalization": "auto"}
RECORDS_FLIPS = PRE | {"inference": {"mirror_axes": [1]}}  # a release whose flips were chosen on validation


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A released `urwkv_test` model (the package's own checkpoint and release functions), its index entry and
    split file, and the data folder it names."""
    base = tmp_path_factory.mktemp("released")
    cases = write_dataset(base / "data" / "tiny")
    split = write_split(base / "splits" / "tiny.json", cases, VAL)
    torch.manual_seed(0)
    model = create_model("urwkv_test", in_channels=3, num_classes=1)
    meta = CheckpointMeta("urwkv_test", 3, 1, preprocessing=PRE, training={"threshold": 0.5})
    weights = release(base, "urwkv_test-tiny", model, meta, "tiny", split, {"val_dice": 0.5, "epochs": 1})
    return base / "data", weights, VAL


def snapshot(folder: Path) -> dict[str, str]:
    """Every file's digest and every folder below folder: what a write, a move or a new file would change."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
        for p in folder.rglob("*")
    }


def run(script, data: Path, weights: Path, out: Path, *extra: str) -> int:
    return script.main([str(data), str(out), "--weights", str(weights), "--threads", "1", *extra])


def table_rows(text: str) -> list[dict[str, str]]:
    """The rows of the markdown table in text, each as {column: cell}."""
    lines = [line for line in text.splitlines() if line.startswith("|") and not line.startswith("|---")]
    header, *rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return [dict(zip(header, row, strict=True)) for row in rows]


def test_every_validation_case_predicted_at_its_size_and_the_table_holds_the_summary(
    script, released, tmp_path, capsys
):
    data, weights, val = released
    before = snapshot(data)
    out = tmp_path / "out"
    assert run(script, data, weights, out) == 0
    assert snapshot(data) == before  # nothing written, moved or added in the data folder

    folder = out / "urwkv_test-tiny"
    summary = json.loads((folder / "eval" / "summary.json").read_text())
    assert summary["cases"] == len(val) == 4
    # the validation images and every mask file of each (c1's two are scored as their union), as links
    assert sorted(p.name for p in (folder / "data" / "images").iterdir()) == [f"{c}.png" for c in val]
    masks = sorted(p.name for p in (folder / "data" / "masks").iterdir())
    assert masks == ["c1_mask.png", "c1_mask_1.png", "c3.png", "c4.png", "c6.png"]
    assert all(p.is_symlink() for p in (folder / "data").rglob("*.png"))
    assert (folder / "eval" / "per_case.csv").read_text().count("\n") == len(val) + 1
    masks = sorted(p for p in (folder / "pred").glob("*.png"))
    assert [p.stem for p in masks] == sorted(val)
    for mask in masks:  # at each image's original size
        h, w = SIZES[int(mask.stem[1:])]
        assert Image.open(mask).size == (w, h)

    printed = capsys.readouterr().out
    assert (out / "results.md").read_text() == printed
    (cells,) = table_rows(printed)
    assert cells["model"] == "urwkv_test-tiny" and cells["validation cases"] == "4"
    assert cells["Dice"] == f"{summary['dice']['mean']:.4f}"
    assert cells["IoU"] == f"{summary['iou']['mean']:.4f}"
    assert cells["HD95"] == f"{summary['hd95']['mean']:.1f} px"
    assert cells["Dice recorded at release"] == "0.5000"
    assert "Quick check" not in printed
    result = json.loads((out / "results.json").read_text())
    (numbers,) = result["models"]
    assert numbers["dice"] == summary["dice"]["mean"] and numbers["cases"] == 4
    params = sum(p.numel() for p in create_model("urwkv_test", in_channels=3, num_classes=1).parameters())
    assert numbers["parameters"] == params and cells["parameters (M)"] == f"{params / 1e6:.3f}"
    assert result["environment"]["torch"] == torch.__version__ and result["environment"]["threads"] == 1
    assert result["limit"] is None and result["targets"]["busi"] == {"Dice": 0.80}


def test_limit_takes_the_first_cases_and_the_table_says_so(script, released, tmp_path, capsys):
    data, weights, val = released
    out = tmp_path / "out"
    assert run(script, data, weights, out, "--limit", "2", "--names", "urwkv_test-tiny") == 0
    folder = out / "urwkv_test-tiny"
    assert sorted(p.stem for p in (folder / "pred").glob("*.png")) == sorted(val[:2])
    printed = capsys.readouterr().out
    assert "Quick check (--limit 2)" in printed
    (cells,) = table_rows(printed)
    assert cells["validation cases"] == "2 of 4"
    summary = json.loads((folder / "eval" / "summary.json").read_text())
    assert summary["cases"] == 2 and cells["Dice"] == f"{summary['dice']['mean']:.4f}"
    assert json.loads((out / "results.json").read_text())["limit"] == 2


def test_an_existing_out_or_an_unknown_name_is_refused(script, released, tmp_path, capsys):
    data, weights, _ = released
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("earlier run")
    assert run(script, data, weights, tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert err == f"results_table.py: error: OUT {tmp_path / 'out'} exists; give a new folder (runs are never mixed)"
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]

    assert run(script, data, weights, tmp_path / "new", "--names", "urwkv-kvasir") == 2
    assert "unknown released model(s) ['urwkv-kvasir']; choose from urwkv_test-tiny" in capsys.readouterr().err
    assert run(script, data, weights, data / "tiny" / "out") == 2  # inside the data folder
    assert "never writes into its inputs" in capsys.readouterr().err
    assert not (tmp_path / "new").exists() and not (data / "tiny" / "out").exists()


def test_an_ensemble_release_is_left_out_and_refused_by_name(script, released, tmp_path, capsys, caplog):
    data, weights, _ = released
    folder = tmp_path / "weights"
    shutil.copytree(weights, folder)
    for k in (0, 1):  # two members (copies of the tiny release) of a fold ensemble
        for suffix in (".safetensors", ".json"):
            shutil.copy(weights / f"urwkv_test-tiny{suffix}", folder / f"urwkv_test-tiny-cv-k{k}{suffix}")
    (model,) = released_models(weights)
    update_index(
        replace(model, name="urwkv_test-tiny-cv", members=("urwkv_test-tiny-cv-k0", "urwkv_test-tiny-cv-k1")), folder
    )
    assert run(script, data, folder, tmp_path / "named", "--names", "urwkv_test-tiny-cv") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "urwkv_test-tiny-cv: an ensemble whose members trained on" in err
    assert "its score is a cross-validation (its card)" in err
    assert not (tmp_path / "named").exists()
    with caplog.at_level(logging.INFO):
        assert run(script, data, folder, tmp_path / "all", "--limit", "1") == 0
    assert [row["name"] for row in json.loads((tmp_path / "all" / "results.json").read_text())["models"]] == [
        "urwkv_test-tiny"
    ]
    assert "leaving out urwkv_test-tiny-cv" in caplog.text


class Edema(nn.Module):
    """A 3D 'trained' model: edema (label 2) where FLAIR z > 1, background elsewhere; 4 label logits."""

    def __init__(self, in_channels=4, num_classes=4):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(10.0))

    def forward(self, x):  # [B, 4, *S] -> [B, 4, *S]
        edema = self.scale * (x[:, 3] - 1)
        zero, never = torch.zeros_like(edema), torch.full_like(edema, -99.0)
        return torch.stack([zero, never, edema, never], 1)


def write_brats_cases(tmp_path: Path, seed: int, enhancing: bool) -> dict:
    """Three 2 mm BraTS cases b0-b2 under tmp_path/data/brats (edema bright in FLAIR, optionally a small enhancing
    core), preprocessed into tmp_path/cache; the cache's plans."""
    spec = dataset_spec("brats")
    rng = np.random.default_rng(seed)
    shape, affine = (22, 20, 18), np.diag([2.0, 2.0, 2.0, 1.0])
    for i in range(3):
        brain = np.zeros(shape, bool)
        brain[2:-2, 2:-2, 2:-2] = True
        seg = np.zeros(shape, np.uint8)
        seg[6 : 12 + i, 6:12, 5:11] = 2
        if enhancing:
            seg[8:10, 8:10, 7:9] = 4
        images = [brain * (50 + rng.normal(0, 1, shape)) for _ in spec.modalities]
        images[3] = images[3] + 100 * (seg > 0)
        write_brats_case(
            tmp_path / "data" / "brats", f"b{i}", [im.astype(np.float32) for im in images], seg, spec, affine
        )
    return preprocess_dataset(tmp_path / "data" / "brats", spec, tmp_path / "cache", PreprocessConfig((2.0, 2.0, 2.0)))


def test_a_3d_release_is_scored_per_region_on_its_cases(script, tmp_path, monkeypatch, capsys, caplog):
    plans = write_brats_cases(tmp_path, seed=1, enhancing=True)  # enhancing tumour the model never predicts: ET 0
    meta = CheckpointMeta("edema", 4, 4, preprocessing=inference_metadata(plans, (16, 16, 16)), spacing=(2.0, 2.0, 2.0))
    monkeypatch.setattr("rwkvseg.checkpoint.build_model", lambda meta: Edema())
    split = write_split(tmp_path / "split.json", ["b0", "b1", "b2"], ["b1", "b2"])
    recorded = {"val_dice_WT": 0.9, "val_dice_TC": 0.5, "val_dice_ET": 0.25}
    weights = release(tmp_path, "edema-brats", Edema(), meta, "brats", split, recorded)
    before = snapshot(tmp_path / "data")
    caplog.set_level(logging.INFO, logger="rwkvseg")
    assert run(script, tmp_path / "data", weights, tmp_path / "out") == 0
    assert snapshot(tmp_path / "data") == before
    off = [r for r in caplog.records if r.getMessage().startswith("mirror TTA off on the CPU")]
    assert len(off) == 1, "the row's flips are resolved twice (for the table and by predict), said once"
    folder = tmp_path / "out" / "edema-brats"
    assert sorted(p.name for p in (folder / "pred").glob("*.nii.gz")) == ["b1.nii.gz", "b2.nii.gz"]
    summary = json.loads((folder / "eval" / "summary.json").read_text())
    dice = {r: summary["regions"][r]["dice"]["mean"] for r in ("WT", "TC", "ET")}
    assert summary["cases"] == 2 and dice["WT"] > 0.8 and dice["ET"] == 0.0
    (cells,) = table_rows(capsys.readouterr().out)
    assert cells["Dice"] == "WT / TC / ET " + " / ".join(f"{dice[r]:.4f}" for r in ("WT", "TC", "ET"))
    assert cells["IoU"] == "-" and cells["HD95"].endswith(" mm") and cells["parameters (M)"] == "0.000"
    assert cells["Dice recorded at release"] == "0.9000 / 0.5000 / 0.2500"


class UnsureEdema(nn.Module):
    """A 3D region model that is right but under-confident: WT probability 0.2 where FLAIR z > 1, else ~0."""

    def __init__(self, in_channels=4, num_classes=3):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.0))

    def forward(self, x):  # [B, 4, *S] -> [B, 3, *S]: WT, TC, ET logits
        wt = self.scale * torch.where(x[:, 3] > 1, -1.386, -20.0)  # sigmoid(-1.386) = 0.2
        never = torch.full_like(wt, -99.0)
        return torch.stack([wt, never, never], 1)


def test_a_recorded_region_threshold_reaches_prediction_and_the_table_says_so(script, tmp_path, monkeypatch, capsys):
    plans = write_brats_cases(tmp_path, seed=2, enhancing=False)
    monkeypatch.setattr("rwkvseg.checkpoint.build_model", lambda meta: UnsureEdema())
    split = write_split(tmp_path / "split.json", ["b0", "b1", "b2"], ["b1", "b2"])
    wt = {}
    for cut in (None, 0.1):
        pre = inference_metadata(plans, (16, 16, 16), target="regions")
        if cut is not None:
            pre["inference"] = {**pre.get("inference", {}), "threshold": cut}
        meta = CheckpointMeta("edema", 4, 3, preprocessing=pre, spacing=(2.0, 2.0, 2.0))
        base = tmp_path / f"cut{cut}"
        recorded = {"val_dice_WT": 0.0} | ({"val_threshold": cut} if cut is not None else {})  # release_3d's
        weights = release(base, "edema-brats", UnsureEdema(), meta, "brats", split, recorded)
        assert run(script, tmp_path / "data", weights, base / "out") == 0
        summary = json.loads((base / "out" / "edema-brats" / "eval" / "summary.json").read_text())
        wt[cut] = summary["regions"]["WT"]["dice"]["mean"]
        row = json.loads((base / "out" / "results.json").read_text())["models"][0]
        assert row["threshold"] == cut
        markdown = (base / "out" / "results.md").read_text()
        assert ("Region probabilities cut at the threshold each checkpoint records" in markdown) == (cut is not None)
        assert (
            cut is None or "edema-brats: 0.1. The Dice recorded at release is at 0.5 (edema-brats at 0.1)." in markdown
        )
    capsys.readouterr()
    assert wt[None] == 0.0 and wt[0.1] > 0.8  # the probabilities of 0.2 are tumour only at the recorded cut


@pytest.fixture
def predict_configs(script, monkeypatch):
    """The PredictConfig of every predict call the script makes (predicting as before)."""
    configs = []
    predict = script.predict

    def spy(checkpoint, inputs, out, config):
        configs.append(config)
        return predict(checkpoint, inputs, out, config)

    monkeypatch.setattr(script, "predict", spy)
    return configs


def test_2d_mirror_tta_reaches_prediction_and_the_table_says_so(script, released, tmp_path, predict_configs, capsys):
    data, weights, _ = released
    configs = predict_configs
    assert run(script, data, weights, tmp_path / "out", "--limit", "1", "--mirror-axes-2d", "0,1") == 0
    assert [c.mirror_axes for c in configs] == [(0, 1)]
    printed = capsys.readouterr().out
    assert "(test-time augmentation, `rwkvseg predict --mirror-axes`, as given for 2D; beyond the papers' " in printed
    assert "recipes): urwkv_test-tiny: 0,1. The Dice recorded at release is without them." in printed
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    assert result["mirror_axes_2d"] == [0, 1] and result["models"][0]["mirror_axes"] == [0, 1]
    configs.clear()  # without the option: the flips the release records, as predict takes them
    recording = tmp_path / "recording"
    shutil.copytree(weights, recording)
    sidecar = recording / "urwkv_test-tiny.json"
    sidecar.write_text(json.dumps(json.loads(sidecar.read_text()) | {"preprocessing": RECORDS_FLIPS}))
    assert run(script, data, recording, tmp_path / "own", "--limit", "1") == 0
    assert [c.mirror_axes for c in configs] == [None]
    assert "each checkpoint's own default; beyond the papers' recipes): urwkv_test-tiny: 1." in capsys.readouterr().out
    result = json.loads((tmp_path / "own" / "results.json").read_text())
    assert result["mirror_axes_2d"] is None and result["models"][0]["mirror_axes"] == [1]
    assert run(script, data, recording, tmp_path / "off", "--limit", "1", "--mirror-axes-2d", "") == 0
    assert json.loads((tmp_path / "off" / "results.json").read_text())["models"][0]["mirror_axes"] == []
    assert "Logits averaged" not in capsys.readouterr().out
    with pytest.raises(SystemExit):
        run(script, data, weights, tmp_path / "out2", "--mirror-axes-2d", "x")
    assert "'x' is not a comma-separated list of axes" in capsys.readouterr().err


def test_postprocess_reaches_prediction_and_the_table_says_so(script, released, tmp_path, predict_configs, capsys):
    data, weights, _ = released
    configs = predict_configs
    assert run(script, data, weights, tmp_path / "out", "--limit", "1", "--postprocess", "largest,fill-holes") == 0
    assert [c.postprocess.spelling() for c in configs] == ["largest,fill-holes"]
    assert (
        "post-processed before scoring (`rwkvseg predict --postprocess`, as given; beyond the papers' recipes): "
        "urwkv_test-tiny: largest,fill-holes." in capsys.readouterr().out
    )
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    assert result["postprocess"] == "largest,fill-holes" and result["models"][0]["postprocess"] == "largest,fill-holes"
    configs.clear()  # without the option: each checkpoint's own choice, as predict (a 2D one records none)
    assert run(script, data, weights, tmp_path / "out1", "--limit", "1") == 0
    assert [c.postprocess for c in configs] == [None] and "post-processed" not in capsys.readouterr().out
    result = json.loads((tmp_path / "out1" / "results.json").read_text())
    assert result["postprocess"] == "each checkpoint's own" and result["models"][0]["postprocess"] == "none"
    with pytest.raises(SystemExit):
        run(script, data, weights, tmp_path / "out2", "--postprocess", "holes")
    assert "'holes' is not an option; give none, largest, fill-holes" in capsys.readouterr().err
    assert run(script, data, weights, tmp_path / "out3", "--postprocess", "et-min-voxels=50") == 2
    assert "urwkv_test-tiny: --postprocess et-min-voxels applies to 3D" in capsys.readouterr().err
    assert not (tmp_path / "out2").exists() and not (tmp_path / "out3").exists()


def test_a_release_trained_on_every_case_is_left_out_and_refused_by_name(script, released, tmp_path, capsys):
    """A model trained on its split's validation cases too (train_all in its sidecar) cannot be scored on them."""
    data, weights, _ = released
    folder = tmp_path / "weights"
    shutil.copytree(weights, folder)
    for suffix in (".safetensors", ".json"):
        shutil.copy(weights / f"urwkv_test-tiny{suffix}", folder / f"urwkv_test-all{suffix}")
    sidecar = json.loads((folder / "urwkv_test-all.json").read_text())
    sidecar["training"] |= {"train_all": True, "train_cases": 6}
    (folder / "urwkv_test-all.json").write_text(json.dumps(sidecar))
    (model,) = released_models(weights)
    update_index(replace(model, name="urwkv_test-all"), folder)
    assert run(script, data, folder, tmp_path / "named", "--names", "urwkv_test-all") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "urwkv_test-all: trained on every case of its split" in err
    assert run(script, data, folder, tmp_path / "all", "--limit", "1") == 0
    rows = json.loads((tmp_path / "all" / "results.json").read_text())["models"]
    assert [row["name"] for row in rows] == ["urwkv_test-tiny"]
