"""memory_format = channels_last in `rwkvseg train`: the model trains and validates in channels-last layout (NDHWC /
NHWC), computes what the contiguous run computes up to rounding, writes checkpoints that load into a contiguous
model, and resumes bit for bit. 3D on mmsegrwkv_test (synthetic phantoms), 2D on urwkv_test."""

import pytest
import torch
from safetensors.torch import load_file

import rwkvseg.train.finetune as finetune_module
from rwkvseg.checkpoint import build_model, load_checkpoint
from rwkvseg.data.preprocess3d import preprocess_dataset
from rwkvseg.data.specs import dataset_spec
from rwkvseg.data.synthetic import write_synthetic_dataset
from rwkvseg.data.synthetic3d import write_synthetic_volumes
from rwkvseg.federated.config import federated_config_from_dict
from rwkvseg.federated.local import site_config
from rwkvseg.train.config import config_from_dict, load_config
from rwkvseg.train.loop import LoopConfig
from rwkvseg.train.train import train
from writers import assert_same_run, run_metrics

# float32 on the CPU: the two layouts sum convolutions in another order, so the runs agree to rounding only (after
# two SGD steps with momentum, at most 1.8e-6 apart on an AVX-512 CPU, 2026-12-04)
RTOL, ATOL = 1e-4, 1e-5
# Dice counts thresholded voxels, so rounding may flip a voxel near the threshold: on the 3D phantoms one torch thread
# gave WT 0.14586 against 0.14582 (losses 1.9e-5 apart). A voxel moves these Dice values by about 1e-4 to 1e-3.
DICE_ATOL = 1e-3


def config_3d(cache, out, **changes):
    data = {
        "dims": 3,
        "device": "cpu",
        "amp": "off",
        "seed": 5,
        "epochs": 2,
        "max_steps_per_epoch": 1,
        "val_every": 2,
        "out": str(out),
        "model": {"name": "mmsegrwkv_test"},
        "data": {
            "root": str(cache),
            # the deepest stage (1/16) sees 2 x 2 x 2 maps: a 1-voxel map (the old 15 x 23 x 21 patch) has a variance
            # of pure rounding, which its instance norm amplifies into 0.8 % weight and Dice differences between layouts
            "patch_size": [32, 32, 32],
            "samples_per_epoch": 2,
            "batch_size": 2,
            "num_workers": 0,
            "val_fraction": 0.25,
        },
        "infer": {"sw_batch_size": 2, "final_eval": False},
        "optim": {"name": "sgd", "lr": 0.01, "momentum": 0.99, "nesterov": True},
    }
    return config_from_dict({**data, **changes})


def config_2d(root, out, batch_size=2, **changes):
    data = {
        "device": "cpu",
        "amp": "off",
        "seed": 3,
        "epochs": 2,
        "max_steps_per_epoch": 1,
        "out": str(out),
        "model": {"name": "urwkv_test"},
        "data": {"root": str(root), "size": [32, 32], "batch_size": batch_size, "val_batch_size": 2, "num_workers": 0},
        "optim": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
    }
    return config_from_dict({**data, **changes})


class Recorder:
    """Wraps train's build_model: keeps the model it builds and, at each of its calls, whether the input and the
    kernels (the parameters of the input's rank) were channels-last, by training / eval mode."""

    def __init__(self):
        self.model, self.calls = None, []

    def build(self, meta):
        self.model = model = build_model(meta)

        def look(module, args):
            x = args[0]
            layout = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
            kernels = [p for p in module.parameters() if p.dim() == x.dim()]
            self.calls.append(
                {
                    "training": module.training,
                    "input": x.is_contiguous(memory_format=layout) and not x.is_contiguous(),
                    "kernels": all(p.is_contiguous(memory_format=layout) for p in kernels)
                    and any(not p.is_contiguous() for p in kernels),
                }
            )

        model.register_forward_pre_hook(look)
        return model


def recorded_train(config, **kwargs):
    recorder = Recorder()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(finetune_module, "build_model", recorder.build)  # where every run builds its model
        progress = train(config, **kwargs)
    return recorder, progress


def assert_runs_close(a, b):
    wa, wb = load_file(a / "last.safetensors"), load_file(b / "last.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=RTOL, atol=ATOL, msg=lambda m, key=key: f"{key}: {m}")
    rows_a, rows_b = run_metrics(a), run_metrics(b)
    assert [r.keys() for r in rows_a] == [r.keys() for r in rows_b]
    for ra, rb in zip(rows_a, rows_b, strict=True):
        for key in ra:  # an epoch without validation leaves its val_ columns empty
            if ra[key] == "" or rb[key] == "":
                assert ra[key] == rb[key], key
            else:
                atol = DICE_ATOL if key.startswith("val_dice") else ATOL
                torch.testing.assert_close(float(ra[key]), float(rb[key]), rtol=RTOL, atol=atol, msg=key)


def assert_channels_last_throughout(recorder):
    training = [c for c in recorder.calls if c["training"]]
    validating = [c for c in recorder.calls if not c["training"]]
    assert training and validating
    assert all(c["input"] and c["kernels"] for c in training), training
    assert all(c["input"] and c["kernels"] for c in validating), validating  # each validation window


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    raw, out = tmp_path_factory.mktemp("phantoms"), tmp_path_factory.mktemp("cache")
    write_synthetic_volumes(raw, n=4, shape=(23, 27, 21), spacing=2.0, seed=1)
    preprocess_dataset(raw, dataset_spec("brats"), out)
    return out


@pytest.fixture(scope="module")
def runs_3d(cache, tmp_path_factory):
    """The same 3D run (2 one-step epochs, validated at the second) contiguous and channels-last."""
    root = tmp_path_factory.mktemp("runs3d")
    train(config_3d(cache, root / "contiguous"))
    recorder, _ = recorded_train(config_3d(cache, root / "channels_last", memory_format="channels_last"))
    return root, recorder


def test_a_bad_memory_format_names_the_setting_and_the_choices():
    with pytest.raises(
        ValueError, match=r"memory_format = 'nhwc' is not valid; choose one of contiguous, channels_last"
    ):
        load_config(None, ["memory_format=nhwc"])
    with pytest.raises(ValueError, match="memory_format = 'channels_last_3d' is not valid"):
        LoopConfig(epochs=1, memory_format="channels_last_3d")
    assert load_config(None, ["memory_format=channels_last"]).memory_format == "channels_last"


def test_a_3d_channels_last_run_trains_and_validates_in_that_layout_and_equals_the_contiguous_run(runs_3d):
    root, recorder = runs_3d
    assert_channels_last_throughout(recorder)
    assert_runs_close(root / "contiguous", root / "channels_last")
    saved = load_config(root / "channels_last" / "config.json")
    assert saved.memory_format == "channels_last"  # the resolved config records it (and --resume reads it back)


def test_the_checkpoint_of_a_channels_last_run_loads_into_a_contiguous_model_with_the_same_outputs(runs_3d):
    root, recorder = runs_3d
    trained = recorder.model.eval()
    loaded, _ = load_checkpoint(root / "channels_last" / "last")
    assert all(p.is_contiguous() for p in loaded.parameters())
    assert any(not p.is_contiguous() for p in trained.parameters())
    for (name, a), b in zip(trained.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    x = torch.randn(1, 4, 15, 23, 21, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = trained(x.contiguous(memory_format=torch.channels_last_3d))
        got = loaded.eval()(x)
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)


def test_a_channels_last_run_resumes_bit_for_bit(runs_3d, cache, tmp_path):
    root, _ = runs_3d
    config = config_3d(cache, tmp_path / "split", memory_format="channels_last")
    first = train(config, stop=lambda progress: progress.epoch == 1)
    assert first.epoch == 1
    # the optimizer's momentum buffers were saved in their parameters' layout, and come back so
    state = torch.load(tmp_path / "split" / "state.pt", weights_only=True)
    buffers = [s["momentum_buffer"] for s in state["optimizer"]["state"].values() if s["momentum_buffer"].dim() == 5]
    assert buffers and all(b.is_contiguous(memory_format=torch.channels_last_3d) for b in buffers)
    assert any(not b.is_contiguous() for b in buffers)
    resumed = train(config, resume=True)
    assert resumed.epoch == 2 and resumed.step == 2
    assert_same_run(root / "channels_last", tmp_path / "split")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn2d")
    write_synthetic_dataset(root, n=6, shape=(37, 41), seed=4)
    return root


def test_a_2d_channels_last_run_trains_and_validates_in_that_layout_and_equals_the_contiguous_run(images, tmp_path):
    train(config_2d(images, tmp_path / "contiguous"))
    recorder, _ = recorded_train(config_2d(images, tmp_path / "channels_last", memory_format="channels_last"))
    assert_channels_last_throughout(recorder)
    assert_runs_close(tmp_path / "contiguous", tmp_path / "channels_last")


def test_channels_last_at_one_sample_per_process_on_the_cpu_is_refused(images, tmp_path):
    config = config_2d(images, tmp_path / "run", batch_size=1, memory_format="channels_last")
    with pytest.raises(ValueError, match=r"data\.batch_size >= 2 per process"):
        train(config)


def test_a_federated_site_trains_in_the_federation_s_memory_format(tmp_path):
    fed = federated_config_from_dict({"memory_format": "channels_last", "federated": {"rounds": 2, "local_epochs": 1}})
    site = site_config(fed.train, tmp_path / "site", str(tmp_path / "data"))
    assert fed.train.memory_format == site.memory_format == "channels_last"
