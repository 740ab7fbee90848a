"""The service's only door into rwkvseg: finding checkpoints, 2D preprocessing and forward, 3D case prediction.

Everything the service needs from the rest of the package is called here and nowhere else in rwkvseg.serve, so a
change of the inference internals is answered by editing this one module. Calls, all in this file:
rwkvseg.released.released_models / released_checkpoint, rwkvseg.checkpoint.read_meta / load_checkpoint,
rwkvseg.data.images2d.read_image, rwkvseg.records.Preprocessing2D.from_meta, rwkvseg.infer.predict2d.predict_arrays /
to_labels / overlay / OVERLAY_COLOURS, rwkvseg.infer.predict.PredictConfig, rwkvseg.infer.predict3d.Predictor3D /
write_like, rwkvseg.data.specs.DatasetSpec.from_dict, rwkvseg.data.volumes.case_from_files, and for runtime "onnx"
rwkvseg.export.runtime.OnnxPredictor (another package's, loaded only when asked for).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from ..checkpoint import load_checkpoint, read_meta
from ..data.images2d import read_image
from ..data.specs import DatasetSpec
from ..data.volumes import case_from_files
from ..infer.predict import PredictConfig
from ..infer.predict2d import OVERLAY_COLOURS, overlay, predict_arrays, to_labels
from ..infer.predict3d import Predictor3D, write_like
from ..records import Preprocessing2D
from ..released import released_checkpoint, released_models

__all__ = ["OVERLAY_COLOURS"]


@dataclass(frozen=True)
class ModelSource:
    """A model to host: the name clients use and the checkpoint it loads."""

    name: str
    checkpoint: Path
    released: bool


def resolve_models(specs: Sequence[str]) -> list[ModelSource]:
    """Released names, checkpoint paths or `alias=path`; none: every released model. Errors name the choices."""
    if not specs:
        specs = [m.name for m in released_models()]
        if not specs:
            raise ValueError("no released models are installed; name checkpoints to host (models=[path, ...])")
    released = {m.name for m in released_models()}
    sources: list[ModelSource] = []
    for spec in specs:
        alias, _, target = spec.rpartition("=") if "=" in spec else ("", "", spec)
        if target in released:
            sources.append(ModelSource(alias or target, released_checkpoint(target), True))
            continue
        path = Path(target)
        if path.suffix in (".safetensors", ".json"):
            path = path.with_suffix("")
        if not path.with_name(path.name + ".json").is_file():
            raise ValueError(
                f"model {spec!r} is neither a released model ({', '.join(sorted(released)) or 'none installed'}) "
                f"nor a checkpoint (no {path}.json sidecar); give a released name, a checkpoint path or alias=path"
            )
        read_meta(path)  # a broken sidecar fails here, at start, not on the first request
        sources.append(ModelSource(alias or path.name, path.with_name(path.name + ".safetensors"), False))
    names = [s.name for s in sources]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"model names {repeated} are hosted twice; give one of them another name with alias=path")
    return sources


def describe(source: ModelSource) -> dict[str, Any]:
    """What GET /v1/models reports about one model (from the sidecar alone, before the weights are loaded)."""
    meta = read_meta(source.checkpoint)
    pre = meta.preprocessing
    info: dict[str, Any] = {
        "name": source.name,
        "architecture": meta.model,
        "released": source.released,
    }
    if pre.get("dims") == 3:
        spec = DatasetSpec.from_dict(pre["dataset"])
        info |= {
            "dims": 3,
            "input": {
                "modalities": list(spec.modalities),
                "file_names": f"<case>{spec.separator}<modality>.nii.gz, one file per modality",
                "formats": ["zip of the per-modality NIfTI files", "several `file` parts, one NIfTI each"],
                "target_spacing_mm": list(pre["target_spacing"]),
                "size_protocol": "any grid; resampled to the training spacing, answered on the input's grid",
            },
            "classes": {
                "label_values": list(spec.label_values),
                "names": list(meta.class_names) or [str(v) for v in spec.label_values],
                "regions": {name: list(values) for name, values in spec.regions},
            },
            "output": "application/gzip: NIfTI (uint8 label values) with the input's header and affine",
        }
    else:
        p2 = Preprocessing2D.from_meta(meta)
        names = list(meta.class_names) or (["foreground"] if meta.num_classes == 1 else [])
        info |= {
            "dims": 2,
            "input": {
                "channels": p2.channels,
                "size": list(p2.size),
                "resize": p2.resize,
                "normalization": p2.normalization,
                "formats": ["png", "jpeg", "bmp", "tiff", "webp"],
                "size_protocol": (
                    f"any size; resized to {p2.size[0]}x{p2.size[1]} for the network, mask answered at the input's size"
                    if p2.resize == "resize"
                    else f"any size; whole image through {p2.size[0]}x{p2.size[1]} sliding windows"
                ),
            },
            "classes": {"num_classes": meta.num_classes, "names": names},
            "output": "image/png: binary mask 0/255" if meta.num_classes == 1 else "image/png: class index as gray",
        }
    return info


class ProbabilityBackend(Protocol):
    """What a 2D runtime provides: probabilities [K, H, W] at each image's own size for float images [H, W, C].

    The "onnx" runtime is expected as rwkvseg.export.runtime.OnnxPredictor(checkpoint, device=...) with this
    method; wire any other runtime the same way in load_2d.
    """

    def probabilities(self, images: Sequence[np.ndarray]) -> Sequence[np.ndarray | torch.Tensor]: ...


class _TorchBackend:
    def __init__(self, checkpoint: Path, device: str):
        self.model, self.meta = load_checkpoint(checkpoint, device)
        self.pre = Preprocessing2D.from_meta(self.meta)
        self.device = device

    def probabilities(self, images: Sequence[np.ndarray]) -> list[torch.Tensor]:
        with torch.inference_mode():
            return predict_arrays(self.model, images, self.pre, self.device)


def _onnx_predictor_class():
    try:
        from ..export.runtime import OnnxPredictor  # type: ignore[import-not-found]
    except ImportError as err:
        raise ValueError(
            f"runtime 'onnx' needs rwkvseg.export.runtime.OnnxPredictor, which this install lacks ({err}); "
            "use runtime 'torch'"
        ) from None
    return OnnxPredictor


def check_runtime(runtime: str) -> None:
    """Fail at start, not on the first request, when a runtime's package is missing."""
    if runtime == "onnx":
        _onnx_predictor_class()


def _onnx_backend(checkpoint: Path, device: str) -> ProbabilityBackend:
    return _onnx_predictor_class()(checkpoint, device=device)


class Hosted2D:
    """A 2D model ready for requests: decode an upload, run a batch, encode a mask or an overlay."""

    dims = 2

    def __init__(self, source: ModelSource, device: str = "cpu", runtime: str = "torch"):
        self.source = source
        self.meta = read_meta(source.checkpoint)
        self.pre = Preprocessing2D.from_meta(self.meta)
        if runtime == "onnx":
            self.backend: ProbabilityBackend = _onnx_backend(source.checkpoint, device)
        else:
            self.backend = _TorchBackend(source.checkpoint, device)
        self.multiclass = self.meta.num_classes > 1

    def warmup(self) -> None:
        """One forward pass on a blank image: the first call of a model is slow, and no request should pay it."""
        self.probabilities([np.zeros((*self.pre.size, self.pre.channels), np.float32)])

    def read(self, path: Path) -> np.ndarray:
        """float32 [H, W, C] exactly as `rwkvseg predict` reads a file; ValueError for unreadable data."""
        return read_image(path, self.pre.channels, self.pre.normalization)

    def probabilities(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """One forward pass over a micro-batch: [K, H, W] float32 per image, at each image's size."""
        return [np.asarray(p, dtype=np.float32) for p in self.backend.probabilities(images)]

    def labels(self, probs: np.ndarray, threshold: float) -> np.ndarray:
        return to_labels(torch.from_numpy(probs)[None], threshold)[0].numpy().astype(np.uint8)  # [H, W]

    def mask_png(self, labels: np.ndarray) -> bytes:
        return _png(labels if self.multiclass else labels * np.uint8(255))

    def overlay_png(self, image: np.ndarray, labels: np.ndarray) -> bytes:
        return _png(overlay(image, labels))


@dataclass(frozen=True)
class Prediction3D:
    """A predicted case: label values [K, J, I] on the input grid, its affine and spacing, and the NIfTI bytes."""

    values: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]  # (k, j, i) mm
    nifti_gz: bytes


class Hosted3D:
    """A 3D model ready for cases given as one NIfTI file per modality."""

    dims = 3

    def __init__(self, source: ModelSource, device: str = "cpu", overlap: float = 0.5, mirror: bool = False):
        self.source = source
        self.meta = read_meta(source.checkpoint)
        self.spec = DatasetSpec.from_dict(self.meta.preprocessing["dataset"])
        options = PredictConfig(overlap=overlap, mirror_axes=(0, 1, 2) if mirror else (), device=device)
        self.predictor = Predictor3D.from_checkpoint(source.checkpoint, options)
        self.modalities: tuple[str, ...] = tuple(self.spec.modalities)
        self.separator: str = self.spec.separator
        self.label_values: tuple[int, ...] = tuple(self.spec.label_values)
        self.regions: dict[str, tuple[int, ...]] = {name: tuple(v) for name, v in self.spec.regions}

    def predict(self, files: Sequence[Path], out_dir: Path, case_id: str = "case") -> Prediction3D:
        """files: one per modality, in self.modalities order. ValueError / OSError for unreadable volumes."""
        case = case_from_files(files, self.spec, case_id)
        values, reference = self.predictor.predict_case(case)
        out = out_dir / f"{case_id}.nii.gz"
        write_like(values, reference, out)
        return Prediction3D(values, np.asarray(reference.affine), tuple(reference.spacing), out.read_bytes())


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)  # speed over size: masks compress well anyway
    return buf.getvalue()


def dims_of(source: ModelSource) -> int:
    return 3 if read_meta(source.checkpoint).preprocessing.get("dims") == 3 else 2


def load(source: ModelSource, device: str, runtime: str, overlap_3d: float, mirror_3d: bool) -> Hosted2D | Hosted3D:
    if dims_of(source) == 3:
        if runtime != "torch":
            raise ValueError(f"model {source.name!r} is 3D; runtime {runtime!r} serves 2D models only, use 'torch'")
        return Hosted3D(source, device, overlap_3d, mirror_3d)
    hosted = Hosted2D(source, device, runtime)
    hosted.warmup()
    return hosted
