"""scripts/release_2d.py end to end: the 2D cards, curves, sidecars and index entries from a campaign's runs, made by
the project's own writers (the loop's metrics.csv, a checkpoint, export_release, `rwkvseg evaluate`), into a weights
folder of the test's own; bad inputs refused in one line before any file is written."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rwkvseg.checkpoint import CheckpointMeta, read_meta, save_checkpoint
from rwkvseg.eval.evaluate import evaluate_folders
from rwkvseg.infer.predict2d import recorded_mirror_axes
from rwkvseg.models import create_model
from rwkvseg.released import export_release
from rwkvseg.train.loop import _write_metrics_csv
from writers import load_script

NAME = "urwkv_s-ph2"
SHIFTS = {"eval": 1, "evaltta": 0}  # evaluation -> pixels the predicted disc is moved from the reference


def disc(shift: int, seed: int) -> np.ndarray:
    """A 40 x 48 mask with a disc placed by seed, moved down by shift pixels."""
    yy, xx = np.mgrid[:40, :48]
    return (((yy - 18 - seed - shift) ** 2 + (xx - 20 - 2 * seed) ** 2) < 100).astype(np.uint8) * 255


@pytest.fixture(scope="module")
def campaign(tmp_path_factory) -> Path:
    """RUNS/ph2-urwkv_s (metrics.csv, config.json, best checkpoint), EVALS/{eval,evaltta}-urwkv_s-ph2, and a weights
    folder holding the int8 export of the best checkpoint and an index with another release."""
    tmp = tmp_path_factory.mktemp("release2d")
    run = tmp / "runs" / "ph2-urwkv_s"
    run.mkdir(parents=True)
    history = [
        {"epoch": e, "step": 32 * e, "lr": 0.01, "train_loss": 1.0 / e, "train_seconds": 3.0}
        | {"val_dice": d, "val_iou": d - 0.1, "val_precision": 0.9, "val_recall": 0.8, "val_specificity": 0.95}
        | {"val_seconds": 1.0}
        for e, d in zip(range(1, 5), (0.6, 0.8, 0.9, 0.85), strict=True)
    ]
    _write_metrics_csv(run / "metrics.csv", history)
    config = {"epochs": 4, "compile": "auto", "device": "cpu", "data": {"batch_size": 4}, "optim": {"ema": 0.999}}
    (run / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    pre = {"dims": 2, "size": [64, 64], "channels": 3, "normalization": "zscore"}
    meta = CheckpointMeta("urwkv_s", 3, 1, {}, pre, ("background", "lesion"), None, {"best": {"epoch": 3}})
    save_checkpoint(run / "best", create_model("urwkv_s", 3, 1), meta)
    weights = tmp / "weights"
    export_release(run / "best", NAME, weights, precision="int8")
    other = {"name": "urwkv-kvasir", "architecture": "urwkv", "dataset": "kvasir_seg", "split": "s", "notes": ""}
    (weights / "index.json").write_text(json.dumps({"models": [{**other, "metrics": {"epochs": 280}}]}))
    refs = tmp / "refs"
    refs.mkdir()
    for seed in range(3):
        Image.fromarray(disc(0, seed)).save(refs / f"IMD00{seed}.png")
    for kind, shift in SHIFTS.items():
        pred = tmp / "pred" / kind
        pred.mkdir(parents=True)
        for seed in range(3):
            Image.fromarray(disc(shift, seed)).save(pred / f"IMD00{seed}.png")
        evaluate_folders(pred, refs, tmp / "evals" / f"{kind}-{NAME}")
    return tmp


def release_args(tmp: Path, *extra: str, weights: str = "weights") -> list[str]:
    options = ["--hardware", "2 CPU cores", "--command", "`campaign.py`", "--commit", "abc1234", "--quality", "0"]
    return [str(tmp / "runs"), str(tmp / "evals"), NAME, *options, "--weights-dir", str(tmp / weights), *extra]


def script_main(args: list[str]) -> int:
    return load_script("release_2d").main(args)


def dice_of(tmp: Path, kind: str) -> float:
    return json.loads((tmp / "evals" / f"{kind}-{NAME}" / "summary.json").read_text())["dice"]["mean"]


def test_release_2d_writes_card_curves_sidecar_and_index(campaign, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    tmp = tmp_path / "copy"
    shutil.copytree(campaign, tmp)
    script = load_script("release_2d")
    evidence = "Dice 0.95 with, 0.90 without"
    notes = ["--note", NAME, "A CPU fine-tune from it scored 0.80.", "--note", NAME, "  Dihedral TTA: +0.001.  "]
    assert script.main(release_args(tmp, "--mirror-axes", "0,1", "--mirror-evidence", evidence, *notes)) == 0
    assert f"{NAME}: wrote {NAME}.md, {NAME}.curves.png and its index entry" in capsys.readouterr().out

    card = (tmp / "weights" / f"{NAME}.md").read_text()
    assert card.startswith(f"# {NAME}: U-RWKV-s trained on PH2 (dermoscopy, skin lesion)")
    assert "| hardware | 2 CPU cores, 0.3 min of training and validation |" in card  # 4 x 3 s + 4 x 1 s
    assert "| command | `campaign.py` (code at commit abc1234) |" in card
    assert "best validation epoch 3 (curves: `urwkv_s-ph2.curves.png`)" in card
    assert "an exponential moving average of the weights (decay 0.999)" in card  # beyond the recipe, from config
    trained = "| during training, at 256 x 256 (CPU, fp32 weights) | 0.9000 | 0.8000 | 0.9000 | 0.8000 | 0.9500 | - |"
    assert trained in card
    assert f"original image size (CPU, `rwkvseg predict` + `rwkvseg evaluate`) | {dice_of(tmp, 'eval'):.4f} |" in card
    assert (
        f"with flip TTA (`rwkvseg predict --mirror-axes 0,1`: 4 forward passes) | {dice_of(tmp, 'evaltta'):.4f} |"
        in card
    )
    assert f"chosen on validation: {evidence} |" in card
    first, second = card.index("A CPU fine-tune from it scored 0.80.\n\n"), card.index("Dihedral TTA: +0.001.\n\n")
    assert card.index("| these released weights (int8)") < first < second < card.index("Means over images;")
    assert (tmp / "weights" / f"{NAME}.curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    meta = read_meta(tmp / "weights" / f"{NAME}.safetensors")  # prediction takes the recorded flips
    assert recorded_mirror_axes(None, meta.preprocessing.get("inference"), NAME) == (0, 1)
    index = json.loads((tmp / "weights" / "index.json").read_text())["models"]
    assert [m["name"] for m in index] == ["urwkv-kvasir", NAME]
    assert index[0]["metrics"] == {"epochs": 280}  # the other entry is kept as it is
    assert index[1]["metrics"] == {
        "val_dice": round(dice_of(tmp, "eval"), 4),
        "val_iou": round(json.loads((tmp / "evals" / f"eval-{NAME}" / "summary.json").read_text())["iou"]["mean"], 4),
        "epochs": 4,
        "val_dice_flips": round(dice_of(tmp, "evaltta"), 4),
    }
    assert (index[1]["dataset"], index[1]["split"], index[1]["notes"]) == ("ph2", "splits/ph2.json", f"card: {NAME}.md")


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize(
    "damage, extra, message",
    [
        ("evaluation", [], f"eval-{NAME}/summary.json not found: score predictions with `rwkvseg evaluate"),
        ("run", [], "metrics.csv not found: give the folder of a training run"),
        ("sidecar", ["--mirror-axes", "0,1", "--mirror-evidence", "x"], "does not exist: export the release first"),
        ("weights", [], "is not a folder: give the released models' folder"),
    ],
)
def test_a_missing_input_is_one_line_and_no_file_changes(campaign, tmp_path, capsys, damage, extra, message):
    pytest.importorskip("matplotlib")
    tmp = tmp_path / "copy"
    shutil.copytree(campaign, tmp)
    if damage == "evaluation":
        shutil.rmtree(tmp / "evals" / f"eval-{NAME}")
    elif damage == "run":
        (tmp / "runs" / "ph2-urwkv_s" / "metrics.csv").unlink()
    elif damage == "sidecar":
        (tmp / "weights" / f"{NAME}.json").unlink()
    before = snapshot(tmp / "weights")
    assert script_main(release_args(tmp, *extra, weights="absent" if damage == "weights" else "weights")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("release_2d.py: error: ") and message in err[0]
    assert snapshot(tmp / "weights") == before


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--note", "urwkv-ph2", "x"], "--note names urwkv-ph2, not a release of this run; give one of urwkv_s-ph2"),
        (["--mirror-axes", "0,1"], "--mirror-axes needs --mirror-evidence"),
    ],
)
def test_bad_options_are_usage_errors(campaign, capsys, extra, message):
    with pytest.raises(SystemExit) as done:
        script_main(release_args(campaign, *extra))
    assert done.value.code == 2 and message in capsys.readouterr().err


def test_a_name_that_is_no_2d_release_is_refused():
    with pytest.raises(SystemExit) as done:
        script_main(["runs", "evals", "urwkv-brats2018", "--hardware", "h", "--command", "c"])
    assert done.value.code == 2
