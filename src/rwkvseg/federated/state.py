"""The server's state for --resume (`state.pt`: round, global weights, strategy and its state, history, best) and
the per-round files (metrics.csv, summary.json), all written atomically after every round."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..files import atomic_write, atomic_write_text, write_json

STATE_FILE = "state.pt"
METRICS_FILE = "metrics.csv"
SUMMARY_FILE = "summary.json"
STATE_FORMAT = 1


@dataclass
class FederatedState:
    """Completed rounds, the strategy (name, settings, differential privacy if on), its server-side tensors
    (FedAvgM's momentum, "momentum.<array name>"; none for FedAvg / FedProx or fixed clipping), the per-round rows
    and the best pooled validation score."""

    round: int = 0
    strategy: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    best_metric: float | None = None
    best_round: int | None = None
    server: dict[str, torch.Tensor] = field(default_factory=dict)


def save_federated_state(run_dir: Path, model: nn.Module, state: FederatedState) -> None:
    doc = {
        "format": STATE_FORMAT,
        "round": state.round,
        "global": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "strategy": state.strategy,
        "history": state.history,
        "best_metric": state.best_metric,
        "best_round": state.best_round,
        "server": state.server,
    }
    atomic_write(Path(run_dir) / STATE_FILE, lambda tmp: torch.save(doc, tmp))


def load_federated_state(run_dir: Path, model: nn.Module, strategy: dict[str, Any]) -> FederatedState:
    """The saved state (global weights loaded into model); the strategy must be the one the run was started with."""
    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no federated state {path} to resume from; start without --resume")
    try:
        doc = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a torn or foreign file: say which and what to do
        raise ValueError(f"cannot read federated state {path} ({err}); start the run again without --resume") from None
    if doc.get("format") != STATE_FORMAT or "global" not in doc:
        raise ValueError(f"{path} is not an rwkvseg federated state (format {STATE_FORMAT})")
    saved = doc["strategy"]
    keys = ("name", "proximal_mu", "server_momentum", "server_lr", "privacy")  # absent when not in use
    if any(saved.get(k) != strategy.get(k) for k in keys):
        raise ValueError(
            f"{path} was written by strategy {saved}, the config asks for {strategy}; resume with the same "
            "strategy, or start a new run in another folder"
        )
    model.load_state_dict(doc["global"])
    server = dict(doc.get("server", {}))  # states written before FedAvgM have none
    return FederatedState(doc["round"], saved, list(doc["history"]), doc["best_metric"], doc["best_round"], server)


def write_round_files(run_dir: Path, state: FederatedState) -> None:
    """metrics.csv (one row per round: pooled and per-site scores) and summary.json."""
    keys = list(dict.fromkeys(k for row in state.history for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(state.history)
    atomic_write_text(Path(run_dir) / METRICS_FILE, buf.getvalue())
    summary = {
        "rounds_done": state.round,
        "strategy": state.strategy,
        "best_round": state.best_round,
        "best_metric": state.best_metric,
        "last": state.history[-1] if state.history else None,
    }
    write_json(Path(run_dir) / SUMMARY_FILE, summary)
