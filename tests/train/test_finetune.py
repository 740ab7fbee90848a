"""model.init: a run starts from a checkpoint's or a released model's weights (exactly those, before any step),
records where they came from in every checkpoint, refuses a source that does not fit before training, and
resumes exactly."""

import logging
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

import rwkvseg.released
import rwkvseg.train.train
from rwkvseg.checkpoint import CheckpointMeta, load_checkpoint, read_meta
from rwkvseg.cli import main
from rwkvseg.data.synthetic import write_synthetic_dataset
from rwkvseg.files import file_sha256
from rwkvseg.records import Preprocessing2D
from rwkvseg.released import ReleasedModel, export_release, update_index
from rwkvseg.train.config import load_config
from rwkvseg.train.finetune import InitSource, check_init
from rwkvseg.train.train import train
from writers import assert_same_run

SETTINGS = [
    "model.name=urwkv_test",
    "device=cpu",
    "data.size=[32, 32]",
    "data.batch_size=2",
    "data.val_batch_size=2",
    "data.num_workers=0",
    "data.gpu_resident=off",
    "data.val_fraction=0.34",
    "max_steps_per_epoch=1",
    "epochs=1",
]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    write_synthetic_dataset(root, n=6, shape=(37, 41), seed=4)
    return root


@pytest.fixture(scope="module")
def source(dataset, tmp_path_factory):
    """The best checkpoint of a tiny run (what a later run fine-tunes), without its suffix."""
    out = tmp_path_factory.mktemp("source") / "run"
    train(load_config(None, [*SETTINGS, f"data.root={dataset}", f"out={out}", "seed=3"]))
    return out / "best"


@pytest.fixture
def started(monkeypatch):
    """The weights each run's model holds when training_setup gets it (before the optimizer, EMA and any step)."""
    seen = []
    setup = rwkvseg.train.train.training_setup

    def spy(model, *args, **kwargs):
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return setup(model, *args, **kwargs)

    monkeypatch.setattr(rwkvseg.train.train, "training_setup", spy)
    return seen


def cli_train(dataset, out, *sets):
    """`rwkvseg train` of the tiny settings and sets (later ones win); the exit code."""
    argv = ["train", "--data", dataset, "--out", out, "--no-progress"]
    for setting in (*SETTINGS, *sets):
        argv += ["--set", setting]
    return main([str(a) for a in argv])


def assert_same_weights(state, expected):
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


def test_a_run_starts_from_the_checkpoint_and_records_it(dataset, source, tmp_path, started):
    out = tmp_path / "run"
    train(load_config(None, [*SETTINGS, f"data.root={dataset}", f"out={out}", f"model.init={source}"]))
    weights = source.with_name("best.safetensors")
    assert_same_weights(started[0], load_file(weights))
    trained = load_file(out / "last.safetensors")
    assert any(not torch.equal(trained[k], v) for k, v in started[0].items())  # and it trained from there
    record = {"source": str(source), "weights_sha256": file_sha256(weights)}
    for name in ("best", "last"):
        assert read_meta(out / name).training["init"] == record
    assert read_meta(out / "last").training["config"]["model"]["init"] == str(source)


def test_a_run_without_init_records_nothing_new(dataset, source):
    assert "init" not in read_meta(source).training
    assert read_meta(source).training["config"]["model"]["init"] == ""


def test_a_released_name_starts_from_its_dequantized_weights(dataset, source, tmp_path, started, monkeypatch, caplog):
    folder = tmp_path / "weights"
    export_release(source, "tiny-polyp", folder, precision="int8")
    update_index(ReleasedModel("tiny-polyp", "urwkv_test", "synthetic", "none"), folder)
    monkeypatch.setattr(rwkvseg.released, "weights_dir", lambda: folder)
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="rwkvseg.train.finetune"):
        assert cli_train(dataset, out, "model.init=tiny-polyp", "data.size=[48,48]") == 0
    released, _ = load_checkpoint(folder / "tiny-polyp")
    assert_same_weights(started[0], released.state_dict())
    assert any(not torch.equal(v, load_file(source.with_name("best.safetensors"))[k]) for k, v in started[0].items())
    digest = file_sha256(folder / "tiny-polyp.safetensors")
    assert read_meta(out / "last").training["init"] == {"source": "tiny-polyp", "weights_sha256": digest}
    assert "was trained at network input [32, 32] (resize), this run trains at [48, 48] (resize)" in caplog.text


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("model.name=no_such_model", "unknown model 'no_such_model'"),  # what failing there leaves, for reference
        ("model.name=urwkv_s", "model.init 'SOURCE' is a 'urwkv_test' model and this run trains 'urwkv_s'"),
        (
            "model.overrides={expansion: 3}",
            "differ (encoders.0.expand.0.weight [8, 4, 1, 1] in the checkpoint, [12, 4, 1, 1] here;",
        ),
        ("data.channels=1", "model.init 'SOURCE' reads images as 3 channel(s) and this run as 1; set data.channels"),
        ("data.num_classes=2", "model.init 'SOURCE' has 1 output channel(s) and this run 2"),
        ("data.normalization=minmax", "normalized 'auto' and this run normalizes 'minmax'; set data.normalization"),
        ("model.init=MISSING", "model.init 'MISSING' is neither a checkpoint file"),
    ],
    ids=["bad-model-name", "architecture", "overrides", "channels", "classes", "normalization", "missing"],
)
def test_a_source_that_does_not_fit_is_refused_before_training(dataset, source, tmp_path, capsys, setting, message):
    missing = str(tmp_path / "nothing" / "best")
    setting, message = setting.replace("MISSING", missing), message.replace("MISSING", missing)
    init = "" if setting.startswith("model.init") or "no_such" in setting else source
    out = tmp_path / "run"
    code = cli_train(dataset, out, f"model.init={init}", setting)
    err = capsys.readouterr().err
    assert code == 2 and message.replace("SOURCE", str(source)) in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    if "no_such" not in setting:
        assert "model.init" in err
    assert sorted(os.listdir(out)) == ["config.json", "split.json"]  # no training, as any setup failure


def test_overrides_that_keep_the_weights_are_loaded_with_a_warning(source, caplog):
    meta = read_meta(source)
    run = CheckpointMeta(meta.model, 3, 1, {"gemm_convs": True}, meta.preprocessing)
    with caplog.at_level(logging.WARNING, logger="rwkvseg.train.finetune"):
        check_init(InitSource("src", source, meta, ""), run)
    assert "was built with model.overrides {} and this run with {'gemm_convs': True}; the weights fit" in caplog.text


def _volumes(modalities=("t1", "t2"), labels=(0, 1, 2), target="labels", spacing=(2.0, 2.0, 2.0), regions=None):
    dataset = {"modalities": list(modalities), "label_values": list(labels), "regions": regions or {"WT": [1, 2]}}
    preprocessing = {"dims": 3, "dataset": dataset, "target": target, "patch_size": [16, 16, 16]}
    classes = len(labels) if target == "labels" else len(dataset["regions"])
    return CheckpointMeta("mmsegrwkv_test", len(modalities), classes, {}, preprocessing, spacing=spacing)


@pytest.mark.parametrize(
    ("run", "message"),
    [
        (
            _volumes(modalities=("t2", "t1")),
            "has modalities (in this order) ['t1', 't2'] and this run's data ['t2', 't1']",
        ),
        (
            _volumes(labels=(0, 1, 4)),
            "label values [0, 1, 2] and this run's data [0, 1, 4]; preprocess the data with the checkpoint's",
        ),
        (_volumes(target="regions"), "predicts labels and this run regions; set data.target = labels"),
        (CheckpointMeta("mmsegrwkv_test", 2, 3, {}, Preprocessing2D(2, (32, 32)).to_dict()), "is a 3D checkpoint and"),
    ],
    ids=["modalities", "label-values", "target", "2d-run"],
)
def test_3d_sources_are_refused_where_the_data_differs(run, message):
    with pytest.raises(ValueError, match=r"^model\.init 'src' ") as err:
        check_init(InitSource("src", None, _volumes(), ""), run)
    assert message in str(err.value)


def test_3d_regions_must_match_and_another_spacing_is_logged(caplog):
    source = InitSource("src", None, _volumes(target="regions"), "")
    with pytest.raises(ValueError, match=r"has regions \{'WT': \[1, 2\]\} and this run \{'TC': \[1\]\}"):
        check_init(source, _volumes(target="regions", regions={"TC": [1]}))
    with caplog.at_level(logging.INFO, logger="rwkvseg.train.finetune"):
        check_init(source, _volumes(target="regions", spacing=(1.0, 1.0, 1.0)))
    assert (
        "was trained at spacing [2.0, 2.0, 2.0] mm on patches [16, 16, 16], this run at [1.0, 1.0, 1.0]" in caplog.text
    )


def test_a_resumed_fine_tuning_ends_as_the_uninterrupted_one_without_its_source(dataset, source, tmp_path):
    copy = tmp_path / "copy" / "best"
    copy.parent.mkdir()
    for suffix in (".safetensors", ".json"):
        shutil.copy(source.with_name("best" + suffix), copy.with_name("best" + suffix))
    sets = [*SETTINGS, f"data.root={dataset}", f"model.init={copy}", "epochs=2"]
    train(load_config(None, [*sets, f"out={tmp_path / 'a'}"]))
    split = load_config(None, [*sets, f"out={tmp_path / 'b'}"])
    assert train(split, stop=lambda progress: progress.epoch == 1).epoch == 1
    shutil.rmtree(copy.parent)  # the resumed state holds the weights, the last checkpoint the record
    assert train(split, resume=True).epoch == 2
    assert_same_run(tmp_path / "a", tmp_path / "b")
    assert read_meta(tmp_path / "b" / "last").training["init"] == read_meta(tmp_path / "a" / "last").training["init"]
