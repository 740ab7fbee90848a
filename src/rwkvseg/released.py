"""Released models: trained weights shipped inside the package, loadable by name with no network access.

`weights/index.json` lists them (architecture, data, split, validation metrics); each has a checkpoint
(`<name>.safetensors` + `<name>.json`) and a model card (`<name>.md`) in the same folder. An ensemble release (e.g.
the fold models of a cross-validation) names its member checkpoints in `members` instead: `<member>.safetensors` +
`<member>.json` each, predicted together as one model (`rwkvseg predict --model NAME`, infer.ensemble).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .checkpoint import INT8_SCALE, checkpoint_paths, dequantize, per_channel, read_meta, with_digest
from .files import atomic_write, write_json

INDEX_FILE = "index.json"


@dataclass(frozen=True)
class ReleasedModel:
    name: str
    architecture: str
    dataset: str
    split: str
    metrics: dict[str, float] = field(default_factory=dict)
    notes: str = ""
    members: tuple[str, ...] = ()  # an ensemble's member checkpoints (file stems beside the index); () for one

    def __post_init__(self) -> None:
        object.__setattr__(self, "members", tuple(self.members))  # a JSON list read from the index
        if len(self.members) == 1:
            raise ValueError(f"released model {self.name!r} lists one member; an ensemble needs two or more")

    @property
    def files(self) -> tuple[str, ...]:
        """The checkpoint stems of the release: its members, or its own name."""
        return self.members or (self.name,)


def weights_dir() -> Path:
    return Path(str(resources.files("rwkvseg") / "weights"))


def released_models(folder: Path | None = None) -> list[ReleasedModel]:
    """Every released model of the index, in index order (empty when none is shipped)."""
    index = (folder or weights_dir()) / INDEX_FILE
    if not index.is_file():
        return []
    entries = json.loads(index.read_text(encoding="utf-8"))["models"]
    return [ReleasedModel(**entry) for entry in entries]


def released_model(name: str, folder: Path | None = None) -> ReleasedModel:
    """The index entry of a released model; ValueError naming the choices when unknown."""
    models = {m.name: m for m in released_models(folder)}
    if name not in models:
        choices = ", ".join(models) or "none are installed"
        raise ValueError(f"unknown released model {name!r}; choose one of: {choices} (see `rwkvseg models`)")
    return models[name]


def released_checkpoints(name: str, folder: Path | None = None) -> list[Path]:
    """The checkpoint paths (weights files) of a released model: one, or an ensemble's members in index order;
    ValueError naming the choices when unknown, FileNotFoundError when a listed file is missing."""
    folder = folder or weights_dir()
    paths = []
    for stem in released_model(name, folder).files:
        weights, sidecar = checkpoint_paths(folder / stem)
        if not (weights.is_file() and sidecar.is_file()):
            raise FileNotFoundError(
                f"released model {name!r} is listed but {weights} or {sidecar} is missing; reinstall"
            )
        paths.append(weights)
    return paths


def released_checkpoint(name: str, folder: Path | None = None) -> Path:
    """The checkpoint path of a released model that is one checkpoint; ValueError naming the choices when unknown,
    and naming the members when it is an ensemble (for the callers that take one checkpoint: fine-tuning, the
    results table)."""
    paths = released_checkpoints(name, folder)
    if len(paths) > 1:
        raise ValueError(
            f"released model {name!r} is an ensemble of {len(paths)} checkpoints, and this takes one: give one "
            f"member's file instead (e.g. {paths[0]}), or predict with the ensemble by `rwkvseg predict --model {name}`"
        )
    return paths[0]


def half_precision(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Matrices and kernels (ndim >= 2, nearly all bytes) to fp16; vectors such as decay, bonus, token-shift
    mixes, norm weights and BatchNorm statistics stay fp32, where fp16 rounding would move the model."""
    return {k: v.half() if v.is_floating_point() and v.dim() >= 2 else v for k, v in state.items()}


def int8_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Matrices and kernels (ndim >= 2) to int8, symmetric per output channel (dim 0), each with its fp32 scale
    [O] under `key + INT8_SCALE` (checkpoint.dequantize undoes it); vectors stay fp32 as in half_precision."""
    out = {}
    for key, value in state.items():
        if not (value.is_floating_point() and value.dim() >= 2):
            out[key] = value
            continue
        w = value.float()
        scale = w.abs().amax(dim=tuple(range(1, w.dim()))).clamp_min(1e-12) / 127  # [O]
        out[key] = torch.round(w / per_channel(scale, w.dim())).clamp(-127, 127).to(torch.int8)
        out[key + INT8_SCALE] = scale
    return out


PRECISIONS = {"fp16": half_precision, "int8": int8_weights}


def export_release(
    checkpoint: str | Path, name: str, folder: Path, overwrite: bool = False, precision: str = "int8"
) -> Path:
    """Write checkpoint as released model `name` in folder: int8 weights (per output channel; the shipped form) or
    fp16, and the unchanged sidecar."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not valid; choose one of {', '.join(PRECISIONS)}")
    source_weights, source_sidecar = checkpoint_paths(checkpoint)
    read_meta(checkpoint)  # the sidecar must be valid before anything is written
    weights, sidecar = checkpoint_paths(folder / name)
    if not overwrite and (weights.exists() or sidecar.exists()):
        raise FileExistsError(f"{weights} exists; pass overwrite to replace released model {name!r}")
    state = PRECISIONS[precision](dequantize(load_file(str(source_weights))))
    metadata = {"format": "rwkvseg", "release": name, "precision": precision}
    atomic_write(weights, lambda tmp: save_file(state, str(tmp), metadata=metadata))
    sidecar_json = json.loads(source_sidecar.read_text(encoding="utf-8"))
    write_json(sidecar, with_digest(sidecar_json, weights))  # the digest of the weights file just written
    return weights


def fold_export(folder: Path, fold: int) -> Path:
    """The weights file of the one checkpoint in folder whose name ends in fold<K> (e.g. an int8 export of fold K's
    best, made where a cross-validation campaign trained, when its fp32 checkpoints cannot travel). ValueError when
    none or several match, or its sidecar is missing."""
    found = sorted(p for p in Path(folder).glob("*.safetensors") if p.stem.endswith(f"fold{fold}"))
    if len(found) != 1:
        raise ValueError(
            f"{folder}: {len(found)} files end in fold{fold}.safetensors; give a folder with one checkpoint per fold"
        )
    sidecar = checkpoint_paths(found[0])[1]
    if not sidecar.is_file():
        raise ValueError(f"fold {fold}: {sidecar} not found; keep each export's .json beside its weights")
    return found[0]


def index_entry(model: ReleasedModel) -> dict[str, Any]:
    return {
        "name": model.name,
        "architecture": model.architecture,
        "dataset": model.dataset,
        "split": model.split,
        "metrics": model.metrics,
        "notes": model.notes,
        **({"members": list(model.members)} if model.members else {}),
    }


def update_index(model: ReleasedModel, folder: Path | None = None) -> Path:
    """Put model's entry into the folder's index.json: in place of the entry of the same name, else appended; the
    other entries are kept as they are. Returns the index's path."""
    index = (folder or weights_dir()) / INDEX_FILE
    entries = json.loads(index.read_text(encoding="utf-8"))["models"] if index.is_file() else []
    names = [e["name"] for e in entries]
    if model.name in names:
        entries[names.index(model.name)] = index_entry(model)
    else:
        entries.append(index_entry(model))
    write_json(index, {"models": entries})
    return index


def add_note_option(parser: argparse.ArgumentParser) -> None:
    """The release scripts' --note NAME TEXT (repeatable): a paragraph for NAME's model card after its validation
    table, so what was measured beside a release survives a rewrite of its card."""
    parser.add_argument(
        "--note",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "TEXT"),
        help="a paragraph for NAME's card after its validation table (repeatable): what else was measured for it",
    )


def card_notes(parser: argparse.ArgumentParser, notes: Sequence[Sequence[str]], names: Sequence[str]) -> dict[str, str]:
    """Each release's --note paragraphs in the order given (text stripped, a blank line after each; "" for none);
    a usage error (parser.error) for a NAME not among the releases being written."""
    if unknown := sorted({who for who, _ in notes} - set(names)):
        parser.error(f"--note names {', '.join(unknown)}, not a release of this run; give one of {', '.join(names)}")
    return {name: "".join(f"{text.strip()}\n\n" for who, text in notes if who == name) for name in names}
