"""max_minutes: the budget stop estimates the next validation from the last epoch's own duration, never from a
first epoch that may hold torch.compile; with fit_schedule, the fit of the run's epochs to the budget; on a fake
clock."""

from types import SimpleNamespace

import pytest

from rwkvseg.train import train as train_module
from rwkvseg.train.config import TrainConfig
from rwkvseg.train.state import ScheduleFit
from rwkvseg.train.train import budget_fit, budget_stop, fitted_epochs


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
        if over(SimpleNamespace(epoch=epoch, history=history, schedule_fit=None)):
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
    # 7 epochs: after epoch 6 the next validation is the last epoch's, one epoch on (300 + 50 <= 360), not three
    last7 = TrainConfig(epochs=7, max_minutes=6, val_every=3)
    assert stopped_after(clock, last7, [50.0] * 7, validated=lambda epoch: epoch % 3 == 0 or epoch == 7) is None
    nine = TrainConfig(epochs=9, max_minutes=6, val_every=3)  # after epoch 6 three more to the next validation
    assert stopped_after(clock, nine, [50.0] * 9, validated=lambda epoch: epoch % 3 == 0) == 6


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


def fitted_at(clock, config, epochs, history=()):
    """Drive budget_fit as fit does: one call per finished epoch, each given as (training seconds, validation
    seconds or None: not validated); (the epoch it fitted the run after, the ScheduleFit), or None. history: the
    rows of a run resumed in this process (its earlier validations)."""
    fit_schedule = budget_fit(config, clock())
    rows, done = list(history), len(history)
    for epoch, (train, val) in enumerate(epochs, done + 1):
        clock.now += train + (val or 0.0)
        rows.append({"train_seconds": train, **({"val_seconds": val} if val is not None else {})})
        fitted = fit_schedule(SimpleNamespace(epoch=epoch, step=10 * epoch, history=rows))
        if fitted is not None:
            return epoch, fitted
    return None


def test_the_fit_ignores_the_first_epoch_and_counts_the_validation(clock, caplog):
    config = TrainConfig(epochs=34, max_minutes=10, fit_schedule=True)  # 600 s
    # epoch 1: 250 s (compiling) + 10 s validation; epoch 2: 20 s + 10 s: 30 s per epoch, 600 - 290 = 310 s left
    with caplog.at_level("INFO", logger="rwkvseg"):
        assert fitted_at(clock, config, [(250.0, 10.0), (20.0, 10.0)] * 20) == (
            2,
            ScheduleFit(34, 12, 2, 20, 30.0, 310.0),
        )
    # a first epoch taken for a measure (260 s per epoch) would have fitted the run to 3
    every4 = TrainConfig(epochs=34, max_minutes=10, fit_schedule=True, val_every=4)
    # no validation timed before epoch 4 (40 s of it): 10 s + 40 / 4 per epoch, 600 - 100 - 30 - 40 = 430 s left, of
    # which 3 validations (120 s) are kept aside for the budget stop's reckoning: 310 / 20 -> 15 more
    epochs = [(100.0, None), (10.0, None), (10.0, None), (10.0, 40.0)] + [(10.0, None)] * 30
    assert fitted_at(clock, every4, epochs) == (4, ScheduleFit(34, 4 + 15, 4, 40, 20.0, 430.0))


def test_a_resumed_process_fits_after_its_second_epoch_with_the_runs_last_validation(clock):
    config = TrainConfig(epochs=50, max_minutes=5, fit_schedule=True, val_every=5)  # 300 s
    earlier = [{"train_seconds": 5.0}] * 9 + [{"train_seconds": 5.0, "val_seconds": 25.0}]  # 10 epochs done
    # this process: epoch 11 (compiling) 60 s, epoch 12 10 s + 25 / 5: 15 s per epoch, 230 s left, 4 x 25 s of it
    # aside -> 12 + floor(130 / 15)
    assert fitted_at(clock, config, [(60.0, None), (10.0, None)], earlier) == (
        12,
        ScheduleFit(50, 20, 12, 120, 15.0, 230.0),
    )


@pytest.mark.parametrize("val_every", [1, 2, 3])
@pytest.mark.parametrize("budget_s", [600.0, 611.0, 619.0, 655.0])
def test_the_budget_stop_lets_a_fitted_run_end_its_fitted_epochs(clock, val_every, budget_s):
    """The fit and the budget stop on one clock, as train asks them after every epoch: steady epochs of 20 s with
    a 10 s validation every val_every epochs (and after the last). However the budget falls between epochs, the run
    the fit ends after epoch F is not stopped before F, and F ends within the budget."""
    config = TrainConfig(epochs=100, max_minutes=budget_s / 60, fit_schedule=True, val_every=val_every)
    start = clock()
    fit_schedule, over = budget_fit(config, start), budget_stop(config, start, None)
    history, fitted, epoch = [], None, 0
    while fitted is None or epoch < fitted.epochs:
        epoch += 1
        last = fitted is not None and epoch == fitted.epochs
        val = 10.0 if epoch % val_every == 0 or last else None
        clock.now += (100.0 if epoch == 1 else 20.0) + (val or 0.0)
        history.append({"train_seconds": 20.0, **({"val_seconds": val, "val_dice": 0.5} if val else {})})
        progress = SimpleNamespace(epoch=epoch, step=epoch, history=history, schedule_fit=fitted)
        if fitted is None:
            fitted = progress.schedule_fit = fit_schedule(progress)
            assert fitted is not None or epoch < 2 * val_every, "a run of 100 epochs never fits 600-655 s"
        if fitted is not None and epoch < fitted.epochs:
            assert not over(progress), f"stopped after epoch {epoch} of the {fitted.epochs} fitted"
    assert clock.now - start <= budget_s


def test_a_train_all_run_fits_without_validation(clock):
    config = TrainConfig(epochs=30, max_minutes=2, fit_schedule=True, val_every=5, train_all=True)  # 120 s
    assert fitted_at(clock, config, [(30.0, None), (10.0, None)]) == (2, ScheduleFit(30, 10, 2, 20, 10.0, 80.0))


def test_a_run_whose_epochs_fit_keeps_them_and_is_not_asked_again(clock, caplog):
    config = TrainConfig(epochs=10, max_minutes=60, fit_schedule=True)
    with caplog.at_level("INFO", logger="rwkvseg"):
        # epoch 2 decides (all 10 fit); epoch 3 onwards, however slow, changes nothing in this process
        assert fitted_at(clock, config, [(50.0, 1.0), (10.0, 1.0)] + [(1000.0, 1.0)] * 8) is None
    assert "the schedule fits the budget: all 10 epochs (11.0 s per epoch, 3538 s left)" in caplog.text
    assert budget_fit(TrainConfig(max_minutes=60), 0.0) is None  # fit_schedule off: nothing to ask


def test_fitted_epochs_bounds():
    assert fitted_epochs(2, 310.0, 30.0, 34) == 12  # 2 + floor(10.33)
    assert fitted_epochs(2, 29.9, 30.0, 34) == 3  # not even one more fits: one more, the epoch that ends the run
    assert fitted_epochs(2, -50.0, 30.0, 34) == 3  # already past the budget
    assert fitted_epochs(2, 3000.0, 30.0, 34) == 34  # never more than planned
    assert fitted_epochs(34, 0.0, 30.0, 34) == 34  # asked after the last epoch: nothing to fit
    assert fitted_epochs(2, 100.0, 0.0, 34) == 34  # a clock that did not move
