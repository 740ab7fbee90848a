import gzip
import io
import json
import logging
import re
import shutil
import struct
import time
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install rwkvseg[serve])")
import httpx
from fastapi.testclient import TestClient
from serve_support import (
    AFFINE,
    SHAPE,
    FlairBall,
    free_port,
    png,
    running_server,
    service_process,
    square_image,
    wait_ready,
    write_case,
)

from rwkvseg.checkpoint import read_meta, save_checkpoint
from rwkvseg.devices import cpu_has_native_bf16
from rwkvseg.serve import (
    ServeConfig,
    create_app,
    predictors,
)
from rwkvseg.serve.app import JsonFormatter
from writers import Bright


def client_for(config: ServeConfig) -> TestClient:
    return TestClient(create_app(config))


def post_image(client, name, data, filename="a.png", **params):
    return client.post(f"/v1/models/{name}/predict", params=params, files={"file": (filename, data, "image/png")})


def fake_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, with almost no data (a decompression bomb's shape)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def zip_of(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buf.getvalue()


@pytest.fixture(scope="module")
def client(test_models):
    config = ServeConfig(
        models=(f"urwkv={test_models['urwkv']}", str(test_models["bright"]), f"ball={test_models['ball']}"),
        max_request_bytes=2**20,
        max_image_pixels=300 * 300,
        max_unpacked_bytes=2**20,
    )
    with client_for(config) as c:
        wait_ready(c)
        yield c


def test_2d_masks_cut_at_the_models_recorded_threshold_unless_asked(test_models):
    """A request without `threshold` cuts at the model's recorded one (as `rwkvseg predict`), listed by /v1/models;
    a request's own threshold wins."""
    config = ServeConfig(
        models=(str(test_models["bright"]), f"cut={test_models['cut']}", f"ball={test_models['ball']}")
    )
    grey = np.full((12, 10, 3), 140, np.uint8)  # Bright: probability 0.88 everywhere
    with client_for(config) as c:
        wait_ready(c)
        models = {m["name"]: m for m in c.get("/v1/models").json()["models"]}
        assert (models["bright"]["threshold"], models["cut"]["threshold"], models["ball"]["threshold"]) == (
            0.5,
            0.9,
            None,
        )

        def mask(name, **params):
            answer = post_image(c, name, png(grey), **params)
            assert answer.status_code == 200, answer.text
            return np.asarray(Image.open(io.BytesIO(answer.content)))

        assert (mask("bright") == 255).all() and (mask("cut") == 0).all()
        assert (mask("cut", threshold=0.5) == 255).all() and (mask("bright", threshold=0.95) == 0).all()


def test_torch_runtime_on_the_cpu_runs_a_micro_batch_one_image_at_a_time(test_models, monkeypatch):
    """Eager PyTorch on the CPU costs more per image in a batch (docs/speed.md): the service's micro-batch of
    requests goes through the network one image per pass there, with the same probabilities."""
    (source,) = predictors.resolve_models([str(test_models["bright"])])
    hosted = predictors.Hosted2D(source, device="cpu")
    images = [np.full((8 + i, 9, 3), 0.2 * i, np.float32) for i in range(3)]
    batches, forward = [], Bright.forward
    monkeypatch.setattr(Bright, "forward", lambda self, x: batches.append(x.shape[0]) or forward(self, x))
    probs = hosted.probabilities(images)
    assert batches == [1, 1, 1] and [p.shape for p in probs] == [(1, 8, 9), (1, 9, 9), (1, 10, 9)]
    for image, p in zip(images, probs, strict=True):
        assert np.allclose(p, hosted.probabilities([image])[0])


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bfloat16")
def test_bf16_service_runs_checkpoints_in_bf16_and_lists_it(test_models):
    """--precision bf16: the 2D network runs under bfloat16 autocast, its probabilities the fp32 ones up to bf16
    rounding; /v1/models says so."""
    (source,) = predictors.resolve_models([str(test_models["urwkv"])])
    hosted = {p: predictors.Hosted2D(source, device="cpu", precision=p) for p in ("fp32", "bf16")}
    seen = []
    for m in hosted["bf16"].backend.model.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(lambda _m, _a, out: seen.append(out.dtype))
    image = square_image().astype(np.float32) / 255
    fp32, bf16 = (hosted[p].probabilities([image])[0] for p in ("fp32", "bf16"))
    assert seen and set(seen) == {torch.bfloat16} and np.asarray(bf16).dtype == np.float32
    assert np.abs(np.asarray(bf16) - np.asarray(fp32)).max() < 0.05
    with client_for(ServeConfig(models=(str(test_models["urwkv"]),), precision="bf16")) as c:
        wait_ready(c)
        (entry,) = c.get("/v1/models").json()["models"]
        assert entry["precision"] == "bf16"


def test_health_models_openapi_and_viewer(client):
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json()["ready"] is True
    models = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    assert set(models) == {"urwkv", "bright", "ball"}
    assert models["urwkv"]["dims"] == 2 and models["urwkv"]["input"]["channels"] == 3
    assert models["urwkv"]["input"]["size"] == [64, 64] and models["urwkv"]["classes"]["num_classes"] == 1
    assert models["ball"]["dims"] == 3 and models["ball"]["input"]["modalities"] == ["t1", "t1ce", "t2", "flair"]
    assert models["ball"]["classes"]["label_values"] == [0, 1, 2, 4] and all(m["ready"] for m in models.values())
    assert {m["postprocess"] for m in models.values()} == {"none"}  # no --postprocess, no recorded choice
    assert all(m["mirror_axes"] == [] for m in models.values())  # no flips: 2D never, 3D without --mirror-3d
    assert all(m["precision"] == "fp32" for m in models.values())  # without --precision
    assert client.get("/v2/models/ball/ready").json() == {"name": "ball", "ready": True}
    assert client.get("/v2/models/nope/ready").status_code == 404
    schema = client.get("/openapi.json").json()
    assert "modalities in order" in json.dumps(schema["components"]["schemas"]["ModelEntry"])
    assert {"/v2/health/live", "/v2/health/ready", "/v1/models", "/v1/models/{name}/predict"} <= set(schema["paths"])
    answers = schema["paths"]["/v1/models/{name}/predict"]["post"]["responses"]
    assert {"image/png", "application/gzip"} <= set(answers["200"]["content"]) and {"413", "503", "504"} <= set(answers)
    assert client.get("/docs").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"] and "viewer.js" in page.text
    assert client.get("/static/viewer.js").status_code == 200


def test_2d_mask_and_overlay_at_the_input_size(client):
    image = square_image()
    answer = post_image(client, "bright", png(image))
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
    mask = np.asarray(Image.open(io.BytesIO(answer.content)))
    truth = image[..., 0] > 128
    assert mask.shape == (40, 52) and set(np.unique(mask)) == {0, 255}
    assert ((mask > 0) != truth).mean() < 0.03  # a 16x16 network input resized back: only border pixels differ
    tinted = np.asarray(Image.open(io.BytesIO(post_image(client, "bright", png(image), overlay="true").content)))
    assert tinted.shape == (40, 52, 3)
    inside, outside = tinted[15:25, 12:34].astype(int), tinted[:5].astype(int)
    assert (inside[..., 0] - inside[..., 1]).min() > 40 and (outside == 40).all()  # red inside, untouched outside
    # a JPEG, a grey image and a threshold that lets nothing through
    assert post_image(client, "bright", png(image, "JPEG"), "a.jpg").status_code == 200
    assert post_image(client, "bright", png(image[..., 0])).status_code == 200
    none = post_image(client, "bright", png(image), threshold=1.0)
    assert np.asarray(Image.open(io.BytesIO(none.content))).max() == 0
    # the real architecture, through its micro-batcher
    real = post_image(client, "urwkv", png(image))
    assert real.status_code == 200 and Image.open(io.BytesIO(real.content)).size == (52, 40)


@pytest.mark.parametrize(
    ("data", "params", "status", "message"),
    [
        (b"GIF89a not really", {}, 415, "not an image"),
        (b"", {}, 400, "empty"),
        ("truncated", {}, 400, "truncated"),
        ("bomb", {}, 413, "too large"),
        ("big", {}, 413, "pixels"),
        ("zip", {}, 415, "not an image"),
        ("ok", {"threshold": 2}, 422, "threshold"),
    ],
)
def test_malformed_2d_requests_get_a_clear_4xx(client, data, params, status, message):
    good = png(square_image())
    data = {
        "truncated": good[: len(good) // 2],
        "bomb": fake_png(30000, 30000),
        "big": fake_png(400, 400),
        "zip": zip_of({"a.png": good}),
        "ok": good,
    }.get(data, data)
    answer = post_image(client, "bright", data, **params)
    assert answer.status_code == status, answer.text
    assert message in answer.json()["detail"]


def test_wrong_model_missing_field_size_and_file_count(client):
    good = png(square_image())
    unknown = post_image(client, "nope", good)
    assert unknown.status_code == 404 and "bright" in unknown.json()["detail"]
    missing = client.post("/v1/models/bright/predict", data={"other": "x"})
    assert missing.status_code == 422 and "field 'file'" in missing.json()["detail"]
    not_form = client.post("/v1/models/bright/predict", content=b"{}", headers={"content-type": "application/json"})
    assert not_form.status_code == 422
    broken = client.post(
        "/v1/models/bright/predict",
        content=b"--x\r\nbroken",
        headers={"content-type": "multipart/form-data; boundary=x"},
    )
    assert broken.status_code in (400, 422)
    too_big = post_image(client, "bright", b"\0" * (2**20 + 1))
    assert too_big.status_code == 413 and "limit" in too_big.json()["detail"]

    def chunks():  # no Content-Length: the limit is counted on the stream
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
        for _ in range(40):
            yield b"\0" * 65536

    streamed = client.post(
        "/v1/models/bright/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"}
    )
    assert streamed.status_code == 413
    two = client.post("/v1/models/bright/predict", files=[("file", ("a.png", good)), ("file", ("b.png", good))])
    assert two.status_code == 400 and "exactly one image" in two.json()["detail"]
    assert client.get("/v2/health/ready").status_code == 200  # still serving


def test_3d_zip_and_parts_give_labels_on_the_input_grid(client, tmp_path):
    files, ball = write_case(tmp_path / "case")
    as_zip = zip_of({f"c1/{p.name}": p.read_bytes() for p in files})
    answer = client.post("/v1/models/ball/predict", files={"file": ("case.zip", as_zip, "application/zip")})
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/gzip"
    labels = nib.Nifti1Image.from_bytes(gzip.decompress(answer.content))
    assert labels.shape == SHAPE and np.allclose(labels.affine, AFFINE) and labels.get_data_dtype() == np.uint8
    values = np.asarray(labels.dataobj)
    assert set(np.unique(values)) == {0, 2}
    assert 2 * ((values == 2) & ball).sum() / ((values == 2).sum() + ball.sum()) > 0.9
    parts = [("file", (p.name, p.read_bytes())) for p in reversed(files)]  # any order: matched by name
    again = client.post("/v1/models/ball/predict", files=parts)
    assert again.status_code == 200 and np.array_equal(
        np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(again.content)).dataobj), values
    )
    view = client.post("/v1/models/ball/view", files=parts).json()
    assert view["shape"] == list(SHAPE) and view["spacing"] == [2.0, 2.0, 2.0] and view["background"] == "flair"
    classes = np.frombuffer(__import__("base64").b64decode(view["labels"]), np.uint8).reshape(SHAPE)
    assert (classes == 2).sum() == (values == 2).sum()  # class index 2 is label value 2
    assert np.array_equal(classes, np.flip(values == 2, (0, 1)) * 2)  # RAS: the case's i and j axes point L and P
    assert view["volumes_ml"]["labels"]["2"] == pytest.approx((values == 2).sum() * 8 / 1000)
    assert view["volumes_ml"]["regions"]["WT"] == view["volumes_ml"]["labels"]["2"]
    assert view["legend"][0] == {"index": 1, "value": 1, "colour": [255, 64, 64]}


def test_probabilities_are_answered_as_predict_writes_them(client, test_models, tmp_path):
    """?probabilities=true: a 2D binary model's 8-bit probability PNG (the very file `rwkvseg predict
    --probabilities` writes) and a 3D model's 4-D 8-bit NIfTI on the input grid, whose argmax is the answered labels;
    asking for an overlay and probabilities at once, or an overlay of a 3D model, is refused in one line."""
    from rwkvseg.cli import main

    image = square_image()
    image[::3, ::5] = 128  # grey pixels: probabilities between 0 and 1
    answer = post_image(client, "bright", png(image), probabilities="true")
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
    served = np.asarray(Image.open(io.BytesIO(answer.content)))
    assert served.shape == (40, 52) and served.dtype == np.uint8 and len(np.unique(served)) > 2
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(png(image))
    args = ["predict", str(test_models["bright"]), str(tmp_path / "in"), "--out", str(tmp_path / "cli")]
    assert main([*args, "--probabilities"]) == 0
    np.testing.assert_array_equal(served, np.asarray(Image.open(tmp_path / "cli" / "probabilities" / "a.png")))
    mask = np.asarray(Image.open(io.BytesIO(post_image(client, "bright", png(image)).content)))
    np.testing.assert_array_equal(served >= 128, mask > 0)  # the cut of 0.5 on the answered probabilities

    files, _ = write_case(tmp_path / "case")
    parts = [("file", (p.name, p.read_bytes())) for p in files]
    soft = client.post("/v1/models/ball/predict", params={"probabilities": "true"}, files=parts)
    assert soft.status_code == 200 and soft.headers["content-type"] == "application/gzip"
    assert "ball_probabilities.nii.gz" in soft.headers["content-disposition"]
    volume = nib.Nifti1Image.from_bytes(gzip.decompress(soft.content))
    assert volume.shape == (*SHAPE, 4) and np.allclose(volume.affine, AFFINE)
    probs = np.asarray(volume.dataobj)  # (i, j, k, class) within 1/255
    assert np.allclose(probs.sum(axis=-1), 1.0, atol=4 / 255)
    labels = np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(client.post("/v1/models/ball/predict",
                        files=parts).content)).dataobj)  # fmt: skip
    assert np.array_equal(np.array([0, 1, 2, 4])[probs.argmax(axis=-1)], labels)

    both = post_image(client, "bright", png(image), overlay="true", probabilities="true")
    assert both.status_code == 422 and "ask for one of them" in both.json()["detail"]
    flat = client.post("/v1/models/ball/predict", params={"overlay": "true"}, files=parts)
    assert flat.status_code == 422 and "overlay: for 2D models" in flat.json()["detail"]
    described = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    assert described["bright"]["probabilities"].startswith("image/png: 8-bit probability")
    assert described["ball"]["probabilities"].startswith("application/gzip: 4-D NIfTI, 8-bit, one channel per label")
    assert "label value: 0, 1, 2, 4 (" in described["ball"]["probabilities"]


def test_hostile_or_ambiguous_3d_requests_get_a_clear_4xx(client, tmp_path):
    files, _ = write_case(tmp_path / "case")
    by_name = {p.name: p.read_bytes() for p in files}
    four_d = io.BytesIO()
    stacked = np.stack([np.asarray(nib.load(p).dataobj) for p in files], -1)
    four_d.write(gzip.compress(nib.Nifti1Image(stacked, AFFINE).to_bytes()))
    bomb = zip_of({"c1_t1.nii.gz": b"\0" * (2 * 2**20)})  # 2 MiB of zeros: ~2 KiB zipped, past the 1 MiB limit
    traversal = zip_of({"../c1_t1.nii.gz": by_name["c1_t1.nii.gz"]})
    link = io.BytesIO()
    with zipfile.ZipFile(link, "w") as archive:
        info = zipfile.ZipInfo("c1_t1.nii.gz")
        info.external_attr = 0o120777 << 16
        archive.writestr(info, "/etc/passwd")
    truncated = dict(by_name, **{"c1_t2.nii.gz": by_name["c1_t2.nii.gz"][:200]})
    cases = [
        ({"file": ("case.nii.gz", four_d.getvalue())}, 422, "one file per modality"),
        ({"file": ("c1_t1.nii.gz", by_name["c1_t1.nii.gz"])}, 422, "missing ['t1ce', 't2', 'flair']"),
        ({"file": ("case.zip", bomb)}, 413, "expands"),
        ({"file": ("case.zip", traversal)}, 400, "unsafe path"),
        ({"file": ("case.zip", link.getvalue())}, 400, "symbolic link"),
        ({"file": ("case.zip", b"PK\x03\x04 broken")}, 400, "not a readable zip"),
        ({"file": ("x.png", png(square_image()))}, 415, "not a NIfTI"),
        ([("file", (n, b"garbage")) for n in by_name], 400, "not a readable NIfTI"),
        ([("file", (n, d)) for n, d in truncated.items()], 422, "cannot predict this case"),
    ]
    for files_arg, status, message in cases:
        answer = client.post("/v1/models/ball/predict", files=files_arg)
        assert answer.status_code == status, (message, answer.text)
        assert message in answer.json()["detail"], answer.json()
    assert client.post("/v1/models/bright/view", files={"file": ("a", b"x")}).status_code == 400  # a 2D model
    assert client.get("/v2/health/ready").status_code == 200


def blobs_with_a_hole() -> np.ndarray:
    """A 64x64 image: a big bright square with a dark hole, and a small bright square apart from it."""
    image = np.full((64, 64, 3), 40, np.uint8)
    image[4:44, 4:44] = 230
    image[16:32, 16:32] = 40
    image[50:60, 50:60] = 230
    return image


def test_2d_masks_are_post_processed_as_predict_does(client, test_models, tmp_path, capsys):
    """--postprocess of the service: the masks (and overlays) `rwkvseg predict --postprocess` writes."""
    from rwkvseg.cli import main

    image = blobs_with_a_hole()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(png(image))
    raw = np.asarray(Image.open(io.BytesIO(post_image(client, "bright", png(image)).content)))
    assert raw[55, 55] == 255 and raw[24, 24] == 0  # the small square and the hole, without post-processing
    config = ServeConfig(models=(str(test_models["bright"]),), postprocess="largest,fill-holes")
    with client_for(config) as processed:
        wait_ready(processed)
        listed = processed.get("/v1/models").json()["models"]
        assert [m["postprocess"] for m in listed] == ["largest,fill-holes"]
        mask = np.asarray(Image.open(io.BytesIO(post_image(processed, "bright", png(image)).content)))
        tinted = np.asarray(Image.open(io.BytesIO(post_image(processed, "bright", png(image), overlay="true").content)))
    assert mask[55, 55] == 0 and mask[24, 24] == 255 and mask[10, 10] == 255
    checkpoint = str(test_models["bright"])
    args = ["predict", checkpoint, str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--device", "cpu"]
    assert main([*args, "--postprocess", "largest,fill-holes", "--overlay"]) == 0
    np.testing.assert_array_equal(mask, np.asarray(Image.open(tmp_path / "out" / "a.png")))
    np.testing.assert_array_equal(tinted, np.asarray(Image.open(tmp_path / "out" / "overlays" / "a.png")))


def test_2d_models_post_process_as_their_sidecar_records_without_flips(test_models, tmp_path):
    """A release's recorded post-processing applies in the service as in predict; its recorded flips do not (the
    service's masks are predict's with --mirror-axes '')."""
    from rwkvseg.cli import main

    weights = Path(test_models["bright"])
    recorded = tmp_path / "rec.safetensors"
    shutil.copyfile(weights, recorded)
    sidecar = json.loads(weights.with_suffix(".json").read_text())
    sidecar["preprocessing"]["inference"] = {"postprocess": "largest,fill-holes", "mirror_axes": [0, 1]}
    recorded.with_suffix(".json").write_text(json.dumps(sidecar))
    image = blobs_with_a_hole()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(png(image))
    with client_for(ServeConfig(models=(str(recorded),))) as served:
        wait_ready(served)
        (listed,) = served.get("/v1/models").json()["models"]
        mask = np.asarray(Image.open(io.BytesIO(post_image(served, "rec", png(image)).content)))
    assert listed["postprocess"] == "largest,fill-holes" and listed["mirror_axes"] == []
    assert mask[55, 55] == 0 and mask[24, 24] == 255 and mask[10, 10] == 255
    args = ["predict", str(recorded), str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--mirror-axes", ""]
    assert main(args) == 0
    np.testing.assert_array_equal(mask, np.asarray(Image.open(tmp_path / "out" / "a.png")))


def test_3d_labels_are_post_processed_with_the_case_s_spacing(client, test_models, tmp_path):
    """et-min-mm3 through the service: 8 enhancing voxels of 2 mm are 64 mm3, relabelled below 100 mm3 and kept
    at 60 (as a count, 8 voxels would fall below both)."""
    files, ball = write_case(tmp_path / "case")
    t1ce = nib.load(files[1])
    data = np.asarray(t1ce.dataobj).copy()
    spot = tuple(slice(c - 1, c + 1) for c in np.argwhere(ball).mean(0).round().astype(int))  # 2x2x2 in the ball
    data[spot] = 3000
    nib.save(nib.Nifti1Image(data, t1ce.affine, t1ce.header), files[1])
    parts = [("file", (p.name, p.read_bytes())) for p in files]

    def labels(answer) -> np.ndarray:
        assert answer.status_code == 200, answer.text
        return np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(answer.content)).dataobj)

    raw = labels(client.post("/v1/models/ball/predict", files=parts))
    assert (raw == 4).sum() == 8 and not (raw == 1).any()
    for volume, relabelled in [(100, True), (60, False)]:
        config = ServeConfig(models=(f"ball={test_models['ball']}",), postprocess=f"et-min-mm3={volume}")
        with client_for(config) as processed:
            wait_ready(processed)
            values = labels(processed.post("/v1/models/ball/predict", files=parts))
        np.testing.assert_array_equal(values == 1, (raw == 4) if relabelled else np.zeros_like(raw, bool))
        assert (values == 4).sum() == (0 if relabelled else 8)


def test_post_processing_that_does_not_fit_a_model_stops_the_start(test_models, capsys, monkeypatch):
    import uvicorn

    from rwkvseg.cli import main

    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: pytest.fail("the service started"))
    bright, ball = str(test_models["bright"]), f"ball={test_models['ball']}"
    refusals = [
        ((bright,), "holes", "--postprocess 'holes': 'holes' is not an option; give none, largest, fill-holes"),
        ((bright,), "largest,et-min-mm3=800", "model bright: --postprocess et-min-mm3 applies to 3D BraTS-style"),
        ((bright, ball), "fill-holes", "model ball: --postprocess fill-holes fills binary masks, and this model"),
        ((ball,), "et-min-mm3=abc", "--postprocess 'et-min-mm3=abc': et-min-mm3=abc is not a volume"),
    ]
    for models, spec, message in refusals:
        with pytest.raises(ValueError, match=re.escape(message)):
            create_app(ServeConfig(models=models, postprocess=spec))
        assert main(["serve", *models, "--port", str(free_port()), "--postprocess", spec]) == 2  # before listening
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"rwkvseg: error: {message}") and len(err.splitlines()) == 1
    create_app(ServeConfig(models=(bright, ball), postprocess="largest"))  # fits both
    create_app(ServeConfig(models=(bright,), postprocess="none"))


def test_3d_region_models_list_the_cut_prediction_applies(test_models, tmp_path, capsys, monkeypatch):
    """GET /v1/models lists a 3D region model's recorded cut of the region sigmoids (0.5 where none is recorded), as
    Predictor3D applies it, and none for a label model (argmax); a label model recording a cut, which prediction
    refuses, stops the start with one line naming it."""
    import uvicorn

    from rwkvseg.cli import main

    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: pytest.fail("the service started"))
    meta = read_meta(test_models["ball"])

    def saved(name: str, **changes) -> str:
        changed = replace(meta, preprocessing={**meta.preprocessing, **changes})
        return f"{name}={save_checkpoint(tmp_path / name, FlairBall(), changed)[0]}"

    models = (saved("cut", target="regions", inference={"threshold": 0.1}), saved("plain", target="regions"))
    listed = client_for(ServeConfig(models=(*models, f"ball={test_models['ball']}"))).get("/v1/models").json()
    assert {m["name"]: m["threshold"] for m in listed["models"]} == {"cut": 0.1, "plain": 0.5, "ball": None}
    refused = saved("labels_cut", inference={"threshold": 0.3})
    message = "model labels_cut: " + refused.split("=", 1)[1] + ": the checkpoint records inference.threshold 0.3,"
    with pytest.raises(ValueError, match=re.escape(message)):
        create_app(ServeConfig(models=(refused,)))
    assert main(["serve", refused, "--port", str(free_port())]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"rwkvseg: error: {message}") and len(err.splitlines()) == 1


def test_json_access_log_lines(client, caplog):
    with caplog.at_level(logging.INFO, logger="rwkvseg.serve.access"):
        post_image(client, "bright", png(square_image()))
        post_image(client, "nope", b"x")
    records = [r for r in caplog.records if r.name == "rwkvseg.serve.access"]
    assert [(r.route, r.model, r.status) for r in records[-2:]] == [
        ("/v1/models/{name}/predict", "bright", 200),
        ("/v1/models/{name}/predict", "nope", 404),
    ]
    line = json.loads(JsonFormatter().format(records[-2]))
    assert line["status"] == 200 and line["ms"] > 0 and line["route"] == "/v1/models/{name}/predict"


def slow_backend(monkeypatch, seconds: float, batches: list[int]):
    original = predictors.Hosted2D.probabilities

    def slow(self, images):
        batches.append(len(images))
        time.sleep(seconds)
        return original(self, images)

    monkeypatch.setattr(predictors.Hosted2D, "probabilities", slow)


def test_queue_limit_timeout_and_micro_batches_on_a_real_server(test_models, monkeypatch):
    """uvicorn on 127.0.0.1: concurrent requests share forward passes; a full queue answers 503, a slow one 504."""
    batches: list[int] = []
    config = ServeConfig(models=(str(test_models["bright"]),), max_queue=4, batch_size=4, batch_wait_ms=50, timeout_s=3)
    with running_server(create_app(config)) as url:
        slow_backend(monkeypatch, 0.3, batches)
        good = png(square_image())

        def send(_):
            return httpx.post(f"{url}/v1/models/bright/predict", files={"file": ("a.png", good)}, timeout=30)

        with ThreadPoolExecutor(10) as pool:
            answers = list(pool.map(send, range(10)))
        codes = sorted(a.status_code for a in answers)
        assert set(codes) == {200, 503} and codes.count(200) >= 4, codes
        busy = next(a for a in answers if a.status_code == 503)
        assert busy.headers["retry-after"] == "1" and "retry later" in busy.json()["detail"]
        assert max(batches) > 1 and sum(batches) == codes.count(200)  # one forward pass for several requests
        monkeypatch.setattr(predictors.Hosted2D, "probabilities", lambda self, images: time.sleep(5) or [])
        late = send(0)
        assert late.status_code == 504 and "longer than 3 s" in late.json()["detail"]
        assert httpx.get(f"{url}/v2/health/live").status_code == 200


def test_serve_runs_uvicorn_with_json_logs(test_models):
    port = free_port()
    code = (
        "from rwkvseg.serve import ServeConfig, serve; "
        f"serve(ServeConfig(models=({str(test_models['urwkv'])!r},), port={port}))"
    )
    with service_process(code, port) as (url, lines):
        answer = httpx.post(f"{url}/v1/models/urwkv/predict", files={"file": ("a.png", png(square_image()))})
        assert answer.status_code == 200 and Image.open(io.BytesIO(answer.content)).size == (52, 40)
    logged = [json.loads(line) for line in lines if line.startswith("{")]
    requests = [e for e in logged if e.get("logger") == "rwkvseg.serve.access" and e["route"].endswith("/predict")]
    assert requests and requests[-1]["status"] == 200 and requests[-1]["model"] == "urwkv"
    assert all(line.startswith("{") for line in lines if line.strip()), lines  # uvicorn's own lines too


def test_config_and_model_errors_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="runtime 'tf' unknown"):
        ServeConfig(runtime="tf")
    with pytest.raises(ValueError, match="max_queue=0"):
        ServeConfig(max_queue=0)
    with pytest.raises(ValueError, match="device 'gpu0' is not a device; use cpu, cuda, cuda:1 or auto"):
        ServeConfig(device="gpu0")
    # auto resolves when the config is made, as the CLI's --device does (onnx runs on the CPU whatever torch sees)
    assert ServeConfig(device="auto").device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert ServeConfig(runtime="onnx", device="auto").device == "cpu"
    with pytest.raises(ValueError, match="--precision 'fp16' unknown"):
        ServeConfig(precision="fp16")
    with pytest.raises(ValueError, match="precision 'bf16' is for checkpoints"):
        ServeConfig(runtime="onnx", precision="bf16")
    with pytest.raises(ValueError, match="neither a released model"):
        create_app(ServeConfig(models=(str(tmp_path / "missing"),)))
    with pytest.raises(ValueError, match="hosted twice"):
        create_app(ServeConfig(models=("urwkv_s-kvasir", "urwkv_s-kvasir")))


def test_serve_command_refuses_bad_settings_in_one_line(capsys):
    from rwkvseg.cli import main

    assert main(["serve", "--port", "0"]) == 2
    assert "port" in capsys.readouterr().err
    assert main(["serve", "--device", "gpu0"]) == 2
    err = capsys.readouterr().err
    assert "--device 'gpu0' is not a device; use cpu, cuda, cuda:1 or auto" in err
    assert len(err.strip().splitlines()) == 1
