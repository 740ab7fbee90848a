"""OnnxPredictor on a hand-built ONNX file (one 1x1 convolution with an rwkvseg record): fast checks of the runtime
protocol without exporting a model."""

import json

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from rwkvseg.checkpoint import CheckpointMeta  # noqa: E402
from rwkvseg.export.onnx import ExportRecord, export_onnx  # noqa: E402
from rwkvseg.export.runtime import OnnxPredictor, activate, predict_files, quantize_int8  # noqa: E402
from rwkvseg.infer.predict2d import Preprocessing2D, predict_arrays  # noqa: E402
from rwkvseg.infer.sliding_window import mirrored  # noqa: E402
from writers import save_conv_onnx  # noqa: E402

PRE = {"channels": 3, "size": [32, 48], "resize": "resize", "normalization": "auto"}


def conv_file(path, weight, bias, axes=({"multiple": 16, "min": 32},) * 2, preprocessing=PRE, threshold=None):
    k = weight.shape[0]
    activation = "sigmoid" if k == 1 else "softmax"
    record = ExportRecord(
        "tiny", 2, 3, k, tuple(axes), activation, {"kind": "test"}, preprocessing=preprocessing, threshold=threshold
    )
    save_conv_onnx(path, weight, bias, record)
    return record


@pytest.fixture
def tiny(tmp_path):
    rng = np.random.default_rng(0)
    weight, bias = rng.standard_normal((1, 3, 1, 1)).astype(np.float32), np.array([-0.3], np.float32)
    conv_file(tmp_path / "tiny.onnx", weight, bias)
    conv = torch.nn.Conv2d(3, 1, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(weight))
        conv.bias.copy_(torch.from_numpy(bias))
    return tmp_path / "tiny.onnx", conv


def test_image_protocol_equals_the_torch_prediction_path(tiny):
    path, conv = tiny
    rng = np.random.default_rng(1)
    pixels = [rng.integers(0, 256, (57, 71, 3), dtype=np.uint8), rng.integers(0, 256, (30, 90, 3), dtype=np.uint8)]
    pre = Preprocessing2D.from_meta(CheckpointMeta("tiny", 3, 1, preprocessing=PRE))
    with torch.no_grad():
        expected = predict_arrays(conv, [p.astype(np.float32) / 255 for p in pixels], pre)
    got = OnnxPredictor(path).predict_images(pixels)
    for g, e, p in zip(got, expected, pixels, strict=True):
        assert g.shape == (1, *p.shape[:2])
        assert np.abs(g - e.numpy()).max() <= 1e-5


def test_mirror_tta_equals_the_torch_path_and_changes_what_a_3x3_kernel_sees(tmp_path):
    """A random 3x3 kernel is not flip-symmetric: averaging over flips changes the logits, as torch's mirrored()."""
    rng = np.random.default_rng(2)
    weight, bias = rng.standard_normal((1, 3, 3, 3)).astype(np.float32), np.array([0.1], np.float32)
    conv_file(tmp_path / "k3.onnx", weight, bias)
    conv = torch.nn.Conv2d(3, 1, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(weight))
        conv.bias.copy_(torch.from_numpy(bias))
    pixels = [rng.integers(0, 256, (41, 67, 3), dtype=np.uint8)]
    pre = Preprocessing2D.from_meta(CheckpointMeta("tiny", 3, 1, preprocessing=PRE))
    plain = OnnxPredictor(tmp_path / "k3.onnx").predict_images(pixels)[0]
    for axes in [(0,), (1,), (0, 1)]:
        with torch.no_grad():
            expected = predict_arrays(mirrored(conv, axes), [pixels[0].astype(np.float32) / 255], pre)[0].numpy()
        got = OnnxPredictor(tmp_path / "k3.onnx", mirror_axes=axes).predict_images(pixels)[0]
        assert np.abs(got - expected).max() <= 1e-5
        assert np.abs(got - plain).max() > 1e-2
    predictor = OnnxPredictor(tmp_path / "k3.onnx")
    for bad in [(2,), (0, 0)]:
        with pytest.raises(ValueError, match=r"--mirror-axes .* must name each of the 2 spatial axes"):
            predictor.mirror_axes = bad
    assert predictor.mirror_axes == ()


def test_sizes_are_checked_against_the_record(tiny):
    predictor = OnnxPredictor(tiny[0])
    assert predictor.predict_batch(np.zeros((2, 3, 32, 48), np.float32)).shape == (2, 1, 32, 48)
    with pytest.raises(ValueError, match=r"multiple of 16.*pad it to 48"):
        predictor.predict_batch(np.zeros((1, 3, 40, 32), np.float32))
    with pytest.raises(ValueError, match=r"pad it to 32"):
        predictor.predict_batch(np.zeros((1, 3, 16, 32), np.float32))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        predictor.predict_batch(np.zeros((1, 1, 32, 32), np.float32))


def test_static_axes_and_files_without_a_record_are_refused(tmp_path):
    weight, bias = np.ones((2, 3, 1, 1), np.float32), np.zeros(2, np.float32)
    conv_file(tmp_path / "static.onnx", weight, bias, axes=(32, {"multiple": 16, "min": 32}))
    predictor = OnnxPredictor(tmp_path / "static.onnx")
    assert predictor.activation == "softmax"
    probs = predictor.predict_batch(np.zeros((1, 3, 32, 64), np.float32))
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="exactly 32"):
        predictor.predict_batch(np.zeros((1, 3, 48, 64), np.float32))
    model = onnx.load(str(tmp_path / "static.onnx"))
    del model.metadata_props[:]
    onnx.save_model(model, str(tmp_path / "bare.onnx"))
    with pytest.raises(ValueError, match="no 'rwkvseg' record"):
        OnnxPredictor(tmp_path / "bare.onnx")


def test_predict_files_writes_masks_and_never_overwrites(tiny, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(2)
    paths = []
    for i, shape in enumerate(((40, 50, 3), (33, 21, 3))):
        paths.append(tmp_path / f"im{i}.png")
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(paths[-1])
    written = predict_files(tiny[0], paths, tmp_path / "out")
    predictor = OnnxPredictor(tiny[0])
    for path, mask_path in zip(paths, written, strict=True):
        mask = np.asarray(Image.open(mask_path))
        assert mask.shape == np.asarray(Image.open(path)).shape[:2]
        np.testing.assert_array_equal(mask // 255, predictor.predict_mask(path))
        assert set(np.unique(mask)) <= {0, 255}
    with pytest.raises(FileExistsError):
        predict_files(tiny[0], paths, tmp_path / "out")


def test_predict_files_with_every_output_runs_without_torch(tiny, tmp_path):
    """The runtime's promise: onnxruntime, numpy and Pillow alone; masks, overlays, probabilities and the largest
    component written by a process that never imports torch."""
    import subprocess
    import sys

    from PIL import Image

    Image.fromarray(np.random.default_rng(5).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    code = (
        "import sys; from rwkvseg.export.runtime import predict_files; "
        "from rwkvseg.infer.postprocess import PostProcess; "
        f"predict_files({str(tiny[0])!r}, [{str(tmp_path / 'a.png')!r}], {str(tmp_path / 'out')!r}, "
        "overlays=True, save_probabilities=True, postprocess=PostProcess(largest=True)); "
        "print('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"
    for name in ("a.png", "overlays/a.png", "probabilities/a.png"):
        assert (tmp_path / "out" / name).is_file()


def test_predict_files_post_processes_the_masks_it_writes(tiny, tmp_path):
    from PIL import Image

    from rwkvseg.infer.postprocess import PostProcess, keep_largest_foreground

    rng = np.random.default_rng(2)
    path = tmp_path / "im.png"
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(path)
    (written,) = predict_files(tiny[0], [path], tmp_path / "out", postprocess=PostProcess(largest=True))
    raw = OnnxPredictor(tiny[0]).predict_mask(path)
    assert np.asarray(Image.open(written)).tolist() != (raw * 255).tolist()  # noise: many components
    np.testing.assert_array_equal(np.asarray(Image.open(written)) // 255, keep_largest_foreground(raw))


def test_int8_weights_keep_the_record(tiny, tmp_path):
    out = quantize_int8(tiny[0], tmp_path / "int8.onnx")
    assert OnnxPredictor(out).record == OnnxPredictor(tiny[0]).record
    x = np.random.default_rng(3).random((1, 3, 32, 32), dtype=np.float32)
    assert np.abs(OnnxPredictor(out).predict_batch(x) - OnnxPredictor(tiny[0]).predict_batch(x)).max() <= 0.02
    with pytest.raises(FileExistsError):
        quantize_int8(tiny[0], out)


def _conv_mul_add(path):
    """x [1, 3, 16, 16] -> c = Conv 3 -> 4 (3x3) -> y = c * c + c: an elementwise tail of activations that static
    quantization can reach beside the convolution."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(5)
    constants = {"w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32)}
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["c", "c"], ["m"]),
        helper.make_node("Add", ["m", "c"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_mul_add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 16, 16])],
        [numpy_helper.from_array(v, k) for k, v in constants.items()],
    )
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _quantized_tensors(path) -> set[str]:
    """The tensors static quantization puts through 8 bits (the inputs of its QuantizeLinear nodes)."""
    return {n.input[0] for n in onnx.load(str(path)).graph.node if n.op_type == "QuantizeLinear"}


def test_static_int8_quantizes_convolutions_and_matrix_products_unless_told(tmp_path):
    source = _conv_mul_add(tmp_path / "f32.onnx")
    calibration = [np.random.default_rng(i).standard_normal((1, 3, 16, 16)).astype(np.float32) for i in range(4)]
    default = quantize_int8(source, tmp_path / "default.onnx", calibration=calibration)
    every = quantize_int8(source, tmp_path / "every.onnx", calibration=calibration, op_types=None)
    assert "x" in _quantized_tensors(default) and "m" not in _quantized_tensors(default)  # the Conv's input only
    assert {"x", "c", "m"} <= _quantized_tensors(every)  # the elementwise tail too


def test_export_refuses_an_existing_target_before_any_work(tmp_path):
    target = tmp_path / "m.onnx"
    target.write_bytes(b"keep")
    with pytest.raises(FileExistsError, match="overwrite"):
        export_onnx("urwkv_test", target)
    assert target.read_bytes() == b"keep"
    with pytest.raises(ValueError, match="registered model"):
        export_onnx("no_such_model", tmp_path / "x.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_record_round_trips_through_json():
    record = ExportRecord("m", 3, 4, 4, (64, {"multiple": 32, "min": 64}), "softmax", {"kind": "registered"})
    assert ExportRecord.from_json(record.to_json()) == record
    assert json.loads(record.to_json())["format"] == 1
    newer = {**json.loads(record.to_json()), "rwkvseg_version": "9.0", "cut_rule": "otsu"}  # a later writer's field
    with pytest.raises(ValueError, match=r"does not know: cut_rule \(written by rwkvseg 9\.0\); upgrade rwkvseg"):
        ExportRecord.from_json(json.dumps(newer))


def test_export_command_refuses_to_replace_a_file(tmp_path, capsys):
    from rwkvseg.cli import main

    out = tmp_path / "model.onnx"
    out.write_bytes(b"user data")
    assert main(["export", "urwkv_test", "--out", str(out), "--in-channels", "3", "--num-classes", "1"]) == 2
    assert out.read_bytes() == b"user data"
    assert str(out) in capsys.readouterr().err


def test_predict_with_the_onnx_runtime_needs_an_exported_file(tmp_path, capsys):
    from rwkvseg.cli import main

    (tmp_path / "in").mkdir()
    assert main(["predict", str(tmp_path / "model.safetensors"), str(tmp_path / "in"), "--out", str(tmp_path / "o"),
                 "--runtime", "onnx"]) == 2  # fmt: skip
    assert "rwkvseg export" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_predict_command_runs_mirror_tta_on_the_onnx_runtime(tmp_path, capsys):
    from PIL import Image

    from rwkvseg.cli import main
    from writers import save_png

    rng = np.random.default_rng(3)
    weight, bias = rng.standard_normal((1, 3, 3, 3)).astype(np.float32), np.array([0.0], np.float32)
    conv_file(tmp_path / "k3.onnx", weight, bias)
    save_png(tmp_path / "in" / "a.png", rng.integers(0, 256, (40, 52, 3), dtype=np.uint8))
    masks = {}
    for name, extra in [("plain", []), ("tta", ["--mirror-axes", "0,1"])]:
        out = tmp_path / name
        argv = ["predict", str(tmp_path / "k3.onnx"), str(tmp_path / "in"), "--out", str(out), "--runtime", "onnx"]
        assert main([*argv, *extra]) == 0
        masks[name] = np.asarray(Image.open(out / "a.png"))
    expected = OnnxPredictor(tmp_path / "k3.onnx", mirror_axes=(0, 1)).predict_mask(tmp_path / "in" / "a.png")
    assert (masks["tta"] > 0).tolist() == (expected > 0).tolist()
    assert (masks["tta"] != masks["plain"]).any()
    bad = ["predict", str(tmp_path / "k3.onnx"), str(tmp_path / "in"), "--out", str(tmp_path / "bad")]
    assert main([*bad, "--runtime", "onnx", "--mirror-axes", "2"]) == 2
    assert "--mirror-axes [2] must name each image axis at most once" in capsys.readouterr().err  # as the torch path
    assert not (tmp_path / "bad").exists()
    for extra, line in [
        (["--overlap", "0.3"], "--overlap: for 3D checkpoints, and this one is 2D: drop it"),
    ]:
        assert main([*bad, "--runtime", "onnx", *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert line in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("classes", [1, 3])
def test_the_onnx_runtime_writes_the_checkpoint_paths_files_with_overlays_and_probabilities(
    classes, tmp_path, monkeypatch, capsys
):
    """`rwkvseg predict --overlay --probabilities` on a checkpoint and on the ONNX file of the same network: the same
    masks, overlays and probabilities (8-bit PNG for one channel, float16 .npy for several), also for a JPEG stored
    sideways with an EXIF orientation, which both read upright (onnxruntime read its own way until session 51)."""
    from PIL import Image

    from rwkvseg.checkpoint import save_checkpoint
    from rwkvseg.cli import main
    from rwkvseg.models import registry
    from writers import Bright, save_png

    monkeypatch.setattr(registry, "_builders", lambda: {"bright": Bright})
    rng = np.random.default_rng(classes)
    weight = rng.standard_normal((classes, 3, 1, 1)).astype(np.float32) * 4  # every class wins somewhere
    bias = -weight.sum(axis=(1, 2, 3)) / 2  # about 0 at mid-grey
    net = Bright(3, classes)
    with torch.no_grad():
        net.mix.weight.copy_(torch.from_numpy(weight))
        net.mix.bias.copy_(torch.from_numpy(bias))
    (checkpoint, _) = save_checkpoint(tmp_path / "ck", net, CheckpointMeta("bright", 3, classes, preprocessing=PRE))
    conv_file(tmp_path / "m.onnx", weight, bias)
    save_png(tmp_path / "in" / "a.png", rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated by 90 degrees: 29 x 41 stored, 41 x 29 shown
    Image.fromarray(rng.integers(0, 256, (29, 41, 3), dtype=np.uint8)).save(tmp_path / "in" / "b.jpg", exif=exif)
    ask = ["--overlay", "--probabilities"]
    assert main(["predict", str(checkpoint), str(tmp_path / "in"), "--out", str(tmp_path / "torch"), *ask]) == 0
    assert main(["predict", str(tmp_path / "m.onnx"), str(tmp_path / "in"), "--out", str(tmp_path / "onnx"), *ask,
                 "--runtime", "onnx"]) == 0  # fmt: skip
    assert "wrote 2 masks" in capsys.readouterr().out
    suffix = ".npy" if classes > 1 else ".png"
    for stem, shape in [("a", (37, 53)), ("b", (41, 29))]:
        torch_mask, onnx_mask = (np.asarray(Image.open(tmp_path / k / f"{stem}.png")) for k in ("torch", "onnx"))
        assert torch_mask.shape == onnx_mask.shape == shape
        assert len(np.unique(torch_mask)) > 1  # the comparison is not between two empty masks
        np.testing.assert_array_equal(onnx_mask, torch_mask)
        overlays = [np.asarray(Image.open(tmp_path / k / "overlays" / f"{stem}.png")) for k in ("torch", "onnx")]
        assert overlays[0].shape == (*shape, 3)
        np.testing.assert_array_equal(overlays[1], overlays[0])
        probs = [tmp_path / k / "probabilities" / f"{stem}{suffix}" for k in ("torch", "onnx")]
        if classes > 1:
            got, expected = np.load(probs[1]), np.load(probs[0])
            assert got.dtype == np.float16 and got.shape == (classes, *shape)
            np.testing.assert_allclose(got.astype(np.float32), expected.astype(np.float32), atol=1e-3)
        else:
            got, expected = (np.asarray(Image.open(p), dtype=np.int16) for p in probs)
            assert got.shape == shape and np.abs(got - expected).max() <= 1  # 8-bit rounding of equal probabilities
            assert len(np.unique(got)) > 10  # probabilities, not a mask


def test_predict_command_takes_the_recorded_flips_on_the_onnx_runtime(tmp_path):
    """An export of a release that records its flips (preprocessing.inference) predicts with them by default, as
    the checkpoint does; --mirror-axes '' turns them off."""
    from PIL import Image

    from rwkvseg.cli import main
    from writers import save_png

    rng = np.random.default_rng(3)
    weight, bias = rng.standard_normal((1, 3, 3, 3)).astype(np.float32), np.array([0.0], np.float32)
    conv_file(tmp_path / "k3.onnx", weight, bias, preprocessing=PRE | {"inference": {"mirror_axes": [0, 1]}})
    save_png(tmp_path / "in" / "a.png", rng.integers(0, 256, (40, 52, 3), dtype=np.uint8))
    masks = {}
    for name, extra in [("default", []), ("given", ["--mirror-axes", "0,1"]), ("off", ["--mirror-axes", ""])]:
        argv = ["predict", str(tmp_path / "k3.onnx"), str(tmp_path / "in"), "--out", str(tmp_path / name)]
        assert main([*argv, "--runtime", "onnx", *extra]) == 0
        masks[name] = np.asarray(Image.open(tmp_path / name / "a.png"))
    assert (masks["default"] == masks["given"]).all()
    assert (masks["default"] != masks["off"]).any()


def test_predict_command_takes_the_recorded_threshold_on_the_onnx_runtime(tmp_path, capsys):
    """An export records its checkpoint's training.threshold and predicts with it by default, as the checkpoint
    does; --threshold wins; a file that records none cuts at 0.5."""
    from PIL import Image

    from rwkvseg.cli import main
    from writers import save_png

    rng = np.random.default_rng(4)
    weight, bias = rng.standard_normal((1, 3, 1, 1)).astype(np.float32), np.array([0.0], np.float32)
    conv_file(tmp_path / "cut.onnx", weight, bias, threshold=0.9)
    conv_file(tmp_path / "plain.onnx", weight, bias)
    save_png(tmp_path / "in" / "a.png", rng.integers(0, 256, (40, 52, 3), dtype=np.uint8))
    probs = OnnxPredictor(tmp_path / "plain.onnx").predict_image(tmp_path / "in" / "a.png")[0]  # [H, W]
    assert ((probs >= 0.5) != (probs >= 0.9)).any()  # the two cuts give different masks here
    masks = {}
    for name, model, extra in [
        ("recorded", "cut", []),
        ("given", "cut", ["--threshold", "0.5"]),
        ("none_recorded", "plain", []),
    ]:
        argv = ["predict", str(tmp_path / f"{model}.onnx"), str(tmp_path / "in"), "--out", str(tmp_path / name)]
        assert main([*argv, "--runtime", "onnx", *extra]) == 0
        masks[name] = np.asarray(Image.open(tmp_path / name / "a.png")) > 0
    assert (masks["recorded"] == (probs >= 0.9)).all()
    assert (masks["given"] == (probs >= 0.5)).all() and (masks["none_recorded"] == (probs >= 0.5)).all()
    conv_file(tmp_path / "bad.onnx", weight, bias, threshold=7)
    bad = ["predict", str(tmp_path / "bad.onnx"), str(tmp_path / "in"), "--out", str(tmp_path / "bad")]
    assert main([*bad, "--runtime", "onnx"]) == 2
    assert "holds threshold 7, not a number in [0, 1]; pass --threshold" in capsys.readouterr().err


def test_the_record_keeps_the_checkpoints_threshold(tmp_path):
    from rwkvseg.checkpoint import save_checkpoint
    from rwkvseg.export.onnx import build_record, load_source
    from rwkvseg.models import create_model

    model = create_model("urwkv_test", 3, 1)
    meta = CheckpointMeta("urwkv_test", 3, 1, preprocessing=PRE, training={"threshold": 0.9})
    save_checkpoint(tmp_path / "ckpt", model, meta)
    axes = ({"multiple": 16, "min": 32},) * 2
    record = ExportRecord.from_json(build_record(load_source(tmp_path / "ckpt.safetensors"), axes, 20).to_json())
    assert record.threshold == 0.9
    assert build_record(load_source("urwkv_test"), axes, 20).threshold is None  # untrained: nothing to record


def test_sigmoid_of_extreme_logits_is_exact_and_silent():
    # confident background logits reach -100 and beyond: 1 / (1 + e^-x) overflowed e^-x there and warned on every
    # image of a service or a predict --runtime onnx run
    logits = np.array([-1000.0, -200.0, -10.0, 0.0, 10.0, 200.0], np.float32).reshape(1, 1, 6)
    with np.errstate(all="raise"):
        probs = activate(logits, "sigmoid")
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs.ravel(), 1 / (1 + np.exp(-logits.ravel().astype(np.float64))), atol=1e-7)
