"""The Flower apps of a federated run (Message API): a ServerApp that drives the rounds and a ClientApp per site.

Server -> site: the global weights (ArrayRecord of the model's state_dict) and a ConfigRecord (round, local
epochs, proximal mu). Site -> server: its locally trained weights (train) or nothing but weights' scores
(evaluate), with a MetricRecord (losses, Dice, counts, the site's index). No image, mask or case id leaves a
site. The server aggregates with Flower's FedAvg, FedProx or FedAvgM (weighted by training cases), pools the sites'
validation scores (weighted by validation cases: the mean over all validation cases), writes the global
checkpoint (`last`, and `best` by the pooled select_metric) and the state for --resume after every round.

With [federated.privacy] on, the strategy is wrapped in Flower's central-DP wrapper (server- or client-side fixed
clipping, Gaussian noise on the mean), the sites' updates count equally in the mean (the noise is calibrated to
the unweighted mean: a mean weighted by cases would let a large site move it by more than clipping_norm / sites),
and only the floating-point entries of the state_dict are exchanged: clipping and noise must not touch integer
buffers (BatchNorm's step counter, Swin's relative position index), which stay as the receiver has them. FedAvgM
exchanges only those too: its server step (weights minus momentum times a learning rate) would make integer
buffers floating-point and move them.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    FedAvgM,
    FedProx,
    Strategy,
)
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from ..checkpoint import CheckpointMeta, build_model, save_checkpoint
from ..data.splits import read_split
from ..devices import resolve_device
from ..train.config import TrainConfig
from ..train.finetune import initial_model
from .config import FederatedConfig, FederatedSettings, PrivacySettings
from .local import setup_site, site_config, train_site, validate_site
from .sites import Site
from .state import FederatedState, load_federated_state, save_federated_state, write_round_files

log = logging.getLogger(__name__)

WEIGHT_KEY = "num-examples"
SITE_KEY = "site"
INIT_STATE = "model-init"  # in a site's context.state: model.init's weights, as its first message loaded them
EQUAL_KEY = "equal-weight"  # under DP the server gives every site's replies weight 1 (not sent by the sites)
# how often the server asks the grid for the sites' replies; Flower's own send_and_receive waits 3 s between pulls
# on the deployment runtime (0.1 s in simulation), up to 3 s lost per exchange, two exchanges per round
POLL_S = 0.2
OnMessage = Callable[[Message], None]


@dataclass(frozen=True)
class SitePlan:
    """What every site app knows: the config, the sites (names and their own splits), where site folders go
    and the data root the sites read (the shared preprocessed cache in a simulation)."""

    config: FederatedConfig
    sites: tuple[Site, ...]
    sites_dir: str
    data_root: str


@dataclass(frozen=True)
class ServerPlan:
    """What the server knows: the config, the site names, the run folder and the checkpoint record (no data)."""

    config: FederatedConfig
    site_names: tuple[str, ...]
    run_dir: str
    meta: CheckpointMeta
    resume: bool = False


def _site_of(plan: SitePlan, context: Context) -> tuple[int, Site]:
    """This node's site: node_config `site` (a name: deployment) or `partition-id` (an index: simulation)."""
    names = [s.name for s in plan.sites]
    if "site" in context.node_config:
        name = str(context.node_config["site"])
        if name not in names:
            raise ValueError(f"node_config site = {name!r} is not among the sites {names}")
        index = names.index(name)
    else:
        index = int(context.node_config["partition-id"])
    return index, plan.sites[index]


def _site_setup(plan: SitePlan, context: Context, arrays: ArrayRecord):
    """This site's index, training config, data, model (with the received weights), device, and the seconds
    that took (setup_seconds in the reply: the rest of a round beyond setup, training and validation is process
    start-up and messaging)."""
    start = time.perf_counter()
    index, site = _site_of(plan, context)
    train = plan.config.train
    device = resolve_device(train.device)
    torch.set_num_threads(max(1, int(plan.config.federated.client_cpus)))
    site_dir, per_case = Path(plan.sites_dir) / site.name, plan.config.federated.patches_per_case
    config = site_config(train, site_dir, plan.data_root, per_case, len(site.train))
    data = setup_site(config, device)
    # the received weights replace model.init's, except integer buffers not exchanged (the module docstring)
    model = _site_model(data.meta, train.model.init, context)
    _load_arrays(model, arrays)
    return index, config, data, model, device, round(time.perf_counter() - start, 3)


def _site_model(meta: CheckpointMeta, init: str, context: Context) -> torch.nn.Module:
    """The site's model with model.init's weights: read, hashed and checked in the site's first message, then
    taken from the node's context state (which Flower keeps between a run's messages and which never leaves the
    site), so later rounds do not read the source again."""
    if not init:
        return initial_model(meta, init)[0]
    if INIT_STATE not in context.state:
        model, _ = initial_model(meta, init)
        context.state[INIT_STATE] = ArrayRecord(model.state_dict())
        return model
    model = build_model(meta)  # draws the random numbers initial_model draws: later draws stay as in round 1
    model.load_state_dict(context.state[INIT_STATE].to_torch_state_dict(), strict=True)
    return model


def exchanged_state(model: torch.nn.Module, settings: FederatedSettings) -> dict[str, torch.Tensor]:
    """The state_dict entries that travel: all, or the floating-point ones under DP or FedAvgM (see the module
    docstring)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {k: v for k, v in state.items() if v.is_floating_point()} if settings.floating_only else state


def _load_arrays(model: torch.nn.Module, arrays: ArrayRecord) -> None:
    """The received entries into model; only integer buffers may be missing (not exchanged under DP)."""
    state = arrays.to_torch_state_dict()
    current = model.state_dict()
    missing = [k for k in current if k not in state and current[k].is_floating_point()]
    if missing or set(state) - set(current):
        raise ValueError(
            f"the global weights do not fit this site's model (missing {missing[:3]}, unexpected "
            f"{sorted(set(state) - set(current))[:3]}); every site and the server need the same model config"
        )
    model.load_state_dict({**current, **state}, strict=True)


def handle_train(plan: SitePlan, msg: Message, context: Context) -> Message:
    """A site's answer to a train message: local epochs from the global weights; its weights and metrics."""
    received = msg.content["arrays"]
    index, config, data, model, device, setup = _site_setup(plan, context, received)
    cfg = msg.content["config"]
    metrics = train_site(
        config,
        data,
        model,
        round_=int(cfg["round"]),
        local_epochs=int(cfg["local-epochs"]),
        mu=float(cfg.get("proximal-mu", 0.0)),
        site_index=index,
        device=device,
        keep_optimizer=plan.config.federated.site_optimizer == "keep",
    )
    trained = model.state_dict()
    state = {k: trained[k].detach().cpu() for k in received}  # what was sent, in its order (fixedclipping_mod)
    # the weight in FedAvg: the site's training cases (a 3D training set's length is its patches per epoch, the
    # same number at every site)
    record = MetricRecord({**metrics, "setup_seconds": setup, WEIGHT_KEY: _n_train(config), SITE_KEY: index})
    return Message(RecordDict({"arrays": ArrayRecord(state), "metrics": record}), reply_to=msg)


def handle_evaluate(plan: SitePlan, msg: Message, context: Context) -> Message:
    """A site's answer to an evaluate message: the global weights' scores on its validation cases."""
    index, config, data, model, device, setup = _site_setup(plan, context, msg.content["arrays"])
    scores = validate_site(config, data, model, device)
    record = MetricRecord({**scores, "setup_seconds": setup, WEIGHT_KEY: _n_val(config), SITE_KEY: index})
    return Message(RecordDict({"metrics": record}), reply_to=msg)


def clip_at_site(privacy: PrivacySettings, msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """A site's clipping (a client mod on train messages): Flower's fixedclipping_mod clips the update to the norm
    the server sends, whenever the server sends one; a site configured for client-fixed refuses a train message
    without the norm or with another norm than its own config's (Flower's mod answers it with an error)."""
    norm = msg.content["config"].get(KEY_CLIPPING_NORM) if "config" in msg.content else None
    if privacy.mode == "client-fixed" and norm is not None and float(norm) != privacy.clipping_norm:
        raise ValueError(
            f"the server asks for clipping norm {norm}, this site's federated.privacy.clipping_norm is "
            f"{privacy.clipping_norm}; the server and every site need the same [federated.privacy]"
        )
    if privacy.mode == "client-fixed" or norm is not None:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


def client_app(plan: SitePlan) -> ClientApp:
    """The ClientApp of every site: `train` (local epochs from the global weights; clipped at the site under
    client-fixed DP) and `evaluate` (the global weights on the site's validation cases)."""
    app = ClientApp()
    privacy = plan.config.federated.privacy

    def clip(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        return clip_at_site(privacy, msg, context, call_next)

    @app.train(mods=[clip])
    def train(msg: Message, context: Context) -> Message:
        return handle_train(plan, msg, context)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return handle_evaluate(plan, msg, context)

    return app


def _n_train(config: TrainConfig) -> int:
    """The number of the site's training cases (the weight of its update in FedAvg / FedProx)."""
    return len(read_split(config.data.split).train)


def _n_val(config: TrainConfig) -> int:
    """The number of the site's validation cases (the weight of its scores in the pooled mean)."""
    return len(read_split(config.data.split).val)


def _pooled(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Means of the sites' metrics weighted by their cases (WEIGHT_KEY, whatever weights the strategy gives the
    arrays: weight_key is EQUAL_KEY under DP); the site index is not a metric."""
    pooled = aggregate_metricrecords(records, WEIGHT_KEY)
    pooled.pop(SITE_KEY, None)
    pooled.pop(EQUAL_KEY, None)
    pooled[WEIGHT_KEY] = sum(int(next(iter(r.metric_records.values()))[WEIGHT_KEY]) for r in records)
    return pooled


def build_strategy(config: FederatedConfig, n_sites: int) -> Strategy:
    """Flower's FedAvg, FedProx or FedAvgM, every site in every round; under DP wrapped in Flower's fixed-clipping
    wrapper (server- or client-side) and weighting every site equally."""
    privacy = config.federated.privacy
    common = {
        "min_train_nodes": n_sites,
        "min_evaluate_nodes": n_sites,
        "min_available_nodes": n_sites,
        "weighted_by_key": EQUAL_KEY if privacy.enabled else WEIGHT_KEY,
        "train_metrics_aggr_fn": _pooled,
        "evaluate_metrics_aggr_fn": _pooled,
    }
    fed = config.federated
    if fed.strategy == "fedprox":
        strategy: Strategy = FedProx(**common, proximal_mu=fed.proximal_mu)
    elif fed.strategy == "fedavgm":
        strategy = FedAvgM(**common, server_learning_rate=fed.server_lr, server_momentum=fed.server_momentum)
    else:
        strategy = FedAvg(**common)
    wrappers = {
        "server-fixed": DifferentialPrivacyServerSideFixedClipping,
        "client-fixed": DifferentialPrivacyClientSideFixedClipping,
    }
    if privacy.enabled:
        return wrappers[privacy.mode](strategy, privacy.noise_multiplier, privacy.clipping_norm, n_sites)
    return strategy


def strategy_record(config: FederatedConfig, n_sites: int) -> dict[str, Any]:
    """The strategy as the run's state, summary and checkpoints record it (and a resume must find unchanged)."""
    record: dict[str, Any] = {"name": config.federated.strategy, "proximal_mu": config.mu}
    if config.federated.strategy == "fedavgm":
        record.update(server_momentum=config.federated.server_momentum, server_lr=config.federated.server_lr)
    privacy = config.federated.privacy
    if privacy.enabled:
        record["privacy"] = {
            "mode": privacy.mode,
            "noise_multiplier": privacy.noise_multiplier,
            "clipping_norm": privacy.clipping_norm,
            "noise_std": privacy.noise_std(n_sites),
        }
    return record


def describe_privacy(config: FederatedConfig, n_sites: int) -> str:
    """One log line on the run's differential privacy."""
    privacy = config.federated.privacy
    if not privacy.enabled:
        return "differential privacy off"
    where = "by the server" if privacy.mode == "server-fixed" else "by each site before sending"
    return (
        f"differential privacy {privacy.mode}: site updates clipped to L2 norm {privacy.clipping_norm:g} {where}, "
        f"Gaussian noise std {privacy.noise_multiplier:g} x {privacy.clipping_norm:g} / {n_sites} = "
        f"{privacy.noise_std(n_sites):g} on the mean per round, sites weighted "
        "equally, integer buffers not exchanged"
    )


def _exchange(grid: Grid, messages: Iterable[Message], timeout: float, on_message: OnMessage | None) -> list[Message]:
    messages = list(messages)
    for m in messages:
        if on_message is not None:
            on_message(m)
    replies = _send_and_receive(grid, messages, timeout)
    for r in replies:
        if on_message is not None:
            on_message(r)
    failed = [r for r in replies if r.has_error()]
    if failed or len(replies) != len(messages):
        reasons = "; ".join(str(r.error.reason).strip().splitlines()[-1] for r in failed) or "no reply before timeout"
        raise RuntimeError(f"{len(messages) - len(replies) + len(failed)} site(s) failed: {reasons}")
    return sorted(replies, key=lambda r: int(r.content["metrics"][SITE_KEY]))  # a fixed order: a fixed sum


def _send_and_receive(grid: Grid, messages: list[Message], timeout: float) -> list[Message]:
    """Grid.send_and_receive with a pull every POLL_S seconds: push the messages, pull replies until every message
    has one or timeout seconds have passed (the replies that came)."""
    waiting = set(grid.push_messages(messages))
    end, replies = time.monotonic() + timeout, []
    while True:
        pulled = list(grid.pull_messages(waiting))
        replies += pulled
        waiting -= {r.metadata.reply_to_message_id for r in pulled}
        if not waiting or time.monotonic() >= end:
            return replies
        time.sleep(POLL_S)


def _column(prefix: str, key: str) -> str:
    """metrics.csv column of a pooled metric: train_loss, val_dice, train_cases, val_cases, val_seconds."""
    if key == WEIGHT_KEY:
        return f"{prefix}_cases"
    return key if key.startswith(prefix + "_") else f"{prefix}_{key}"


def _metrics(record: MetricRecord) -> dict[str, float]:
    return {k: float(v) for k, v in record.items() if isinstance(v, (int, float))}


def server_app(plan: ServerPlan, on_message: OnMessage | None = None) -> ServerApp:
    """The ServerApp: rounds of train -> aggregate -> evaluate on every site (every federated.validate_every-th
    round and the last) -> global checkpoint and state.
    on_message(message) is called with every message the server sends and receives (an audit hook)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(plan, grid, on_message)

    return app


def run_federation(plan: ServerPlan, grid: Grid, on_message: OnMessage | None = None) -> FederatedState:
    config, fed = plan.config, plan.config.federated
    run_dir = Path(plan.run_dir)
    torch.manual_seed(config.train.seed)
    model, meta = initial_model(plan.meta, config.train.model.init, run_dir if plan.resume else None)
    plan = replace(plan, meta=meta)  # with training.init
    strategy = build_strategy(config, len(plan.site_names))
    strategy_state = strategy_record(config, len(plan.site_names))
    log.info("%s", describe_privacy(config, len(plan.site_names)))
    if fed.privacy.enabled:
        # Flower draws the noise from numpy's global generator: seeded from the OS here, so that knowing the
        # config's seed does not let anyone regenerate (and subtract) it. A DP run does not repeat exactly.
        np.random.seed()  # noqa: NPY002 (the legacy global generator is the one Flower draws from)
    if plan.resume:
        state = load_federated_state(run_dir, model, strategy_state)
        log.info("resuming the federation in %s after round %d", run_dir, state.round)
    else:
        state = FederatedState(strategy=strategy_state)
    arrays = ArrayRecord(exchanged_state(model, fed))
    _restore_server_momentum(strategy, state, list(arrays.keys()))
    for round_ in range(state.round + 1, fed.rounds + 1):
        start = time.perf_counter()
        train_config = ConfigRecord({"round": round_, "local-epochs": fed.local_epochs})
        replies = _exchange(
            grid, strategy.configure_train(round_, arrays, train_config, grid), fed.timeout_s, on_message
        )
        _weigh_equally(replies, fed.privacy)
        new_arrays, train_metrics = strategy.aggregate_train(round_, replies)
        if new_arrays is None:
            raise RuntimeError(f"round {round_}: no site returned weights")
        arrays = new_arrays
        _keep_server_momentum(strategy, state, list(arrays.keys()))
        evals: list[Message] = []
        if round_ % fed.validate_every == 0 or round_ == fed.rounds:
            eval_config = ConfigRecord({"round": round_})
            evals = _exchange(
                grid, strategy.configure_evaluate(round_, arrays, eval_config, grid), fed.timeout_s, on_message
            )
            _weigh_equally(evals, fed.privacy)
        _load_arrays_cast(model, arrays)
        row: dict[str, Any] = {"round": round_, "epochs": round_ * fed.local_epochs}
        row.update({_column("train", k): v for k, v in _metrics(train_metrics).items()})
        if evals:
            pooled = strategy.aggregate_evaluate(round_, evals)
            row.update({_column("val", k): v for k, v in _metrics(pooled).items()})
        for reply in evals:
            site = plan.site_names[int(reply.content["metrics"][SITE_KEY])]
            scores = _metrics(reply.content["metrics"])
            scores.pop(SITE_KEY)
            row.update({f"site_{site}_{'val_cases' if k == WEIGHT_KEY else k}": v for k, v in scores.items()})
        row["round_seconds"] = round(time.perf_counter() - start, 3)
        state.round = round_
        state.history.append(row)
        _save_round(plan, model, state, row)
    return state


def _fedavgm(strategy: Strategy) -> FedAvgM | None:
    """The FedAvgM inside strategy (itself, or wrapped by a DP strategy), else None."""
    inner = getattr(strategy, "strategy", strategy)  # Flower's DP wrappers hold the strategy they wrap
    return inner if isinstance(inner, FedAvgM) else None


def _keep_server_momentum(strategy: Strategy, state: FederatedState, keys: list[str]) -> None:
    """FedAvgM's momentum after a round's aggregation, into the state that state.pt saves (by array name)."""
    fedavgm = _fedavgm(strategy)
    if fedavgm is not None and fedavgm.momentum_vector is not None:
        state.server = {
            f"momentum.{k}": torch.tensor(v)  # copied: the saved state does not alias the strategy's arrays
            for k, v in zip(keys, fedavgm.momentum_vector, strict=True)
        }


def _restore_server_momentum(strategy: Strategy, state: FederatedState, keys: list[str]) -> None:
    """A resumed FedAvgM run continues with the momentum of its last finished round."""
    fedavgm = _fedavgm(strategy)
    if fedavgm is None or not state.server:
        return
    missing = [k for k in keys if f"momentum.{k}" not in state.server]
    if missing:
        raise ValueError(f"the saved FedAvgM momentum lacks {missing[:3]}; start the run again without --resume")
    fedavgm.momentum_vector = [state.server[f"momentum.{k}"].numpy() for k in keys]


def _weigh_equally(replies: list[Message], privacy: PrivacySettings) -> None:
    """Under DP the strategy weighs by EQUAL_KEY (every site once); pooled metrics still weigh by cases."""
    if privacy.enabled:
        for reply in replies:
            reply.content["metrics"][EQUAL_KEY] = 1


def _load_arrays_cast(model: torch.nn.Module, arrays: ArrayRecord) -> None:
    """Aggregated arrays into the server's model (averaging makes integer buffers float: cast back; under DP they
    are not exchanged and keep the server's values)."""
    current = model.state_dict()
    state = {k: v.to(current[k].dtype) for k, v in arrays.to_torch_state_dict().items()}
    model.load_state_dict({**current, **state}, strict=True)


def _save_round(plan: ServerPlan, model: torch.nn.Module, state: FederatedState, row: dict[str, Any]) -> None:
    config = plan.config
    metric = config.train.select_metric
    score = row.get(f"val_{metric}", math.nan)
    run_dir = Path(plan.run_dir)
    training = {**plan.meta.training, "round": state.round, "epoch": row["epochs"]}
    if not math.isnan(score) and (state.best_metric is None or score > state.best_metric):
        state.best_metric, state.best_round = score, state.round
        best = {"round": state.round, "epoch": row["epochs"], **{k: v for k, v in row.items() if k.startswith("val_")}}
        save_checkpoint(
            run_dir / "best", model, replace(plan.meta, training={**training, "best": best}), overwrite=True
        )
    save_checkpoint(run_dir / "last", model, replace(plan.meta, training=training), overwrite=True)
    save_federated_state(run_dir, model, state)
    write_round_files(run_dir, state)
    sites = "  ".join(
        f"{name} {row[f'site_{name}_{metric}']:.4f}" for name in plan.site_names if f"site_{name}_{metric}" in row
    )
    scores = f"pooled val {metric} {score:.4f}  per site: {sites}" if sites else "not validated (validate_every)"
    log.info(
        "round %d/%d  loss %.4f  %s", state.round, config.federated.rounds, row.get("train_loss", math.nan), scores
    )
