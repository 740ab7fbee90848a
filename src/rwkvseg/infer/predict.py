"""One entry to prediction: a checkpoint (or released model) and inputs in, label files out, 2D or 3D alike.

The checkpoint's sidecar says which predictor applies (preprocessing.dims == 3: NIfTI / ITK volumes and case
folders through predict3d; else image files and folders through predict2d); both read everything else they need
from the sidecar, check every output before writing the first, and write each file atomically.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint import read_meta
from ..compiling import check_compile


@dataclass(frozen=True)
class PredictConfig:
    """device: cpu, cuda, cuda:1. threshold None: the checkpoint's (binary 2D). 2D: batch_size, overlays,
    probabilities, skip_non_images. 3D: the sliding window's overlap, mirror axes and windows per pass.
    compile: "auto" (compiled on CUDA, eager on the CPU), "on", "off" or a torch.compile mode; the first batch's
    time is logged apart as the compile time. compile_backend: "inductor" or "aot_eager"."""

    device: str = "cpu"
    overwrite: bool = False
    batch_size: int = 8
    threshold: float | None = None
    overlays: bool = False
    probabilities: bool = False
    skip_non_images: bool = False
    overlap: float = 0.5
    mirror_axes: tuple[int, ...] = (0, 1, 2)
    sw_batch_size: int = 1
    compile: str = "auto"
    compile_backend: str = "inductor"

    def __post_init__(self) -> None:
        check_compile(self.compile, self.compile_backend)


def is_3d_checkpoint(checkpoint: str | Path) -> bool:
    return read_meta(checkpoint).preprocessing.get("dims") == 3


def predict(
    checkpoint: str | Path, inputs: Sequence[str | Path], out: str | Path, config: PredictConfig = PredictConfig()
) -> list[Path]:
    """Predict every image / case in inputs into out; returns the label files written.

    2D: one image file or folder. 3D: case folders, or one 3-D file per modality in the model's order.
    """
    if is_3d_checkpoint(checkpoint):
        from .predict3d import predict_paths

        return predict_paths(checkpoint, inputs, out, config)
    from .predict2d import predict_2d

    if len(inputs) != 1:
        raise ValueError(f"a 2D checkpoint predicts one image file or folder, got {len(inputs)} inputs")
    threshold = config.threshold
    if threshold is None:
        threshold = float(read_meta(checkpoint).training.get("threshold", 0.5))
    return predict_2d(
        checkpoint,
        inputs[0],
        out,
        device=config.device,
        batch_size=config.batch_size,
        threshold=threshold,
        overlays=config.overlays,
        save_probabilities=config.probabilities,
        overwrite=config.overwrite,
        skip_non_images=config.skip_non_images,
        compile=config.compile,
        compile_backend=config.compile_backend,
    )
