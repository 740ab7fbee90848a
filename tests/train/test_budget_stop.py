"""max_minutes: the budget stop estimates the next validation from the last epoch's own duration, never from a
first epoch that may hold torch.compile, on a fake clock."""

from types import SimpleNamespace

import pytest

from rwkvseg.train import train as train_module
from rwkvseg.train.config import TrainConfig
from rwkvseg.train.train import budget_stop


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0  # perf_counter has an arbitrary origin

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(train_module.time, "perf_counter", clock)
    return clock


def stopped_after(clock, config, epoch_seconds, stop=None, validated=lambda epoch: True):
    """Drive budget_stop as fit does: one call per finished epoch; the epoch it stopped after, or None."""
    over = budget_stop(config, clock(), stop)
    history = []
    for epoch, seconds in enumerate(epoch_seconds, 1):
        clock.now += seconds
        history.append({"train_loss": 0.5, **({"val_dice": 0.5} if validated(epoch) else {})})
        if over(SimpleNamespace(epoch=epoch, history=history)):
            return epoch
    return None


def test_a_long_compiled_first_epoch_does_not_stop_a_run_of_short_epochs(clock):
    config = TrainConfig(max_minutes=7.4)  # 444 s
    # epoch 1 ends at 250 s (the old mean-time rule stopped here: 250 x 2 > 444); epoch k ends at 250 + 5 (k - 1):
    # epoch 38 ends at 435 (+5 = 440, goes on), epoch 39 at 440 (+5 = 445 > 444, stops)
    assert stopped_after(clock, config, [250.0] + [5.0] * 100) == 39
    assert stopped_after(clock, config, [250.0] + [5.0] * 37) is None


def test_steady_epochs_stop_when_the_next_would_end_past_the_budget(clock):
    config = TrainConfig(max_minutes=5)  # 300 s
    assert stopped_after(clock, config, [100.0] * 10) == 3  # 200 + 100 = 300 is not past it; 300 + 100 is
    assert stopped_after(clock, config, [101.0] * 10) == 2  # 202 + 101 > 300
    assert stopped_after(clock, config, [301.0] * 10) == 1  # elapsed alone past the budget after epoch 1
    # val_every = 3, validated at epochs 3 (150 + 3 x 50 = 300, goes on) and 6 (300 + 150, stops)
    every3 = TrainConfig(max_minutes=5, val_every=3)
    assert stopped_after(clock, every3, [50.0] * 10, validated=lambda epoch: epoch % 3 == 0) == 6


def test_an_epoch_without_validation_never_stops(clock):
    config = TrainConfig(max_minutes=1, val_every=2)
    assert stopped_after(clock, config, [1000.0] * 5, validated=lambda epoch: False) is None
    assert stopped_after(clock, config, [1000.0] * 5, validated=lambda epoch: epoch == 4) == 4


def test_the_wrapped_stop_is_still_asked(clock):
    asked = []

    def stop(progress):
        asked.append(progress.epoch)
        return progress.epoch == 3

    assert stopped_after(clock, TrainConfig(max_minutes=60), [1.0] * 10, stop=stop) == 3
    assert asked == [1, 2, 3]
    assert budget_stop(TrainConfig(), 0.0, stop) is stop  # no budget: the stop alone
    assert budget_stop(TrainConfig(), 0.0, None) is None
