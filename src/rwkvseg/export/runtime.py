"""Run an exported rwkvseg ONNX file with onnxruntime and numpy only: no torch, no rwkvseg model code.

Everything comes from the record embedded in the file (metadata key "rwkvseg", see `export.onnx`):
- 2D, resize protocol (the released models): pixels -> float32 by the record's normalization -> bilinear resize
  to the record's size (half-pixel centres, as torch's interpolate with align_corners=False) -> logits -> resized
  back to the image's size -> sigmoid or softmax -> mask (the recorded threshold, else 0.5; or argmax).
  `predict_normalized` starts from images already normalized (the service reads them as `rwkvseg predict` does).
- any dims: `predict_batch(batch)` on network-ready arrays [B, C, *spatial]; each axis is checked against the
  record (static size, or a multiple and a minimum) with an error that says how to pad.
- mirror TTA (`OnnxPredictor(path, mirror_axes=(0, 1))`): the logits averaged over every flip of those spatial
  axes, as `rwkvseg predict --mirror-axes` does with torch.
Optional int8 weights: `quantize_int8` (onnxruntime.quantization, dynamic or static with calibration inputs).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..data.images2d import normalize, read_pixels  # the exact reading and normalisation training used
from ..files import refuse_existing
from ..records import recorded_threshold, regions_in_channel_order

if TYPE_CHECKING:
    from ..infer.postprocess import PostProcess

METADATA_KEY = "rwkvseg"
# 2D images per onnxruntime run when none is asked for: it batches without the per-image cost that eager PyTorch
# pays on the CPU (docs/speed.md), so the default is a GPU's, not the CPU torch path's one
BATCH_SIZE = 8


def _session(path: str | os.PathLike, threads: int | None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of half-pixel linear interpolation (torch, align_corners=False, no antialias)."""
    scale = n_in / n_out
    src = np.maximum((np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = (src - i0).astype(np.float32)
    return i0, i1, frac


def resize_bilinear(x: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """[..., H, W] -> [..., h, w] float32, bilinear with half-pixel centres."""
    h, w = (int(s) for s in size)
    r0, r1, fr = _linear_taps(x.shape[-2], h)
    c0, c1, fc = _linear_taps(x.shape[-1], w)
    x = x.astype(np.float32, copy=False)
    rows = x[..., r0, :] * (1 - fr)[:, None] + x[..., r1, :] * fr[:, None]  # [..., h, W]
    return rows[..., c0] * (1 - fc) + rows[..., c1] * fc


def activate(logits: np.ndarray, activation: str) -> np.ndarray:
    """[B, K, ...] logits -> probabilities: sigmoid, or softmax over axis 1."""
    logits = logits.astype(np.float32, copy=False)
    if activation == "sigmoid":
        from scipy import special  # here, not at import: the ONNX-only paths load no scipy unless they post-process

        return special.expit(logits)  # 1 / (1 + e^-x) without overflowing e^-x (and warning) at large negative logits
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def to_labels(probs: np.ndarray, activation: str, threshold: float = 0.5) -> np.ndarray:
    """[K, ...] probabilities -> integer labels [...]: threshold per channel for one sigmoid channel, else argmax
    (region sigmoids with several channels: label = index of the last region above the threshold, 0 if none)."""
    if probs.shape[0] == 1:
        return (probs[0] >= threshold).astype(np.uint8)
    if activation == "softmax":
        return probs.argmax(axis=0).astype(np.uint8)
    labels = np.zeros(probs.shape[1:], dtype=np.uint8)
    for k in range(probs.shape[0]):
        labels[probs[k] >= threshold] = k + 1
    return labels


class OnnxPredictor:
    """An exported rwkvseg model on onnxruntime, driven by its embedded record.

    `OnnxPredictor("model.onnx", threads=2).predict_image("polyp.jpg")` -> probabilities [K, H, W] at the image's
    own size (2D resize protocol); `predict_batch(x)` -> probabilities for network-ready x [B, C, *spatial].
    mirror_axes: spatial axes whose flips every logits call averages over (test-time augmentation; () none).
    """

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None, mirror_axes: Sequence[int] = ()) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX file {self.path} not found; export one with rwkvseg.export.export_onnx")
        self.session = _session(self.path, threads)
        meta = self.session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in meta:
            raise ValueError(f"{self.path} carries no {METADATA_KEY!r} record; export it with rwkvseg's export_onnx")
        self.record: dict[str, Any] = json.loads(meta[METADATA_KEY])
        if "preprocessing" in self.record:  # an older file's regions in the order of its output channels
            pre = regions_in_channel_order(self.record["preprocessing"] or {}, self.record.get("class_names", ()))
            self.record["preprocessing"] = pre
        self.input_name = self.record["input_name"]
        self.output_name = self.record["output_name"]
        self.mirror_axes = mirror_axes

    @property
    def mirror_axes(self) -> tuple[int, ...]:
        return self._mirror_axes

    @mirror_axes.setter
    def mirror_axes(self, axes: Sequence[int]) -> None:
        checked = tuple(int(a) for a in axes)
        if any(a not in range(self.dims) for a in checked) or len(set(checked)) < len(checked):
            raise ValueError(
                f"--mirror-axes {list(checked)} must name each of the {self.dims} spatial axes of {self.path} at "
                f"most once (0 .. {self.dims - 1})"
            )
        self._mirror_axes = checked

    @property
    def dims(self) -> int:
        return int(self.record["dims"])

    @property
    def activation(self) -> str:
        return self.record["activation"]

    @property
    def preprocessing(self) -> dict[str, Any]:
        return self.record.get("preprocessing") or {}

    @property
    def threshold(self) -> float:
        """A binary mask's default cut: the checkpoint's training.threshold as the export recorded it, else 0.5."""
        return recorded_threshold(self.record.get("threshold"), f"the record of {self.path}")

    def check_input(self, shape: Sequence[int]) -> None:
        """Raise ValueError with the sizes to pad to unless shape [B, C, *spatial] fits the exported file."""
        expected = 2 + self.dims
        if len(shape) != expected or shape[1] != self.record["in_channels"]:
            raise ValueError(
                f"input shape {tuple(shape)} does not fit [B, {self.record['in_channels']}, "
                f"{', '.join('DHW'[3 - self.dims :])}]"
            )
        for axis, (size, rule) in enumerate(zip(shape[2:], self.record["axes"], strict=True)):
            if isinstance(rule, int):
                if size != rule:
                    raise ValueError(f"spatial axis {axis} must be exactly {rule} in this export, got {size}")
            elif size % rule["multiple"] or size < rule["min"]:
                fit = max(-(-size // rule["multiple"]) * rule["multiple"], rule["min"])
                raise ValueError(
                    f"spatial axis {axis} must be a multiple of {rule['multiple']} and at least {rule['min']}, "
                    f"got {size}; pad it to {fit}"
                )

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Network-ready float32 [B, C, *spatial] -> logits [B, K, *spatial] (with mirror_axes: averaged over the
        flips, each flipped back)."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        self.check_input(batch.shape)
        subsets = [s for r in range(len(self.mirror_axes) + 1) for s in combinations(self.mirror_axes, r)]
        total = None
        for subset in subsets:
            axes = tuple(2 + a for a in subset)
            x = np.ascontiguousarray(np.flip(batch, axes)) if axes else batch
            out = self.session.run([self.output_name], {self.input_name: x})[0]
            out = np.flip(out, axes) if axes else out
            total = out.astype(np.float32, copy=False) if total is None else total + out
        return total if len(subsets) == 1 else total / len(subsets)

    def predict_batch(self, batch: np.ndarray) -> np.ndarray:
        """Network-ready [B, C, *spatial] -> probabilities [B, K, *spatial]."""
        return activate(self.logits(batch), self.activation)

    def _resize_protocol(self) -> tuple[tuple[int, int], str]:
        pre = self.preprocessing
        if self.dims != 2 or "size" not in pre:
            raise ValueError(
                f"{self.path} has no 2D image record (size, resize, normalization); use predict_batch on "
                "network-ready arrays"
            )
        if pre.get("resize", "resize") != "resize":
            raise ValueError(
                f"{self.path} was trained with resize={pre.get('resize')!r}; only the 'resize' protocol runs here, "
                "use the torch runtime (sliding windows) for crop-trained models"
            )
        return (int(pre["size"][0]), int(pre["size"][1])), pre.get("normalization", "auto")

    def preprocess(self, pixels: np.ndarray) -> np.ndarray:
        """[H, W, C] pixels -> network input [C, h, w] float32 by the record (normalize, resize)."""
        _, normalization = self._resize_protocol()
        return self._network_input(normalize(pixels, normalization))

    def _network_input(self, image: np.ndarray) -> np.ndarray:
        size, _ = self._resize_protocol()
        return resize_bilinear(image.transpose(2, 0, 1), size)  # [H, W, C] -> [C, h, w]

    def predict_images(
        self, images: Iterable[np.ndarray | str | os.PathLike], batch_size: int = BATCH_SIZE
    ) -> list[np.ndarray]:
        """Probabilities [K, H, W] at each image's own size, for pixel arrays [H, W, C] or image paths."""
        return self.predict_normalized(self.read_images(images), batch_size)

    def read_images(self, images: Iterable[np.ndarray | str | os.PathLike]) -> list[np.ndarray]:
        """Pixel arrays [H, W, C] or image paths (read as rwkvseg.data.images2d reads them: upright by their EXIF
        orientation, the record's channels) -> float32 [H, W, C] by the record's normalization."""
        channels = int(self.preprocessing.get("channels", self.record["in_channels"]))
        _, normalization = self._resize_protocol()
        arrays = [im if isinstance(im, np.ndarray) else read_pixels(im, channels) for im in images]
        return [normalize(a, normalization) for a in arrays]

    def predict_normalized(self, images: Sequence[np.ndarray], batch_size: int = BATCH_SIZE) -> list[np.ndarray]:
        """Probabilities [K, H, W] at each image's own size, for images already normalized by the record's
        normalization: float32 [H, W, C] as rwkvseg.data.images2d.read_image returns them (2D resize protocol)."""
        out = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            logits = self.logits(np.stack([self._network_input(im) for im in chunk]))  # [B, K, h, w]
            for im, lg in zip(chunk, logits, strict=True):
                out.append(activate(resize_bilinear(lg, im.shape[:2])[None], self.activation)[0])  # logits resized
        return out

    def predict_image(self, image: np.ndarray | str | os.PathLike) -> np.ndarray:
        return self.predict_images([image])[0]

    def predict_mask(self, image: np.ndarray | str | os.PathLike, threshold: float | None = None) -> np.ndarray:
        """Labels [H, W] uint8 at the image's size (0/1 for one channel, class index otherwise); threshold None:
        the recorded one."""
        threshold = self.threshold if threshold is None else threshold
        return to_labels(self.predict_image(image), self.activation, threshold)


# What static int8 quantizes by default: the convolutions and matrix products, where the time is. Quantizing every
# operator onnxruntime can (elementwise ops, concatenations, the Bi-WKV's exponentials and sums) cost Kvasir-SEG
# Dice -0.069 (U-RWKV-s) and -0.030 (U-RWKV) on 40 validation images; these two alone +0.010 and -0.004, with
# U-RWKV 40.0 ms against 36.2 (all) and 46.8 (fp32) per 256^2 image on 2 cores (session 20, docs/targets.md).
STATIC_INT8_OPS = ("Conv", "MatMul")


def quantize_int8(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    calibration: Sequence[np.ndarray] | None = None,
    op_types: Sequence[str] | None = STATIC_INT8_OPS,
    overwrite: bool = False,
) -> Path:
    """int8 weights with onnxruntime.quantization: static QDQ (activations calibrated on `calibration`, a few
    network-ready [1, C, *spatial] arrays) when given, else dynamic (weights only). The record is kept.
    op_types: the operators static quantization touches (None: every one onnxruntime can, which also puts the
    exported Bi-WKV's exponentials and prefix sums through 8 bits)."""
    import onnx
    from onnxruntime import quantization as q

    src, dst = Path(src), Path(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists; choose another path or pass overwrite=True")
    record = {p.key: p.value for p in onnx.load(str(src), load_external_data=False).metadata_props}
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        q.quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)  # symbolic inference fails on Bi-WKV
        quantized = Path(tmp) / "int8.onnx"
        if calibration:
            name = onnx.load(str(prepared), load_external_data=False).graph.input[0].name
            reader = _Calibration(name, calibration)
            q.quantize_static(
                str(prepared),
                str(quantized),
                reader,
                quant_format=q.QuantFormat.QDQ,
                per_channel=True,
                weight_type=q.QuantType.QInt8,
                activation_type=q.QuantType.QUInt8,
                **({} if op_types is None else {"op_types_to_quantize": list(op_types)}),
            )
        else:
            q.quantize_dynamic(str(prepared), str(quantized), weight_type=q.QuantType.QInt8)
        model = onnx.load(str(quantized))
        del model.metadata_props[:]
        for key, value in record.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        staged = Path(tmp) / "final.onnx"
        onnx.save_model(model, str(staged))
        os.replace(staged, dst)
    return dst


class _Calibration:
    """onnxruntime CalibrationDataReader over a list of arrays."""

    def __init__(self, name: str, arrays: Sequence[np.ndarray]):
        self._items = iter([{name: np.ascontiguousarray(a, dtype=np.float32)} for a in arrays])

    def get_next(self):
        return next(self._items, None)


def predict_files(
    onnx: OnnxPredictor | str | os.PathLike,
    images: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    threshold: float | None = None,
    threads: int | None = None,
    batch_size: int = BATCH_SIZE,
    overwrite: bool = False,
    postprocess: PostProcess | None = None,
    overlays: bool = False,
    save_probabilities: bool = False,
) -> list[Path]:
    """Masks `<out>/<stem>.png` for 2D image files, with overlays and probabilities when asked for: the files
    `rwkvseg predict` writes with a checkpoint (rwkvseg.infer.outputs2d), from images read as it reads them
    (rwkvseg.data.images2d: EXIF orientation, channels); nothing is written when a target exists and overwrite is
    False. onnx: an open OnnxPredictor, or the exported file's path (opened with threads). threshold None: the
    recorded one (OnnxPredictor.threshold). postprocess: applied to each mask (and so its overlay) before writing,
    the probabilities staying the model's (rwkvseg.infer.postprocess, numpy and scipy). Returns the masks' paths."""
    from ..infer.outputs2d import output_paths, write_outputs

    predictor = onnx if isinstance(onnx, OnnxPredictor) else OnnxPredictor(onnx, threads=threads)
    threshold = predictor.threshold if threshold is None else threshold
    num_classes = int(predictor.record.get("num_classes", 1))
    if postprocess is not None and postprocess.active:
        from ..infer.postprocess import check_postprocess
        from ..infer.postprocess import postprocess as postprocess_labels

        check_postprocess(postprocess, max(num_classes - 1, 1))
    out = Path(out)
    multiclass = num_classes > 1
    targets = output_paths([Path(p) for p in images], out, overlays, save_probabilities, multiclass)
    if not overwrite:
        refuse_existing(out, [t for t in targets if t.exists()])
    written = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        normalized = predictor.read_images(chunk)  # [H, W, C] float32 each, as read_image gives them
        probs = predictor.predict_normalized(normalized, batch_size)  # [K, H, W] each
        for path, image, prob in zip(chunk, normalized, probs, strict=True):
            labels = to_labels(prob, predictor.activation, threshold)
            if postprocess is not None and postprocess.active:
                labels = postprocess_labels(labels, postprocess)
            shown, saved = image if overlays else None, prob if save_probabilities else None
            written.append(write_outputs(out, Path(path).stem, labels, multiclass, image=shown, probabilities=saved))
    return written
