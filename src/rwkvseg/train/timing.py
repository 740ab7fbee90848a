"""Epoch time of a 2D training recipe under each execution setting: `rwkvseg bench epoch DATA`.

Every variant is a real `train` run (same config, same split, fresh run folder) that differs only in `compile`
and `data.gpu_resident`; the times are the loop's own per-epoch train_seconds (optimizer steps, no validation).
The first epoch holds the compilation and the one-off costs (loading a resident set is before it); the steady
epoch time is the median of the others.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .config import load_config


def time_epochs(
    data_root: str | Path,
    epochs: int = 3,
    compile_settings: Sequence[str] = ("off", "on"),
    resident_settings: Sequence[str] = ("off", "on"),
    overrides: Sequence[str] = (),
    out: str | Path | None = None,
    config_file: str | Path | None = None,
) -> list[dict[str, Any]]:
    """One row per (compile, gpu_resident): first epoch, steady epoch (median of the rest), setup and
    validation seconds. The recipe: config_file (e.g. configs/urwkv_kvasir.toml) or the TrainConfig defaults
    (the paper's 2D recipe), then overrides (`--set` strings); data_root, epochs and the two settings on top."""
    from .train import train

    if epochs < 2:
        raise ValueError(f"time at least 2 epochs (the first one compiles), got {epochs}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="rwkvseg-epochs-") as tmp:
        base = Path(out) if out else Path(tmp)
        for resident in resident_settings:
            for setting in compile_settings:
                name = f"compile-{setting}_resident-{resident}"
                sets = [
                    *overrides,
                    f"data.root={data_root}",
                    f"out={base / name}",
                    f"epochs={epochs}",
                    f"val_every={epochs}",
                    f"compile={setting}",
                    f"data.gpu_resident={resident}",
                ]
                config = load_config(config_file, sets)
                torch._dynamo.reset()  # each variant compiles from scratch (and below the recompile limit)
                start = time.perf_counter()
                progress = train(config)
                total = time.perf_counter() - start
                seconds = [float(r["train_seconds"]) for r in progress.history]
                val = sum(float(r.get("val_seconds", 0.0)) for r in progress.history)
                rows.append(
                    {
                        "compile": setting,
                        "gpu_resident": resident,
                        "first_epoch_s": seconds[0],
                        "epoch_s": statistics.median(seconds[1:]),
                        "epochs": seconds,
                        "setup_s": total - sum(seconds) - val,
                        "val_s": val,
                        "final_loss": progress.history[-1]["train_loss"],
                        "steps_per_epoch": progress.step // len(seconds),
                    }
                )
    return rows
