"""Start a run from existing weights (`model.init`): a checkpoint or a released model, checked against the run
before any training, loaded strictly into the model the run builds, and recorded in every checkpoint it writes.

One entry, `initial_model`, for every place a run builds its model: `rwkvseg train` (2D, 3D, under torchrun) and
the federated server's first global model and its sites. Only the weights come from the source; the optimizer,
schedule and epoch count start fresh, and a resumed run takes its weights from its own state.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import (
    DIGEST_KEY,
    CheckpointMeta,
    build_model,
    checkpoint_paths,
    load_checkpoint,
    read_meta,
    state_shapes,
)
from ..files import file_sha256
from ..released import released_checkpoint, released_models

log = logging.getLogger(__name__)

INIT_KEY = "init"  # in the sidecar's `training`: {"source": as given, "weights_sha256": of the file started from}
LAST = "last"  # the run folder's last checkpoint, whose record a resumed run keeps
SHOWN = 3  # differences named in an error


@dataclass(frozen=True)
class InitSource:
    """What model.init names: the text as given, its weights file, sidecar and the file's sha256."""

    given: str
    weights: Path
    meta: CheckpointMeta
    sha256: str

    def record(self) -> dict[str, str]:
        return {"source": self.given, DIGEST_KEY: self.sha256}


def find_init(init: str) -> InitSource:
    """The checkpoint model.init names: a released model (`rwkvseg models`) or a checkpoint path (the weights or
    the sidecar file, or their name without suffix). A released name wins over a file of that name in the current
    folder (write ./NAME for the file)."""
    weights, sidecar = checkpoint_paths(init)
    released = [m.name for m in released_models()]
    if init not in released and not (weights.is_file() or sidecar.is_file()):
        raise FileNotFoundError(
            f"model.init {init!r} is neither a checkpoint file (no {weights}) nor a released model; give a "
            "checkpoint path (NAME.safetensors with NAME.json beside it) or a released name (`rwkvseg models`)"
        )
    try:
        if init in released:
            weights = released_checkpoint(init)
        meta = read_meta(weights)
        if not weights.is_file():
            raise FileNotFoundError(f"checkpoint weights {weights} not found (the sidecar is there); copy both files")
        return InitSource(init, weights, meta, file_sha256(weights))
    except (ValueError, OSError) as err:
        raise _naming(init, err) from None


def _naming(init: str, err: Exception) -> Exception:
    """err's kind of failure (file missing, other OS error, bad content) with model.init named first."""
    kind = (
        FileNotFoundError if isinstance(err, FileNotFoundError) else OSError if isinstance(err, OSError) else ValueError
    )
    return kind(f"model.init {init!r}: {err}")


def _dims(meta: CheckpointMeta) -> int:
    return 3 if meta.preprocessing.get("dims") == 3 else 2


def _plain(value: Any) -> Any:
    """JSON's view of a value (tuples as lists), so a config's overrides compare with a sidecar's."""
    return json.loads(json.dumps(value))


def check_init(source: InitSource, run: CheckpointMeta) -> None:
    """Refuse a source whose model or inputs differ from the run's record (one line: what differs, what to do);
    log what may differ (2D input size, 3D spacing and patch size) and overrides that leave the weights' shapes."""
    src, name = source.meta, f"model.init {source.given!r}"
    if _dims(src) != _dims(run):
        raise ValueError(
            f"{name} is a {_dims(src)}D checkpoint and this run is {_dims(run)}D; start from a {_dims(run)}D "
            "checkpoint, or set dims to match it"
        )
    if src.model != run.model:
        raise ValueError(
            f"{name} is a {src.model!r} model and this run trains {run.model!r}; set model.name = {src.model}, "
            f"or start from a {run.model} checkpoint"
        )
    if _dims(run) == 3:
        _check_volumes(name, src, run)
    else:
        _check_images(name, src, run)
    if src.in_channels != run.in_channels:
        raise ValueError(
            f"{name} takes {src.in_channels} input channel(s) and this run {run.in_channels}; set the data's "
            f"channels as the checkpoint was trained, or start from a checkpoint of {run.in_channels} input channel(s)"
        )
    if src.num_classes != run.num_classes:
        fix = "data.target and the labels" if _dims(run) == 3 else f"data.num_classes = {src.num_classes}"
        raise ValueError(
            f"{name} has {src.num_classes} output channel(s) and this run {run.num_classes}; set {fix} as the "
            f"checkpoint was trained, or start from a checkpoint of {run.num_classes} output channel(s)"
        )
    _check_overrides(name, src, run)


def _check_images(name: str, src: CheckpointMeta, run: CheckpointMeta) -> None:
    a, b = src.preprocessing, run.preprocessing
    channels = int(a.get("channels", src.in_channels)), int(b.get("channels", run.in_channels))
    if channels[0] != channels[1]:
        raise ValueError(
            f"{name} reads images as {channels[0]} channel(s) and this run as {channels[1]}; "
            f"set data.channels = {channels[0]}, or start from a checkpoint of {channels[1]} channel(s)"
        )
    norm = a.get("normalization", "auto"), b.get("normalization", "auto")
    if norm[0] != norm[1]:
        raise ValueError(
            f"{name} was trained on images normalized {norm[0]!r} and this run normalizes {norm[1]!r}; "
            f"set data.normalization = {norm[0]}"
        )
    size = (a.get("size"), a.get("resize", "resize")), (b.get("size"), b.get("resize", "resize"))
    if size[0] != size[1]:
        log.info("%s was trained at network input %s (%s), this run trains at %s (%s)", name, *size[0], *size[1])


def _check_volumes(name: str, src: CheckpointMeta, run: CheckpointMeta) -> None:
    a, b = src.preprocessing, run.preprocessing
    spec_a, spec_b = a.get("dataset", {}), b.get("dataset", {})
    for key, what, setting in (
        ("modalities", "modalities (in this order)", "data.modalities"),
        ("label_values", "label values", "data.label_values"),
    ):
        if _plain(spec_a.get(key)) != _plain(spec_b.get(key)):
            raise ValueError(
                f"{name} has {what} {spec_a.get(key)} and this run's data {spec_b.get(key)}; preprocess the data "
                f"with the checkpoint's ({setting}), or start from a checkpoint of this data"
            )
    if a.get("target") != b.get("target"):
        raise ValueError(
            f"{name} predicts {a.get('target')} and this run {b.get('target')}; set data.target = {a.get('target')}"
        )
    if b.get("target") == "regions" and _plain(spec_a.get("regions")) != _plain(spec_b.get("regions")):
        raise ValueError(
            f"{name} has regions {spec_a.get('regions')} and this run {spec_b.get('regions')}; set data.regions "
            "to the checkpoint's"
        )
    grid = _plain([(src.spacing, a.get("patch_size")), (run.spacing, b.get("patch_size"))])
    if grid[0] != grid[1]:
        log.info("%s was trained at spacing %s mm on patches %s, this run at %s mm on %s", name, *grid[0], *grid[1])


def _check_overrides(name: str, src: CheckpointMeta, run: CheckpointMeta) -> None:
    """Overrides that change the weights' names or shapes are refused; others (speed options such as gemm_convs,
    which keep the weights) are logged."""
    if _plain(src.model_overrides) == _plain(run.model_overrides):
        return
    differences = shape_differences(state_shapes(run), state_shapes(src))
    if differences:
        raise ValueError(
            f"{name} was built with model.overrides {src.model_overrides} and this run with {run.model_overrides}: "
            f"the weights differ ({'; '.join(differences)}); set model.overrides to the checkpoint's"
        )
    log.warning(
        "%s was built with model.overrides %s and this run with %s; the weights fit and are loaded",
        name,
        src.model_overrides,
        run.model_overrides,
    )


def shape_differences(run: dict[str, tuple[int, ...]], source: dict[str, tuple[int, ...]]) -> list[str]:
    """The first few differences between two state dicts' names and shapes, as text."""
    missing = [f"{k} only in this run" for k in run if k not in source]
    extra = [f"{k} only in the checkpoint" for k in source if k not in run]
    shapes = [
        f"{k} {list(source[k])} in the checkpoint, {list(run[k])} here"
        for k in run
        if k in source and run[k] != source[k]
    ]
    found = [*missing, *extra, *shapes]
    return found[:SHOWN] + ([f"{len(found) - SHOWN} more"] if len(found) > SHOWN else [])


def with_init(meta: CheckpointMeta, record: dict[str, str] | None) -> CheckpointMeta:
    """meta with training.init (none without a record)."""
    training = {k: v for k, v in meta.training.items() if k != INIT_KEY}
    return replace(meta, training={**training, INIT_KEY: record} if record else training)


def init_record(
    meta: CheckpointMeta, init: str, resumed: Path | None = None
) -> tuple[CheckpointMeta, InitSource | None]:
    """(meta with training.init, the checked source to load or None). init "" is random initialisation.

    resumed: the folder of a resumed run, whose state replaces the weights: its last checkpoint's record is kept
    and nothing is loaded (the source need not be there any more); without a last checkpoint the source is checked
    as for a new run."""
    recorded = _recorded(resumed) if resumed is not None else None
    if recorded is not None:
        record = recorded[INIT_KEY] if INIT_KEY in recorded else None
        source = record["source"] if record else ""
        if source != init:
            log.warning(
                "model.init is %r but the run in %s started from %r; resuming from its state, whose record is kept",
                init,
                resumed,
                source,
            )
        return with_init(meta, record), None
    if not init:
        return with_init(meta, None), None
    source = find_init(init)
    check_init(source, meta)
    return with_init(meta, source.record()), source


def _recorded(run_dir: Path) -> dict[str, Any] | None:
    """The `training` of the run's last checkpoint, or None where there is none to read."""
    if not (run_dir / f"{LAST}.json").is_file():
        return None
    try:
        return read_meta(run_dir / LAST).training
    except (ValueError, OSError) as err:
        log.warning("cannot read %s (%s); checking model.init as for a new run", run_dir / f"{LAST}.json", err)
        return None


def load_init(model: nn.Module, source: InitSource) -> None:
    """The source's weights into model, strictly; int8 releases are dequantized by load_checkpoint."""
    # loading builds the source's model, which draws random initial weights: the run's own draws stay as without it
    with torch.random.fork_rng(devices=[]):
        try:
            trained, _ = load_checkpoint(source.weights)
        except (ValueError, OSError) as err:
            raise _naming(source.given, err) from None
    state = trained.state_dict()
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    differences = shape_differences(own, {k: tuple(v.shape) for k, v in state.items()})
    if differences:
        raise ValueError(
            f"model.init {source.given!r}: its weights do not fit this run's model ({'; '.join(differences)}); "
            "set model.name and model.overrides to the checkpoint's"
        )
    model.load_state_dict(state, strict=True)


def initial_model(meta: CheckpointMeta, init: str, resumed: Path | None = None) -> tuple[nn.Module, CheckpointMeta]:
    """(the model a run starts from, the record its checkpoints carry): built from meta, with model.init's weights
    loaded after check_init, and training.init recorded; see init_record for resumed."""
    meta, source = init_record(meta, init, resumed)
    model = build_model(meta)
    if source is not None:
        load_init(model, source)
        log.info("starting from the weights of %s (%s)", source.given, source.weights)
    return model, meta
