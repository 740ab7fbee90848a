"""optim.ema: the average of the weights follows ema = decay * ema + (1 - decay) * weights after every optimizer
step (copies before ema_start), is what validation scores and the best / last checkpoints hold, resumes bit for bit,
and is the same under the compiled step; off (the default) leaves runs as they were."""

import csv
import json

import pytest
import test_loop
import torch
import torch._dynamo
from safetensors.torch import load_file
from test_loop import TinySeg

from rwkvseg.checkpoint import CheckpointMeta, read_meta
from rwkvseg.train.config import OptimConfig, load_config
from rwkvseg.train.ema import WeightEma
from rwkvseg.train.loop import LoopConfig, Run, fit, steps_per_epoch
from rwkvseg.train.losses import SegmentationLoss
from rwkvseg.train.optim import build_optimizer, build_scheduler
from rwkvseg.train.run import training_setup
from rwkvseg.train.validate import validator_2d

sets = test_loop.data  # the synthetic 2D sets of test_loop (its module fixture): 7 training images, batch 3

DECAY, START = 0.8, 1


def _fit(data, run_dir, epochs=3, stop_after=None, resume=False, hook=None, **loop):
    train, val, pre = data
    torch.manual_seed(0)
    model = TinySeg()
    optim = OptimConfig(lr=0.05)
    optimizer = build_optimizer(model, optim)
    if hook is not None:
        optimizer.register_step_post_hook(lambda *_: hook(model))
    scheduler = build_scheduler(optimizer, optim, epochs * steps_per_epoch(len(train), 3))
    validate = validator_2d(val, pre, 1, torch.device("cpu"), batch_size=2)
    meta = CheckpointMeta("tiny", 3, 1, preprocessing=pre.to_dict())
    run = Run(model, train, SegmentationLoss(1), optimizer, scheduler, validate, meta, run_dir)
    stop = (lambda p: p.epoch >= stop_after) if stop_after else None
    progress = fit(run, LoopConfig(epochs=epochs, batch_size=3, seed=1, **loop), resume=resume, stop=stop)
    return model, progress, validate


class Reference:
    """The average by hand, one parameter at a time, from the weights after every optimizer step; a snapshot of
    the average and of the raw weights at the end of every epoch (2 steps)."""

    def __init__(self):
        self.ema, self.step, self.epochs = {}, 0, {}

    def __call__(self, model):
        self.step += 1
        for name, p in model.named_parameters():
            old = self.ema.get(name)
            self.ema[name] = p.detach().clone() if old is None or self.step <= START else DECAY * old + (1 - DECAY) * p
        if self.step % 2 == 0:
            raw = {k: v.clone() for k, v in model.state_dict().items()}
            self.epochs[self.step // 2] = ({k: v.clone() for k, v in self.ema.items()}, raw)


def test_average_of_a_loop_equals_the_plain_reference_and_is_what_is_validated_and_saved(sets, tmp_path):
    ref = Reference()
    model, progress, validate = _fit(sets, tmp_path, hook=ref, ema=DECAY, ema_start=START)
    assert ref.step == progress.step == 6
    ema, _ = ref.epochs[3]
    last = load_file(tmp_path / "last.safetensors")
    for name, value in model.state_dict().items():
        if name in ema:  # parameters: the average
            torch.testing.assert_close(last[name], ema[name], rtol=1e-6, atol=1e-7, msg=name)
        else:  # buffers (BatchNorm statistics, its counter) are the model's
            assert torch.equal(last[name], value), name
    assert (last["body.0.weight"] - model.body[0].weight).abs().max() > 1e-3  # far from the raw weights
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert state["ema"]["decay"] == DECAY and state["ema"]["start"] == START
    assert all(torch.equal(state["model"][k], v) for k, v in model.state_dict().items())  # raw, to go on training
    assert all(torch.equal(state["ema"]["module"][k], v) for k, v in last.items())

    # best: the average at its epoch, and the validation score of that epoch is the average's
    best_epoch = progress.best_epoch
    ema_then, raw_then = ref.epochs[best_epoch]
    best_model, meta = TinySeg(), read_meta(tmp_path / "best")
    best_model.load_state_dict(load_file(tmp_path / "best.safetensors"))
    for name, value in best_model.state_dict().items():
        if name in ema_then:
            torch.testing.assert_close(value, ema_then[name], rtol=1e-6, atol=1e-7, msg=name)
        else:
            assert torch.equal(value, raw_then[name]), name
    assert (best_model.body[0].weight - raw_then["body.0.weight"]).abs().max() > 1e-3
    assert meta.training["ema"] == {"weights": "ema", "decay": DECAY, "start": START}
    with torch.no_grad():
        scores = validate(best_model.eval())
    row = progress.history[best_epoch - 1]
    assert row["val_dice"] == scores["dice"] and row["ema"] == DECAY
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [float(r["ema"]) for r in rows] == [DECAY] * 3
    assert json.loads((tmp_path / "summary.json").read_text())["ema"] == {"weights": "ema", "decay": DECAY, "start": 1}


def test_update_copies_before_start_and_leaves_the_model_alone():
    model = TinySeg()
    ema = WeightEma(model, 0.5, start=2)
    assert ema.module is not model and not any(p.requires_grad for p in ema.module.parameters())
    weight = model.body[0].weight
    with torch.no_grad():
        weight.fill_(1.0)
    ema.update(2)  # step 2 <= start: a copy
    assert torch.equal(ema.module.body[0].weight, weight)
    with torch.no_grad():
        weight.fill_(3.0)
    ema.update(3)
    assert torch.equal(ema.module.body[0].weight, torch.full_like(weight, 2.0)) and torch.equal(weight, 3 + 0 * weight)


def test_resume_with_the_average_is_bit_identical(sets, tmp_path):
    straight, p_straight, _ = _fit(sets, tmp_path / "a", epochs=4, ema=DECAY, ema_start=START)
    _, p_half, _ = _fit(sets, tmp_path / "b", epochs=4, stop_after=2, ema=DECAY, ema_start=START)
    assert p_half.epoch == 2
    resumed, p_resumed, _ = _fit(sets, tmp_path / "b", epochs=4, resume=True, ema=DECAY, ema_start=START)
    assert p_resumed.step == p_straight.step == 8
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    strip = lambda h: [{k: v for k, v in r.items() if "seconds" not in k} for r in h]  # noqa: E731
    assert strip(p_resumed.history) == strip(p_straight.history)
    for name in ("best.safetensors", "last.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    a, b = (torch.load(tmp_path / run / "state.pt", weights_only=True)["ema"]["module"] for run in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_resume_cannot_switch_the_average_on_or_off(sets, tmp_path):
    _fit(sets, tmp_path / "off", epochs=2, stop_after=1)
    before = (tmp_path / "off" / "state.pt").read_bytes()
    with pytest.raises(ValueError, match=r"trained with optim\.ema = 0 and the config has optim\.ema = 0\.8; .*own"):
        _fit(sets, tmp_path / "off", epochs=2, resume=True, ema=DECAY)
    assert (tmp_path / "off" / "state.pt").read_bytes() == before
    _fit(sets, tmp_path / "on", epochs=2, stop_after=1, ema=DECAY)
    with pytest.raises(ValueError, match=r"trained with optim\.ema = 0\.8 and the config has optim\.ema = 0;"):
        _fit(sets, tmp_path / "on", epochs=2, resume=True)


def test_off_by_default_writes_no_trace_of_an_average(sets, tmp_path):
    model, progress, _ = _fit(sets, tmp_path, epochs=1)
    assert "ema" not in torch.load(tmp_path / "state.pt", weights_only=True)
    assert "ema" not in progress.history[0] and "ema" not in json.loads((tmp_path / "summary.json").read_text())
    last = load_file(tmp_path / "last.safetensors")
    assert all(torch.equal(last[k], v) for k, v in model.state_dict().items())  # the raw weights


def test_compiled_step_gives_the_eager_average(sets, tmp_path):
    torch._dynamo.reset()
    _fit(sets, tmp_path / "eager", epochs=2, ema=DECAY)
    _fit(sets, tmp_path / "compiled", epochs=2, ema=DECAY, compile="default", compile_backend="aot_eager")
    eager, compiled = (load_file(tmp_path / run / "last.safetensors") for run in ("eager", "compiled"))
    for name, value in eager.items():
        torch.testing.assert_close(compiled[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_settings_reach_the_loop_and_bad_ones_are_named(tmp_path):
    config = load_config(None, [f"out={tmp_path}", "optim.ema=0.999", "optim.ema_start=500"])
    _, _, loop = training_setup(torch.nn.Conv2d(3, 1, 1), config, 8, torch.device("cpu"), progress_bar=False)
    assert (loop.ema, loop.ema_start) == (0.999, 500)
    assert load_config(None).optim.ema == 0.0  # off: the paper's recipe
    for value in ("1", "1.5", "-0.1", "nan"):
        with pytest.raises(ValueError, match=r"^optim\.ema = .* must be in \[0, 1\): 0 is off"):
            load_config(None, [f"optim.ema={value}"])
    with pytest.raises(ValueError, match=r"optim\.ema_start = -1 must be >= 0"):
        load_config(None, ["optim.ema_start=-1"])
