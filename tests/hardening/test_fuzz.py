"""Fuzz target (issue 18): hostile headers, sizes and values for the image, volume and checkpoint readers.

Each reader either returns a well-formed result or raises ValueError / FileNotFoundError with a message naming
the file: never another exception, a hang or a huge allocation. Fixed budget: `max_examples` and `deadline`
below keep the whole target under ~30 s on a CPU (derandomized, so CI runs are repeatable). Run it alone with
`python -m pytest -q -m fuzz`.
"""

from __future__ import annotations

import io
import json
import struct
import tempfile
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from hardening.helpers import Bright, bright_checkpoint
from rwkvseg.checkpoint import load_checkpoint
from rwkvseg.data.images2d import read_image, read_mask
from rwkvseg.data.volumes import read_volume
from rwkvseg.models import registry

pytestmark = pytest.mark.fuzz
BUDGET = settings(
    max_examples=40, deadline=2000, derandomize=True, suppress_health_check=[HealthCheck.too_slow], database=None
)


def _png(width: int, height: int, mode: str = "L") -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(width * 31 + height)
    shape = (height, width, 3) if mode == "RGB" else (height, width)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def _with_ihdr(data: bytes, width: int, height: int) -> bytes:
    """data (a PNG) with its header's size replaced and the chunk's CRC fixed (so only the size lies)."""
    ihdr = bytearray(data[16:29])
    ihdr[0:8] = struct.pack(">II", width, height)
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    return data[:16] + bytes(ihdr) + crc + data[33:]


def _mutate(data: bytes, flips: list[tuple[int, int]], cut: int | None) -> bytes:
    out = bytearray(data)
    for pos, value in flips:
        out[pos % len(out)] = value
    return bytes(out[:cut] if cut is not None else out)


@BUDGET
@given(
    width=st.integers(1, 40),
    height=st.integers(1, 40),
    claimed=st.tuples(st.integers(0, 2**31 - 1), st.integers(0, 2**31 - 1)) | st.none(),
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
    cut=st.integers(0, 400) | st.none(),
)
def test_image_reader(width, height, claimed, flips, cut):
    data = _png(width, height)
    if claimed is not None:
        data = _with_ihdr(data, *claimed)
    data = _mutate(data, flips, cut)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "x.png"
        path.write_bytes(data)
        for read in (read_image, read_mask):
            try:
                array = read(path)
            except ValueError as err:
                assert "x.png" in str(err)
                continue
            assert array.ndim in (2, 3) and array.shape[0] * array.shape[1] <= 2**26
            if array.dtype.kind == "f":
                assert np.isfinite(array).all()


@BUDGET
@given(
    dims=st.lists(st.integers(-5, 5000), min_size=8, max_size=8),
    datatype=st.sampled_from([2, 4, 8, 16, 64, 256, 512, 768, 0, 1, 9999]),
    offset=st.integers(0, 2000),
    values=st.sampled_from([0.0, 1.0, np.nan, np.inf, -np.inf, 1e38]),
    cut=st.integers(0, 2000) | st.none(),
)
def test_volume_reader(dims, datatype, offset, values, cut):
    volume = np.full((6, 5, 4), values, np.float32)
    image = nib.Nifti1Image(volume, np.eye(4))
    data = bytearray(image.header.binaryblock + b"\0" * 4 + volume.tobytes(order="F"))
    data[40:56] = struct.pack("<8h", *(max(-32768, min(32767, d)) for d in dims))
    data[70:72] = struct.pack("<h", datatype)
    data[108:112] = struct.pack("<f", float(offset))
    data = bytes(data[:cut] if cut is not None else data)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "x.nii"
        path.write_bytes(data)
        try:
            vol = read_volume(path)
        except ValueError as err:
            assert "x.nii" in str(err)
            return
        assert vol.array.ndim == 3 and vol.array.size <= 2**30
        if vol.array.dtype.kind == "f":
            assert np.isfinite(vol.array).all()


@BUDGET
@given(
    flips=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), min_size=1, max_size=3),
    keep_digest=st.booleans(),
    sidecar=st.fixed_dictionaries(
        {},
        optional={
            "size": st.lists(st.integers(-10, 100_000), max_size=3),
            "resize": st.sampled_from(["resize", "crop", "bogus", ""]),
            "channels": st.integers(-2, 5),
        },
    ),
)
def test_checkpoint_reader(flips, keep_digest, sidecar):
    original = registry._builders
    registry._builders = lambda: {"bright": Bright}
    try:
        with tempfile.TemporaryDirectory() as folder:
            ck = bright_checkpoint(Path(folder))
            side = ck.with_suffix(".json")
            data = json.loads(side.read_text())
            if not keep_digest:
                del data["training"]["weights_sha256"]
            data["preprocessing"].update(sidecar)
            side.write_text(json.dumps(data))
            ck.write_bytes(_mutate(ck.read_bytes(), flips, None))
            try:
                model, meta = load_checkpoint(ck)
            except ValueError as err:
                assert "ck." in str(err) or "sidecar" in str(err)
                return
            if keep_digest:  # any changed byte was caught by the digest, so here none changed
                assert all(p.isfinite().all() for p in model.parameters())
            from rwkvseg.records import Preprocessing2D

            try:
                Preprocessing2D.from_meta(meta)
            except ValueError as err:
                assert "sidecar" in str(err)
    finally:
        registry._builders = original
