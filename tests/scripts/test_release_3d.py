"""scripts/release_3d.py: the 3D cards, curves and index entries from a campaign's runs, made by the project's own
writers (the loop's metrics.csv, checkpoints, export_release, the configs as runs save them, `rwkvseg evaluate`)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from rwkvseg.bench.complexity import count_parameters
from rwkvseg.checkpoint import CheckpointMeta, save_checkpoint
from rwkvseg.data.specs import dataset_spec
from rwkvseg.eval.evaluate import evaluate_folders
from rwkvseg.eval.report import read_run
from rwkvseg.models import create_model
from rwkvseg.released import export_release
from rwkvseg.train.config import load_config, to_dict
from writers import load_script, save_nifti, write_run_3d

ROOT = Path(__file__).resolve().parents[2]
REGIONS = ("WT", "TC", "ET")
RUNS = {  # variant -> (test-size model of its config, WT Dice of its three validations, extra settings)
    "mmsegrwkv_small": ({"name": "mmsegrwkv_test", "overrides": {"decoder_hidden": 16}}, [0.5, 0.7, 0.6], []),
    "segresnet": ({"name": "segresnet", "overrides": {"init_filters": 8}}, [0.4, 0.6, 0.65], []),
    "dynunet": ({"name": "dynunet", "overrides": {"filters": [4] * 6}}, [0.3, 0.5, 0.55], ["data.num_workers=3"]),
    "mmsegrwkv": ({"name": "mmsegrwkv_test", "overrides": {}}, [0.6, 0.8, 0.75], []),
}
SHIFTS = {  # evaluation -> voxels the predictions are shifted from the references (0: perfect)
    "mmsegrwkv_small": 1,
    "mmsegrwkv_small-brats2018": 2,
    "segresnet": 2,
    "dynunet": 3,
    "mmsegrwkv": 0,
    "mmsegrwkv-brats2018": 0,
}
SPEC = dataset_spec("brats")


def label_volume(seed: int) -> np.ndarray:
    """A 16^3 tumour: edema (2) around necrosis (1) around enhancing tumour (4), placed by seed."""
    volume = np.zeros((16, 16, 16), np.uint8)
    o = seed % 3
    volume[2 + o : 13 + o, 3:13, 2:14] = 2
    volume[4 + o : 11 + o, 5:11, 4:12] = 1
    volume[5 + o : 9 + o, 6:10, 5:10] = 4
    return volume


def write_evaluations(tmp: Path) -> dict[str, dict]:
    """EVALS/eval-<name>/summary.json by `rwkvseg evaluate` for every run and release; their summaries."""
    refs = tmp / "refs"
    cases = ["Brats18_2013_23_1", "Brats18_CBICA_ALU_1"]
    for i, case in enumerate(cases):
        save_nifti(refs / f"{case}_seg.nii.gz", label_volume(i), np.diag([2.0, 2.0, 2.0, 1.0]))
    summaries = {}
    for name, shift in SHIFTS.items():
        pred = tmp / "pred" / name
        for i, case in enumerate(cases):
            save_nifti(pred / f"{case}.nii.gz", np.roll(label_volume(i), shift, 0), np.diag([2.0, 2.0, 2.0, 1.0]))
        summaries[name] = evaluate_folders(pred, refs, tmp / "evals" / f"eval-{name}", spec=SPEC)
    return summaries


def write_run(runs: Path, variant: str, fold: dict, split: dict) -> Path:
    model, wt, settings = RUNS[variant]
    config = to_dict(load_config(ROOT / "configs" / f"brats2018_{variant}.toml", settings))
    run = write_run_3d(runs / f"brats2018-{variant}", wt, val_every=5, planned=40, config={**config, "model": model})
    (run / "split.json").write_text(json.dumps(split))
    row = read_run(run).best  # what validate_epoch records in the best checkpoint
    best = {"epoch": int(row["epoch"]), "step": int(row["step"])}
    best |= {k: v for k, v in row.items() if k.startswith("val_dice")}
    torch.manual_seed(0)
    network = create_model(model["name"], 4, 4, **model["overrides"])
    pre = {"dims": 3, "dataset": SPEC.to_dict(), "target_spacing": [2.0] * 3, "patch_size": [64] * 3}
    pre |= {"target": "labels", "inference": {"overlap": 0.5, "mirror_axes": [0, 1, 2]}}
    meta = CheckpointMeta(
        model["name"], 4, 4, model["overrides"], pre, ("0", "1", "2", "4"), (2.0,) * 3, {"best": best}
    )
    save_checkpoint(run / "best", network, meta)
    final = {"checkpoint": "best", "epoch": best["epoch"], "cases": fold["val"], "mirror_axes": [0, 1, 2]}
    final |= {f"dice_{r}": best[f"val_dice_{r}"] + 0.01 for r in REGIONS} | {"dice": best["val_dice"] + 0.01}
    (run / "final_val.json").write_text(json.dumps(final))
    return run


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    """RUNS (four runs and campaign.json), EVALS, a weights folder with both int8 releases and an index; the
    evaluation summaries."""
    tmp = tmp_path_factory.mktemp("release3d")
    split = json.loads((ROOT / "splits" / "brats2018_2mm.json").read_text())
    runs = {v: write_run(tmp / "runs", v, split["folds"][0], split) for v in RUNS}
    rows = [{**load_script("campaign").summary(run), "exit": 0} for run in runs.values()]
    (tmp / "runs" / "campaign.json").write_text(json.dumps({"wall_s": 1.0, "runs": rows}))
    weights = tmp / "weights"
    for arch in ("mmsegrwkv_small", "mmsegrwkv"):
        export_release(runs[arch] / "best", f"{arch}-brats2018", weights, precision="int8")
    old = {"architecture": "mmsegrwkv", "dataset": "d", "split": "s", "metrics": {"epochs": 15}, "notes": ""}
    index = [{"name": "urwkv-busi", **old}, {"name": "mmsegrwkv_small-brats2018", **old}]
    (weights / "index.json").write_text(json.dumps({"models": index}, indent=2) + "\n")
    return tmp, write_evaluations(tmp)


def release_args(tmp: Path, weights: Path, *names: str) -> list[str]:
    names = names or ("mmsegrwkv_small-brats2018", "mmsegrwkv-brats2018")
    options = ["--hardware", "one H200", "--command", "`campaign.py`", "--commit", "abc1234", "--weights-dir"]
    return [str(tmp / "runs"), str(tmp / "evals"), *names, *options, str(weights)]


def means(summary: dict, region: str) -> tuple[float, float]:
    return summary["regions"][region]["dice"]["mean"], summary["regions"][region]["hd95"]["mean"]


def test_release_3d_writes_cards_curves_and_index(campaign, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    tmp, evals = campaign
    weights = tmp_path / "weights"
    shutil.copytree(tmp / "weights", weights)
    script = load_script("release_3d")
    fp16 = [
        script.weights_sizes(weights / f"{n}.safetensors")[1]
        for n in ("mmsegrwkv_small-brats2018", "mmsegrwkv-brats2018")
    ]
    script.PACKAGE_MB = sum(fp16) / 2  # only the larger test model's fp16 is "too large"
    assert script.main(release_args(tmp, weights)) == 0
    assert capsys.readouterr().out.count("index entry") == 2

    card = (weights / "mmsegrwkv_small-brats2018.md").read_text()
    params = count_parameters(create_model("mmsegrwkv_test", 4, 4, decoder_hidden=16)) / 1e6
    assert f"`mmsegrwkv_test` with decoder_hidden 16 ({params:.2f} M parameters)" in card
    size = (weights / "mmsegrwkv_small-brats2018.safetensors").stat().st_size / 1e6
    assert f"; {size:.1f} MB (fp16 would be " in card and "too large" not in card
    assert "planned 40 epochs; stopped by the run's time limit after epoch 15 (poly schedule not finished)" in card
    assert (
        "validated every 5 epochs and after the last; 3,750 iterations (250 per epoch); best validation epoch 10"
        in card
    )
    assert "| hardware | one H200, 1.3 min of training and validation (median 4.0 s per epoch) |" in card
    assert "- fp32 and int8: `rwkvseg predict` (no TTA) and `rwkvseg evaluate`" in card  # no --eval-mirror-axes
    assert "- mirror TTA: the best checkpoint at the end of training, mirror TTA on axes " in card
    assert "split `splits/brats2018_2mm.json` (13 train / 5 val, stratified, seed 0)" in card
    assert "| command | `campaign.py` (code at commit abc1234) |" in card
    fp32, int8 = evals["mmsegrwkv_small"], evals["mmsegrwkv_small-brats2018"]
    (f_wt, f_hd), (i_wt, i_hd) = means(fp32, "WT"), means(int8, "WT")
    assert f"| WT | 0.7000 | 0.7100 | {f_wt:.4f} | {f_hd:.2f} | {i_wt:.4f} | {i_wt - f_wt:+.4f} | {i_hd:.2f} |" in card
    assert f"| mean | 0.6000 | 0.6100 | {fp32['mean_dice']:.4f} |" in card
    assert "the 2 validation cases" not in card and "2 of the split's 5 validation cases at 2 mm" in card
    assert "Settings of the runs' config.json that differ besides the model: `data.num_workers`." in card
    seg_hd95 = " | ".join(f"{means(evals['segresnet'], r)[1]:.2f}" for r in REGIONS)
    assert (
        f"| brats2018-segresnet | {count_parameters(create_model('segresnet', 4, 4, init_filters=8)) / 1e6:.2f} |"
        in card
    )
    assert f"| 15 of 40 | 15 | 0.6500 | 0.5500 | 0.4500 | 0.5500 | 0.5600 | {seg_hd95} | 4.0 |" in card
    assert "| brats2018-mmsegrwkv_small (these weights) |" in card and card.count("| brats2018-") == 4
    missed = [r for r, t in zip(REGIONS, (0.88, 0.80, 0.75), strict=True) if means(int8, r)[0] < t]
    assert missed and f"{len(missed)} of 3 targets missed" in card
    assert (weights / "mmsegrwkv_small-brats2018.curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    paper = (weights / "mmsegrwkv-brats2018.md").read_text()
    assert "too large to ship in the package, so only int8 is released" in paper
    params = count_parameters(create_model("mmsegrwkv_test", 4, 4)) / 1e6
    assert f"| architecture | `mmsegrwkv_test` in the registry's configuration ({params:.2f} M parameters) |" in paper
    assert "WT 1.0000 (target 0.88: met here)" in paper and "not yet a target met" in paper  # perfect predictions
    assert "mean Dice +0.0000, mean HD95 +0.00 mm" in paper

    index = json.loads((weights / "index.json").read_text())["models"]
    assert [m["name"] for m in index] == ["urwkv-busi", "mmsegrwkv_small-brats2018", "mmsegrwkv-brats2018"]
    entry = index[1]
    assert (entry["architecture"], entry["dataset"], entry["split"]) == (
        "mmsegrwkv_test",
        "brats2018_4mod_2mm",
        "splits/brats2018_2mm.json",
    )
    regions = {f"val_dice_{r}": round(means(int8, r)[0], 4) for r in REGIONS}
    assert entry["metrics"] == {"val_dice": round(int8["mean_dice"], 4), **regions, "epochs": 15}
    assert index[0]["metrics"] == {"epochs": 15} and entry["notes"] == "card: mmsegrwkv_small-brats2018.md"


def lose_an_evaluation(tmp: Path) -> str:
    (tmp / "evals" / "eval-dynunet" / "summary.json").unlink()
    summary = tmp / "evals" / "eval-dynunet" / "summary.json"
    return f"{summary} not found: score predictions with `rwkvseg evaluate PRED GT --out {summary.parent}`"


def release_another_run(tmp: Path) -> str:
    weights = tmp / "weights" / "mmsegrwkv-brats2018.safetensors"
    export_release(tmp / "runs" / "brats2018-mmsegrwkv_small" / "best", weights.stem, weights.parent, overwrite=True)
    return f"{weights} is missing or not exported from {tmp / 'runs' / 'brats2018-mmsegrwkv' / 'best'}"


@pytest.mark.parametrize("damage", [lose_an_evaluation, release_another_run])
def test_release_3d_refuses_in_one_line_and_writes_nothing(campaign, tmp_path, capsys, damage):
    tmp = tmp_path / "copy"
    shutil.copytree(campaign[0], tmp)
    message = damage(tmp)
    before = {p.name: p.read_bytes() for p in (tmp / "weights").iterdir()}
    assert load_script("release_3d").main(release_args(tmp, tmp / "weights")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("release_3d.py: error: ") and message in err
    assert {p.name: p.read_bytes() for p in (tmp / "weights").iterdir()} == before  # no card, curves or index change


def test_an_interrupted_run_without_its_final_evaluation_is_released_with_its_status(campaign, tmp_path):
    """A run stopped by the time limit before its final mirror-TTA evaluation (no final_val.json, summary.json
    status "interrupted") is released: no TTA cell, its status in the campaign table. A run that says it completed
    but lost final_val.json is refused."""
    pytest.importorskip("matplotlib")
    tmp, _ = campaign
    copy = tmp_path / "copy"
    shutil.copytree(tmp, copy, ignore=shutil.ignore_patterns("pred", "refs"))
    run = copy / "runs" / "brats2018-mmsegrwkv"
    (run / "final_val.json").unlink()
    script = load_script("release_3d")
    (run / "summary.json").write_text(json.dumps({"status": "complete"}))
    assert script.main(release_args(copy, copy / "weights", "mmsegrwkv-brats2018")) == 2
    assert not (copy / "weights" / "mmsegrwkv-brats2018.md").exists()

    (run / "summary.json").write_text(json.dumps({"status": "interrupted"}))
    assert script.main(release_args(copy, copy / "weights", "mmsegrwkv-brats2018")) == 0
    card = (copy / "weights" / "mmsegrwkv-brats2018.md").read_text()
    wt = next(line for line in card.splitlines() if line.startswith("| WT | "))
    assert wt.split(" | ")[2] == "-"  # the mirror TTA column
    assert "| brats2018-mmsegrwkv (these weights) | " in card and " of 40 (interrupted) | " in card
    assert "- mirror TTA: not run (the run was interrupted before its final evaluation" in card


def released_copy(campaign, tmp_path, name):
    """A copy of the campaign to release from, the script, and the release's sidecar path and JSON before."""
    pytest.importorskip("matplotlib")
    copy = tmp_path / "copy"
    shutil.copytree(campaign[0], copy, ignore=shutil.ignore_patterns("pred", "refs"))
    sidecar = copy / "weights" / f"{name}.json"
    return copy, load_script("release_3d"), sidecar, json.loads(sidecar.read_text())


def test_a_postprocessing_default_is_recorded_in_the_sidecar_and_the_card(campaign, tmp_path, capsys):
    name = "mmsegrwkv_small-brats2018"
    copy, script, sidecar, before = released_copy(campaign, tmp_path, name)
    evidence = "results_table.py: WT 0.80 -> 0.81 on the validation cases"
    options = ["--postprocess", "largest", "--postprocess-evidence", evidence]
    assert script.main(release_args(copy, copy / "weights", name) + options) == 0
    after = json.loads(sidecar.read_text())
    assert after["preprocessing"]["inference"] == {**before["preprocessing"]["inference"], "postprocess": "largest"}
    assert {k: v for k, v in after.items() if k != "preprocessing"} == {
        k: v for k, v in before.items() if k != "preprocessing"
    }  # the weights digest and everything else as exported
    card = (copy / "weights" / f"{name}.md").read_text()
    assert "| post-processing | `largest` by default (recorded as `preprocessing.inference.postprocess`" in card
    assert evidence in card
    # the default reaches prediction: the checkpoint loads and its Predictor3D takes it
    from rwkvseg.checkpoint import read_meta
    from rwkvseg.infer.postprocess import PostProcess, chosen_postprocess

    meta = read_meta(copy / "weights" / f"{name}.safetensors")
    assert chosen_postprocess(None, meta.preprocessing["inference"]) == PostProcess(largest=True)
    capsys.readouterr()
    with pytest.raises(SystemExit):  # the card must name its evidence
        script.main([*release_args(copy, copy / "weights", name), "--postprocess", "largest"])
    assert "--postprocess needs --postprocess-evidence" in capsys.readouterr().err
    # an option that does not fit the model: one line, nothing written
    before = {p.name: p.read_bytes() for p in (copy / "weights").iterdir()}
    assert (
        script.main(
            [*release_args(copy, copy / "weights", name), "--postprocess", "fill-holes", "--postprocess-evidence", "x"]
        )
        == 2
    )
    assert "fill-holes fills binary masks" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (copy / "weights").iterdir()} == before


def test_test_time_flips_chosen_on_validation_are_recorded_in_the_sidecar_and_the_card(campaign, tmp_path, capsys):
    name = "mmsegrwkv-brats2018"
    copy, script, sidecar, before = released_copy(campaign, tmp_path, name)
    assert before["preprocessing"]["inference"]["mirror_axes"] == [0, 1, 2]  # the training's
    evidence = "WT 0.8149 -> 0.8099 with flips on the validation cases"
    options = ["--mirror-axes", "", "--mirror-evidence", evidence]
    assert script.main([*release_args(copy, copy / "weights", name), *options]) == 0
    after = json.loads(sidecar.read_text())
    assert after["preprocessing"]["inference"] == {**before["preprocessing"]["inference"], "mirror_axes": []}
    card = (copy / "weights" / f"{name}.md").read_text()
    assert f"no mirror TTA by default (`--mirror-axes 0,1,2` asks for it), chosen on validation: {evidence} |" in card
    from rwkvseg.checkpoint import read_meta
    from rwkvseg.infer.predict3d import default_mirror_axes

    meta = read_meta(copy / "weights" / f"{name}.safetensors")  # prediction takes the recorded choice, on a GPU too
    assert default_mirror_axes(None, meta.preprocessing["inference"], torch.device("cuda")) == ()
    capsys.readouterr()
    with pytest.raises(SystemExit):
        script.main([*release_args(copy, copy / "weights", name), "--mirror-axes", "0,1"])
    assert "--mirror-axes needs --mirror-evidence" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.main([*release_args(copy, copy / "weights", name), "--mirror-axes", "3", "--mirror-evidence", "x"])
    assert "must name each of the axes 0, 1, 2 at most once" in capsys.readouterr().err


def test_a_region_threshold_chosen_on_validation_is_recorded_and_refused_for_a_label_model(campaign, tmp_path, capsys):
    name = "mmsegrwkv_small-brats2018"
    copy, script, sidecar, before = released_copy(campaign, tmp_path, name)
    evidence = "mean Dice 0.628 -> 0.659 at 0.1 on the validation cases"
    options = ["--threshold", "0.1", "--threshold-evidence", evidence]
    # the fixture's models predict labels: a threshold does not apply; one line, nothing written
    files = {p.name: p.read_bytes() for p in (copy / "weights").iterdir()}
    assert script.main([*release_args(copy, copy / "weights", name), *options]) == 2
    assert "--threshold 0.1 cuts region probabilities, and this model predicts labels" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (copy / "weights").iterdir()} == files
    assert script.main([*release_args(copy, copy / "weights", name), "--eval-threshold", "0.1"]) == 2
    assert "--eval-threshold 0.1 names a cut of region probabilities" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (copy / "weights").iterdir()} == files
    # the same run trained with region targets
    for path in (copy / "runs" / "brats2018-mmsegrwkv_small" / "best.json", sidecar):
        meta = json.loads(path.read_text())
        meta["preprocessing"]["target"] = "regions"
        path.write_text(json.dumps(meta))
    regions = json.loads(sidecar.read_text())
    assert script.main([*release_args(copy, copy / "weights", name), *options]) == 0
    after = json.loads(sidecar.read_text())
    assert after["preprocessing"]["inference"] == {**regions["preprocessing"]["inference"], "threshold": 0.1}
    assert {k: v for k, v in after.items() if k != "preprocessing"} == {
        k: v for k, v in before.items() if k != "preprocessing"
    }
    card = (copy / "weights" / f"{name}.md").read_text()
    assert "| threshold | each region's sigmoid cut at 0.1 by default (recorded as" in card and evidence in card
    assert "- fp32 and int8: `rwkvseg predict` (no TTA) and" in card  # evaluations at 0.5 unless told
    # evaluations predicted at the chosen cut: the card says so
    assert script.main([*release_args(copy, copy / "weights", name), *options, "--eval-threshold", "0.1"]) == 0
    card = (copy / "weights" / f"{name}.md").read_text()
    assert "- fp32 and int8: `rwkvseg predict` (no TTA, region threshold 0.1) and" in card
    (entry,) = [m for m in json.loads((copy / "weights" / "index.json").read_text())["models"] if m["name"] == name]
    assert entry["metrics"]["val_threshold"] == 0.1  # the index says at which cut its Dice were measured
    capsys.readouterr()
    for bad, message in [
        (["--threshold", "0.1"], "--threshold needs --threshold-evidence"),
        (["--threshold", "1.5", "--threshold-evidence", "x"], "--threshold 1.5 must be in [0, 1]"),
    ]:
        with pytest.raises(SystemExit):
            script.main([*release_args(copy, copy / "weights", name), *bad])
        assert message in capsys.readouterr().err


def test_notes_go_into_the_named_card_only_and_an_unknown_name_is_refused(campaign, tmp_path, capsys):
    """`--note NAME TEXT` puts a paragraph after NAME's validation table (what was measured beside the release, which
    a hand edit would lose when the card is written again); a note for a release not being written is an error."""
    pytest.importorskip("matplotlib")
    tmp, _ = campaign
    copy = tmp_path / "copy"
    shutil.copytree(tmp, copy, ignore=shutil.ignore_patterns("pred", "refs"))
    script = load_script("release_3d")
    args = release_args(copy, copy / "weights")
    with pytest.raises(SystemExit) as done:
        script.main([*args, "--note", "urwkv-kvasir", "not this run's"])
    assert done.value.code == 2 and "--note names urwkv-kvasir, not a release of this run" in capsys.readouterr().err
    assert not (copy / "weights" / "mmsegrwkv_small-brats2018.md").exists()

    note = ["--note", "mmsegrwkv_small-brats2018", "With mirror TTA: WT 0.81."]
    assert script.main([*args, *note, "--note", "mmsegrwkv_small-brats2018", "  The earlier release: 0.79.  "]) == 0
    card = (copy / "weights" / "mmsegrwkv_small-brats2018.md").read_text()
    table_end = card.index("| mean | ")
    first = card.index("With mirror TTA: WT 0.81.\n\n")
    assert table_end < first < card.index("The earlier release: 0.79.\n\nDice and HD95")
    assert "With mirror TTA" not in (copy / "weights" / "mmsegrwkv-brats2018.md").read_text()
