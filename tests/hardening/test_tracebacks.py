"""Issue 18, tracebacks and unclear errors: each bad file or fault ends in one line naming the file or setting,
a non-zero exit, and no partial output under a final name."""

from __future__ import annotations

import errno
import json
import os
import re
import resource
import signal
import struct
import subprocess
import sys
import time
import zlib

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import get_worker_info

from hardening.helpers import Bright, bright_checkpoint, cli, snapshot, square
from rwkvseg.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from rwkvseg.data.dataset2d import SegDataset2D
from rwkvseg.data.images2d import discover_pairs, read_image
from rwkvseg.data.preprocess3d import load_cached_case
from rwkvseg.data.specs import dataset_spec
from rwkvseg.data.synthetic import write_synthetic_dataset
from rwkvseg.data.volumes import brats_cases, discover_cases, read_volume
from rwkvseg.files import LOCK, atomic_write, atomic_write_text
from rwkvseg.models import registry
from rwkvseg.records import Preprocessing2D
from rwkvseg.train import loop
from writers import save_nifti, save_png, write_brats_case


class Wide(nn.Module):
    """A 1x1 convolution through `width` hidden channels: its size follows in_channels, num_classes and width."""

    def __init__(self, in_channels, num_classes, width=1):
        super().__init__()
        self.mix = nn.Sequential(nn.Conv2d(in_channels, width, 1, bias=False), nn.Conv2d(width, num_classes, 1))

    def forward(self, x):
        return self.mix(x)


@pytest.fixture
def bright(monkeypatch):
    monkeypatch.setattr(registry, "_builders", lambda: {"bright": Bright})


def png_header_only(path, width, height):
    """A PNG whose header claims width x height 8-bit gray pixels, with a few bytes of data (a bomb's shape)."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


@pytest.mark.parametrize("side", [12000, 20000])
def test_decompression_bomb_refused_before_decoding(tmp_path, side):
    path = png_header_only(tmp_path / "bomb.png", side, side)
    with pytest.raises(ValueError, match=r"bomb\.png claims (12000x12000 pixels, above the limit|too many pixels)"):
        read_image(path)


@pytest.mark.parametrize(
    "content, name",
    [(b"", "empty.nii"), (b"not a nifti at all", "text.nii.gz"), (None, "truncated.nii.gz")],
)
def test_unreadable_nifti_is_one_line(tmp_path, content, name):
    path = tmp_path / name
    if content is None:
        full = save_nifti(tmp_path / "full.nii.gz", np.random.default_rng(0).random((20, 20, 20)).astype(np.float32))
        content = full.read_bytes()[: len(full.read_bytes()) // 2]
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"{name.replace('.', '[.]')}.*(empty, truncated|truncated or damaged)"):
        read_volume(path)


def test_header_claiming_3000_cubed_voxels(tmp_path):
    header = nib.Nifti1Header()
    header.set_data_shape((3000, 3000, 3000))
    header.set_data_dtype(np.float32)
    header.set_data_offset(352)
    path = tmp_path / "huge.nii"
    path.write_bytes(header.binaryblock + b"\0" * 4 + b"\0" * 64)
    with pytest.raises(ValueError, match=r"huge\.nii claims 3000 x 3000 x 3000 voxels, above the limit"):
        read_volume(path)


def test_corrupt_safetensors_header(tmp_path, bright):
    ck = bright_checkpoint(tmp_path)
    sidecar = ck.with_suffix(".json")
    data = json.loads(sidecar.read_text())
    del data["training"]["weights_sha256"]  # a checkpoint from before digests: the header itself is checked
    sidecar.write_text(json.dumps(data))
    ck.write_bytes(b"\xff" * 8 + ck.read_bytes()[8:])
    with pytest.raises(ValueError, match=r"ck\.safetensors is not a readable safetensors file"):
        load_checkpoint(ck)


@pytest.mark.parametrize("code_", [errno.ENOSPC, errno.EROFS])
def test_full_or_read_only_disk(tmp_path, capsys, bright, monkeypatch, code_):
    ck = bright_checkpoint(tmp_path)
    save_png(tmp_path / "in" / "a.png", square())
    out = tmp_path / "out"

    def fail(src, dst):
        raise OSError(code_, os.strerror(code_), str(dst))

    monkeypatch.setattr("rwkvseg.files.os.replace", fail)
    code, err = cli(capsys, "predict", ck, tmp_path / "in", "--out", out)
    assert code == 2 and err.count("\n") == 1 and str(out) in err
    assert ("disk is full" if code_ == errno.ENOSPC else "read-only") in err
    assert not list(out.glob("*a.png*"))  # no partial file under any name


def test_folder_where_an_output_file_goes(tmp_path, capsys, bright):
    ck = bright_checkpoint(tmp_path)
    save_png(tmp_path / "in" / "a.png", square())
    out = tmp_path / "out"
    assert cli(capsys, "predict", ck, tmp_path / "in", "--out", out)[0] == 0
    (out / "a.png").unlink()
    (out / "a.png").mkdir()
    code, err = cli(capsys, "predict", ck, tmp_path / "in", "--out", out, "--overwrite")
    assert code == 2 and "a.png is a folder where an output file goes" in err
    assert (out / "a.png").is_dir()


def test_ctrl_c_is_one_line_and_exit_130(tmp_path, capsys, bright, monkeypatch):
    ck = bright_checkpoint(tmp_path)
    save_png(tmp_path / "in" / "a.png", square())

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("rwkvseg.infer.predict.predict", interrupted)
    code, err = cli(capsys, "predict", ck, tmp_path / "in", "--out", tmp_path / "out")
    assert code == 130 and err.startswith("rwkvseg: interrupted") and err.count("\n") == 1


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_outputs_get_the_umask_mode(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "f.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == mode


@pytest.mark.parametrize(("name", "suffix"), [("c.1.nii.gz", ".nii.gz"), ("p1.nrrd", ".nrrd"), ("m.onnx", ".onnx")])
def test_atomic_write_keeps_the_format_suffix_when_asked_and_leaves_no_temporary(tmp_path, name, suffix):
    """keep_suffix: the temporary file ends in the target's format suffix (writers that read the format from the
    name); a failing writer leaves neither the target nor a temporary behind."""
    seen = []
    atomic_write(tmp_path / name, lambda tmp: seen.append(tmp.name) or tmp.write_bytes(b"x"), keep_suffix=True)
    atomic_write(tmp_path / "plain.nii.gz", lambda tmp: seen.append(tmp.name) or tmp.write_bytes(b"y"))
    assert seen[0].endswith(suffix) and seen[0].startswith(f".{name}.") and seen[1].endswith(".tmp")
    assert (tmp_path / name).read_bytes() == b"x"

    def failing(tmp):
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(tmp_path / "out" / name, failing, keep_suffix=True)
    assert list((tmp_path / "out").iterdir()) == []


def test_npz_with_objects_is_refused_without_unpickling(tmp_path):
    path = tmp_path / "c1.npz"
    np.savez(path, image=np.array([{"x": 1}], dtype=object), label=np.zeros(3))
    plans = {"cases": {"c1": {"zscore_mean": [0.0], "zscore_std": [1.0]}}}
    with pytest.raises(ValueError, match=r"cache file .*c1\.npz is damaged or not written by"):
        load_cached_case(tmp_path, "c1", plans)


def test_symlink_loop_and_broken_link_reported(tmp_path):
    root = tmp_path / "ds"
    save_png(root / "images" / "a.png", square())
    save_png(root / "masks" / "a.png", square())
    (root / "again").symlink_to(root)  # a loop: ds/again/images/... would be the same cases twice
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=r"ds/again leads to .*already part of"):
        discover_pairs(root)
    (root / "again").unlink()
    (root / "images" / "b.png").symlink_to(tmp_path / "gone.png")
    with pytest.raises(ValueError, match=r"b\.png is a broken link"):
        discover_pairs(root)
    assert snapshot(tmp_path) == before


def test_symlink_loop_in_a_3d_tree_reported(tmp_path):
    root = tmp_path / "brats"
    shape = (4, 5, 6)
    images = [np.ones(shape, np.float32) for _ in range(4)]
    write_brats_case(root / "HGG", "c1", images, np.zeros(shape, np.uint8))
    spec = dataset_spec("brats")
    assert [c.case_id for c in discover_cases(root, spec)] == ["c1"]
    (root / "HGG" / "again").symlink_to(root)  # a loop: brats/HGG/again/HGG/c1 would be c1 again
    before = snapshot(tmp_path)
    for find in (discover_cases, brats_cases):
        with pytest.raises(ValueError, match=r"HGG/again leads to .*already part of .*remove the link"):
            find(root, spec)
    (root / "HGG" / "again").unlink()
    (root / "c1_alias").symlink_to(root / "HGG" / "c1")  # a second path to one case
    with pytest.raises(ValueError, match=r"c1_alias leads to .*HGG/c1, which is already part of"):
        discover_cases(root, spec)
    (root / "c1_alias").unlink()
    (root / "HGG" / "c1" / "c1_extra.nii.gz").symlink_to(tmp_path / "gone.nii.gz")
    with pytest.raises(ValueError, match=r"c1_extra\.nii\.gz is a broken link"):
        discover_cases(root, spec)
    (root / "HGG" / "c1" / "c1_extra.nii.gz").unlink()
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "edit",
    [
        {"in_channels": 10**12},  # a 4 TB layer from a 200-byte file
        {"num_classes": 10**12},
        {"model_overrides": {"width": 10**6}},  # an override that multiplies every layer
    ],
    ids=["in_channels", "num_classes", "overrides"],
)
def test_sidecar_asking_for_a_huge_model_refused_before_allocating(tmp_path, capsys, monkeypatch, edit):
    monkeypatch.setattr(registry, "_builders", lambda: {"bright": Wide})
    pre = Preprocessing2D(1, (16, 16), "resize", "dtype").to_dict()
    ck = save_checkpoint(tmp_path / "ck", Wide(1, 1), CheckpointMeta("bright", 1, 1, preprocessing=pre))[0]
    sidecar = ck.with_suffix(".json")
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), **edit}))  # the weights' digest still fits
    save_png(tmp_path / "in" / "a.png", square())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    start = time.perf_counter()
    code, err = cli(capsys, "predict", ck, tmp_path / "in", "--out", tmp_path / "out")
    assert code == 2 and err.count("\n") == 1
    assert re.search(
        r"^rwkvseg: error: the sidecar of .*ck\.safetensors asks for a model of [\d,]+ parameters but the "
        r"file holds 3 values .*copy both files again$",
        err.strip(),
    )
    assert time.perf_counter() - start < 20 and resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 2**19
    assert not (tmp_path / "out").exists()
    assert torch.empty(1).device.type == "cpu"  # the meta device left nothing behind in this thread


def _train_args(data, run):
    write_synthetic_dataset(data, n=6, shape=(37, 41), seed=4)
    sets = ["model.name=urwkv_test", "data.size=[32,32]", "data.batch_size=2", "max_steps_per_epoch=1", "epochs=3"]
    return ["train", "--data", data, "--out", run, "--no-progress", *[a for s in sets for a in ("--set", s)]]


def test_killed_dataloader_worker_is_one_line_and_the_run_incomplete(tmp_path, capsys, monkeypatch):
    read = SegDataset2D.__getitem__

    def dies_in_epoch_2(self, i):
        if get_worker_info() is not None and self.epoch == 2:
            os.kill(os.getpid(), signal.SIGKILL)  # as the out-of-memory killer does
        return read(self, i)

    monkeypatch.setattr(SegDataset2D, "__getitem__", dies_in_epoch_2)
    run = tmp_path / "run"
    code, err = cli(capsys, *_train_args(tmp_path / "data", run), "--set", "data.num_workers=1")
    assert code == 2 and err.count("\n") == 1
    assert re.fullmatch(
        r"rwkvseg: error: a data loading worker process died \(DataLoader worker \(pid(\(s\))? \d+\) "
        r"(exited unexpectedly|is killed by signal: Killed\.)\); the run stopped incomplete\. "
        r"If it was killed for memory, lower data\.num_workers .* if it aborted .* set data\.worker_start = "
        r"forkserver; then continue with --resume\n",
        err,
    ), err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["complete"] is False and summary["status"] == "failed" and "DataLoader worker" in summary["error"]
    assert summary["epochs_done"] == 1 and json.loads((run / "last.json").read_text())["training"]["epoch"] == 1
    assert not (run / LOCK).exists()
    monkeypatch.setattr(SegDataset2D, "__getitem__", read)
    assert cli(capsys, "train", "--out", run, "--resume", "--no-progress")[0] == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["complete"] is True and summary["status"] == "complete" and summary["epochs_done"] == 3


def test_interrupted_run_is_marked_incomplete(tmp_path, capsys, monkeypatch):
    epoch = loop.train_epoch

    def ctrl_c_in_epoch_2(run, loop_, number, *args, **kw):
        if number == 2:
            assert json.loads((run.run_dir / "summary.json").read_text())["status"] == "running"
            raise KeyboardInterrupt
        return epoch(run, loop_, number, *args, **kw)

    monkeypatch.setattr(loop, "train_epoch", ctrl_c_in_epoch_2)
    run = tmp_path / "run"
    code, err = cli(capsys, *_train_args(tmp_path / "data", run))
    assert code == 130 and err.startswith("rwkvseg: interrupted")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["complete"] is False and summary["status"] == "interrupted" and summary["epochs_done"] == 1


def test_cli_help_and_light_commands_start_without_torch():
    """`rwkvseg --help`, every command's --help and `split` parse arguments without importing torch (~4 s)."""
    commands = ["models", "demo", "bench", "compact2d", "preprocess", "train", "federate", "split", "synthetic3d"]
    commands += ["predict", "evaluate", "export", "serve"]
    script = (
        "import sys\nfrom rwkvseg.cli import main\n"
        "for argv in [['--help']] + [[c, '--help'] for c in sys.argv[1:]]:\n"
        "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
        "import rwkvseg.data.splits\n"
        "print(sorted(m for m in ('torch', 'monai', 'numpy.f2py') if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", script, *commands], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_a_reader_that_goes_away_ends_the_command_quietly():
    """`rwkvseg models | head -0`: the reader closes the pipe before the listing is written. The command stops
    with exit code 1 and nothing on stderr (no "error: [Errno 32] Broken pipe", no "Exception ignored" at exit)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rwkvseg.cli", "models"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    proc.stdout.close()  # before the child has imported anything: its first write meets a closed pipe
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1, err
    assert err == ""


def test_a_broken_pipe_elsewhere_is_an_error_like_any_other(monkeypatch, capsys):
    """A broken pipe that is not standard output's (a socket, a subprocess) gets the usual one line and exit 2."""
    from rwkvseg.cli import models as models_command

    def broken(args):
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    monkeypatch.setattr(models_command, "run", broken)
    assert cli(capsys, "models") == (2, "rwkvseg: error: [Errno 32] Broken pipe\n")
