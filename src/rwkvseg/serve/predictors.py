"""The service's only door into rwkvseg: finding checkpoints, 2D preprocessing and forward, 3D case prediction.

Everything the service needs from the rest of the package is called here and nowhere else in rwkvseg.serve, so a
change of the inference internals is answered by editing this one module. Calls, all in this file:
rwkvseg.released.released_models / released_checkpoints, rwkvseg.checkpoint.read_meta,
rwkvseg.infer.ensemble.load_checkpoints / check_members (one checkpoint, or an ensemble release's members),
rwkvseg.data.images2d.read_image, rwkvseg.records.Preprocessing2D.from_meta, rwkvseg.infer.predict2d.predict_arrays /
to_labels, rwkvseg.infer.outputs2d.overlay / OVERLAY_COLOURS / mask_image / png_bytes / probability_file,
rwkvseg.infer.predict.PredictConfig, rwkvseg.infer.predict3d.Predictor3D / write_like / write_probabilities,
rwkvseg.infer.postprocess.PostProcess / chosen_postprocess / check_postprocess / postprocess,
rwkvseg.data.specs.DatasetSpec.from_dict, rwkvseg.data.volumes.case_from_files, and for runtime "onnx" (the export
extra, imported only when asked for) rwkvseg.export.onnx.read_record,
rwkvseg.export.runtime.OnnxPredictor.predict_normalized and rwkvseg.export.volumes.onnx_predictor_3d.

Runtime "onnx" hosts exported files (`rwkvseg export NAME --out FILE.onnx`) and nothing else: the record inside
the file stands in for the checkpoint's sidecar (preprocessing, classes, architecture), so the file alone is the
deployed model. Released names and checkpoints are refused with the export command to run, not exported on the
fly: an export takes tens of seconds per model and the exporter's packages, and the file served should be the
one that was checked (`rwkvseg export --verify`); docs/serve.md says more.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from ..checkpoint import CheckpointMeta, read_meta
from ..data.images2d import read_image
from ..data.specs import DatasetSpec
from ..data.volumes import case_from_files
from ..infer.ensemble import check_members, load_checkpoints
from ..infer.outputs2d import OVERLAY_COLOURS, mask_image, overlay, png_bytes, probability_file
from ..infer.postprocess import PostProcess, check_postprocess, chosen_postprocess
from ..infer.postprocess import postprocess as postprocess_labels
from ..infer.precision import for_precision, in_precision
from ..infer.predict import PredictConfig
from ..infer.predict2d import predict_arrays, to_labels
from ..infer.predict3d import Predictor3D, recorded_region_threshold, write_like, write_probabilities
from ..records import Preprocessing2D, recorded_threshold
from ..released import released_checkpoints, released_models

if TYPE_CHECKING:
    from ..export.onnx import ExportRecord

__all__ = ["OVERLAY_COLOURS"]


@dataclass(frozen=True)
class ModelSource:
    """A model to host: the name clients use, the file it loads (a checkpoint's .safetensors, or an exported .onnx
    for runtime "onnx") and the facts read from it at start (the checkpoint's sidecar or the export's record: both
    hold model, in_channels, num_classes, preprocessing, class_names)."""

    name: str
    path: Path
    released: bool
    meta: CheckpointMeta | ExportRecord = field(repr=False, compare=False)
    members: tuple[Path, ...] = ()  # an ensemble release's checkpoints (path is the first), averaged as one model

    @property
    def checkpoints(self) -> tuple[Path, ...]:
        """The checkpoints the model loads: an ensemble's members, or path alone."""
        return self.members or (self.path,)

    @property
    def exported(self) -> bool:
        return self.path.suffix == ".onnx"

    @property
    def dims(self) -> int:
        return 3 if self.meta.preprocessing.get("dims") == 3 else 2


def resolve_models(specs: Sequence[str], runtime: str = "torch") -> list[ModelSource]:
    """Runtime "torch": released names (an ensemble release hosts its members as one model), checkpoint paths or
    `alias=path`; none: every released model. Runtime "onnx": exported .onnx files or `alias=file`. Errors name the
    choices and the fix."""
    if not specs:
        if runtime == "onnx":
            raise ValueError(
                "runtime 'onnx' serves exported files only; export each model once "
                "(rwkvseg export NAME --out NAME.onnx) and name the files to host"
            )
        specs = [m.name for m in released_models()]
        if not specs:
            raise ValueError("no released models are installed; name checkpoints to host (models=[path, ...])")
    released = {m.name for m in released_models()}
    sources: list[ModelSource] = []
    for spec in specs:
        alias, _, target = spec.rpartition("=") if "=" in spec else ("", "", spec)
        if runtime == "onnx":
            sources.append(_exported_source(spec, alias, target))
            continue
        if target.endswith(".onnx"):
            raise ValueError(f"model {spec!r} is an ONNX export; serve it with runtime 'onnx' (--runtime onnx)")
        if target in released:
            paths = released_checkpoints(target)
            if len(paths) == 1:
                sources.append(ModelSource(alias or target, paths[0], True, read_meta(paths[0])))
            else:  # its members must predict as one model; the first member's record stands for them all
                sources.append(ModelSource(alias or target, paths[0], True, check_members(paths), tuple(paths)))
            continue
        path = Path(target)
        if path.suffix in (".safetensors", ".json"):
            path = path.with_suffix("")
        if not path.with_name(path.name + ".json").is_file():
            raise ValueError(
                f"model {spec!r} is neither a released model ({', '.join(sorted(released)) or 'none installed'}) "
                f"nor a checkpoint (no {path}.json sidecar); give a released name, a checkpoint path or alias=path"
            )
        meta = read_meta(path)  # a broken sidecar fails here, at start, not on the first request
        sources.append(ModelSource(alias or path.name, path.with_name(path.name + ".safetensors"), False, meta))
    names = [s.name for s in sources]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"model names {repeated} are hosted twice; give one of them another name with alias=path")
    return sources


def _exported_source(spec: str, alias: str, target: str) -> ModelSource:
    """An exported file to host with onnxruntime, its record read and checked now (a bad file fails at start)."""
    path = Path(target)
    if path.suffix != ".onnx":
        out = f"{alias or path.stem}.onnx"
        raise ValueError(
            f"runtime 'onnx' serves exported files and {spec!r} is not one; export it once with "
            f"`rwkvseg export {target} --out {out}` and serve {out}"
        )
    if not path.is_file():
        raise ValueError(f"model {spec!r}: no file {path}; export one with `rwkvseg export MODEL --out {path}`")
    record = _onnx_tools().read_record(path)
    pre = record.preprocessing
    if not pre:
        raise ValueError(
            f"{path} was exported from an untrained architecture (no preprocessing record); export a checkpoint "
            "or a released model to serve it"
        )
    if record.dims == 2 and pre.get("resize", "resize") != "resize":
        raise ValueError(
            f"{path} was trained with resize={pre['resize']!r} (sliding windows), which onnxruntime does not run "
            "here; serve its checkpoint with runtime 'torch'"
        )
    return ModelSource(alias or path.stem, path, record.source.get("kind") == "released", record)


def read_postprocess(text: str | None) -> PostProcess | None:
    """ServeConfig.postprocess read as `rwkvseg predict --postprocess` reads it (None: each model's own choice);
    ValueError, one line naming --postprocess and the spellings, for a bad one."""
    return None if text is None else PostProcess.parse(text)


def postprocess_for(source: ModelSource, given: PostProcess | None) -> PostProcess:
    """What the model's label maps get, as `rwkvseg predict` chooses it (given, else the checkpoint's recorded
    default, else none), checked against the model now; ValueError naming the model when it does not fit."""
    meta = source.meta
    try:
        chosen = chosen_postprocess(given, meta.preprocessing.get("inference"))
        if source.dims == 3:
            spec = DatasetSpec.from_dict(meta.preprocessing["dataset"])
            check_postprocess(chosen, spec.num_classes - 1, spec)
        else:
            check_postprocess(chosen, max(meta.num_classes - 1, 1))  # one sigmoid channel: one foreground label
    except ValueError as err:
        raise ValueError(f"model {source.name}: {err}") from None
    return chosen


def threshold_for(source: ModelSource) -> float | None:
    """The probability cut of a model's masks, as `rwkvseg predict` applies it: a 2D binary model's when a request
    names none (its checkpoint's sidecar training.threshold, or the export's record; else 0.5); a 3D region model's
    cut of every region's sigmoid (preprocessing.inference.threshold, chosen on validation at release; else 0.5).
    None for multi-class 2D and 3D label models (argmax). ValueError naming the model for a recorded value
    prediction would refuse."""
    meta = source.meta
    if source.dims == 3:
        try:  # the same reading as Predictor3D's, so a record it would refuse fails when the service starts
            return recorded_region_threshold(meta.preprocessing)
        except ValueError as err:
            raise ValueError(f"model {source.name}: {source.path}: {err}") from None
    if meta.num_classes > 1:
        return None
    value = meta.training.get("threshold") if isinstance(meta, CheckpointMeta) else meta.threshold
    return recorded_threshold(value, f"model {source.name}: {source.path}", "mend its record, or host another model")


def describe(source: ModelSource) -> dict[str, Any]:
    """What GET /v1/models reports about one model (from the sidecar or the export's record, before the weights
    are loaded)."""
    meta = source.meta
    pre = meta.preprocessing
    info: dict[str, Any] = {
        "name": source.name,
        "architecture": meta.model,
        "released": source.released,
        "runtime": "onnx" if source.exported else "torch",
        "checkpoints": len(source.checkpoints),  # more than one: an ensemble release, its members averaged
    }
    if source.dims == 3:
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
            "probabilities": "application/gzip: 4-D NIfTI, 8-bit, one channel per "
            + ("region: " if pre["target"] == "regions" else "label value: ")
            + ", ".join(spec.output_names(pre["target"]))
            + " (?probabilities=true)",
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
            "probabilities": (
                "image/png: 8-bit probability" if meta.num_classes == 1 else "application/x-npy: [K, H, W] float16"
            )
            + " (?probabilities=true)",
        }
    return info


class ProbabilityBackend(Protocol):
    """What a 2D runtime provides: probabilities [K, H, W] at each image's own size for float images [H, W, C],
    already normalized as read_image returns them. Wire another runtime the same way in Hosted2D."""

    def probabilities(self, images: Sequence[np.ndarray]) -> Sequence[np.ndarray | torch.Tensor]: ...


class _TorchBackend:
    def __init__(self, checkpoints: Sequence[Path], device: str, precision: str = "fp32"):
        self.model, self.meta = load_checkpoints(list(checkpoints), device)  # one, or an ensemble's mean
        self.forward = in_precision(for_precision(self.model, precision), precision, device)
        self.pre = Preprocessing2D.from_meta(self.meta)
        self.device = device

    def probabilities(self, images: Sequence[np.ndarray]) -> list[torch.Tensor]:
        with torch.inference_mode():  # one image per pass on the CPU, where batches cost more per image
            return predict_arrays(self.forward, images, self.pre, self.device)


class _OnnxBackend:
    """An exported file on onnxruntime (CPU): the same resize, logits and activation as `rwkvseg predict
    --runtime onnx`, from images the service has normalized already."""

    def __init__(self, path: Path, threads: int | None):
        self.predictor = _onnx_tools().OnnxPredictor(path, threads=threads)

    def probabilities(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        return self.predictor.predict_normalized(images, batch_size=max(len(images), 1))


def _onnx_tools() -> SimpleNamespace:
    """read_record, OnnxPredictor and onnx_predictor_3d of rwkvseg.export: the export extra, loaded on demand."""
    try:
        import onnxruntime  # noqa: F401

        from ..export.onnx import read_record
        from ..export.runtime import OnnxPredictor
        from ..export.volumes import onnx_predictor_3d
    except ImportError as err:
        raise ValueError(
            f"runtime 'onnx' needs the export extra, which this install lacks ({err}); "
            "pip install 'rwkvseg[export]', or use runtime 'torch'"
        ) from None
    return SimpleNamespace(read_record=read_record, OnnxPredictor=OnnxPredictor, onnx_predictor_3d=onnx_predictor_3d)


def check_runtime(runtime: str) -> None:
    """Fail at start, not on the first request, when a runtime's package is missing."""
    if runtime == "onnx":
        _onnx_tools()


class Hosted2D:
    """A 2D model ready for requests: decode an upload, run a batch, encode a mask or an overlay."""

    dims = 2

    def __init__(
        self,
        source: ModelSource,
        device: str = "cpu",
        threads: int | None = None,
        postprocess: PostProcess | None = None,
        precision: str = "fp32",
    ):
        self.source = source
        self.meta = source.meta
        self.pre = Preprocessing2D.from_meta(self.meta)
        self.postprocess = postprocess_for(source, postprocess)
        if source.exported:
            self.backend: ProbabilityBackend = _OnnxBackend(source.path, threads)
        else:
            self.backend = _TorchBackend(source.checkpoints, device, precision)
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
        """[H, W] uint8 labels of probabilities [K, H, W], post-processed as `rwkvseg predict` does the mask."""
        labels = to_labels(torch.from_numpy(probs)[None], threshold)[0].numpy().astype(np.uint8)  # [H, W]
        return postprocess_labels(labels, self.postprocess) if self.postprocess.active else labels

    def mask_png(self, labels: np.ndarray) -> bytes:
        return png_bytes(mask_image(labels, self.multiclass), compress_level=1)  # speed over size: masks compress well

    def overlay_png(self, image: np.ndarray, labels: np.ndarray) -> bytes:
        return png_bytes(overlay(image, labels), compress_level=1)

    @property
    def probabilities_type(self) -> str:
        """The media type of probabilities_file's answer."""
        return "application/x-npy" if self.multiclass else "image/png"

    def probabilities_file(self, probs: np.ndarray) -> bytes:
        """The file `rwkvseg predict --probabilities` writes for probabilities [K, H, W]: the 8-bit PNG of a binary
        model's one channel, or every class's channel as float16 .npy."""
        return probability_file(probs, self.multiclass)[0]


@dataclass(frozen=True)
class Prediction3D:
    """A predicted case: label values [K, J, I] on the input grid, its affine and spacing, the NIfTI bytes and, when
    asked for, those of the probabilities (4-D, 8-bit, one channel per region or class, as `rwkvseg predict
    --probabilities` writes them)."""

    values: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]  # (k, j, i) mm
    nifti_gz: bytes
    probabilities_gz: bytes | None = None


class Hosted3D:
    """A 3D model ready for cases given as one NIfTI file per modality."""

    dims = 3

    def __init__(
        self,
        source: ModelSource,
        device: str = "cpu",
        overlap: float = 0.5,
        mirror: bool = False,
        threads: int | None = None,
        postprocess: PostProcess | None = None,
        precision: str = "fp32",
    ):
        self.source = source
        self.meta = source.meta
        self.spec = DatasetSpec.from_dict(self.meta.preprocessing["dataset"])
        mirror_axes = (0, 1, 2) if mirror else ()
        options = PredictConfig(
            overlap=overlap, mirror_axes=mirror_axes, device=device, postprocess=postprocess, precision=precision
        )
        if source.exported:  # the same sliding window, resampling and label mapping; onnxruntime runs the network
            self.predictor = _onnx_tools().onnx_predictor_3d(source.path, options, threads)
        else:
            self.predictor = Predictor3D.from_checkpoint(list(source.checkpoints), options)
        self.modalities: tuple[str, ...] = tuple(self.spec.modalities)
        self.separator: str = self.spec.separator
        self.label_values: tuple[int, ...] = tuple(self.spec.label_values)
        self.regions: dict[str, tuple[int, ...]] = {name: tuple(v) for name, v in self.spec.regions}

    def predict(
        self, files: Sequence[Path], out_dir: Path, case_id: str = "case", probabilities: bool = False
    ) -> Prediction3D:
        """files: one per modality, in self.modalities order. ValueError / OSError for unreadable volumes."""
        case = case_from_files(files, self.spec, case_id)
        prediction = self.predictor.predict(case, probabilities=probabilities)
        values, reference = prediction.values, prediction.reference
        out = out_dir / f"{case_id}.nii.gz"
        write_like(values, reference, out)
        soft = None
        if prediction.probabilities is not None:
            channels = self.spec.output_names(self.predictor.target)
            soft = write_probabilities(prediction.probabilities, channels, reference, out_dir / f"{case_id}_p.nii.gz")
        return Prediction3D(
            values,
            np.asarray(reference.affine),
            tuple(reference.spacing),
            out.read_bytes(),
            soft.read_bytes() if soft is not None else None,
        )


def load(
    source: ModelSource,
    device: str,
    overlap_3d: float,
    mirror_3d: bool,
    threads: int | None = None,
    postprocess: PostProcess | None = None,
    precision: str = "fp32",
) -> Hosted2D | Hosted3D:
    """The model ready for requests: onnxruntime for an exported file, torch on `device` for a checkpoint.
    postprocess: the service's --postprocess (None: the model's own choice, as `rwkvseg predict`). precision: a
    checkpoint's arithmetic (rwkvseg.infer.precision); an exported file runs as it was exported."""
    if source.dims == 3:
        return Hosted3D(source, device, overlap_3d, mirror_3d, threads, postprocess, precision)
    hosted = Hosted2D(source, device, threads, postprocess, precision)
    hosted.warmup()
    return hosted
