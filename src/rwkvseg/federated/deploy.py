"""Entry points for Flower's deployment runtime (SuperLink + one SuperNode per site), the same apps as the
simulation with their plans read from the run and node configs instead of one pooled dataset.

The Flower app's pyproject.toml names them and gives the run config (paths on the server):

    [tool.flwr.app.components]
    serverapp = "rwkvseg.federated.deploy:server"
    clientapp = "rwkvseg.federated.deploy:client"

    [tool.flwr.app.config]
    config = "/srv/federation/federated.toml"   # the server's federated config (out = its run folder)
    record = "/srv/federation/record.json"      # checkpoint record: `rwkvseg federate CONFIG --write-record FILE`
    sites = "2013,CBICA,TCIA01,TCIA02,other"    # every site's name
    resume = false

Each site starts its SuperNode with `--node-config "site='CBICA' config='/site/federated.toml'"`: its own copy of
the federated config, whose data.root is the site's data, out its working folder, and federated.sites either
empty (all cases of data.root are this site's) or a sites file with an entry for this site.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.serverapp import Grid, ServerApp

from ..checkpoint import read_meta
from .app import ServerPlan, SitePlan, clip_at_site, handle_evaluate, handle_train, run_federation
from .config import FederatedConfig, load_federated_config
from .local import write_site_split
from .run import SITES_DIR, dataset_cases
from .sites import Site, read_sites, resolve_sites

# Flower loads apps as module attributes; creating them does no work (the plans are read per message).
server = ServerApp()
client = ClientApp()


def site_names(context: Context) -> tuple[str, ...]:
    names = tuple(sorted(n.strip() for n in str(context.run_config.get("sites", "")).split(",") if n.strip()))
    if not names:
        raise ValueError("the Flower app's run config needs sites = 'NAME,NAME,...' (every site's name)")
    return names


def deployed_server_plan(context: Context) -> ServerPlan:
    """The server's plan: its config, the site names and the checkpoint record (no site data)."""
    for key in ("config", "record"):
        if key not in context.run_config:
            raise ValueError(f"the Flower app's run config needs {key} = PATH (see rwkvseg.federated.deploy)")
    config = load_federated_config(str(context.run_config["config"]))
    Path(config.train.out).mkdir(parents=True, exist_ok=True)
    meta = read_meta(str(context.run_config["record"]))
    resume = bool(context.run_config.get("resume", False))
    return ServerPlan(config, site_names(context), config.train.out, meta, resume)


def site_federated_config(context: Context) -> FederatedConfig:
    """The site's own federated config, named by its node config."""
    for key in ("site", "config"):
        if key not in context.node_config:
            raise ValueError(f"start the SuperNode with --node-config \"site='NAME' config='PATH'\" ({key} is missing)")
    return load_federated_config(str(context.node_config["config"]))


def deployed_site_plan(context: Context) -> SitePlan:
    """A site's plan from its node config: its own config file, data and split."""
    config = site_federated_config(context)
    name, names = str(context.node_config["site"]), site_names(context)
    if name not in names:
        raise ValueError(f"site {name!r} is not among the federation's sites {list(names)}")
    run_dir = Path(config.train.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    cases, data_root = dataset_cases(config, run_dir)
    table = read_sites(config.federated.sites) if config.federated.sites else {name: cases}
    if name not in table:
        raise ValueError(f"sites file {config.federated.sites} has no site {name!r}")
    site = resolve_sites({name: table[name]}, cases, config.train.data.val_fraction, config.train.seed)[0]
    write_site_split(site, run_dir / SITES_DIR / name, config.train.seed)
    sites = tuple(site if n == name else Site(n, (), ()) for n in names)
    return SitePlan(config, sites, str(run_dir / SITES_DIR), data_root)


@server.main()
def _main(grid: Grid, context: Context) -> None:
    run_federation(deployed_server_plan(context), grid)


def _clip(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Client-side DP clipping as the site's own [federated.privacy] asks (and whenever the server sends a norm)."""
    return clip_at_site(site_federated_config(context).federated.privacy, msg, context, call_next)


@client.train(mods=[_clip])
def _train(msg: Message, context: Context) -> Message:
    return handle_train(deployed_site_plan(context), msg, context)


@client.evaluate()
def _evaluate(msg: Message, context: Context) -> Message:
    return handle_evaluate(deployed_site_plan(context), msg, context)
