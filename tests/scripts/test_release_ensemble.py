"""scripts/release_ensemble.py: the fold models of a cross-validation released as one ensemble, scored by the CV."""

import json

import pytest

from rwkvseg.checkpoint import load_checkpoint, read_meta
from rwkvseg.released import ReleasedModel, released_checkpoints, released_models, update_index
from writers import load_script

COMMON = ["--variant", "brats2018-bright", "--dataset", "phantoms", "--hardware", "CPU", "--command", "campaign.py"]


@pytest.fixture
def scored(fold_campaign, tmp_path):
    """The fold campaign with its cross-validation (cv_eval.py at 0.5, no post-processing) in tmp/cv."""
    runs, data, split = fold_campaign
    cv = tmp_path / "cv"
    assert load_script("cv_eval").main([str(runs), str(data), str(cv), "--device", "cpu", "--postprocess", "none"]) == 0
    return runs, cv, split


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.exists() else {}


def test_release_writes_members_card_curves_and_an_index_entry(scored, tmp_path, capsys):
    runs, cv, split = scored
    weights = tmp_path / "weights"
    update_index(ReleasedModel("older", "bright3d", "phantoms", "none"), weights)  # kept as it is
    args = [str(runs), str(cv), "bright-cv", *COMMON, "--weights-dir", str(weights), "--postprocess", "largest"]
    args += ["--postprocess-evidence", "CV 0.5 against 0.4 without", "--note", "Measured beside it: nothing."]
    assert load_script("release_ensemble").main(args) == 0
    assert "released bright-cv: 2 members" in capsys.readouterr().out
    older, entry = released_models(weights)
    assert older.name == "older" and entry.members == ("bright-cv-k0", "bright-cv-k1")
    scores = json.loads((cv / "cv.json").read_text())["models"]["brats2018-bright"]["all"]
    assert entry.metrics["cv_dice"] == round(scores["dice"], 4) and entry.metrics["cv_cases"] == 5
    assert entry.metrics["cv_dice_TC"] == round(scores["dice_TC"], 4)
    assert entry.split == "splits/brats2018_5fold.json" and entry.dataset == "phantoms"
    members = released_checkpoints("bright-cv", weights)
    gains = []
    for path in members:
        meta = read_meta(path)
        assert meta.preprocessing["inference"]["postprocess"] == "largest"  # the recorded default
        model, _ = load_checkpoint(path)  # the digest matches the rewritten sidecar
        gains.append(model.mix.weight[0, 3].item())
    assert gains == pytest.approx([4.0, 2.0], rel=1e-2)  # fold 0's member is fold 0's model (int8)
    card = (weights / "bright-cv.md").read_text()
    assert f"| 0 | {len(split['folds'][0]['val'])} | 4 of 4 (4 planned) | 0.4500 |" in card  # best at epoch 4
    assert f"| 1 | {len(split['folds'][1]['val'])} | 4 of 4 (4 planned) | 0.5500 |" in card
    assert "| **all 5 cases** | 5 | | | " in card and f"(**{scores['dice']:.4f}**)" in card
    assert "`largest`" in card and "CV 0.5 against 0.4 without" in card and "Measured beside it: nothing." in card
    assert "no held-out cases here" in card and "| data | the cases of `phantoms`," in card
    assert (weights / "bright-cv.curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in weights.iterdir() if p.name.startswith("tmp")]  # the staging folder is gone


@pytest.mark.parametrize(
    "damage",
    ["name taken", "variant not scored", "no export for a fold", "bad postprocess", "members disagree", "short split"],
)
def test_release_refuses_in_one_line_and_writes_nothing(scored, tmp_path, capsys, damage):
    runs, cv, _ = scored
    weights = tmp_path / "weights"
    args = [str(runs), str(cv), "bright-cv", *COMMON, "--weights-dir", str(weights)]
    if damage == "name taken":
        update_index(ReleasedModel("bright-cv", "bright3d", "phantoms", "none"), weights)
        message = "lists bright-cv already"
    elif damage == "variant not scored":
        args[args.index("brats2018-bright")] = "brats2018-other"
        message = "has no brats2018-other"
    elif damage == "no export for a fold":
        exports = tmp_path / "exports"
        exports.mkdir()
        for suffix in (".safetensors", ".json"):
            (exports / f"x-fold0{suffix}").write_bytes((runs / "brats2018-bright-fold0" / f"best{suffix}").read_bytes())
        args += ["--members-from", str(exports)]
        message = "0 files end in fold1.safetensors"
    elif damage == "bad postprocess":
        args += ["--postprocess", "fill-holes", "--postprocess-evidence", "none"]
        message = "--postprocess"
    elif damage == "members disagree":
        sidecar = runs / "brats2018-bright-fold1" / "best.json"
        record = json.loads(sidecar.read_text())
        record["preprocessing"]["inference"] = {**record["preprocessing"].get("inference", {}), "threshold": 0.3}
        sidecar.write_text(json.dumps(record))
        message = "cannot form one ensemble"
    else:
        split = runs / "brats2018-bright-fold1" / "split.json"
        split.write_text(json.dumps({**json.loads(split.read_text()), "folds": []}))
        message = "holds no fold 1"
    before = snapshot(weights)
    assert load_script("release_ensemble").main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert snapshot(weights) == before
