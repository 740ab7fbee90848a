import json

import pytest
import torch

from rwkvseg.checkpoint import INT8_SCALE, CheckpointMeta, dequantize, load_checkpoint, read_meta, save_checkpoint
from rwkvseg.models import create_model
from rwkvseg.released import (
    ReleasedModel,
    export_release,
    index_entry,
    released_checkpoint,
    released_checkpoints,
    released_models,
    update_index,
    weights_dir,
)


@pytest.fixture
def trained(tmp_path):
    torch.manual_seed(0)
    model = create_model("urwkv_test", in_channels=3, num_classes=1)
    meta = CheckpointMeta("urwkv_test", 3, 1, preprocessing={"size": [32, 32], "resize": "resize", "channels": 3})
    save_checkpoint(tmp_path / "run" / "best", model, meta)
    return model.eval(), tmp_path / "run" / "best"


def test_export_keeps_vectors_fp32_and_outputs_close(trained, tmp_path):
    model, checkpoint = trained
    folder = tmp_path / "weights"
    weights = export_release(checkpoint, "tiny-demo", folder, precision="fp16")
    from safetensors.torch import load_file

    state = load_file(str(weights))
    assert {v.dtype for k, v in state.items() if v.dim() >= 2} == {torch.float16}
    assert all(v.dtype != torch.float16 for v in state.values() if v.dim() < 2)
    released, _ = load_checkpoint(weights)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref, out = model(x), released(x)
    assert next(released.parameters()).dtype == torch.float32
    assert ((out - ref).norm() / ref.norm()).item() < 1e-2
    with pytest.raises(FileExistsError, match="overwrite"):
        export_release(checkpoint, "tiny-demo", folder)


def test_int8_export_stores_per_channel_scales_and_loads_close(trained, tmp_path):
    model, checkpoint = trained
    weights = export_release(checkpoint, "tiny-int8", tmp_path / "weights")  # int8 is the default
    from safetensors.torch import load_file

    state = load_file(str(weights))
    matrices = [k for k, v in model.state_dict().items() if v.is_floating_point() and v.dim() >= 2]
    assert matrices and all(state[k].dtype == torch.int8 for k in matrices)
    assert all(state[k + INT8_SCALE].shape == (state[k].shape[0],) for k in matrices)
    vectors = [k for k, v in model.state_dict().items() if v.is_floating_point() and v.dim() < 2]
    assert vectors and all(state[k].dtype == torch.float32 for k in vectors)
    restored = dequantize(state)
    for k in matrices:  # symmetric rounding: at most half a step per value
        step = state[k + INT8_SCALE].reshape(-1, *([1] * (state[k].dim() - 1)))
        assert ((restored[k] - model.state_dict()[k]).abs() <= step / 2 + 1e-7).all()
    released, _ = load_checkpoint(weights)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref, out = model(x), released(x)
    assert ((out - ref).norm() / ref.norm()).item() < 5e-2
    assert weights.stat().st_size < 0.5 * checkpoint.with_suffix(".safetensors").stat().st_size  # fp32 there
    with pytest.raises(ValueError, match="choose one of fp16, int8"):
        export_release(checkpoint, "tiny-x", tmp_path / "weights", precision="int4")


def test_lookup_by_name(trained, tmp_path):
    _, checkpoint = trained
    folder = tmp_path / "weights"
    export_release(checkpoint, "tiny-demo", folder)
    entry = ReleasedModel("tiny-demo", "urwkv_test", "synthetic", "none", {"dice": 0.5})
    (folder / "index.json").write_text(json.dumps({"models": [index_entry(entry)]}))
    assert released_models(folder) == [entry]
    assert released_checkpoint("tiny-demo", folder).name == "tiny-demo.safetensors"
    with pytest.raises(ValueError, match="choose one of: tiny-demo"):
        released_checkpoint("tiny", folder)


def test_update_index_replaces_in_place_or_appends(tmp_path):
    first, second = ReleasedModel("a-x", "a", "x", "splits/x.json"), ReleasedModel("b-x", "b", "x", "splits/x.json")
    update_index(first, tmp_path)
    update_index(second, tmp_path)
    update_index(ReleasedModel("a-x", "a", "x", "splits/x.json", {"val_dice": 0.5}, "card: a-x.md"), tmp_path)
    assert [(m.name, m.metrics) for m in released_models(tmp_path)] == [("a-x", {"val_dice": 0.5}), ("b-x", {})]
    assert (tmp_path / "index.json").read_text().endswith("}\n")


@pytest.fixture
def ensemble(trained, tmp_path, monkeypatch):
    """A weights folder, installed as the package's, with a two-member ensemble release and one single release."""
    model, checkpoint = trained
    folder = tmp_path / "weights"
    export_release(checkpoint, "tiny-demo", folder)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # a second, different member
    save_checkpoint(tmp_path / "run2" / "best", model, read_meta(checkpoint))
    export_release(checkpoint, "tiny-cv-k0", folder)
    export_release(tmp_path / "run2" / "best", "tiny-cv-k1", folder)
    single = ReleasedModel("tiny-demo", "urwkv_test", "synthetic", "none", {"dice": 0.5})
    both = ReleasedModel(
        "tiny-cv", "urwkv_test", "synthetic", "none", {"cv_dice": 0.6}, members=("tiny-cv-k0", "tiny-cv-k1")
    )
    update_index(single, folder)
    update_index(both, folder)
    monkeypatch.setattr("rwkvseg.released.weights_dir", lambda: folder)
    return folder, single, both


def test_ensemble_release_names_its_members(ensemble):
    folder, single, both = ensemble
    assert released_models(folder) == [single, both]  # members read back from the index as a tuple
    assert json.loads((folder / "index.json").read_text())["models"][1]["members"] == ["tiny-cv-k0", "tiny-cv-k1"]
    assert "members" not in json.loads((folder / "index.json").read_text())["models"][0]
    assert [p.name for p in released_checkpoints("tiny-cv")] == ["tiny-cv-k0.safetensors", "tiny-cv-k1.safetensors"]
    assert [p.name for p in released_checkpoints("tiny-demo")] == ["tiny-demo.safetensors"]
    with pytest.raises(ValueError, match=r"'tiny-cv' is an ensemble of 2 checkpoints.*rwkvseg predict --model tiny-cv"):
        released_checkpoint("tiny-cv")  # fine-tuning and the results table take one checkpoint
    (folder / "tiny-cv-k1.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"tiny-cv-k1\.json is missing; reinstall"):
        released_checkpoints("tiny-cv")
    with pytest.raises(ValueError, match="lists one member"):
        ReleasedModel("x", "urwkv_test", "synthetic", "none", members=("tiny-cv-k0",))


def test_predict_by_ensemble_name_averages_its_members(ensemble, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from rwkvseg.cli import main

    folder, _, _ = ensemble
    image = (np.random.default_rng(0).random((40, 52, 3)) * 255).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "frame.png")
    frame = str(tmp_path / "frame.png")
    members = [str(folder / "tiny-cv-k0.safetensors"), str(folder / "tiny-cv-k1.safetensors")]
    outs = {"name": tmp_path / "by-name", "paths": tmp_path / "by-paths"}
    for how, given in (("name", ["--model", "tiny-cv"]), ("paths", members)):
        assert main(["predict", *given, frame, "--out", str(outs[how])]) == 0
        assert "(an ensemble of 2 checkpoints)" in capsys.readouterr().out
    masks = {how: np.asarray(Image.open(out / "frame.png")) for how, out in outs.items()}
    assert np.array_equal(masks["name"], masks["paths"])  # the release is its members' ensemble
    main(["models"])
    row = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("tiny-cv"))
    assert row.split()[4:8] == [
        "2",
        "0.5",
        "none",
        "none",
    ]  # checkpoints; predicts at 0.5, no post-processing, no flips


def test_prediction_defaults_are_read_as_prediction_reads_them():
    from rwkvseg.infer.predict import prediction_defaults

    def defaults(num_classes=1, training=None, **preprocessing):
        return prediction_defaults(
            CheckpointMeta("m", 4, num_classes, preprocessing=preprocessing, training=training or {})
        )

    regions = {"threshold": 0.1, "postprocess": "largest", "mirror_axes": [0, 2]}
    assert defaults(3, dims=3, target="regions", inference=regions) == {
        "threshold": "0.1",
        "postprocess": "largest",
        "flips": "0,2 on a GPU",  # none on the CPU
    }
    # a 3D checkpoint that records no flips gets all three (as Predictor3D); labels take the argmax
    assert defaults(4, dims=3, target="labels") == {
        "threshold": "argmax",
        "postprocess": "none",
        "flips": "0,1,2 on a GPU",
    }
    assert defaults(3, dims=3, target="regions", inference={"mirror_axes": []})["flips"] == "none"
    # 2D: the binary cut of training.threshold (0.5 where none), flips on every device; several classes: argmax
    assert defaults(training={"threshold": 0.3}, inference={"mirror_axes": [1]}) == {
        "threshold": "0.3",
        "postprocess": "none",
        "flips": "1",
    }
    assert defaults()["threshold"] == "0.5" and defaults(3)["threshold"] == "argmax"
    with pytest.raises(ValueError, match=r"records inference\.threshold 0\.3, but it predicts labels"):
        defaults(4, dims=3, target="labels", inference={"threshold": 0.3})
    with pytest.raises(ValueError, match="holds threshold 2"):
        defaults(training={"threshold": 2})
    with pytest.raises(ValueError, match=r"inference\.postprocess 'biggest', which is not valid"):
        defaults(inference={"postprocess": "biggest"})


@pytest.mark.parametrize("model", released_models(), ids=lambda m: m.name)
def test_shipped_models_load_and_run(model):
    for checkpoint in released_checkpoints(model.name):  # one, or an ensemble's members
        net, meta = load_checkpoint(checkpoint)
        assert meta.model == model.architecture
        spatial = (20, 33, 27) if meta.preprocessing.get("dims") == 3 else (64, 80)
        x = torch.rand(1, meta.in_channels, *spatial)
        with torch.no_grad():
            out = net(x)
        assert out.shape == (1, meta.num_classes, *spatial)
        assert torch.isfinite(out).all()
    dice = [v for k, v in model.metrics.items() if "dice" in k]
    assert dice and all(0 < v <= 1 for v in dice)


# PyPI's limit on one uploaded file (its default, 100 MiB): the wheel carries src/rwkvseg/weights whole
PYPI_FILE_BYTES = 100 * 2**20


def test_the_package_with_its_weights_fits_one_pypi_upload():
    """The released weights ship inside the wheel (pyproject's package data), int8 and fp16 tensors that zip barely
    compresses (session 52: a 96.4 MB weights folder, a 94.0 MB wheel): the package's files, uncompressed, must
    stay under PyPI's limit, or the wheel cannot be published."""
    package = weights_dir().parent
    shipped = [p for p in weights_dir().iterdir() if p.suffix in {".safetensors", ".json", ".md", ".png"}]
    total = sum(p.stat().st_size for p in [*shipped, *package.rglob("*.py")])
    largest = max(shipped, key=lambda p: p.stat().st_size)
    assert total < PYPI_FILE_BYTES, (
        f"the package's files come to {total / 2**20:.1f} MiB, over PyPI's {PYPI_FILE_BYTES / 2**20:.0f} MiB for "
        f"one wheel (largest: {largest.name}); ship further weights as int8, or in a package of their own"
    )


def test_predict_by_released_name_through_the_cli(tmp_path):
    import numpy as np
    from PIL import Image

    from rwkvseg.cli import main

    if "urwkv_s-kvasir" not in [m.name for m in released_models()]:
        pytest.skip("urwkv_s-kvasir is not shipped in this install")
    image = (np.random.default_rng(0).random((45, 70, 3)) * 255).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "frame.png")
    frame = str(tmp_path / "frame.png")
    assert main(["predict", "--model", "urwkv_s-kvasir", frame, "--out", str(tmp_path / "p")]) == 0
    with Image.open(tmp_path / "p" / "frame.png") as mask:
        assert mask.size == (70, 45)
    assert main(["predict", "--model", "nope", str(tmp_path / "frame.png"), "--out", str(tmp_path / "q")]) == 2
    assert main(["predict", str(tmp_path / "frame.png"), "--out", str(tmp_path / "q")]) == 2


def test_serving_hosts_an_ensemble_release_as_the_mean_of_its_members(ensemble):
    import numpy as np

    from rwkvseg.serve import predictors

    sources = {source.name: source for source in predictors.resolve_models([])}  # every release, ensembles too
    assert sorted(sources) == ["tiny-cv", "tiny-demo"]
    assert [p.name for p in sources["tiny-cv"].checkpoints] == ["tiny-cv-k0.safetensors", "tiny-cv-k1.safetensors"]
    assert predictors.describe(sources["tiny-cv"])["checkpoints"] == 2
    assert predictors.describe(sources["tiny-demo"])["checkpoints"] == 1
    members = predictors.resolve_models([str(p) for p in sources["tiny-cv"].checkpoints])
    image = np.random.default_rng(0).random((40, 52, 3)).astype(np.float32)
    ensemble_probs = predictors.Hosted2D(sources["tiny-cv"], device="cpu").probabilities([image])[0]
    member_probs = [predictors.Hosted2D(m, device="cpu").probabilities([image])[0] for m in members]
    assert not np.allclose(member_probs[0], member_probs[1], atol=1e-4)  # two different members
    np.testing.assert_allclose(ensemble_probs, np.mean(member_probs, axis=0), atol=1e-5)
