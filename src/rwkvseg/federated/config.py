"""A federated run's configuration: the usual training config plus a [federated] table.

The training part (model, data, optim, loss, seed, out, ...) is a TrainConfig and means what it means for
`rwkvseg train`; data.root is the pooled dataset of the simulation, split into sites by the sites file. The
[federated] table may name a base training config (`train_config`, relative to this file) whose settings this
file's top-level keys override: then that file, trained centrally, is the federated run's counterpart. Every site
trains rounds x local_epochs epochs in all, so `epochs` must equal that product (it is set to it when left out).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..train.config import TrainConfig, apply_overrides, config_from_dict, from_dict, read_config_file, to_dict

STRATEGIES = ("fedavg", "fedprox", "fedavgm")
PRIVACY_MODES = ("off", "server-fixed", "client-fixed")
SITE_OPTIMIZER = ("fresh", "keep")


@dataclass(frozen=True)
class PrivacySettings:
    """Central differential privacy with Flower's fixed-clipping wrappers. Every site's update (its trained weights
    minus the global weights) is clipped to L2 norm clipping_norm, by the server (server-fixed) or by the site before
    it sends it (client-fixed, Flower's fixedclipping_mod); the server adds Gaussian noise of standard deviation
    noise_multiplier x clipping_norm / sites to the mean of the clipped updates. noise_multiplier 0: clipping only."""

    mode: str = "off"
    noise_multiplier: float = 1.0
    clipping_norm: float = 1.0

    def __post_init__(self) -> None:
        if self.mode not in PRIVACY_MODES:
            raise ValueError(
                f"federated.privacy.mode = {self.mode!r} is not valid; choose one of {', '.join(PRIVACY_MODES)}"
            )
        if not self.noise_multiplier >= 0:
            raise ValueError(
                f"federated.privacy.noise_multiplier = {self.noise_multiplier} must be >= 0 (0: clipping only)"
            )
        if not self.clipping_norm > 0:
            raise ValueError(
                f"federated.privacy.clipping_norm = {self.clipping_norm} must be > 0 (the L2 bound of a site's update)"
            )

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def noise_std(self, sites: int) -> float:
        """The standard deviation of the Gaussian noise added to the mean of the sites' clipped updates."""
        return self.noise_multiplier * self.clipping_norm / sites


@dataclass(frozen=True)
class FederatedSettings:
    """rounds of (local_epochs epochs per site, aggregation, validation); strategy fedavg, fedprox (local loss +
    proximal_mu/2 ||w - w_global||^2) or fedavgm (FedAvg with server momentum, Hsu et al. 2019: the server treats
    the global weights minus the sites' mean as a gradient, v <- server_momentum v + that, and steps
    w <- w - server_lr v; its v is server state, saved for --resume). sites: a sites file (empty: num_sites seeded
    random sites of data.root).
    client_cpus / client_gpus: what one simulated site may use (0.5 GPU: two sites share one GPU). privacy: the
    [federated.privacy] table (differential privacy; off by default). site_optimizer: "fresh" starts every round's
    local training with a new optimizer; "keep" has each site keep its optimizer state (SGD momentum) from its
    previous round in its own folder (the state never leaves the site). With momentum 0.99 a fresh optimizer spends
    the first ~100 steps of every round building its momentum back up; on BraTS keeping it changed little
    (docs/federated.md). patches_per_case (3D): each site's epoch is this many patches per training case of the
    site, as a centralized epoch of N patches over C cases gives each case N / C; 0: every site draws
    data.patches.samples_per_epoch (sites of few cases then see each case more often). validate_every: the global
    model is scored on the sites' validation cases after every validate_every-th round and after the last (the
    rounds between send no evaluate message: on the deployment runtime each message is a fresh process per site),
    and the best checkpoint is chosen among the validated rounds."""

    rounds: int = 10
    local_epochs: int = 1
    strategy: str = "fedavg"
    proximal_mu: float = 0.01
    server_momentum: float = 0.9
    server_lr: float = 1.0
    sites: str = ""
    num_sites: int = 2
    train_config: str = ""
    client_cpus: float = 1.0
    client_gpus: float = 0.0
    timeout_s: float = 3600.0
    site_optimizer: str = "fresh"
    patches_per_case: int = 0
    validate_every: int = 1
    privacy: PrivacySettings = field(default_factory=PrivacySettings)

    @property
    def floating_only(self) -> bool:
        """Only the floating-point state_dict entries travel: under DP (clipping and noise must not touch integer
        buffers) and FedAvgM (its server step would turn them into moving floats); each side keeps its own."""
        return self.privacy.enabled or self.strategy == "fedavgm"

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(
                f"federated.strategy = {self.strategy!r} is not valid; choose one of {', '.join(STRATEGIES)}"
            )
        if self.rounds < 1 or self.local_epochs < 1 or self.num_sites < 1:
            raise ValueError("federated.rounds, federated.local_epochs and federated.num_sites must be >= 1")
        if self.strategy == "fedprox" and self.proximal_mu <= 0:
            raise ValueError("federated.proximal_mu must be > 0 for fedprox (0 is fedavg: set strategy = fedavg)")
        if self.strategy == "fedavgm" and not (0 <= self.server_momentum < 1 and self.server_lr > 0):
            raise ValueError(
                f"federated.server_momentum = {self.server_momentum} must be in [0, 1) and federated.server_lr = "
                f"{self.server_lr} > 0 for fedavgm"
            )
        if self.strategy == "fedavgm" and self.server_momentum == 0 and self.server_lr == 1:
            raise ValueError("fedavgm with server_momentum = 0 and server_lr = 1 is fedavg: set strategy = fedavg")
        if self.site_optimizer not in SITE_OPTIMIZER:
            raise ValueError(f"federated.site_optimizer = {self.site_optimizer!r} is not valid; choose fresh or keep")
        if self.client_cpus <= 0 or self.client_gpus < 0:
            raise ValueError("federated.client_cpus must be > 0 and federated.client_gpus >= 0")
        if self.validate_every < 1:
            raise ValueError(
                f"federated.validate_every = {self.validate_every} must be >= 1 (1: validate after every round)"
            )
        if self.patches_per_case < 0:
            raise ValueError(f"federated.patches_per_case = {self.patches_per_case} must be >= 0 (0: off)")


@dataclass(frozen=True)
class FederatedConfig:
    train: TrainConfig = field(default_factory=TrainConfig)
    federated: FederatedSettings = field(default_factory=FederatedSettings)

    @property
    def mu(self) -> float:
        """The proximal weight the sites use (0 under fedavg)."""
        return self.federated.proximal_mu if self.federated.strategy == "fedprox" else 0.0


def federated_config_from_dict(data: dict[str, Any], base_dir: Path | str = ".") -> FederatedConfig:
    """A FederatedConfig from a training-config dict with a `federated` table (train_config relative to base_dir)."""
    data = dict(data)
    table = data.pop("federated", None)
    if not isinstance(table, dict):
        raise ValueError("a federated config needs a [federated] table (rounds, local_epochs, strategy, sites, ...)")
    settings = from_dict(FederatedSettings, table, prefix="federated.")
    if settings.train_config:
        base_path = Path(base_dir) / settings.train_config
        base = read_config_file(base_path)
        if "federated" in base:
            raise ValueError(f"federated.train_config {base_path} is itself a federated config; name a training config")
        data = _merge(base, data)
    total = settings.rounds * settings.local_epochs
    if "epochs" in data and data["epochs"] != total:
        raise ValueError(
            f"epochs = {data['epochs']} but federated rounds x local_epochs = {settings.rounds} x "
            f"{settings.local_epochs} = {total}; every site trains that many epochs: make them agree"
        )
    data["epochs"] = total
    train = config_from_dict(data)
    if settings.patches_per_case and train.dims != 3:
        raise ValueError(
            "federated.patches_per_case sizes 3D patch epochs; a 2D site's epoch is its own images: set it to 0"
        )
    return FederatedConfig(train, settings)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merge(out[key], value) if both else value
    return out


def load_federated_config(path: str | Path, overrides: Sequence[str] = ()) -> FederatedConfig:
    """A FederatedConfig from a TOML/YAML/JSON file plus --set overrides (federated.rounds=3, optim.lr=0.001)."""
    data = apply_overrides(read_config_file(path), overrides)
    return federated_config_from_dict(data, Path(path).parent)


def federated_to_dict(config: FederatedConfig) -> dict[str, Any]:
    """The resolved config as one dict (the training settings with the federated table), as a run folder keeps it."""
    federated = to_dict(config.federated)
    federated["train_config"] = ""  # resolved: the training settings are all here
    return {**to_dict(config.train), "federated": federated}
