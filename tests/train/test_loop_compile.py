"""The compiled training step (aot_eager on the CPU: the whole trace, eager kernels) trains exactly like eager,
and the loss, kept on the device, is still checked for NaN / inf with an error that names the step."""

import pytest
import test_loop
import torch
import torch._dynamo
from test_loop import TinySeg

from rwkvseg.checkpoint import CheckpointMeta
from rwkvseg.compiling import compile_mode
from rwkvseg.train.config import OptimConfig
from rwkvseg.train.loop import LoopConfig, Run, fit, steps_per_epoch
from rwkvseg.train.losses import SegmentationLoss
from rwkvseg.train.optim import build_optimizer, build_scheduler
from rwkvseg.train.validate import validator_2d

sets = test_loop.data  # the synthetic 2D sets of test_loop (its module fixture)


def _fit(data, run_dir, loss_fn=None, epochs=2, **loop):
    train, val, pre = data
    torch.manual_seed(0)
    model = TinySeg()
    optim = OptimConfig(lr=0.05)
    optimizer = build_optimizer(model, optim)
    scheduler = build_scheduler(optimizer, optim, epochs * steps_per_epoch(len(train), 3))
    validate = validator_2d(val, pre, 1, torch.device("cpu"), batch_size=2)
    meta = CheckpointMeta("tiny", 3, 1, preprocessing=pre.to_dict())
    run = Run(model, train, loss_fn or SegmentationLoss(1), optimizer, scheduler, validate, meta, run_dir)
    return model, fit(run, LoopConfig(epochs=epochs, batch_size=3, seed=1, **loop))


def test_compiled_step_gives_the_eager_losses_and_weights(sets, tmp_path, caplog):
    torch._dynamo.reset()
    eager, p_eager = _fit(sets, tmp_path / "eager")
    with caplog.at_level("INFO", logger="rwkvseg.train.loop"):
        compiled, p_compiled = _fit(sets, tmp_path / "compiled", compile="default", compile_backend="aot_eager")
    assert "compiled the training step in" in caplog.text
    for a, b in zip(p_eager.history, p_compiled.history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5, abs=1e-6)
        assert a["val_dice"] == pytest.approx(b["val_dice"], abs=1e-4)
    for (name, a), b in zip(eager.state_dict().items(), compiled.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
    # the checkpoint holds the model's own parameter names (the step is compiled, not the module wrapped)
    assert not any("_orig_mod" in k for k in compiled.state_dict())


class NanAtStep(torch.nn.Module):
    """SegmentationLoss, but NaN from the n-th call on."""

    def __init__(self, n):
        super().__init__()
        self.loss, self.n, self.calls = SegmentationLoss(1), n, 0

    def forward(self, logits, target):
        self.calls += 1
        loss = self.loss(logits, target)
        return loss * float("nan") if self.calls >= self.n else loss


def test_non_finite_loss_names_the_first_bad_step(sets, tmp_path):
    # 7 images, batch 3: 2 steps per epoch; the 3rd call is epoch 2, step 3 (sync_every 50: read at epoch end)
    with pytest.raises(FloatingPointError, match=r"nan at epoch 2, step 3 .*lower optim.lr"):
        _fit(sets, tmp_path, loss_fn=NanAtStep(3))


def test_compile_setting_resolves_per_device():
    assert compile_mode("auto", "cpu") is None and compile_mode("auto", "cuda") == "default"
    assert compile_mode("on", "cpu") == "default" and compile_mode("off", "cuda") is None
    assert compile_mode("max-autotune", "cpu") == "max-autotune"
    with pytest.raises(ValueError, match="choose auto, on, off"):
        compile_mode("fast", "cpu")
    with pytest.raises(ValueError, match="resolve it"):
        LoopConfig(epochs=1, compile="on")
    # "auto" is the caller's mode on CUDA (and still eager on the CPU); "on" stays the default mode
    assert compile_mode("auto", "cuda", auto="reduce-overhead") == "reduce-overhead"
    assert compile_mode("auto", "cpu", auto="reduce-overhead") is None
    assert compile_mode("on", "cuda", auto="reduce-overhead") == "default"
    with pytest.raises(ValueError, match="choose one of default"):
        compile_mode("auto", "cuda", auto="fastest")


def test_training_compiles_under_cuda_graphs_by_default_on_one_gpu(tmp_path):
    from rwkvseg.train.config import load_config
    from rwkvseg.train.run import auto_compile_mode, training_setup

    assert auto_compile_mode(1) == "reduce-overhead" and auto_compile_mode(2) == "default"
    config = load_config(None, [f"out={tmp_path / 'run'}", "data.root=unused", "model.name=urwkv_test"])
    assert config.compile == "auto"
    model = torch.nn.Conv2d(3, 1, 1)
    _, _, loop = training_setup(model, config, 8, torch.device("cuda"), progress_bar=False)
    assert loop.compile == "reduce-overhead" and loop.compile_fallback
    _, _, loop = training_setup(model, config, 8, torch.device("cpu"), progress_bar=False)
    assert loop.compile == "off"


def test_config_settings_for_compile_and_resident_data():
    from rwkvseg.train.config import load_config

    config = load_config(None, ["compile=off", "data.gpu_resident=on", "compile_backend=aot_eager"])
    assert (config.compile, config.data.gpu_resident, config.compile_backend) == ("off", "on", "aot_eager")
    defaults = load_config(None)
    assert (defaults.compile, defaults.compile_backend, defaults.data.gpu_resident) == ("auto", "inductor", "auto")
    assert load_config(None, ["compile=max-autotune"]).compile == "max-autotune"
    with pytest.raises(ValueError, match="compile = 'fast' is not valid"):
        load_config(None, ["compile=fast"])
    with pytest.raises(ValueError, match=r"data\.gpu_resident"):
        load_config(None, ["data.gpu_resident=always"])
