import math

import pytest
import torch

from rwkvseg.train.config import LossConfig, OptimConfig
from rwkvseg.train.losses import SegmentationLoss
from rwkvseg.train.optim import build_optimizer, build_scheduler, lr_factor


def test_binary_and_multiclass_losses_reward_the_right_answer():
    target = torch.zeros(2, 1, 9, 11)
    target[:, :, 2:6, 3:8] = 1
    loss = SegmentationLoss(1)
    good, bad = loss((target * 2 - 1) * 8, target), loss((1 - 2 * target) * 8, target)
    assert loss.name == "bce_dice" and good < 0.05 < 2 < bad
    labels = torch.randint(0, 3, (2, 1, 7, 9)).float()
    onehot = torch.nn.functional.one_hot(labels[:, 0].long(), 3).permute(0, 3, 1, 2).float()
    multi = SegmentationLoss(3)
    assert multi.name == "ce_dice" and multi(onehot * 10, labels) < 0.05 < multi(-onehot * 10, labels)
    assert SegmentationLoss(3, LossConfig("ce"))(onehot * 10, labels) < 1e-3
    with pytest.raises(ValueError, match="needs one output channel"):
        SegmentationLoss(3, LossConfig("bce_dice"))


def test_poly_and_cosine_schedules():
    poly = OptimConfig()
    assert lr_factor(0, 100, poly) == 1.0 and lr_factor(100, 100, poly) == 0.0
    assert lr_factor(50, 100, poly) == pytest.approx(0.5**0.9)
    cos = OptimConfig(name="adamw", lr=1e-3, schedule="cosine", warmup_steps=10, min_lr=1e-5)
    assert lr_factor(0, 110, cos) == pytest.approx(0.1)
    assert lr_factor(60, 110, cos) == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(110, 110, cos) == pytest.approx(0.01)
    model = torch.nn.Linear(2, 1)
    opt = build_optimizer(model, poly)
    sched = build_scheduler(opt, poly, total_steps=10)
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["momentum"] == 0.9
    for _ in range(5):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * 0.5**0.9)
