import math

import pytest
import torch

from rwkvseg.train.config import LossConfig, OptimConfig
from rwkvseg.train.losses import SegmentationLoss
from rwkvseg.train.optim import build_optimizer, build_scheduler, compress_schedule, lr_factor


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


def _lrs(sched, steps):
    """The learning rate after each of `steps` more scheduler steps."""
    lrs = []
    for _ in range(steps):
        sched.optimizer.step()
        sched.step()
        lrs.append(sched.optimizer.param_groups[0]["lr"])
    return lrs


@pytest.mark.parametrize(
    "config",
    [OptimConfig(), OptimConfig(min_lr=1e-4, power=2.0), OptimConfig(schedule="cosine", min_lr=1e-4)],
    ids=["poly", "poly-floor", "cosine"],
)
def test_a_compressed_schedule_goes_on_from_its_factor_and_ends_at_the_fitted_step(config):
    """100 planned steps, fitted to 60 after step 30: the same factor at the switch, the end value at step 60,
    and for poly the same curve from the switch's factor down to the floor over the remaining 30 steps."""
    opt = build_optimizer(torch.nn.Linear(2, 1), config)
    sched = build_scheduler(opt, config, total_steps=100)
    before = _lrs(sched, 30)
    compress_schedule(sched, 30, 100, 60)
    after = _lrs(sched, 35)
    base, floor = config.lr, config.min_lr / config.lr
    assert before[-1] == pytest.approx(base * lr_factor(30, 100, config))  # the switch changes nothing done
    assert after[29] == config.min_lr and after[34] == config.min_lr  # the end at step 60, and after it
    assert all(a > b for a, b in zip([before[-1], *after[:29]], after[:30], strict=True))  # decreasing, no jump up
    if config.schedule == "poly":
        f0 = lr_factor(30, 100, config)
        expected = [base * (floor + (f0 - floor) * (1 - k / 30) ** config.power) for k in range(1, 31)]
        assert after[:30] == pytest.approx(expected, rel=1e-12)
    # the rest of the plan played 70 / 30 times faster: step 31 takes the planned factor of step 30 + 70 / 30
    assert after[0] == pytest.approx(base * lr_factor(30 + 70 / 30, 100, config), rel=1e-12)


def test_compress_schedule_refuses_what_it_cannot_compress():
    config = OptimConfig()
    opt = build_optimizer(torch.nn.Linear(2, 1), config)
    with pytest.raises(ValueError, match="step < fitted < total"):
        compress_schedule(build_scheduler(opt, config, 100), 30, 100, 100)
    with pytest.raises(TypeError, match="needs a LambdaLR"):
        compress_schedule(torch.optim.lr_scheduler.StepLR(opt, 10), 30, 100, 60)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_fused_optimizer_step_equals_the_default_one(name):
    """optim.fused: torch's fused kernel gives the default (foreach) update up to rounding, and the two share one
    state format, so a run can resume across the setting."""

    def run(fused, steps=5, state=None):
        torch.manual_seed(0)
        # no norm: a bias before a batch norm has a gradient of pure rounding, which Adam scales up to full steps
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 1, 1))
        config = OptimConfig(name=name, lr=0.05, momentum=0.9, nesterov=name == "sgd", fused=fused)
        optimizer = build_optimizer(model, config)
        assert optimizer.defaults["fused"] is (True if fused else None)
        if state is not None:
            optimizer.load_state_dict(state)
        x = torch.randn(2, 3, 9, 9)
        for _ in range(steps):
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()
        return model, optimizer

    plain, plain_opt = run(False)
    fused, _ = run(True)
    moved = False
    for (key, a), b in zip(plain.state_dict().items(), fused.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=key)
        moved |= key.endswith("weight") and not torch.equal(a, run(False, steps=0)[0].state_dict()[key])
    assert moved  # the steps changed the weights: the comparison is not of two untouched models
    run(True, steps=1, state=plain_opt.state_dict())  # a default optimizer's state loads into a fused one
