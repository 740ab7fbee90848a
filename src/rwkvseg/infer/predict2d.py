"""2D prediction from a checkpoint alone: images in, masks at each input's original size out.

Preprocessing comes from the checkpoint's sidecar (channels, size, resize mode, normalization), so prediction
repeats exactly what validation saw during training. Outputs, per input `<stem>` (infer.outputs2d, the same files
as `rwkvseg predict --runtime onnx` writes):
- `<out>/<stem>.png`: the mask (binary: 0/255; multi-class: class index as gray value)
- `<out>/overlays/<stem>.png` (optional): the image with the mask outlined and tinted
- `<out>/probabilities/<stem>.png` (binary, 8-bit probability) or `.npy` ([K, H, W] float16, multi-class)
Nothing is overwritten unless asked: every target is checked before the first file is written.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..compiling import maybe_compile, prediction_freezes
from ..data.images2d import list_inputs, read_image
from ..files import refuse_existing
from ..memory_format import fed_in, module_to
from ..records import Preprocessing2D, recorded_threshold
from .ensemble import Given, load_checkpoints
from .outputs2d import output_paths, write_outputs
from .postprocess import PostProcess, check_postprocess, chosen_postprocess
from .postprocess import postprocess as postprocess_labels
from .precision import check_precision, for_precision, in_precision
from .sliding_window import SlidingWindowConfig, mirrored, predict_logits

log = logging.getLogger(__name__)

Predictor = Callable[[torch.Tensor], torch.Tensor]  # a network, or mirrored(network, axes)
PROGRESS_EVERY_S = 10.0  # at most one progress line per this many seconds (and one at the end)


def forward_logits(model: Predictor, images: torch.Tensor, pre: Preprocessing2D) -> torch.Tensor:
    """Logits [B, K, H, W] for network-ready images [B, C, H, W] (resized, or whole images in crop mode)."""
    if pre.resize == "resize":
        return model(images)
    return predict_logits(model, images, crop_window(pre), images.device)


def check_mirror_axes(axes: Sequence[int]) -> tuple[int, ...]:
    """The 2D mirror-TTA axes (0: height, 1: width), or ValueError naming --mirror-axes."""
    axes = tuple(int(a) for a in axes)
    if any(a not in (0, 1) for a in axes) or len(set(axes)) != len(axes):
        raise ValueError(
            f"--mirror-axes {list(axes)} must name each image axis at most once: 0 (height), 1 (width), or both"
        )
    return axes


def recorded_mirror_axes(
    given: Sequence[int] | None, inference: Mapping[str, Any] | None, source: str = "the checkpoint"
) -> tuple[int, ...]:
    """The 2D mirror-TTA axes: the given ones (--mirror-axes; () for none) as they are; else the ones the checkpoint
    records (`mirror_axes` in its sidecar's preprocessing.inference, chosen on validation at release), on every
    device, since in 2D they cost a few passes of one small network input (flips over both axes: 4 passes; about
    0.8 s per image for U-RWKV and 0.16 s for U-RWKV-s on 2 CPU cores); none where it records none. ValueError
    naming the sidecar for recorded axes that are not 0 and / or 1."""
    if given is not None:
        return check_mirror_axes(given)
    recorded = (inference or {}).get("mirror_axes")
    if recorded is None:
        return ()
    try:
        axes = check_mirror_axes(recorded)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"{source} records inference.mirror_axes {recorded!r}, which is not valid ({err}); fix its sidecar or "
            "pass --mirror-axes explicitly"
        ) from None
    return axes


def log_recorded_flips(given: Sequence[int] | None, axes: Sequence[int]) -> None:
    """The one log line for flips taken from the checkpoint (none when given or when there are none)."""
    if given is None and axes:
        log.info(
            "mirror TTA over axes %s, the checkpoint's default (%d forward passes per image; --mirror-axes '' for one)",
            ",".join(map(str, axes)),
            2 ** len(axes),
        )


def crop_window(pre: Preprocessing2D) -> SlidingWindowConfig:
    """Crop-trained models see whole images through overlapping windows of the training crop size."""
    return SlidingWindowConfig(patch_size=tuple(pre.size), overlap=0.25, sw_batch_size=4, mirror_axes=())


def default_batch_size(device: torch.device | str) -> int:
    """Images per forward pass when none is asked for: 1 on the CPU, 8 on a GPU. Eager PyTorch on the CPU is
    bound by memory traffic once a batch's activations outgrow the caches: U-RWKV at 256^2 on 2 threads took
    about 2.5x longer per image in batches of 8 than one at a time (docs/speed.md)."""
    return 1 if torch.device(device).type == "cpu" else 8


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """[B, K, H, W] logits -> probabilities (sigmoid for one channel, softmax over classes)."""
    logits = logits.float()
    return torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)


def to_labels(probs: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """[B, K, H, W] probabilities -> [B, H, W] int64 labels."""
    if probs.shape[1] == 1:
        return (probs[:, 0] >= threshold).long()
    return probs.argmax(dim=1)


def predict_arrays(
    model: Predictor,
    images: Sequence[np.ndarray],
    pre: Preprocessing2D,
    device: torch.device | str = "cpu",
    per_pass: int | None = None,
) -> list[torch.Tensor]:
    """Probabilities [K, H, W] at each image's own size for float images [H, W, C]. model: the network, or
    `mirrored(network, axes)` for mirror TTA (logits averaged over the flips). per_pass: images per forward pass;
    None: default_batch_size(device) (one on the CPU)."""
    device = torch.device(device)
    per_pass = per_pass or default_batch_size(device)
    sizes = [im.shape[:2] for im in images]
    tensors = [torch.from_numpy(np.ascontiguousarray(im.transpose(2, 0, 1))) for im in images]  # -> [C, H, W]
    if pre.resize != "resize":  # whole images through sliding windows, one at a time
        return [probabilities(forward_logits(model, t[None].to(device), pre))[0].cpu() for t in tensors]
    resized = [F.interpolate(t[None], size=pre.size, mode="bilinear", align_corners=False) for t in tensors]
    out = []
    for start in range(0, len(resized), per_pass):
        logits = forward_logits(model, torch.cat(resized[start : start + per_pass]).to(device), pre)  # [b, K, h, w]
        for i, size in enumerate(sizes[start : start + per_pass]):
            # Logits, not labels, are resized back: smooth borders at the original size.
            back = F.interpolate(logits[i : i + 1].float(), size=size, mode="bilinear", align_corners=False)
            out.append(probabilities(back)[0].cpu())
    return out


def predict_2d(
    checkpoint: Given,
    inputs: str | Path,
    out: str | Path,
    *,
    device: str | torch.device = "cpu",
    batch_size: int | None = None,
    threshold: float | None = None,
    overlays: bool = False,
    save_probabilities: bool = False,
    overwrite: bool = False,
    skip_non_images: bool = False,
    compile: str = "auto",
    compile_backend: str = "inductor",
    mirror_axes: Sequence[int] | None = None,
    memory_format: str = "contiguous",
    postprocess: PostProcess | None = None,
    precision: str = "fp32",
) -> list[Path]:
    """Predict masks for an image file or folder; returns the mask paths written. checkpoint: one, or several
    predicting as one ensemble (infer.ensemble). threshold: the binary cut; None: the checkpoint's recorded one
    (training.threshold, 0.5 where none). compile, memory_format, precision: see PredictConfig. mirror_axes:
    test-time augmentation, the logits averaged over every flip of these axes (0: height, 1: width; (0, 1) costs 4
    forward passes per image); None: the checkpoint's recorded default
    (recorded_mirror_axes). postprocess: applied to each mask (and so its overlay) before writing, the
    probabilities staying the model's; None: the checkpoint's recorded default (infer.postprocess). batch_size:
    images per forward pass; None: default_batch_size(device)."""
    if mirror_axes is not None:
        check_mirror_axes(mirror_axes)  # before loading: a bad option fails fast
    check_precision(precision, device)
    given = {"threshold": threshold, "postprocess": postprocess, "mirror_axes": mirror_axes}
    overridden = [name for name, value in given.items() if value is not None]  # members' records may differ
    model, meta = load_checkpoints(checkpoint, device, overridden)  # several: one ensemble (infer.ensemble)
    if threshold is None:
        threshold = recorded_threshold(meta.training.get("threshold"), f"the sidecar of {checkpoint}")
    inference = meta.preprocessing.get("inference")
    given, mirror_axes = mirror_axes, recorded_mirror_axes(mirror_axes, inference, f"the sidecar of {checkpoint}")
    log_recorded_flips(given, mirror_axes)
    postprocess = chosen_postprocess(postprocess, inference, f"the sidecar of {checkpoint}")
    check_postprocess(postprocess, max(meta.num_classes - 1, 1))  # one sigmoid channel: one foreground label
    if postprocess.active:
        log.info("post-processing each mask: %s", postprocess.spelling())
    module_to(model, memory_format, 2)  # before compiling, which specializes on the parameters' strides
    for_precision(model, precision)  # bf16: the weights held in bf16 before compiling, as the graph will read them
    frozen = prediction_freezes(device)
    model = maybe_compile(model, compile, device, "the model", compile_backend, freeze=frozen)
    predictor = mirrored(in_precision(fed_in(model, memory_format), precision, device), mirror_axes)
    pre = Preprocessing2D.from_meta(meta)
    files = list_inputs(inputs, skip_non_images)
    out = Path(out)
    multiclass = meta.num_classes > 1
    targets = output_paths(files, out, overlays, save_probabilities, multiclass)
    existing = [p for p in targets if p.exists()]
    if not overwrite:
        refuse_existing(out, existing)
    batch_size = batch_size or default_batch_size(device)
    written, logged = [], time.monotonic()
    with torch.inference_mode():
        for start in range(0, len(files), batch_size):
            chunk = files[start : start + batch_size]
            images = [read_image(f, pre.channels, pre.normalization) for f in chunk]
            probs = predict_arrays(predictor, images, pre, device, batch_size)
            for f, image, prob in zip(chunk, images, probs, strict=True):
                labels = to_labels(prob[None], threshold)[0].numpy().astype(np.uint8)  # [H, W]
                if postprocess.active:
                    labels = postprocess_labels(labels, postprocess)
                shown, saved = image if overlays else None, prob.numpy() if save_probabilities else None
                written.append(write_outputs(out, f.stem, labels, multiclass, image=shown, probabilities=saved))
            done = min(start + batch_size, len(files))
            if done == len(files) or time.monotonic() - logged >= PROGRESS_EVERY_S:  # one line per image would flood
                log.info("predicted %d/%d images", done, len(files))
                logged = time.monotonic()
    return written
