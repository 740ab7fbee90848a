"""One entry to prediction: a checkpoint (or released model) and inputs in, label files out, 2D or 3D alike.

The checkpoint's sidecar says which predictor applies (preprocessing.dims == 3: NIfTI / ITK volumes and case
folders through predict3d; else image files and folders through predict2d); both read everything else they need
from the sidecar, check every output before writing the first, and write each file atomically.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint import CheckpointMeta, read_meta
from ..compiling import check_compile
from ..files import output_folder
from ..memory_format import check_memory_format
from ..records import recorded_threshold
from .ensemble import Given, checkpoint_list
from .postprocess import PostProcess
from .precision import check_precision


@dataclass(frozen=True)
class PredictConfig:
    """device: cpu, cuda, cuda:1. threshold None: the checkpoint's (binary 2D), 0.5 for 3D region checkpoints
    (refused for 3D label checkpoints, which take the argmax). 2D only: batch_size (None: 1 on the CPU, 8 on a GPU:
    predict2d.default_batch_size), overlays, probabilities, skip_non_images. mirror_axes: flips
    averaged for TTA (2D: 0 height, 1 width; 3D: 0, 1, 2; () none). None: the axes the checkpoint records under
    preprocessing.inference, chosen on validation at release (2D: on every device, none where it records none; 3D:
    on a GPU only, 8 passes per window being too slow for the CPU). 3D: the sliding window's overlap and windows
    per pass; modalities: the input's channel names in its order, where the input does not name them itself;
    out_format: nifti (the input's format for ITK files) or dicom-seg (DICOM inputs). An option of the other
    dimensionality than the checkpoint's is refused (refuse_other_dims_options), not ignored.
    compile: "auto" (compiled on CUDA, eager on the CPU), "on", "off" or a torch.compile mode; the first batch's
    time is logged apart as the compile time. compile_backend: "inductor" or "aot_eager". memory_format:
    "contiguous" or "channels_last" (the model and each batch or window in NHWC / NDHWC: rwkvseg.memory_format).
    precision: "fp32" or "bf16" (the model under bfloat16 autocast, its outputs float32: infer.precision; refused
    on a CPU without native bfloat16).
    postprocess: applied to each label map before it is written (infer.postprocess); probabilities stay raw. None:
    the checkpoint's own choice (preprocessing.inference.postprocess, recorded at release after being chosen on
    validation; none where it records none)."""

    device: str = "cpu"
    overwrite: bool = False
    batch_size: int | None = None
    threshold: float | None = None
    overlays: bool = False
    probabilities: bool = False
    skip_non_images: bool = False
    overlap: float | None = None
    mirror_axes: tuple[int, ...] | None = None
    sw_batch_size: int = 1
    modalities: tuple[str, ...] = ()
    out_format: str = "nifti"
    postprocess: PostProcess | None = None

    compile: str = "auto"
    compile_backend: str = "inductor"
    memory_format: str = "contiguous"
    precision: str = "fp32"

    def __post_init__(self) -> None:
        check_compile(self.compile, self.compile_backend)
        check_memory_format(self.memory_format, "--memory-format")
        check_precision(self.precision, self.device)
        if self.threshold is not None and not 0 <= self.threshold <= 1:
            raise ValueError(f"--threshold {self.threshold} must be in [0, 1] (a probability)")
        if (self.batch_size is not None and self.batch_size < 1) or self.sw_batch_size < 1:
            raise ValueError(f"--batch-size {self.batch_size} and --sw-batch-size {self.sw_batch_size} must be >= 1")
        if self.overlap is not None and not 0 <= self.overlap < 1:
            raise ValueError(f"--overlap {self.overlap} must be in [0, 1)")
        if self.mirror_axes is not None and any(a not in (0, 1, 2) for a in self.mirror_axes):
            raise ValueError(f"--mirror-axes {list(self.mirror_axes)} must index the spatial axes 0, 1, 2")


def refuse_other_dims_options(config: PredictConfig, dims: int) -> None:
    """ValueError naming the options config sets that only a checkpoint of the other dimensionality uses."""
    if dims == 3:
        given = {
            "--batch-size": config.batch_size is not None,
            "--overlay": config.overlays,
            "--skip-non-images": config.skip_non_images,
        }
    else:
        given = {
            "--overlap": config.overlap is not None,
            "--sw-batch-size": config.sw_batch_size != 1,
            "--modalities": bool(config.modalities),
            "--out-format": config.out_format != "nifti",
        }
    if names := [name for name, on in given.items() if on]:
        other = 2 if dims == 3 else 3
        raise ValueError(
            f"{', '.join(names)}: for {other}D checkpoints, and this one is {dims}D: drop "
            f"{'it' if len(names) == 1 else 'them'}"
        )


def prediction_defaults(meta: CheckpointMeta) -> dict[str, str]:
    """What `rwkvseg predict` applies to a checkpoint when no option says otherwise, as text for listings: the
    threshold (the binary or region cut; "argmax" for label and multi-class checkpoints), the post-processing, and
    the flips averaged for test-time augmentation (3D: on a GPU only, none on the CPU); read as prediction reads
    them (ValueError for a sidecar prediction would refuse)."""
    from .postprocess import chosen_postprocess

    inference = meta.preprocessing.get("inference") or {}
    if meta.preprocessing.get("dims") == 3:
        from .predict3d import recorded_axes, recorded_region_threshold

        threshold = recorded_region_threshold(meta.preprocessing)  # refuses what prediction refuses
        axes, where = recorded_axes(inference), " on a GPU"
    else:
        from .predict2d import recorded_mirror_axes

        binary = meta.num_classes == 1
        threshold = recorded_threshold(meta.training.get("threshold"), "the sidecar's training") if binary else None
        axes, where = recorded_mirror_axes(None, inference), ""
    return {
        "threshold": "argmax" if threshold is None else f"{threshold:g}",
        "postprocess": chosen_postprocess(None, inference).spelling(),
        "flips": ",".join(map(str, axes)) + where if axes else "none",
    }


def is_3d_checkpoint(checkpoint: Given) -> bool:
    """Whether the checkpoint (an ensemble's first member) predicts volumes."""
    return read_meta(checkpoint_list(checkpoint)[0]).preprocessing.get("dims") == 3


def predict(
    checkpoint: Given, inputs: Sequence[str | Path], out: str | Path, config: PredictConfig = PredictConfig()
) -> list[Path]:
    """Predict every image / case in inputs into out; returns the label files written. checkpoint: one, or several
    predicting as one ensemble (infer.ensemble: their probabilities averaged).

    2D: one image file or folder. 3D: case folders (BraTS, MSD / nnU-Net with dataset.json, DICOM), one 4-D file
    or one 3-D file per modality; channels are matched by name to the checkpoint's modalities (config.modalities
    names them where the input does not).
    out may not be, contain or sit inside an input; overwrite replaces files only in a folder rwkvseg made.
    """
    with output_folder(out, inputs, config.overwrite, "predict") as folder:
        return _predict(checkpoint, inputs, folder, config)


def _predict(checkpoint: Given, inputs: Sequence[str | Path], out: Path, config: PredictConfig) -> list[Path]:
    if is_3d_checkpoint(checkpoint):
        from .predict3d import predict_paths

        return predict_paths(checkpoint, inputs, out, config)
    from .predict2d import predict_2d

    refuse_other_dims_options(config, 2)
    if len(inputs) != 1:
        raise ValueError(f"a 2D checkpoint predicts one image file or folder, got {len(inputs)} inputs")
    return predict_2d(
        checkpoint,
        inputs[0],
        out,
        device=config.device,
        batch_size=config.batch_size,
        threshold=config.threshold,  # None: the checkpoint's (an ensemble's members must agree on it)
        overlays=config.overlays,
        save_probabilities=config.probabilities,
        overwrite=config.overwrite,
        skip_non_images=config.skip_non_images,
        compile=config.compile,
        compile_backend=config.compile_backend,
        mirror_axes=config.mirror_axes,  # None: the checkpoint's recorded defaults, as for postprocess
        memory_format=config.memory_format,
        postprocess=config.postprocess,
        precision=config.precision,
    )
