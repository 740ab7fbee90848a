"""3D training end to end on synthetic phantoms: CLI dispatch, sliding-window validation, a checkpoint that predicts
alone onto the input grid, bit-exact resume, both loss paradigms, and the config / cache checks."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rwkvseg.checkpoint import read_meta
from rwkvseg.cli import main
from rwkvseg.data.specs import dataset_spec
from rwkvseg.data.synthetic3d import write_synthetic_volumes
from rwkvseg.data.volumes import discover_cases
from rwkvseg.files import file_sha256
from rwkvseg.infer.predict import PredictConfig
from rwkvseg.infer.predict3d import Predictor3D
from rwkvseg.models import create_model
from rwkvseg.train.config import LossConfig, TrainConfig, VolumeDataConfig, config_dims, load_config, read_config_file
from rwkvseg.train.losses import RegionLoss, SegmentationLoss
from rwkvseg.train.train import train
from rwkvseg.train.volumes import FINAL_FILE, prepare_cache
from writers import assert_same_run

BRATS = dataset_spec("brats")
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
# cached phantoms are about 17 x 22 x 19: two windows per case along the first axis keep validation cheap (the
# test model pads any input up to 32 x 32 x 64, so small patches would only add windows)
PATCH = (15, 23, 21)
BASE = {
    "dims": 3,
    "device": "cpu",
    "amp": "off",
    "seed": 5,
    "val_every": 1,
    "model": {"name": "mmsegrwkv_test"},
    "data": {
        "patch_size": list(PATCH),
        "samples_per_epoch": 2,
        "batch_size": 1,
        "num_workers": 0,
        "val_fraction": 0.34,
    },
    "infer": {"mirror_axes": [0], "sw_batch_size": 2},
    "optim": {"name": "sgd", "lr": 0.01, "momentum": 0.99, "nesterov": True},
}


def write_config(path, **changes):
    data = json.loads(json.dumps(BASE))
    for key, value in changes.items():
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    lines = []

    def emit(table, prefix):
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
        if prefix:
            lines.append(f"[{prefix}]")
        lines.extend(f"{k} = {json.dumps(v)}" for k, v in scalars.items())
        for k, v in table.items():
            if isinstance(v, dict):
                emit(v, f"{prefix}.{k}" if prefix else k)

    emit(data, "")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    ("target", "threshold", "post"), [("labels", 0.5, ""), ("regions", 0.5, ""), ("regions", 0.2, "largest")]
)
def test_cli_trains_validates_and_the_checkpoint_predicts_alone_on_the_input_grid(
    tmp_path, raw, target, threshold, post, capsys
):
    changes = {"data.target": target, "threshold": threshold, "infer.val_postprocess": post}
    config = write_config(tmp_path / "c.toml", epochs=1, max_steps_per_epoch=1, **changes)
    run_dir = tmp_path / "run"
    code = main(["train", str(config), "--data", str(raw), "--out", str(run_dir), "--no-progress"])
    assert code == 0 and "best validation dice" in capsys.readouterr().out
    assert (run_dir / "cache" / "plans.json").is_file()  # the raw folder was preprocessed into the run
    # `rwkvseg train --out RUN --resume` reads RUN/config.json: it must come back as the same 3D config
    saved = read_config_file(run_dir / "config.json")
    assert config_dims(saved) == 3
    assert load_config(run_dir / "config.json") == load_config(config, [f"data.root={raw}", f"out={run_dir}"])
    split = json.loads((run_dir / "split.json").read_text())["folds"][0]
    assert len(split["train"]) + len(split["val"]) == 4 and split["val"]
    history = (run_dir / "metrics.csv").read_text().splitlines()
    assert len(history) == 2 and all(f"val_dice_{r}" in history[0] for r in ("WT", "TC", "ET"))
    final = json.loads((run_dir / FINAL_FILE).read_text())
    assert final["mirror_axes"] == [0] and final["cases"] == split["val"] and 0 <= final["dice"] <= 1
    assert final["postprocess"] == (post or "none")
    assert sorted(final["per_case"]) == sorted(split["val"])  # each case's Dice per region; the means agree
    for region in ("WT", "TC", "ET"):
        cases = [scores[f"dice_{region}"] for scores in final["per_case"].values()]
        assert final[f"dice_{region}"] == pytest.approx(sum(cases) / len(cases))

    meta = read_meta(run_dir / "best")
    assert meta.num_classes == (4 if target == "labels" else 3) and meta.in_channels == 4
    assert meta.preprocessing["target"] == target and meta.preprocessing["patch_size"] == list(PATCH)
    assert meta.preprocessing["dataset"]["modalities"] == ["t1", "t1ce", "t2", "flair"]
    assert meta.training["best"]["epoch"] == 1 and meta.spacing == (2.0, 2.0, 2.0)
    # a region run's cut other than 0.5 is recorded for prediction (0.5 is the default when none is)
    assert meta.preprocessing["inference"].get("threshold", 0.5) == threshold
    assert ("threshold" in meta.preprocessing["inference"]) == (threshold != 0.5)
    # validation's post-processing is prediction's default too (none recorded when off)
    assert meta.preprocessing["inference"].get("postprocess", "") == post

    # a new case on another grid (1.5 mm, odd shape) comes back on that grid with its affine
    other = tmp_path / "other"
    write_synthetic_volumes(other, n=1, shape=(25, 29, 19), spacing=1.5, seed=9)
    (case,) = discover_cases(other, BRATS, require_label=False)
    predictor = Predictor3D.from_checkpoint(run_dir / "best", PredictConfig(mirror_axes=()))
    assert predictor.threshold == threshold and predictor.postprocess.largest == (post == "largest")
    out = predictor.predict_to_file(case, tmp_path / "pred")
    written, source = nib.load(out), nib.load(other / "Phantom_000" / "Phantom_000_flair.nii.gz")
    assert written.shape == source.shape == (25, 29, 19)
    np.testing.assert_array_equal(written.affine, source.affine)
    assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1, 2, 4}


def test_resume_repeats_the_uninterrupted_run_bit_for_bit(tmp_path, cache):
    overrides = [f"data.root={cache}", "epochs=2", "max_steps_per_epoch=1"]
    overrides += ["val_every=2", "infer.final_eval=false"]
    path = write_config(tmp_path / "c.toml")
    straight = load_config(path, [*overrides, f"out={tmp_path / 'a'}"])
    train(straight)
    split = load_config(path, [*overrides, f"out={tmp_path / 'b'}"])
    first = train(split, stop=lambda progress: progress.epoch == 1)
    assert first.epoch == 1 and first.step == 1 and not (tmp_path / "b" / "best.json").exists()
    with pytest.raises(FileExistsError, match="pass --resume"):
        train(split)
    resumed = train(split, resume=True)
    assert resumed.epoch == 2 and resumed.step == 2
    assert_same_run(tmp_path / "a", tmp_path / "b")


def test_a_3d_run_starts_from_model_init_and_refuses_another_target(tmp_path, cache, monkeypatch):
    import rwkvseg.train.train

    overrides = [f"data.root={cache}", "epochs=1", "max_steps_per_epoch=1", "infer.final_eval=false"]
    path = write_config(tmp_path / "c.toml")
    train(load_config(path, [*overrides, f"out={tmp_path / 'source'}"]))
    weights = tmp_path / "source" / "best.safetensors"
    init = [*overrides, f"model.init={weights}"]
    with pytest.raises(
        ValueError, match=r"model\.init .* predicts labels and this run regions; set data\.target = labels"
    ):
        train(load_config(path, [*init, "data.target=regions", f"out={tmp_path / 'regions'}"]))
    started, setup = [], rwkvseg.train.train.training_setup

    def spy(model, *args, **kwargs):
        started.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return setup(model, *args, **kwargs)

    monkeypatch.setattr(rwkvseg.train.train, "training_setup", spy)
    train(load_config(path, [*init, f"out={tmp_path / 'tuned'}"]))
    source = load_file(weights)
    assert started[0].keys() == source.keys() and all(torch.equal(started[0][k], v) for k, v in source.items())
    record = {"source": str(weights), "weights_sha256": file_sha256(weights)}
    assert read_meta(tmp_path / "tuned" / "best").training["init"] == record


def test_a_time_budget_stops_after_a_validated_epoch_and_leaves_a_best_checkpoint(tmp_path, cache):
    overrides = [f"data.root={cache}", f"out={tmp_path / 'run'}", "epochs=5", "val_every=2", "max_minutes=1e-6"]
    overrides += ["max_steps_per_epoch=1", "infer.mirror_axes=[]"]
    progress = train(load_config(write_config(tmp_path / "c.toml"), overrides))
    assert progress.epoch == 2 and progress.best_epoch == 2  # epoch 1 is past the budget but not validated
    assert json.loads((tmp_path / "run" / FINAL_FILE).read_text())["epoch"] == 2


class Unsure(torch.nn.Module):
    """Every voxel in every region with probability 0.2: right where there is tumour, but under-confident."""

    def forward(self, x):  # [B, 4, *S] -> [B, 3, *S]
        return torch.full((x.shape[0], 3, *x.shape[2:]), -1.386)  # sigmoid(-1.386) = 0.2


def test_region_validation_cuts_at_the_run_threshold(cache):
    from rwkvseg.data.preprocess3d import load_plans
    from rwkvseg.train.validate import SlidingWindowValidator

    cases = sorted(load_plans(cache)["cases"])[:2]
    scores = {
        t: SlidingWindowValidator.from_cache(cache, cases, PATCH, "regions", threshold=t)(Unsure()) for t in (0.5, 0.1)
    }
    assert scores[0.5]["dice_WT"] == 0.0  # nothing above 0.5: every tumour missed
    assert 0.0 < scores[0.1]["dice_WT"] < 1.0  # everything above 0.1: the whole volume is tumour
    assert scores[0.1]["dice"] > scores[0.5]["dice"]


class Speckled(torch.nn.Module):
    """Labels from the input: NCR (class 1) where the flair channel is above its mean, and ET (class 3) on isolated
    voxels every fifth index of each axis: a tumour with stray specks for `largest` to remove."""

    def forward(self, x):  # [B, 4, *S] -> [B, 4, *S]
        flair = x[:, 3]
        logits = torch.zeros(x.shape[0], 4, *x.shape[2:])
        logits[:, 1] = torch.where(flair > flair.mean(), 3.0, -3.0)
        specks = torch.zeros(x.shape[2:], dtype=torch.bool)
        specks[2::5, 2::5, 2::5] = True
        logits[:, 3] = torch.where(specks, 6.0, -6.0)
        return logits


def test_validation_post_processes_the_label_map_as_prediction_writes_it(cache):
    from scipy import ndimage

    from rwkvseg.data.preprocess3d import load_cached_case, load_plans
    from rwkvseg.infer.postprocess import PostProcess
    from rwkvseg.infer.sliding_window import activate, predict_logits
    from rwkvseg.train.validate import SlidingWindowValidator

    plans = load_plans(cache)
    cases = sorted(plans["cases"])[:2]
    plain = SlidingWindowValidator.from_cache(cache, cases, PATCH, "labels")
    largest = SlidingWindowValidator.from_cache(cache, cases, PATCH, "labels", postprocess=PostProcess(largest=True))
    got, before = largest.per_case(Speckled()), plain.per_case(Speckled())
    regions = {"WT": [1, 2, 3], "TC": [1, 3], "ET": [3]}  # class indices of BraTS labels 1, 2, 4 (label 4: class 3)
    for case_id in cases:
        case = load_cached_case(cache, case_id, plans)
        probs = activate(predict_logits(Speckled(), torch.from_numpy(case.image)[None], plain.window, "cpu"), "softmax")
        classes = probs[0].argmax(0).numpy()  # [*S]
        parts, count = ndimage.label(classes > 0, structure=np.ones((3, 3, 3)))
        assert count > 1  # the specks are components of their own
        keep = parts == 1 + np.argmax(np.bincount(parts.ravel())[1:])
        kept = np.where(keep, classes, 0)
        for name, members in regions.items():
            pred, truth = np.isin(kept, members), np.isin(case.label, members)
            both = pred.sum() + truth.sum()
            expected = 1.0 if both == 0 else 2 * (pred & truth).sum() / both
            assert got[case_id][f"dice_{name}"] == pytest.approx(expected)
    assert got != before  # the specks counted against the plain validation


def _soft_dice_loss(prob, target, dims):
    """1 - soft Dice summed over dims (MONAI's smoothing 1e-5 above and below), written out as a reference."""
    return 1 - (2 * (prob * target).sum(dims) + 1e-5) / ((prob + target).sum(dims) + 1e-5)


def test_region_loss_is_bce_plus_sigmoid_dice_per_region():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, 4, 3)
    target = (torch.rand(2, 3, 5, 4, 3) > 0.6).float()
    prob = logits.sigmoid()
    dice = _soft_dice_loss(prob, target, (2, 3, 4))  # [B, R]: per patch and region
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    loss = RegionLoss(LossConfig(name="auto", ce_weight=0.5, dice_weight=2.0))(logits, target)
    torch.testing.assert_close(loss, 0.5 * bce + 2.0 * dice.mean())
    torch.testing.assert_close(RegionLoss(LossConfig(name="dice"))(logits, target), dice.mean())


def test_region_weights_weigh_each_regions_bce_and_dice_and_are_checked():
    """loss.region_weights [1, 2, 1]: the tumour core's BCE and Dice count double in the mean over the regions
    (equal weights give the plain loss); per sample and pooled over the batch; wrong lengths, negative weights and
    label or 2D models are refused in one line."""
    from monai.losses import DiceLoss

    from rwkvseg.data.specs import dataset_spec
    from rwkvseg.train.losses import build_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, 4, 3, requires_grad=True)
    target = (torch.rand(2, 3, 5, 4, 3) > 0.6).float()
    weights = torch.tensor([1.0, 2.0, 1.0])
    for batch_dice, dims in ((False, (2, 3, 4)), (True, (0, 2, 3, 4))):
        dice = _soft_dice_loss(logits.sigmoid(), target, dims)  # [B, R] or [R]
        dice_r = dice.mean(0) if dice.ndim == 2 else dice
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
        bce_r = bce.mean((0, 2, 3, 4))  # [R]
        expected = 0.5 * (bce_r * weights).sum() / 4 + 2.0 * (dice_r * weights).sum() / 4
        config = LossConfig(ce_weight=0.5, dice_weight=2.0, batch_dice=batch_dice, region_weights=(1.0, 2.0, 1.0))
        loss = RegionLoss(config)(logits, target)
        torch.testing.assert_close(loss, expected)
        grad, want = torch.autograd.grad(loss, logits)[0], torch.autograd.grad(expected, logits)[0]
        torch.testing.assert_close(grad, want)
        plain = RegionLoss(LossConfig(ce_weight=0.5, dice_weight=2.0, batch_dice=batch_dice))(logits, target)
        equal = LossConfig(ce_weight=0.5, dice_weight=2.0, batch_dice=batch_dice, region_weights=(3.0, 3.0, 3.0))
        torch.testing.assert_close(RegionLoss(equal)(logits, target), plain)
        assert not torch.allclose(loss, plain)
    # without weights the loss is the one of before region_weights, bit for bit (runs resume and repeat as they did)
    before = torch.nn.functional.binary_cross_entropy_with_logits(logits, target) + DiceLoss(sigmoid=True)(
        logits, target
    )
    assert torch.equal(RegionLoss(LossConfig())(logits, target), before)
    brats = dataset_spec("brats")
    with pytest.raises(ValueError, match=r"region_weights \[1.0, 2.0\]: give one weight per region \(WT, TC, ET\)"):
        build_loss(LossConfig(region_weights=(1.0, 2.0)), brats, "regions")
    with pytest.raises(ValueError, match="for 3D region targets"):
        build_loss(LossConfig(region_weights=(1.0, 2.0, 1.0)), brats, "labels")
    with pytest.raises(ValueError, match="for 3D region targets"):
        SegmentationLoss(1, LossConfig(region_weights=(1.0,)))
    for bad in ((1.0, -1.0, 1.0), (0.0, 0.0, 0.0)):
        with pytest.raises(ValueError, match=r"loss.region_weights .*: give weights >= 0, not all 0"):
            LossConfig(region_weights=bad)


def test_batch_dice_pools_each_region_over_the_batch_so_an_empty_patch_no_longer_scores_alone():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, 4, 3)
    target = (torch.rand(2, 3, 5, 4, 3) > 0.6).float()
    target[1, 2] = 0  # the second patch holds no ET
    dice = _soft_dice_loss(logits.sigmoid(), target, (0, 2, 3, 4))  # [R]: one Dice per region over both patches
    batch = RegionLoss(LossConfig(name="dice", batch_dice=True))
    torch.testing.assert_close(batch(logits, target), dice.mean())
    per_sample = RegionLoss(LossConfig(name="dice"))
    # per sample, the empty ET patch costs a whole Dice loss for its stray probabilities; pooled it costs less
    assert per_sample(logits, target) > batch(logits, target)
    labels = torch.randint(0, 3, (2, 1, 7, 9))
    logits2d = torch.randn(2, 3, 7, 9, requires_grad=True)
    onehot = torch.nn.functional.one_hot(labels[:, 0], 3).permute(0, 3, 1, 2).float()
    pooled = _soft_dice_loss(logits2d.softmax(1), onehot, (0, 2, 3))  # [K]
    loss2d = SegmentationLoss(3, LossConfig(name="dice", batch_dice=True))(logits2d, labels.float())
    torch.testing.assert_close(loss2d, pooled.mean())
    grad, expected = torch.autograd.grad(loss2d, logits2d)[0], torch.autograd.grad(pooled.mean(), logits2d)[0]
    torch.testing.assert_close(grad, expected)
    ce = torch.nn.functional.cross_entropy(logits2d, labels[:, 0])  # CE + Dice: the CE unchanged, the Dice pooled
    both = SegmentationLoss(3, LossConfig(name="ce_dice", batch_dice=True))(logits2d, labels.float())
    torch.testing.assert_close(both, ce + pooled.mean())


def test_deep_supervision_loss_halves_the_weight_per_level_and_passes_one_output_through():
    from rwkvseg.data.specs import dataset_spec
    from rwkvseg.train.losses import build_loss

    torch.manual_seed(0)
    target = (torch.rand(2, 3, 5, 4, 3) > 0.6).float()
    main, aux1, aux2 = (torch.randn(2, 3, 5, 4, 3) for _ in range(3))
    loss = build_loss(LossConfig(name="bce_dice"), dataset_spec("brats"), "regions")
    plain = RegionLoss(LossConfig(name="bce_dice"))
    torch.testing.assert_close(loss(main, target), plain(main, target))  # a model without deep supervision
    expected = (plain(main, target) + 0.5 * plain(aux1, target) + 0.25 * plain(aux2, target)) / 1.75
    torch.testing.assert_close(loss((main, aux1, aux2), target), expected)
    torch.testing.assert_close(loss((main,), target), plain(main, target))


def test_a_deep_supervision_run_trains_its_heads_and_its_checkpoint_predicts_the_main_output(tmp_path, cache):
    overrides = [f"data.root={cache}", f"out={tmp_path / 'run'}", "epochs=1", "max_steps_per_epoch=2"]
    overrides += ["infer.mirror_axes=[]", "data.target=regions", "model.overrides.deep_supervision=2"]
    progress = train(load_config(write_config(tmp_path / "c.toml"), overrides))
    assert progress.best_epoch == 1 and np.isfinite(progress.history[0]["train_loss"])
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=True)
    names = [n for n, _ in create_model("mmsegrwkv_test", 4, 3, deep_supervision=2).named_parameters()]
    momentum = {names[i]: v["momentum_buffer"] for i, v in state["optimizer"]["state"].items()}  # SGD, in order
    heads = [n for n in names if n.startswith("aux_heads.")]
    assert len(heads) == 4 and all(momentum[n].abs().sum() > 0 for n in heads)  # the heads' losses reached them
    meta = read_meta(tmp_path / "run" / "best")
    assert meta.model_overrides["deep_supervision"] == 2
    predictor = Predictor3D.from_checkpoint(tmp_path / "run" / "best", PredictConfig(mirror_axes=()))
    x = torch.randn(1, 4, *PATCH)
    assert predictor.model(x).shape == (1, 3, *PATCH)  # eval: the main logits alone


def test_dynunet_trains_its_own_heads_through_the_same_loss(tmp_path, cache):
    """The baseline's arm with MONAI's heads (session 41's planned fair comparison): in training DynUNet stacks its
    upsampled auxiliary logits behind the main ones, the wrapper hands them on as a tuple, the deep-supervision
    loss reaches every head, and the checkpoint predicts the main output alone."""
    config = write_config(tmp_path / "c.toml", **{"data.patch_size": [32, 32, 64]})
    overrides = [f"data.root={cache}", f"out={tmp_path / 'run'}", "epochs=1", "max_steps_per_epoch=2"]
    overrides += ["infer.mirror_axes=[]", "data.target=regions", "model.name=dynunet"]
    overrides += ["model.overrides.deep_supervision=true", "model.overrides.deep_supr_num=2"]
    overrides += ["model.overrides.filters=[4,8,8,16,16,16]"]
    progress = train(load_config(config, overrides))
    assert progress.best_epoch == 1 and np.isfinite(progress.history[0]["train_loss"])
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=True)
    model = create_model("dynunet", 4, 3, filters=(4, 8, 8, 16, 16, 16), deep_supervision=True, deep_supr_num=2)
    names = [n for n, _ in model.named_parameters()]
    momentum = {names[i]: v["momentum_buffer"] for i, v in state["optimizer"]["state"].items()}  # SGD, in order
    heads = [n for n in names if ".deep_supervision_heads." in n]
    assert len(heads) == 4 and all(momentum[n].abs().sum() > 0 for n in heads)  # the heads' losses reached them
    predictor = Predictor3D.from_checkpoint(tmp_path / "run" / "best", PredictConfig(mirror_axes=()))
    assert predictor.model(torch.randn(1, 4, 32, 32, 64)).shape == (1, 3, 32, 32, 64)  # eval: the main logits


def test_config_errors_name_the_setting(tmp_path):
    assert config_dims({}) == 2 and config_dims({"dims": 3}) == 3
    with pytest.raises(ValueError, match="dims = 4"):
        config_dims({"dims": 4})
    with pytest.raises(ValueError, match=r"does not fit data\.target = regions"):
        load_config(None, ["dims=3", "data.target=regions", "loss.name=ce_dice"])
    with pytest.raises(ValueError, match=r"threshold = 0.3 needs data\.target = regions .* leave threshold at 0\.5"):
        load_config(None, ["dims=3", "threshold=0.3"])
    assert load_config(None, ["dims=3", "data.target=regions", "threshold=0.3"]).threshold == 0.3
    with pytest.raises(ValueError, match=r"unknown setting.*data\.size"):
        load_config(None, ["dims=3", "data.size=[8,8]"])
    with pytest.raises(ValueError, match=r"data\.target = 'voxels'"):
        load_config(None, ["dims=3", "data.target=voxels"])
    with pytest.raises(ValueError, match=r"data\.root is empty"):
        train(TrainConfig(dims=3, data=VolumeDataConfig(), out=str(tmp_path / "r")))
    assert load_config(None, ["dims=3", "optim.nesterov=true"]).optim.nesterov
    strong = load_config(None, ["dims=3", "data.patches.augment_preset=strong"])
    assert strong.data.patches.augment_preset == "strong"
    with pytest.raises(ValueError, match=r"augment_preset = 'da5' is unknown"):
        load_config(None, ["dims=3", "data.patches.augment_preset=da5"])
    assert load_config(None, ["dims=3", "infer.val_postprocess=largest"]).infer.postprocess().largest
    with pytest.raises(
        ValueError, match=r"infer\.val_postprocess = 'biggest': 'biggest' is not an option; give none, largest"
    ):
        load_config(None, ["dims=3", "infer.val_postprocess=biggest"])
    with pytest.raises(ValueError, match=r"infer\.val_postprocess = 'largest' applies to 3D runs"):
        load_config(None, ["infer.val_postprocess=largest"])


def test_a_cache_made_from_other_data_is_not_reused(tmp_path, raw, cache):
    config = load_config(None, ["dims=3", f"data.root={raw}"])
    assert prepare_cache(config.data, tmp_path) == tmp_path / "cache"
    assert prepare_cache(config.data, tmp_path) == tmp_path / "cache"  # reused
    other = load_config(None, ["dims=3", f"data.root={raw}", "data.regions={WT: [1, 2, 4]}"])
    with pytest.raises(ValueError, match="delete it to preprocess again"):
        prepare_cache(other.data, tmp_path)
    spaced = load_config(None, ["dims=3", f"data.root={cache}", "data.target_spacing=[1.5]"])
    with pytest.raises(ValueError, match="differs from the cache"):
        prepare_cache(spaced.data, tmp_path)
    assert prepare_cache(load_config(None, ["dims=3", f"data.root={cache}"]).data, tmp_path) == cache
    reordered = load_config(None, ["dims=3", f"data.root={cache}", "data.modalities=[t1, t1ce, flair, t2]"])
    with pytest.raises(ValueError, match="modalities differ from the cache"):
        prepare_cache(reordered.data, tmp_path)
    same = load_config(None, ["dims=3", f"data.root={cache}", "data.modalities=[t1, t1ce, t2, flair]"])
    assert prepare_cache(same.data, tmp_path) == cache
    uncropped = load_config(None, ["dims=3", f"data.root={raw}", "data.crop_nonzero=false"])
    with pytest.raises(ValueError, match="delete it to preprocess again"):
        prepare_cache(uncropped.data, tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("model", ["mmsegrwkv", "segresnet"])
def test_cuda_mixed_precision_run_of_the_brats_recipe(tmp_path, cache, model):
    """The BraTS recipe (64^3 patches, SGD Nesterov, AMP) for two steps on the phantoms, on the GPU. Eager: the
    compiled step is what every GPU campaign runs, and compiling it on a fresh machine outlasted a device call's
    limit with the other gpu tests, twice (the last in session 43)."""
    overrides = [f"data.root={cache}", f"out={tmp_path / 'run'}", f"model.name={model}", "device=cuda", "amp=auto"]
    overrides += ["compile=off"]
    overrides += ["epochs=1", "max_steps_per_epoch=2", "data.samples_per_epoch=4", "data.batch_size=2"]
    overrides += ["data.patch_size=[64, 64, 64]", "data.num_workers=2"]
    config = load_config(CONFIGS / "brats2018_mmsegrwkv.toml", overrides)
    progress = train(config)
    assert progress.step == 2 and np.isfinite(progress.history[-1]["train_loss"])
    final = json.loads((tmp_path / "run" / FINAL_FILE).read_text())
    assert final["mirror_axes"] == [0, 1, 2] and 0 <= final["dice"] <= 1


@pytest.mark.parametrize(
    "arm",
    [
        [],
        # session 40's planned arms: deep supervision's tuple of outputs and the strong preset through the trace
        # (and session 51's weights of the regions in the loss)
        [
            "data.target=regions",
            "model.overrides.deep_supervision=2",
            "data.patches.augment_preset=strong",
            "loss.region_weights=[1, 2, 1]",
        ],
    ],
    ids=["nnunet", "regions-ds2-strong"],
)
def test_compiled_step_trains_on_augmented_patches(tmp_path, cache, caplog, arm):
    """The 3D step compiles on what the augmentation hands it (MONAI transforms: plain tensors, not MetaTensors,
    which Dynamo cannot trace) and trains like the eager step (aot_eager: the whole trace, eager kernels)."""
    overrides = [f"data.root={cache}", "epochs=1", "max_steps_per_epoch=2", "infer.final_eval=false", *arm]
    overrides += ["data.patches.augment=true", "data.patches.samples_per_epoch=4", "val_every=2"]
    path = write_config(tmp_path / "c.toml")
    train(load_config(path, [*overrides, f"out={tmp_path / 'eager'}"]))
    with caplog.at_level("INFO", logger="rwkvseg.train.loop"):
        compiled = ["compile=on", "compile_backend=aot_eager", f"out={tmp_path / 'compiled'}"]
        train(load_config(path, [*overrides, *compiled]))
    assert "compiled the training step in" in caplog.text
    a, b = load_file(tmp_path / "eager" / "last.safetensors"), load_file(tmp_path / "compiled" / "last.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)


def test_an_average_of_the_weights_is_what_a_3d_run_validates_and_saves(tmp_path, cache):
    overrides = [f"data.root={cache}", f"out={tmp_path / 'run'}", "epochs=1", "max_steps_per_epoch=2"]
    overrides += ["optim.ema=0.5", "infer.mirror_axes=[]"]
    progress = train(load_config(write_config(tmp_path / "c.toml"), overrides))
    assert progress.best_epoch == 1 and progress.history[0]["ema"] == 0.5
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=True)
    best = load_file(tmp_path / "run" / "best.safetensors")
    assert best.keys() == state["ema"]["module"].keys()
    assert all(torch.equal(v, state["ema"]["module"][k]) for k, v in best.items())
    assert any(not torch.equal(v, state["model"][k]) for k, v in best.items())  # not the raw weights
    assert read_meta(tmp_path / "run" / "best").training["ema"]["decay"] == 0.5
    assert json.loads((tmp_path / "run" / FINAL_FILE).read_text())["epoch"] == 1  # scored the average


def test_a_cpu_run_keeps_its_batch_one_convolutions_off_the_slow_path(tmp_path, cache, monkeypatch):
    """CPU training turns the model's plain 3-D convolutions into OneDnnConv3d (rwkvseg.cpu_convs), the same modules
    and parameters: its validation windows run at batch 1, where PyTorch's backend rule takes its slow path."""
    import rwkvseg.train.train as train_module
    from rwkvseg.cpu_convs import OneDnnConv3d

    seen = []
    fit = train_module.fit

    def spy(run, *args, **kwargs):
        seen.extend(type(m) for m in run.model.modules() if isinstance(m, torch.nn.Conv3d))
        return fit(run, *args, **kwargs)

    monkeypatch.setattr(train_module, "fit", spy)
    overrides = [f"data.root={cache}", "epochs=1", "max_steps_per_epoch=1", "infer.final_eval=false"]
    train(load_config(write_config(tmp_path / "c.toml"), [*overrides, f"out={tmp_path / 'a'}"]))
    assert seen and set(seen) == {OneDnnConv3d}
