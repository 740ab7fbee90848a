"""`federate(config)`: a federated run on one machine with Flower's simulation runtime.

The pooled dataset of data.root is split into sites (a sites file, or num_sites seeded random sites); each site
gets a folder <out>/sites/<name> with its split, and one simulated SuperNode runs its ClientApp; the ServerApp
(in this process) drives the rounds and writes <out>/last, <out>/best (standard checkpoints: `rwkvseg predict`
loads them), metrics.csv (pooled and per-site scores per round), summary.json, state.pt (--resume) and
sites.json (the sites with their train/val cases). For real sites, run the same apps on Flower's deployment
runtime (SuperLink / SuperNodes): docs/federated.md.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import CheckpointMeta
from ..devices import resolve_device
from ..files import write_json
from ..train.config import to_dict
from ..train.finetune import init_record
from .app import OnMessage, ServerPlan, SitePlan, client_app, server_app
from .config import FederatedConfig, federated_to_dict
from .local import setup_site, site_config, write_site_split
from .sites import Site, random_sites, read_sites, resolve_sites, sites_to_json
from .state import STATE_FILE, SUMMARY_FILE

log = logging.getLogger(__name__)

SITES_FILE = "sites.json"
CONFIG_FILE = "federated.json"
SITES_DIR = "sites"


def dataset_cases(config: FederatedConfig, run_dir: Path) -> tuple[list[str], str]:
    """(case ids, the data root the sites read): 2D image pairs, or for 3D the cases of the preprocessed cache
    (made once in <out>/cache from a raw folder, as `rwkvseg train` does)."""
    data = config.train.data
    if not data.root:
        raise ValueError("data.root is empty; set it in the config or pass --data (the pooled dataset of the sites)")
    if config.train.dims == 3:
        from ..data.preprocess3d import load_plans
        from ..train.volumes import prepare_cache

        cache = prepare_cache(data, run_dir)
        return list(load_plans(cache)["cases"]), str(cache)
    from ..data.images2d import discover_pairs

    return [s.case for s in discover_pairs(data.root, data.skip_non_images)], str(data.root)


def make_sites(config: FederatedConfig, cases: list[str], run_dir: Path, resume: bool) -> tuple[Site, ...]:
    """The run's sites with their splits; kept in <out>/sites.json, which a resume must find unchanged."""
    fed, train = config.federated, config.train
    if fed.sites:
        table, source = read_sites(fed.sites), f"sites file {fed.sites}"
    else:
        table, source = random_sites(cases, fed.num_sites, train.seed), f"{fed.num_sites} random sites"
    sites = resolve_sites(table, cases, train.data.val_fraction, train.seed, source)
    doc, path = sites_to_json(sites), run_dir / SITES_FILE
    if resume and path.is_file() and json.loads(path.read_text(encoding="utf-8")) != doc:
        raise ValueError(f"the sites differ from those of the run in {run_dir} ({path}); resume with the same sites")
    write_json(path, doc, indent=1)
    return sites


def checkpoint_record(
    config: FederatedConfig, sites: Sequence[Site], sites_dir: Path, data_root: str, resumed: Path | None = None
) -> CheckpointMeta:
    """The record the global checkpoints carry (model, preprocessing, classes, spacing: the same at every site,
    taken from the first site's setup) with the federation in its training field, and model.init checked against
    it and recorded (rwkvseg.train.finetune.init_record; resumed: the run folder of a resumed run)."""
    first = site_config(config.train, sites_dir / sites[0].name, data_root)
    meta = setup_site(first, torch.device("cpu")).meta
    federated = {
        "strategy": config.federated.strategy,
        "proximal_mu": config.mu,
        "rounds": config.federated.rounds,
        "local_epochs": config.federated.local_epochs,
        "privacy": to_dict(config.federated.privacy),
        "sites": {s.name: {"train": len(s.train), "val": len(s.val)} for s in sites},
    }
    training = {"dataset": str(config.train.data.root), "config": federated_to_dict(config), "federated": federated}
    return init_record(replace(meta, training=training), config.train.model.init, resumed)[0]


def deployment_record(config: FederatedConfig) -> CheckpointMeta:
    """The checkpoint record of a deployed federation, made at one site from its config and data (the site's
    cases as one site; written to <out>/record)."""
    run_dir = Path(config.train.out) / "record"
    run_dir.mkdir(parents=True, exist_ok=True)
    cases, data_root = dataset_cases(config, run_dir)
    site = resolve_sites({"record": cases}, cases, config.train.data.val_fraction, config.train.seed)[0]
    write_site_split(site, run_dir / SITES_DIR / site.name, config.train.seed)
    return checkpoint_record(config, [site], run_dir / SITES_DIR, data_root)


RUNTIMES = ("simulation", "deployment")


def federate(
    config: FederatedConfig,
    resume: bool = False,
    on_message: OnMessage | None = None,
    runtime: str = "simulation",
) -> dict[str, Any]:
    """Run (or with resume: continue) the federation the config describes; returns summary.json's content.

    runtime "simulation": Flower's simulation runtime (Ray actors, the apps in this process); "deployment": a
    SuperLink and one SuperNode per site as processes on this machine (rwkvseg.federated.deployment; no Ray).
    on_message(message) sees every Flower message the server sends to or receives from a site (simulation only:
    in a deployment the server is another process).
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime {runtime!r} is not one of {', '.join(RUNTIMES)}")
    if on_message is not None and runtime != "simulation":
        raise ValueError("on_message needs runtime 'simulation' (in a deployment the server is another process)")
    run_dir = Path(config.train.out)
    if not resume and (run_dir / STATE_FILE).exists():
        raise FileExistsError(
            f"{run_dir} already holds a federated run; pass --resume to continue it, or choose another output folder"
        )
    if resume and not (run_dir / STATE_FILE).exists():
        raise FileNotFoundError(f"no federated state {run_dir / STATE_FILE} to resume from; start without --resume")
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    cases, data_root = dataset_cases(config, run_dir)
    sites = make_sites(config, cases, run_dir, resume)
    sites_dir = run_dir / SITES_DIR
    for site in sites:
        write_site_split(site, sites_dir / site.name, config.train.seed)
    write_json(run_dir / CONFIG_FILE, federated_to_dict(config))
    log.info(
        "%d sites (%s), %d rounds x %d local epochs, %s, Flower %s runtime",
        len(sites),
        ", ".join(f"{s.name}: {len(s.train)} train / {len(s.val)} val" for s in sites),
        config.federated.rounds,
        config.federated.local_epochs,
        config.federated.strategy,
        runtime,
    )
    meta = checkpoint_record(config, sites, sites_dir, data_root, run_dir if resume else None)
    resolve_device(config.train.device)  # a clear error for device = cuda without a GPU, before Flower starts
    if runtime == "deployment":
        from .deployment import run_deployment

        sites_config = replace(config, train=replace(config.train, data=replace(config.train.data, root=data_root)))
        run_deployment(sites_config, sites, meta.to_json(), resume)
    else:
        _simulate(
            config,
            sites,
            ServerPlan(config, tuple(s.name for s in sites), str(run_dir), meta, resume),
            SitePlan(config, sites, str(sites_dir), data_root),
            on_message,
        )
    summary_path = run_dir / SUMMARY_FILE
    if not summary_path.is_file():
        raise RuntimeError(f"the federation ended without writing {summary_path}; see the log above for the error")
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    if summary["rounds_done"] < config.federated.rounds:
        raise RuntimeError(
            f"the federation stopped after round {summary['rounds_done']} of {config.federated.rounds}; see the log "
            "above for the error, and continue it with --resume"
        )
    log.info(
        "federation done in %.1f s: %d rounds, best pooled %s",
        time.perf_counter() - start,
        summary["rounds_done"],
        summary["best_metric"],
    )
    return summary


def _simulate(
    config: FederatedConfig, sites: Sequence[Site], server: ServerPlan, client: SitePlan, on_message: OnMessage | None
) -> None:
    from flwr.simulation import run_simulation

    fed = config.federated
    run_simulation(
        server_app=server_app(server, on_message),
        client_app=client_app(client),
        num_supernodes=len(sites),
        backend_config={
            "client_resources": {"num_cpus": fed.client_cpus, "num_gpus": fed.client_gpus},
            "init_args": {"logging_level": "ERROR", "log_to_driver": True},
        },
    )
