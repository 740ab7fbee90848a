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


def write_train_all_run(runs: Path, split: dict, train_cases: int = 18) -> Path:
    """A run of MMSegRWKV (test size) trained on every case of the committed split: metrics.csv without
    validation, its config (train_all), split and last-epoch best checkpoint as the loop writes them."""
    from rwkvseg.train.loop import LAST_EPOCH, _write_metrics_csv

    run = runs / "brats2018-mmsegrwkv"
    run.mkdir(parents=True)
    rows = [{"epoch": e, "step": 250 * e, "lr": 0.01, "train_loss": 1 / e, "train_seconds": 8.0} for e in (1, 2, 3)]
    _write_metrics_csv(run / "metrics.csv", rows)
    config = to_dict(load_config(ROOT / "configs" / "brats2018_mmsegrwkv.toml", ["train_all=true", "epochs=3"]))
    model = {"name": "mmsegrwkv_test", "overrides": {}}
    (run / "config.json").write_text(json.dumps({**config, "model": model}))
    (run / "split.json").write_text(json.dumps(split))
    (run / "summary.json").write_text(json.dumps({"status": "complete"}))
    pre = {"dims": 3, "dataset": SPEC.to_dict(), "target_spacing": [2.0] * 3, "patch_size": [64] * 3}
    pre |= {"target": "regions", "inference": {"overlap": 0.5, "mirror_axes": [0, 1, 2]}}
    best = {"epoch": 3, "step": 750, "selection": LAST_EPOCH}
    training = {"best": best, "train_all": True, "train_cases": train_cases}
    meta = CheckpointMeta("mmsegrwkv_test", 4, 3, {}, pre, REGIONS, (2.0,) * 3, training)
    torch.manual_seed(0)
    save_checkpoint(run / "best", create_model("mmsegrwkv_test", 4, 3), meta)
    return run


def write_cv(
    path: Path,
    models: tuple[str, ...] = ("brats2018-mmsegrwkv-ds2_e34",),
    shift: float = 0.0,
    checkpoints_from: str | None = None,
) -> Path:
    """A scripts/cv_eval.py file: each model's means over all cases and per fold (every Dice lowered by shift and
    every HD95 raised by 10 * shift; checkpoints_from: as cv_eval records --checkpoints-from)."""
    scores = {"dice_WT": 0.8733, "hd95_WT": 9.17, "dice_TC": 0.7469, "hd95_TC": 10.30, "dice_ET": 0.7207}
    scores |= {"hd95_ET": 8.51, "dice": 0.7803}
    scores = {k: v + 10 * shift if k.startswith("hd95") else v - shift for k, v in scores.items()}
    entry = {
        "folds": [0, 1, 2, 3, 4],
        "cases": 18,
        "all": scores,
        "per_fold": {str(k): {"dice": 0.7 + k / 100} for k in range(5)},
    }
    settings = {"threshold": 0.5, "mirror_axes": "", "postprocess": "largest", "device": "cuda", "compile": "off"}
    settings["checkpoints_from"] = checkpoints_from
    path.write_text(json.dumps({"settings": settings, "models": dict.fromkeys(models, entry)}))
    return path


def released_train_all_run(tmp_path: Path, split: dict) -> tuple[Path, Path]:
    """A train_all run under tmp_path/runs exported as int8 `mmsegrwkv-brats2018` into tmp_path/weights (with an
    empty index), and its recipe's cross-validation file: (weights folder, cv.json)."""
    run = write_train_all_run(tmp_path / "runs", split)
    weights = tmp_path / "weights"
    export_release(run / "best", "mmsegrwkv-brats2018", weights, precision="int8")
    (weights / "index.json").write_text(json.dumps({"models": []}) + "\n")
    return weights, write_cv(tmp_path / "cv.json")


def test_a_model_trained_on_every_case_is_released_with_its_recipes_cross_validation(tmp_path, capsys):
    """A train_all run has nothing to validate it: its card shows the cross-validation of the recipe's fold models
    (--cv) in place of a validation table, its index entry holds cv_* metrics, EVALS is not read; it is refused
    without --cv, with a cv file of several models and no --cv-model, and with a run that trained other cases."""
    pytest.importorskip("matplotlib")
    split = json.loads((ROOT / "splits" / "brats2018_2mm.json").read_text())
    weights, cv = released_train_all_run(tmp_path, split)
    script = load_script("release_3d")
    base = release_args(tmp_path, weights, "mmsegrwkv-brats2018")  # tmp_path/evals does not exist
    evidence = ["--cv-evidence", "session 44's five fold runs of this recipe, 34 epochs"]
    assert script.main(base) == 2
    assert "trained on every case (train_all), so nothing validates it: give --cv" in capsys.readouterr().err
    chosen = ["--postprocess", "largest", "--postprocess-evidence", "the cross-validation's cut"]
    assert script.main([*base, "--cv", str(cv), *evidence, *chosen]) == 0

    card = (weights / "mmsegrwkv-brats2018.md").read_text()
    assert card.startswith("# mmsegrwkv-brats2018: MMSegRWKV (paper configuration) trained on BraTS 2018") and (
        "every case" in card.splitlines()[0]
    )
    assert "| data | every one of the 18 cases of `../shared/data/brats2018_4mod_2mm`" in card
    assert "session 44's five fold runs of this recipe, 34 epochs" in card
    assert "`brats2018-mmsegrwkv-ds2_e34`, 5 folds, 18 cases; region cut 0.5, post-processing `largest`" in card
    assert "| TC | 0.7469 | 10.30 | 0.80 |" in card and "| mean | 0.7803 | 9.33 | |" in card
    assert (
        "Per fold, mean Dice: 0: 0.7000, 1: 0.7100" in card
        and "planned 3 epochs, all run, no validation (train_all)" in card
    )
    assert "not measured for these weights" in card and "| post-processing | `largest` by default" in card
    assert (weights / "mmsegrwkv-brats2018.curves.png").is_file()
    (entry,) = json.loads((weights / "index.json").read_text())["models"]
    assert entry["metrics"] == {
        "cv_dice_WT": 0.8733,
        "cv_dice_TC": 0.7469,
        "cv_dice_ET": 0.7207,
        "cv_dice": 0.7803,
        "cv_cases": 18,
        "epochs": 3,
        "train_cases": 18,
    }
    assert "train_all" in entry["notes"]
    sidecar = json.loads((weights / "mmsegrwkv-brats2018.json").read_text())
    assert sidecar["preprocessing"]["inference"]["postprocess"] == "largest"

    two = write_cv(tmp_path / "cv2.json", ("a", "b"))
    assert script.main([*base, "--cv", str(two), *evidence]) == 2
    assert "holds the models ['a', 'b']: name one with --cv-model" in capsys.readouterr().err
    assert script.main([*base, "--cv", str(two), "--cv-model", "b", *evidence]) == 0
    with pytest.raises(SystemExit):
        script.main([*base, "--cv", str(cv)])  # no evidence named
    with pytest.raises(SystemExit):  # one recipe's cross-validation would stand for two models
        two_names = release_args(tmp_path, weights, "mmsegrwkv-brats2018", "mmsegrwkv_small-brats2018")
        script.main([*two_names, "--cv", str(cv), *evidence])
    assert "release one model per call" in capsys.readouterr().err
    capsys.readouterr()
    other = write_train_all_run(tmp_path / "other" / "runs", split, train_cases=13)
    export_release(other / "best", "mmsegrwkv-brats2018", tmp_path / "w2", precision="int8")
    (tmp_path / "w2" / "index.json").write_text(json.dumps({"models": []}) + "\n")
    argv = release_args(tmp_path / "other", tmp_path / "w2", "mmsegrwkv-brats2018")
    assert script.main([*argv, "--cv", str(cv), *evidence]) == 2
    assert "trained 13 cases, not the 18 of the split" in capsys.readouterr().err


def test_the_int8_change_of_a_model_trained_on_every_case_is_measured_on_its_recipes_fold_models(tmp_path, capsys):
    """--int8-cv FP32_CV INT8_CV: the same recipe's fold models cross-validated in fp32 and as int8 exports give the
    card its int8 change per region; the pair is refused swapped, predicted differently, over other cases, or
    without --cv and evidence."""
    pytest.importorskip("matplotlib")
    split = json.loads((ROOT / "splits" / "brats2018_2mm.json").read_text())
    weights, cv = released_train_all_run(tmp_path, split)
    fp32 = write_cv(tmp_path / "fp32.json", shift=0.001)
    int8 = write_cv(tmp_path / "int8.json", shift=0.003, checkpoints_from="/w/int8-B")
    script = load_script("release_3d")
    base = release_args(tmp_path, weights, "mmsegrwkv-brats2018")
    base += ["--cv", str(cv), "--cv-evidence", "session 44's five fold runs"]
    said = ["--int8-cv-evidence", "session 50's five fold runs of the recipe"]
    assert script.main([*base, "--int8-cv", str(fp32), str(int8), *said]) == 0
    card = (weights / "mmsegrwkv-brats2018.md").read_text()
    assert "not measured" not in card
    assert (
        "the int8 change (int8 minus fp32), measured on the same recipe's 5 fold models on their 18 held-out cases "
        "(session 50's five fold runs of the recipe): mean Dice -0.0020 (WT -0.0020, TC -0.0020, ET -0.0020), mean "
        "HD95 +0.02 mm" in card
    )

    assert script.main([*base, "--int8-cv", str(int8), str(fp32), *said]) == 2  # swapped
    assert "scored other checkpoints (--checkpoints-from): give the fold runs' own fp32 scores first" in (
        capsys.readouterr().err
    )
    doc = json.loads(int8.read_text())
    doc["settings"]["threshold"] = 0.3
    (tmp_path / "int8-cut.json").write_text(json.dumps(doc))
    assert script.main([*base, "--int8-cv", str(fp32), str(tmp_path / "int8-cut.json"), *said]) == 2
    assert "were predicted differently (threshold, mirror_axes, postprocess, checkpoint)" in capsys.readouterr().err
    doc = json.loads(fp32.read_text())
    doc["settings"]["checkpoint"] = "last"  # the fold runs' last epochs, against int8 exports of their best
    (tmp_path / "fp32-last.json").write_text(json.dumps(doc))
    assert script.main([*base, "--int8-cv", str(tmp_path / "fp32-last.json"), str(int8), *said]) == 2
    assert "were predicted differently" in capsys.readouterr().err
    doc = json.loads(int8.read_text())
    next(iter(doc["models"].values()))["cases"] = 15
    (tmp_path / "int8-15.json").write_text(json.dumps(doc))
    assert script.main([*base, "--int8-cv", str(fp32), str(tmp_path / "int8-15.json"), *said]) == 2
    assert "scored different folds or cases" in capsys.readouterr().err
    # --cv-model names a model of --cv; the fold runs scored for the int8 change may carry another variant name
    two = write_cv(tmp_path / "cv2.json", ("a", "b"))
    other = [*release_args(tmp_path, weights, "mmsegrwkv-brats2018"), "--cv", str(two), "--cv-model", "b"]
    other += ["--cv-evidence", "session 44's five fold runs"]
    assert script.main([*other, "--int8-cv", str(fp32), str(int8), *said]) == 0
    assert "mean Dice -0.0020 (WT -0.0020" in (weights / "mmsegrwkv-brats2018.md").read_text()
    assert "Each fold model was the best checkpoint of its own validation cases" in card
    doc = json.loads(cv.read_text())
    doc["settings"]["checkpoint"] = "last"  # cv_eval.py --checkpoint last: each fold run's last epoch
    (tmp_path / "cv-last.json").write_text(json.dumps(doc))
    last = [*base[: base.index("--cv") + 1], str(tmp_path / "cv-last.json"), *base[base.index("--cv") + 2 :]]
    assert script.main(last) == 0
    card = (weights / "mmsegrwkv-brats2018.md").read_text()
    assert "Each fold model was its run's last epoch, the rule these weights follow" in card
    assert "on cuda; each fold's last-epoch checkpoint." in card and "optimistic" not in card
    assert script.main([*base, "--int8-cv", str(fp32), str(fp32), *said]) == 2  # one file twice
    assert "scored the runs' own checkpoints" in capsys.readouterr().err
    doc = json.loads(int8.read_text())
    del doc["settings"]["checkpoints_from"]  # cv_eval before it recorded the key (session 45's int8 members)
    (tmp_path / "int8-s45.json").write_text(json.dumps(doc))
    assert script.main([*base, "--int8-cv", str(fp32), str(tmp_path / "int8-s45.json"), *said]) == 0
    assert "mean Dice -0.0020 (WT -0.0020" in (weights / "mmsegrwkv-brats2018.md").read_text()
    with pytest.raises(SystemExit):
        script.main([*base, "--int8-cv", str(fp32), str(int8)])  # no evidence
    assert "--int8-cv goes with --cv" in capsys.readouterr().err


def test_a_run_fitted_to_its_time_limit_reads_as_fitted_in_the_campaign_table(campaign, tmp_path):
    """A run that fit_schedule fitted to its budget and that ran all its fitted epochs is not shown as stopped
    short of its planned ones: the table says the epochs were fitted, the card's schedule how."""
    pytest.importorskip("matplotlib")
    tmp, _ = campaign
    copy = tmp_path / "copy"
    shutil.copytree(tmp, copy, ignore=shutil.ignore_patterns("pred", "refs"))
    run = copy / "runs" / "brats2018-mmsegrwkv"
    fit = {"planned": 40, "epochs": 15, "epoch": 2, "step": 500, "seconds_per_epoch": 4.0, "seconds_left": 60.0}
    (run / "summary.json").write_text(json.dumps({"status": "complete", "schedule_fit": fit}))
    assert load_script("release_3d").main(release_args(copy, copy / "weights", "mmsegrwkv-brats2018")) == 0
    card = (copy / "weights" / "mmsegrwkv-brats2018.md").read_text()
    assert "| brats2018-mmsegrwkv (these weights) | " in card and " | 15 of 15 fitted (40 planned) | " in card
    assert "planned 40 epochs, fitted to 15 after epoch 2 by the run's time limit (poly schedule compressed" in card
