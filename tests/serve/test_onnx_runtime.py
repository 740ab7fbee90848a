"""The service on exported files (runtime "onnx"): hand-built ONNX convolutions carrying the same records as the
torch test checkpoints give the torch service's masks, label volumes and /v1/models entries."""

import gzip
import io
import re
import sys
import zipfile

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install rwkvseg[serve])")
pytest.importorskip("onnxruntime", reason="the export extra is not installed (pip install rwkvseg[export])")
import httpx
from fastapi.testclient import TestClient
from serve_support import PRE_2D, free_port, png, service_process, square_image, wait_ready, write_case

from rwkvseg.checkpoint import CheckpointMeta, read_meta
from rwkvseg.export.onnx import ExportRecord
from rwkvseg.export.runtime import OnnxPredictor
from rwkvseg.infer.predict2d import predict_arrays
from rwkvseg.records import Preprocessing2D
from rwkvseg.serve import ServeConfig, create_app, predictors
from writers import save_conv_onnx

NOISE_PRE = {**PRE_2D, "size": [32, 48]}


def _record(meta, axes, source=None) -> ExportRecord:
    return ExportRecord(
        meta.model,
        3 if meta.preprocessing.get("dims") == 3 else 2,
        meta.in_channels,
        meta.num_classes,
        axes,
        "sigmoid" if meta.num_classes == 1 else "softmax",
        source or {"kind": "checkpoint", "path": "test"},
        preprocessing=meta.preprocessing,
        class_names=meta.class_names,
        spacing=meta.spacing,
    )


@pytest.fixture(scope="module")
def exports(test_models, tmp_path_factory):
    """ONNX files of the torch test checkpoints' networks with their records (bright: Bright's 1x1 convolution;
    ball: FlairBall as a 1x1x1 convolution), and a random 1x1 convolution `noise` with its torch twin."""
    folder = tmp_path_factory.mktemp("onnx")
    dynamic = ({"multiple": 16, "min": 16},) * 2
    bright = save_conv_onnx(
        folder / "bright.onnx",
        np.full((1, 3, 1, 1), 40.0 / 3, np.float32),
        np.array([-20.0], np.float32),
        _record(read_meta(test_models["bright"]), dynamic),
    )
    weight3d = np.zeros((4, 4, 1, 1, 1), np.float32)
    weight3d[2, 3], weight3d[3, 1] = 10.0, 20.0  # FlairBall: 10 (flair - 1), 20 (t1ce - 5)
    ball = save_conv_onnx(
        folder / "ball.onnx",
        weight3d,
        np.array([0.0, -99.0, -10.0, -100.0], np.float32),
        _record(read_meta(test_models["ball"]), (16, 16, 16)),
    )
    rng = np.random.default_rng(0)
    weight, bias = rng.standard_normal((1, 3, 1, 1)).astype(np.float32), np.array([-0.3], np.float32)
    noise_meta = CheckpointMeta("tiny", 3, 1, preprocessing=NOISE_PRE)
    noise = save_conv_onnx(
        folder / "noise.onnx", weight, bias, _record(noise_meta, dynamic, {"kind": "released", "name": "x"})
    )
    conv = torch.nn.Conv2d(3, 1, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(weight))
        conv.bias.copy_(torch.from_numpy(bias))
    return {"bright": bright, "ball": ball, "noise": noise, "noise_conv": conv, "noise_meta": noise_meta}


@pytest.fixture(scope="module")
def clients(test_models, exports):
    """(torch service on the checkpoints, onnx service on the exports), the same names on both."""
    on_torch = ServeConfig(models=(str(test_models["bright"]), f"ball={test_models['ball']}"))
    on_onnx = ServeConfig(
        models=(str(exports["bright"]), str(exports["ball"]), str(exports["noise"])), runtime="onnx", torch_threads=1
    )
    with TestClient(create_app(on_torch)) as torch_client, TestClient(create_app(on_onnx)) as onnx_client:
        wait_ready(torch_client)
        wait_ready(onnx_client)
        yield torch_client, onnx_client


def mask_of(client: TestClient, name: str, image: np.ndarray, **params) -> np.ndarray:
    answer = client.post(f"/v1/models/{name}/predict", params=params, files={"file": ("a.png", png(image))})
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "image/png"
    return np.asarray(Image.open(io.BytesIO(answer.content)))


def test_models_are_described_from_the_export_record(clients):
    torch_client, onnx_client = clients
    by_torch = {m["name"]: m for m in torch_client.get("/v1/models").json()["models"]}
    by_onnx = {m["name"]: m for m in onnx_client.get("/v1/models").json()["models"]}
    assert set(by_onnx) == {"bright", "ball", "noise"}
    for name in ("bright", "ball"):
        assert by_onnx[name]["runtime"] == "onnx" and by_torch[name]["runtime"] == "torch"
        assert by_onnx[name]["precision"] == "exported" and by_torch[name]["precision"] == "fp32"
        for key in ("architecture", "dims", "input", "classes", "output"):
            assert by_onnx[name][key] == by_torch[name][key], key
    assert by_onnx["bright"]["dims"] == 2 and by_onnx["bright"]["input"]["size"] == [16, 16]
    assert by_onnx["ball"]["dims"] == 3 and by_onnx["ball"]["input"]["modalities"] == ["t1", "t1ce", "t2", "flair"]
    assert by_onnx["noise"]["input"]["size"] == [32, 48] and by_onnx["noise"]["released"] is True
    assert not by_onnx["bright"]["released"] and all(m["ready"] for m in by_onnx.values())


def test_2d_masks_equal_the_torch_service_and_the_onnx_predictor(clients, exports):
    torch_client, onnx_client = clients
    image = square_image()
    image[::3, ::5] = 128  # pixels near the cut, so a wrong resize or normalization shows
    for params in ({}, {"threshold": 0.8}):
        assert np.array_equal(
            mask_of(onnx_client, "bright", image, **params), mask_of(torch_client, "bright", image, **params)
        )
    tinted = mask_of(onnx_client, "bright", image, overlay="true")
    assert np.array_equal(tinted, mask_of(torch_client, "bright", image, overlay="true"))

    pixels = np.random.default_rng(1).integers(0, 256, (57, 71, 3), dtype=np.uint8)
    served = mask_of(onnx_client, "noise", pixels)
    assert served.shape == (57, 71) and set(np.unique(served)) == {0, 255}
    np.testing.assert_array_equal(served // 255, OnnxPredictor(exports["noise"]).predict_mask(pixels))
    pre = Preprocessing2D.from_meta(exports["noise_meta"])
    with torch.no_grad():
        reference = predict_arrays(exports["noise_conv"], [pixels.astype(np.float32) / 255], pre)[0][0].numpy()
    clear = np.abs(reference - 0.5) > 1e-5
    assert clear.mean() > 0.99 and np.array_equal((served // 255)[clear], (reference >= 0.5)[clear])


def test_onnx_backend_probabilities_equal_the_torch_path(exports):
    """The hosted model's probabilities themselves (the HTTP answer is a thresholded mask)."""
    (source,) = predictors.resolve_models([str(exports["noise"])], "onnx")
    hosted = predictors.load(source, "cpu", 0.5, False, threads=1)
    rng = np.random.default_rng(2)
    images = [rng.random((40, 30, 3), dtype=np.float32), rng.random((64, 100, 3), dtype=np.float32)]
    with torch.no_grad():
        expected = predict_arrays(exports["noise_conv"], images, Preprocessing2D.from_meta(exports["noise_meta"]))
    for got, want in zip(hosted.probabilities(images), expected, strict=True):
        assert got.shape == want.shape and np.abs(got - want.numpy()).max() <= 1e-5


def test_3d_labels_equal_the_torch_service(clients, tmp_path):
    torch_client, onnx_client = clients
    files, ball = write_case(tmp_path / "case")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for p in files:
            archive.writestr(p.name, p.read_bytes())
    volumes = []
    for client in (onnx_client, torch_client):
        answer = client.post("/v1/models/ball/predict", files={"file": ("case.zip", buf.getvalue())})
        assert answer.status_code == 200, answer.text
        volumes.append(np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(answer.content)).dataobj))
    assert set(np.unique(volumes[0])) == {0, 2} and ((volumes[0] == 2) & ball).sum() > 0.9 * ball.sum()
    np.testing.assert_array_equal(volumes[0], volumes[1])
    soft = []
    for client in (onnx_client, torch_client):
        answer = client.post(
            "/v1/models/ball/predict", params={"probabilities": "true"}, files={"file": ("case.zip", buf.getvalue())}
        )
        assert answer.status_code == 200, answer.text
        soft.append(np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(answer.content)).dataobj))
    assert soft[0].shape == (*volumes[0].shape, 4) and np.abs(soft[0] - soft[1]).max() <= 1 / 255 + 1e-6


def test_2d_probabilities_equal_the_torch_service(clients):
    torch_client, onnx_client = clients
    image = square_image()
    image[::3, ::5] = 128
    answers = [c.post("/v1/models/bright/predict", params={"probabilities": "true"}, files={"file": ("a.png",
               png(image))}) for c in (onnx_client, torch_client)]  # fmt: skip
    assert all(a.status_code == 200 and a.headers["content-type"] == "image/png" for a in answers)
    got, expected = (np.asarray(Image.open(io.BytesIO(a.content)), dtype=np.int16) for a in answers)
    assert got.shape == (40, 52) and len(np.unique(got)) > 2 and np.abs(got - expected).max() <= 1


def test_runtime_onnx_refuses_what_is_not_an_export_in_one_line(test_models, exports, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"`rwkvseg export urwkv_s-kvasir --out urwkv_s-kvasir\.onnx`"):
        create_app(ServeConfig(models=("urwkv_s-kvasir",), runtime="onnx"))
    with pytest.raises(ValueError, match=re.escape(f"`rwkvseg export {test_models['bright']} --out mine.onnx`")):
        create_app(ServeConfig(models=(f"mine={test_models['bright']}",), runtime="onnx"))
    with pytest.raises(ValueError, match="exported files only"):
        create_app(ServeConfig(runtime="onnx"))
    with pytest.raises(ValueError, match="no file"):
        create_app(ServeConfig(models=(str(tmp_path / "gone.onnx"),), runtime="onnx"))
    with pytest.raises(ValueError, match="serve it with runtime 'onnx'"):
        create_app(ServeConfig(models=(str(exports["bright"]),)))
    with pytest.raises(ValueError, match="runs on the CPU"):
        ServeConfig(models=(str(exports["bright"]),), runtime="onnx", device="cuda")
    untrained = ExportRecord("tiny", 2, 3, 1, ({"multiple": 16, "min": 16},) * 2, "sigmoid", {"kind": "registered"})
    save_conv_onnx(tmp_path / "untrained.onnx", np.ones((1, 3, 1, 1), np.float32), np.zeros(1, np.float32), untrained)
    with pytest.raises(ValueError, match="untrained architecture"):
        create_app(ServeConfig(models=(str(tmp_path / "untrained.onnx"),), runtime="onnx"))
    crop = ExportRecord(
        "tiny", 2, 3, 1, untrained.axes, "sigmoid", {"kind": "test"}, preprocessing={**PRE_2D, "resize": "crop"}
    )
    save_conv_onnx(tmp_path / "crop.onnx", np.ones((1, 3, 1, 1), np.float32), np.zeros(1, np.float32), crop)
    with pytest.raises(ValueError, match=r"resize='crop'.*runtime 'torch'"):
        create_app(ServeConfig(models=(str(tmp_path / "crop.onnx"),), runtime="onnx"))
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # an install without the export extra
    with pytest.raises(ValueError, match=r"needs the export extra.*rwkvseg\[export\]"):
        create_app(ServeConfig(models=(str(exports["bright"]),), runtime="onnx"))


def test_serve_command_starts_on_an_export(exports):
    port = free_port()
    argv = ["serve", "--runtime", "onnx", str(exports["bright"]), "--port", str(port), "--threads", "1"]
    code = f"import sys; from rwkvseg.cli import main; sys.exit(main({argv!r}))"
    with service_process(code, port) as (url, _):
        assert httpx.get(f"{url}/v1/models").json()["models"][0]["runtime"] == "onnx"
        answer = httpx.post(f"{url}/v1/models/bright/predict", files={"file": ("a.png", png(square_image()))})
        mask = np.asarray(Image.open(io.BytesIO(answer.content)))
        assert answer.status_code == 200 and mask.shape == (40, 52)
        assert ((mask > 0) != (square_image()[..., 0] > 128)).mean() < 0.03


def test_load_test_starts_an_onnx_service(exports, tmp_path):
    """The load test's own service on runtime onnx (`--runtime onnx --serve NAME=FILE.onnx`): every request is
    answered, the malformed burst gets 4xx, and the report names the runtime."""
    from rwkvseg.serve.loadtest import LoadTestConfig, markdown, run_load_test

    (tmp_path / "a.png").write_bytes(png(square_image()))
    config = LoadTestConfig(
        images=(tmp_path / "a.png",),
        model_2d="bright",
        server_models=(f"bright={exports['bright']}",),
        runtime="onnx",
        torch_threads=1,
        concurrency=(1, 2),
        requests=6,
        seconds=30,
        malformed=5,
        zip_bomb_mib=2,
        warmup=2,
    )
    report = run_load_test(config, log_path=tmp_path / "service.log")
    levels = [(lv["kind"], lv["clients"], lv["requests"], lv["errors"]) for lv in report["levels"]]
    assert levels == [("2D", 1, 6, 0), ("2D", 2, 6, 0), ("2D after burst", 1, 20, 0)]
    assert report["malformed"] == {"4xx": 5, "other": 0} and report["ready_after_burst"]
    assert "service runtime onnx" in markdown(report)
    # a service on runtime torch refuses an .onnx file at start and never becomes ready: these answers came from
    # onnxruntime
