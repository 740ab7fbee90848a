"""Fixtures shared by the tests of the scripts."""

import json

import pytest
import torch
from torch import nn

from rwkvseg.checkpoint import CheckpointMeta, save_checkpoint
from rwkvseg.data.preprocess3d import PreprocessConfig, preprocess_dataset
from rwkvseg.data.specs import dataset_spec
from rwkvseg.data.splits import make_split, write_split
from rwkvseg.records import inference_metadata
from writers import write_phantoms_as


class Bright(nn.Module):
    """Region logits from FLAIR and T1ce intensities (z-scored): a fixed 1x1x1 convolution."""

    def __init__(self, gain: float = 4.0):
        super().__init__()
        self.mix = nn.Conv3d(4, 3, 1)
        with torch.no_grad():
            self.mix.weight.zero_()
            self.mix.weight[0, 3] = gain  # WT from FLAIR
            self.mix.weight[1, 1] = gain  # TC and ET from T1ce
            self.mix.weight[2, 1] = gain
            self.mix.bias.fill_(-gain)

    def forward(self, x):
        return self.mix(x)


def run_config(fold: int, split: str) -> dict:
    """The parts of a 3D run's config.json that the scripts read (as `rwkvseg train` writes it)."""
    return {
        "epochs": 4,
        "val_every": 2,
        "model": {"name": "bright3d", "overrides": {}},
        "data": {
            "dataset": "brats",
            "split": split,
            "fold": fold,
            "target": "regions",
            "batch_size": 2,
            "patches": {"patch_size": [16, 16, 16], "samples_per_epoch": 8, "fg_fraction": 0.66},
        },
        "optim": {"name": "sgd", "lr": 0.01, "schedule": "poly", "ema": 0.999, "ema_start": 500},
        "loss": {"name": "bce_dice"},
    }


METRICS = """epoch,step,lr,train_loss,train_seconds,val_dice_WT,val_dice_TC,val_dice_ET,val_dice,val_seconds,ema
1,4,0.01,0.9,1.0,,,,,,0.999
2,8,0.008,0.7,1.0,0.5,0.4,0.3,0.4,0.5,0.999
3,12,0.005,0.6,1.0,,,,,,0.999
4,16,0.0,0.5,1.0,0.6,0.5,0.4,{last},0.5,0.999
"""


@pytest.fixture
def fold_campaign(tmp_path, monkeypatch):
    """DATA with five phantom cases and RUNS with two folds of one variant (brats2018-bright): a best checkpoint,
    config.json, split.json and metrics.csv each, as `scripts/campaign.py ... --folds 0 1` leaves them."""
    cases = ["c1", "c2", "c3", "c4", "c5"]
    data = write_phantoms_as(tmp_path / "data", cases, (24, 24, 24))
    plans = preprocess_dataset(data, dataset_spec("brats"), tmp_path / "cache", PreprocessConfig())
    monkeypatch.setattr("rwkvseg.checkpoint.build_model", lambda meta: Bright())
    meta = CheckpointMeta(
        "bright3d", 4, 3, preprocessing=inference_metadata(plans, (16, 16, 16), target="regions"), spacing=(1.0,) * 3
    )
    split = make_split(cases, folds=2, seed=0)
    runs = tmp_path / "runs"
    for fold, gain in ((0, 4.0), (1, 2.0)):
        folder = runs / f"brats2018-bright-fold{fold}"
        save_checkpoint(folder / "best", Bright(gain), meta)
        write_split(folder / "split.json", split)
        (folder / "config.json").write_text(json.dumps(run_config(fold, str(tmp_path / "brats2018_5fold.json"))))
        (folder / "metrics.csv").write_text(METRICS.format(last=0.45 + 0.1 * fold))
    return runs, data, split
