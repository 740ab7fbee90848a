"""Shared pieces of the hostile-input tests: a tiny registered model, its checkpoints, snapshots of folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rwkvseg.checkpoint import CheckpointMeta, save_checkpoint
from rwkvseg.cli import main
from rwkvseg.records import Preprocessing2D
from writers import Bright


def bright_checkpoint(folder: Path, channels: int = 1, dims: int = 2, **training) -> Path:
    pre = Preprocessing2D(channels, (16, 16), "resize", "dtype").to_dict()
    if dims == 3:
        pre = {"dims": 3}
    meta = CheckpointMeta("bright", channels, 1, preprocessing=pre, training=training)
    return save_checkpoint(folder / "ck", Bright(channels, 1), meta)[0]


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file below root (relative name -> bytes): what must be unchanged after a refusal."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def cli(capsys, *argv) -> tuple[int, str]:
    """Run `rwkvseg argv` in-process: (exit code, stderr)."""
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def square(shape=(20, 20)) -> np.ndarray:
    img = np.zeros(shape, np.uint8)
    img[2:9, 2:9] = 255
    return img
