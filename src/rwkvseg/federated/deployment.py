"""A federation on Flower's deployment runtime on this machine: one SuperLink, one SuperNode per site, `flwr run`.

The same run as the simulation (`rwkvseg.federated.run.federate`, the same folder layout and files), with the
sites as real Flower processes talking gRPC on localhost instead of Ray actors: it needs no Ray (whose wheel is
larger than some machines can take), exercises exactly what real sites run (rwkvseg.federated.deploy's apps,
each message handled by a fresh `flwr-clientapp` process), and is how a consortium rehearses a deployment.

In <out>/deployment: site.json (the resolved config every site and the server read: data.root the pooled data,
federated.sites the run's sites.json), record.json (the checkpoint record), app/pyproject.toml (the Flower app),
flwr-home/config.toml (the local SuperLink connection) and logs/ (one log per process). Flower's console scripts
(flower-superlink, flower-supernode, flwr) must be on PATH: `pip install "rwkvseg[federated]"` puts them there.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from ..files import atomic_write_text, write_json
from .config import FederatedConfig, federated_to_dict
from .run import SITES_FILE
from .sites import Site

log = logging.getLogger(__name__)

DEPLOY_DIR = "deployment"
SCRIPTS = ("flower-superlink", "flower-supernode", "flwr")
STARTUP_S = 60.0  # how long the SuperLink may take to open its ports


@dataclass(frozen=True)
class Ports:
    """The SuperLink's three APIs and one ClientAppIo port per SuperNode, all on 127.0.0.1."""

    fleet: int
    control: int
    serverappio: int
    clientappio: tuple[int, ...]


def free_ports(n: int) -> list[int]:
    """n distinct TCP ports that are free on 127.0.0.1 now (the OS picks them)."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def flower_scripts() -> dict[str, str]:
    """Paths of Flower's console scripts, on PATH or beside this Python (a virtual environment that is not
    activated); a clear error when they are in neither."""
    beside = str(Path(sys.executable).parent)
    search = os.pathsep.join([os.environ.get("PATH", ""), beside])
    found = {name: shutil.which(name, path=search) for name in SCRIPTS}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        raise FileNotFoundError(
            f"Flower's {', '.join(missing)} not found on PATH or in {beside}; install the extra "
            "(pip install 'rwkvseg[federated]') and put its scripts folder on PATH"
        )
    return {name: str(path) for name, path in found.items()}


def write_app(deploy_dir: Path, config: FederatedConfig, sites: tuple[Site, ...], record: dict, resume: bool) -> Path:
    """The deployment's site config, checkpoint record and Flower app folder; returns the app folder."""
    run_dir = Path(config.train.out).resolve()
    site_config = federated_to_dict(config)
    site_config["out"] = str(run_dir)  # the server and every site write the simulation's layout in the run folder
    site_config["federated"]["sites"] = str(run_dir / SITES_FILE)
    write_json(deploy_dir / "site.json", site_config)
    write_json(deploy_dir / "record.json", record)
    app = deploy_dir / "app"
    app.mkdir(exist_ok=True)
    names = ",".join(s.name for s in sites)
    atomic_write_text(
        app / "pyproject.toml",
        f"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "rwkvseg-federation"
version = "1.0.0"
description = "rwkvseg federation on this machine ({len(sites)} sites)"
license = "Apache-2.0"
dependencies = ["rwkvseg[federated]"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "rwkvseg"

[tool.flwr.app.components]
serverapp = "rwkvseg.federated.deploy:server"
clientapp = "rwkvseg.federated.deploy:client"

[tool.flwr.app.config]
config = "{(deploy_dir / "site.json").resolve()}"
record = "{(deploy_dir / "record.json").resolve()}"
sites = "{names}"
resume = {"true" if resume else "false"}
""",
    )
    return app


def run_deployment(config: FederatedConfig, sites: tuple[Site, ...], record: dict, resume: bool) -> None:
    """Start the SuperLink and one SuperNode per site on localhost, submit the app with `flwr run`, wait for it
    to end (the server writes the run folder), and stop every process, also on an error or an interrupt."""
    scripts = flower_scripts()
    deploy_dir = Path(config.train.out).resolve() / DEPLOY_DIR
    logs = deploy_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    app = write_app(deploy_dir, config, sites, record, resume)
    fleet, control, serverappio, *clientappio = free_ports(3 + len(sites))
    ports = Ports(fleet, control, serverappio, tuple(clientappio))
    home = deploy_dir / "flwr-home"
    home.mkdir(exist_ok=True)
    connection = f'[superlink.local]\naddress = "127.0.0.1:{ports.control}"\ninsecure = true\n'
    atomic_write_text(home / "config.toml", f'[superlink]\ndefault = "local"\n\n{connection}')
    # the SuperLink and SuperNodes start Flower's other scripts (flower-superexec, flwr-serverapp, flwr-clientapp)
    # by name: their folder goes first on PATH
    scripts_dir = str(Path(scripts["flwr"]).parent)
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": os.pathsep.join([scripts_dir, os.environ.get("PATH", "")])}
    site_json = (deploy_dir / "site.json").resolve()
    with ExitStack() as stack:
        processes: list[subprocess.Popen] = []
        stack.callback(_stop, processes)

        def start(name: str, args: list[str]) -> subprocess.Popen:
            out = stack.enter_context(open(logs / f"{name}.log", "w", encoding="utf-8"))
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
            processes.append(proc)
            return proc

        link = start(
            "superlink",
            [
                scripts["flower-superlink"],
                "--insecure",
                "--disable-runtime-dependency-installation",  # the app's code is this installed package
                "--fleet-api-address", f"127.0.0.1:{ports.fleet}",
                "--control-api-address", f"127.0.0.1:{ports.control}",
                "--serverappio-api-address", f"127.0.0.1:{ports.serverappio}",
            ],
        )  # fmt: skip
        _wait_for_port(ports.control, link, logs / "superlink.log")
        for site, port in zip(sites, ports.clientappio, strict=True):
            start(
                f"supernode-{site.name}",
                [
                    scripts["flower-supernode"],
                    "--insecure",
                    "--superlink", f"127.0.0.1:{ports.fleet}",
                    "--clientappio-api-address", f"127.0.0.1:{port}",
                    "--node-config", f"site='{site.name}' config='{site_json}'",
                ],
            )  # fmt: skip
        log.info(
            "Flower deployment runtime on localhost: SuperLink (fleet %d, control %d) and %d SuperNodes; logs in %s",
            ports.fleet,
            ports.control,
            len(sites),
            logs,
        )
        runner = start("flwr-run", [scripts["flwr"], "run", str(app), "local", "--stream"])
        limit = config.federated.timeout_s * 2 * config.federated.rounds + 600  # every round's two exchanges
        try:
            code = runner.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            raise TimeoutError(
                f"the federation did not end within {limit:.0f} s (federated.timeout_s per exchange); see {logs}"
            ) from None
        if code != 0:
            raise RuntimeError(f"`flwr run` ended with exit code {code}; see {logs / 'flwr-run.log'}")


def _wait_for_port(port: int, proc: subprocess.Popen, log_file: Path) -> None:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the SuperLink exited with code {proc.returncode}; see {log_file}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"the SuperLink did not open port {port} within {STARTUP_S:.0f} s; see {log_file}")


def _stop(processes: list[subprocess.Popen]) -> None:
    """Terminate (then kill) the processes, newest first: the runner, the SuperNodes, then the SuperLink."""
    for proc in reversed(processes):
        if proc.poll() is None:
            proc.terminate()
    for proc in reversed(processes):
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
