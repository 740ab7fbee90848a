"""Helpers of the service tests: test checkpoints' models, images, cases and a uvicorn runner."""

import io
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from PIL import Image
from torch import nn

from rwkvseg.data.specs import dataset_spec

BRATS = dataset_spec("brats")
PRE_2D = {"channels": 3, "size": [64, 64], "resize": "resize", "normalization": "auto"}


class FlairBall(nn.Module):
    """3D: label 2 (edema) where FLAIR z > 1, label 4 where T1ce z > 5; classes (0, 1, 2, 4)."""

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(10.0))

    def forward(self, x):  # [B, 4, *S] -> [B, 4, *S]
        flair, t1ce = x[:, 3], x[:, 1]
        zero = torch.zeros_like(flair)
        return torch.stack([zero, zero - 99, self.scale * (flair - 1), 2 * self.scale * (t1ce - 5)], 1)


def png(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def square_image(shape=(40, 52), box=(10, 30, 6, 40)) -> np.ndarray:
    img = np.full((*shape, 3), 40, np.uint8)
    img[box[0] : box[1], box[2] : box[3]] = 230
    return img


AFFINE = np.diag([-2.0, -2.0, 2.0, 1.0])
AFFINE[:3, 3] = (30.0, 40.0, -10.0)
SHAPE = (22, 20, 18)  # (i, j, k)


def write_case(folder: Path, case: str = "c1", shape=SHAPE, affine=AFFINE) -> tuple[list[Path], np.ndarray]:
    """A BraTS-named 4-modality case on a 2 mm grid with a bright FLAIR ball; returns files and the ball mask."""
    folder.mkdir(parents=True, exist_ok=True)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    brain = np.linalg.norm((grid - np.array(shape) / 2) / (np.array(shape) * 0.45), axis=-1) < 1
    ball = np.linalg.norm(grid - np.array(shape) / 2 + 2, axis=-1) < 4
    rng = np.random.default_rng(0)
    files = []
    for modality in BRATS.modalities:
        data = brain * (100 + rng.normal(0, 2, shape)) + (300 * ball if modality == "flair" else 0)
        image = nib.Nifti1Image(data.astype(np.int16), affine)
        image.set_qform(affine, 1)
        path = folder / f"{case}_{modality}.nii.gz"
        nib.save(image, path)
        files.append(path)
    return files, ball


def wait_ready(client, timeout: float = 60.0) -> None:
    """Until a TestClient's service answers /v2/health/ready with 200 (its models are loaded)."""
    deadline = time.monotonic() + timeout
    while client.get("/v2/health/ready").status_code != 200:
        assert time.monotonic() < deadline, client.get("/v2/health/ready").json()
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(app, timeout: float = 60.0):
    """uvicorn on 127.0.0.1 in a thread of this process; yields the base URL once ready."""
    import uvicorn

    from rwkvseg.serve.loadtest import wait_until_ready

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        if not wait_until_ready(url, timeout, poll_s=0.1):
            raise TimeoutError(f"the service on {url} did not become ready in {timeout} s")
        yield url
    finally:
        server.should_exit = True
        thread.join(10)


@contextmanager
def service_process(code: str, port: int, timeout: float = 60.0):
    """`python -c code`, a service on 127.0.0.1:port, in a child process; yields (base URL, its stderr lines, which
    keep filling until the process ends) once ready, and stops it."""
    from rwkvseg.serve.loadtest import wait_until_ready

    process = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True)
    reader.start()
    try:
        url = f"http://127.0.0.1:{port}"
        assert wait_until_ready(url, timeout, alive=lambda: process.poll() is None), "".join(lines)
        yield url, lines
    finally:
        process.terminate()
        process.wait(20)
        reader.join(5)
