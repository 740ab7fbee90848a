"""Model checkpoints: `<name>.safetensors` (weights) beside `<name>.json` (what rebuilds and uses them).

The JSON sidecar alone rebuilds the model through the registry, so prediction never needs the training code or
its config file. Both files are written atomically (rwkvseg.files), so a crash mid-write never leaves a
half-written checkpoint under the final name. What the sidecar's `preprocessing` holds: rwkvseg.records.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, load_model, save_model
from torch import nn

from . import __version__
from .files import atomic_write, file_sha256, write_json

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
WEIGHTS_SUFFIX = ".safetensors"
SIDECAR_SUFFIX = ".json"
DIGEST_KEY = "weights_sha256"  # in the sidecar's `training` (a free-form table older readers pass through)


@dataclass(frozen=True)
class CheckpointMeta:
    """What a checkpoint's JSON sidecar holds.

    preprocessing is free-form because 2D and 3D differ; the 2D pipeline writes
    {"size": [H, W], "resize": "resize"|"crop", "normalization": "minmax"|..., "channels": C}.
    spacing is the model's voxel/pixel spacing when it was trained on physical units, else None.
    training summarises how the weights were made (epochs, best metric, split file, config).
    """

    model: str
    in_channels: int
    num_classes: int
    model_overrides: dict[str, Any] = field(default_factory=dict)
    preprocessing: dict[str, Any] = field(default_factory=dict)
    class_names: tuple[str, ...] = ()
    spacing: tuple[float, ...] | None = None
    training: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["class_names"] = list(self.class_names)
        data["spacing"] = None if self.spacing is None else list(self.spacing)
        return {"format": CHECKPOINT_FORMAT, "rwkvseg_version": __version__, **data}

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str = "<dict>") -> CheckpointMeta:
        data = dict(data)
        version = data.pop("format", None)
        data.pop("rwkvseg_version", None)
        if version != CHECKPOINT_FORMAT:
            raise ValueError(
                f"{source}: checkpoint format {version!r} is not supported (this rwkvseg reads format "
                f"{CHECKPOINT_FORMAT}); re-export the checkpoint with a matching rwkvseg version"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(data.keys() - names)
        missing = sorted(f.name for f in dataclasses.fields(cls) if f.name not in data and f.name in _REQUIRED)
        if unknown or missing:
            raise ValueError(
                f"{source}: unknown keys {unknown} / missing keys {missing} in checkpoint sidecar; "
                f"valid keys are {sorted(names)}"
            )
        data["class_names"] = tuple(data.get("class_names", ()))
        if data.get("spacing") is not None:
            data["spacing"] = tuple(float(s) for s in data["spacing"])
        return cls(**data)


_REQUIRED = ("model", "in_channels", "num_classes")


def checkpoint_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """(weights, sidecar) for a checkpoint named with or without its .safetensors / .json suffix."""
    path = Path(path)
    if path.suffix in (WEIGHTS_SUFFIX, SIDECAR_SUFFIX):
        path = path.with_suffix("")
    return path.with_name(path.name + WEIGHTS_SUFFIX), path.with_name(path.name + SIDECAR_SUFFIX)


def save_checkpoint(
    path: str | os.PathLike, model: nn.Module, meta: CheckpointMeta, *, overwrite: bool = False
) -> tuple[Path, Path]:
    """Write model weights and the sidecar; refuse to replace existing files unless overwrite=True."""
    weights, sidecar = checkpoint_paths(path)
    if not overwrite:
        existing = [str(p) for p in (weights, sidecar) if p.exists()]
        if existing:
            raise FileExistsError(
                f"checkpoint files already exist: {', '.join(existing)}; choose another name or pass overwrite"
            )
    # save_model (not save_file) drops tied/shared tensors that safetensors cannot store twice; force_contiguous
    # (explicit, whatever the installed version defaults to) stores a channels-last run's parameters contiguous
    atomic_write(
        weights, lambda tmp: save_model(model, str(tmp), metadata={"format": "rwkvseg"}, force_contiguous=True)
    )
    write_json(sidecar, with_digest(meta.to_json(), weights))
    log.debug("wrote checkpoint %s (+ %s)", weights, sidecar.name)
    return weights, sidecar


def with_digest(sidecar: dict[str, Any], weights: Path) -> dict[str, Any]:
    """The sidecar's JSON with the sha256 of the weights file it describes (checked on load)."""
    return {**sidecar, "training": {**sidecar.get("training", {}), DIGEST_KEY: file_sha256(weights)}}


def check_digest(weights: Path, expected: str | None) -> None:
    """Refuse weights whose bytes differ from the digest in their sidecar (bit rot, a torn copy, a swap)."""
    if expected is None:
        log.debug("%s: no digest in the sidecar (written before rwkvseg recorded them)", weights)
        return
    actual = file_sha256(weights)
    if actual != expected:
        raise ValueError(
            f"{weights} is damaged or was replaced: its sha256 {actual[:16]}... differs from the sidecar's "
            f"{str(expected)[:16]}...; copy the checkpoint again (both files) from where it was made"
        )


def stored_numel(weights: Path) -> int:
    """The number of values the weights file holds, from its header alone (no tensor is read)."""
    try:
        with safe_open(str(weights), framework="pt") as f:
            return sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    except (SafetensorError, OSError) as err:  # a corrupt header
        raise ValueError(f"{weights} is not a readable safetensors file ({err}); copy the checkpoint again") from None


def claimed_numel(meta: CheckpointMeta) -> int:
    """The parameter count of the model the sidecar names, built on the meta device (nothing is allocated)."""
    return _on_meta_device(meta, lambda model: sum(p.numel() for p in model.parameters()))


def state_shapes(meta: CheckpointMeta) -> dict[str, tuple[int, ...]]:
    """The state dict's names and shapes of the model the sidecar names (what its weights file must hold), built on
    the meta device where it can be, else for real with the caller's random state left as it was."""
    try:
        return _on_meta_device(meta, lambda model: {k: tuple(v.shape) for k, v in model.state_dict().items()})
    except (TypeError, ValueError):
        raise
    except Exception as err:  # a model the meta device cannot build
        log.debug("state shapes on the meta device failed (%s); building %s for real", err, meta.model)
    with torch.random.fork_rng(devices=[]):
        return {k: tuple(v.shape) for k, v in build_model(meta).state_dict().items()}


T = TypeVar("T")


def _on_meta_device(meta: CheckpointMeta, measure: Callable[[nn.Module], T]) -> T:
    """measure(the model the sidecar names), built on the meta device (nothing is allocated).

    The build runs in a thread of its own: the meta device is a thread-local torch function mode, so whatever
    happens while it is active cannot touch the caller's mode stack (compiled or opcheck'ed code after it)."""
    from . import models  # noqa: F401  (imported here, not first under the meta device)

    result: list[Any] = []

    def probe() -> None:
        try:
            with torch.device("meta"):
                result.append(measure(build_model(meta)))
        except Exception as err:  # handed back to the caller's thread
            result.append(err)

    thread = threading.Thread(target=probe, name="rwkvseg-size-probe")
    thread.start()
    thread.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def check_size(weights: Path, meta: CheckpointMeta) -> None:
    """Refuse a sidecar that asks for a model larger than its weights file holds (edited or hostile widths,
    channels or overrides) before the model is allocated: the claim is counted on the meta device and compared
    with the tensor shapes in the weights file's header."""
    stored = stored_numel(weights)
    try:
        numel = claimed_numel(meta)
    except (TypeError, ValueError) as err:
        raise ValueError(f"the sidecar of {weights} does not build model {meta.model!r}: {err}") from None
    except Exception as err:  # a model the meta device cannot build: built for real below
        log.debug("%s: size probe on the meta device failed (%s); building the model directly", weights, err)
        return
    if numel > 2 * stored + 2**20:  # slack for tensors a model creates but does not store
        raise ValueError(
            f"the sidecar of {weights} asks for a model of {numel:,} parameters but the file holds {stored:,} "
            f"values (in_channels={meta.in_channels}, num_classes={meta.num_classes}, model_overrides="
            f"{meta.model_overrides}); the sidecar was edited or belongs to other weights: copy both files again"
        )


def read_meta(path: str | os.PathLike) -> CheckpointMeta:
    """The sidecar of a checkpoint, checked (without the weights' digest, which belongs to the file)."""
    return _read_sidecar(path)[0]


def _read_sidecar(path: str | os.PathLike) -> tuple[CheckpointMeta, str | None]:
    """(the sidecar's record, the sha256 it holds of the weights or None)."""
    _, sidecar = checkpoint_paths(path)
    if not sidecar.is_file():
        raise FileNotFoundError(
            f"checkpoint sidecar {sidecar} not found; a checkpoint is a .safetensors file with a .json beside it"
        )
    try:
        data = json.loads(sidecar.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"checkpoint sidecar {sidecar} is not valid JSON ({err}); restore it from the run") from None
    if not isinstance(data, dict):
        raise ValueError(f"checkpoint sidecar {sidecar} must hold a JSON object; restore it from the run")
    training = data.get("training")
    digest = None
    if isinstance(training, dict) and DIGEST_KEY in training:
        training = dict(training)
        digest = str(training.pop(DIGEST_KEY))
        data = {**data, "training": training}
    return CheckpointMeta.from_json(data, source=str(sidecar)), digest


def build_model(meta: CheckpointMeta) -> nn.Module:
    """An untrained model of the architecture the sidecar names."""
    from .models import create_model

    return create_model(meta.model, meta.in_channels, meta.num_classes, **meta.model_overrides)


INT8_SCALE = ":int8_scale"  # key suffix of the per-output-channel scales of int8 tensors (released models)


def per_channel(scale: torch.Tensor, ndim: int) -> torch.Tensor:
    """A per-output-channel scale [O] shaped to broadcast over a tensor of ndim dimensions: [O, 1, ...]."""
    return scale.reshape(-1, *([1] * (ndim - 1)))


def dequantize(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with its int8 tensors back in float32: each int8 tensor `k` [O, ...] times the scale stored
    under `k + INT8_SCALE` [O] (symmetric, per output channel); the scale entries themselves are dropped."""
    out = {}
    for key, value in state.items():
        if key.endswith(INT8_SCALE):
            continue
        scale = state.get(key + INT8_SCALE)
        if scale is not None:
            value = value.float() * per_channel(scale.float(), value.dim())
        out[key] = value
    return out


def _is_quantized(weights: Path) -> bool:
    with safe_open(str(weights), framework="pt") as f:
        return any(name.endswith(INT8_SCALE) for name in f.keys())


def _load_weights(model: nn.Module, weights: Path, device: str) -> tuple[list[str], list[str]]:
    """(missing, unexpected) keys after loading the file into model; int8 files are dequantized first."""
    if not _is_quantized(weights):
        return load_model(model, str(weights), strict=False, device=device)
    missing, unexpected = model.load_state_dict(dequantize(load_file(str(weights), device=device)), strict=False)
    own = model.state_dict()
    loaded = {t.data_ptr() for k, t in own.items() if k not in missing}
    # tied tensors are stored once: a missing key that shares a loaded tensor's storage is not missing
    return [k for k in missing if own[k].data_ptr() not in loaded], list(unexpected)


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, CheckpointMeta]:
    """Rebuild the model from the sidecar and load its weights; returns (model in eval mode, meta)."""
    weights, _ = checkpoint_paths(path)
    meta, digest = _read_sidecar(path)
    if not weights.is_file():
        raise FileNotFoundError(f"checkpoint weights {weights} not found (the sidecar is there); copy both files")
    check_digest(weights, digest)
    check_size(weights, meta)
    model = build_model(meta)
    try:
        missing, unexpected = _load_weights(model, weights, str(device))
    except SafetensorError as err:  # a corrupt header
        raise ValueError(f"{weights} is not a readable safetensors file ({err}); copy the checkpoint again") from None
    except RuntimeError as err:  # shape mismatches: the sidecar was edited or belongs to other weights
        raise ValueError(
            f"{weights} does not fit model {meta.model!r} built from its sidecar "
            f"(in_channels={meta.in_channels}, num_classes={meta.num_classes}): "
            f"{str(err).splitlines()[-1].strip()}; "
            "the sidecar and weights come from different runs"
        ) from None
    if missing or unexpected:
        raise ValueError(
            f"{weights} does not match model {meta.model!r} built from its sidecar: "
            f"missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}; the sidecar and weights come from different runs"
        )
    return model.to(device).eval(), meta
