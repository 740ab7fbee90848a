"""The full training state for an exact resume: weights, optimizer, scheduler, AMP scaler, RNGs, progress, and
with optim.ema the average of the weights beside the raw ones (key "ema", absent without it).

One file (`state.pt`, written atomically at the end of each epoch). Data order and augmentation are seeded from
(seed, epoch[, index]), so together with the RNG states here a resumed run repeats the uninterrupted one bit for
bit on CPU. Loaded with weights_only=True: the file holds tensors and plain values only.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..files import atomic_write
from .ema import WeightEma

STATE_FORMAT = 1


@dataclass(frozen=True)
class ScheduleFit:
    """A run fitted to its time budget (TrainConfig.fit_schedule): after epoch `epoch` (optimizer step `step`) the
    run planned for `planned` epochs was set to end after `epochs`, its LR schedule compressed onto them
    (rwkvseg.train.optim.compress_schedule), from `seconds_per_epoch` and the `seconds_left` of the budget then."""

    planned: int
    epochs: int
    epoch: int
    step: int
    seconds_per_epoch: float
    seconds_left: float

    def record(self) -> dict[str, Any]:
        """A plain dict (the training state, summary.json, checkpoint sidecars)."""
        return asdict(self)

    def describe(self) -> str:
        return (
            f"{self.planned} -> {self.epochs} epochs ({self.seconds_per_epoch:.1f} s per epoch, "
            f"{self.seconds_left:.0f} s left)"
        )


@dataclass
class Progress:
    """Where training stands: completed epochs and steps, the best validation score and its epoch, and the fit of
    the run to its time budget once made (None: the run keeps its planned epochs)."""

    epoch: int = 0
    step: int = 0
    best_metric: float | None = None
    best_epoch: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    schedule_fit: ScheduleFit | None = None


def _rng_state() -> dict[str, Any]:
    # The legacy global NumPy RNG is saved because third-party transforms may draw from it.
    np_state = np.random.get_state()  # noqa: NPY002
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "key": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    legacy = ("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    np.random.set_state(legacy)  # noqa: NPY002
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def tensors_sha256(tree: Any) -> str:
    """sha256 over every tensor and plain value of a state (keys sorted): what a bit flip would change."""
    digest = hashlib.sha256()

    def visit(node: Any) -> None:
        if isinstance(node, torch.Tensor):
            t = node.detach().cpu().contiguous()
            digest.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(node, dict):
            for key in sorted(node, key=repr):
                digest.update(f"K{key!r}".encode())
                visit(node[key])
        elif isinstance(node, (list, tuple)):
            digest.update(f"L{len(node)}".encode())
            for item in node:
                visit(item)
        else:
            digest.update(f"V{node!r}".encode())

    visit(tree)
    return digest.hexdigest()


def save_state(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    progress: Progress,
    ema: WeightEma | None = None,
) -> None:
    state = {
        "format": STATE_FORMAT,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "progress": {
            "epoch": progress.epoch,
            "step": progress.step,
            "best_metric": progress.best_metric,
            "best_epoch": progress.best_epoch,
            "history": progress.history,
            **({"schedule_fit": progress.schedule_fit.record()} if progress.schedule_fit else {}),
        },
        "rng": _rng_state(),
    }
    if ema is not None:
        state["ema"] = ema.state_dict()
    state["sha256"] = tensors_sha256(state)
    atomic_write(Path(path), lambda tmp: torch.save(state, tmp))


def read_state(path: str | Path) -> dict[str, Any]:
    """The state save_state wrote, checked: readable, of this format, and equal to its recorded digest (the
    `sha256` key is removed)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no training state {path} to resume from; start without --resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a torn or foreign file: say which and what to do
        raise ValueError(f"cannot read training state {path} ({err}); start the run again without --resume") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} is not an rwkvseg training state (format {STATE_FORMAT})")
    expected = state.pop("sha256", None)  # absent in states written before digests
    if expected is not None and tensors_sha256(state) != expected:
        raise ValueError(
            f"{path} is damaged (its tensors differ from the sha256 recorded when it was written); "
            "resume from a copy or start the run again without --resume"
        )
    return state


def load_state(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    ema: WeightEma | None = None,
) -> Progress:
    """Restore everything save_state wrote; returns the progress to continue from. A run cannot switch its
    average of the weights on or off (its validations and best checkpoint would mix two kinds of weights)."""
    path = Path(path)
    state = read_state(path)
    saved_ema = state.get("ema")
    if (saved_ema is None) != (ema is None):
        raise ValueError(
            f"{path} was trained with optim.ema = {saved_ema['decay'] if saved_ema else 0:g} and the config has "
            f"optim.ema = {ema.decay if ema else 0:g}; an average of the weights cannot be switched on or off "
            "mid-run: resume with the run's own optim.ema or start a new run"
        )
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise ValueError(
            f"{path} holds another architecture than the config builds ({str(err).splitlines()[0]}); "
            "resume with the run's own config (rwkvseg train --resume --out RUN) or start a new run"
        ) from None
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    if ema is not None:
        ema.load_state_dict(saved_ema)
    _set_rng_state(state["rng"])
    p = state["progress"]
    fitted = ScheduleFit(**p["schedule_fit"]) if "schedule_fit" in p else None
    return Progress(p["epoch"], p["step"], p["best_metric"], p["best_epoch"], list(p["history"]), fitted)
