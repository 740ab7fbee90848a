"""The viewer's JSON for a predicted 3D case: label and background volumes as compact bytes, geometry, volumes.

Arrays are turned to the closest RAS orientation (axis 0: left -> right, 1: posterior -> anterior, 2: inferior ->
superior), so the viewer draws axial, coronal and sagittal planes without reading an affine.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, io_orientation

from .predictors import OVERLAY_COLOURS, Hosted3D, Prediction3D


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def _to_ras(data_ijk: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return apply_orientation(data_ijk, io_orientation(affine))


def _window(volume: np.ndarray) -> np.ndarray:
    """Any-valued intensities -> uint8 grey, 0.5-99.5 percentile window of the nonzero voxels."""
    volume = volume.astype(np.float32)
    inside = volume[volume != 0]
    if inside.size == 0:
        return np.zeros(volume.shape, np.uint8)
    lo, hi = np.percentile(inside, (0.5, 99.5))
    return (np.clip((volume - lo) / max(hi - lo, 1e-6), 0, 1) * 255).round().astype(np.uint8)


def label_volumes_ml(values: np.ndarray, affine: np.ndarray, label_values: Sequence[int], regions) -> dict:
    voxel_ml = abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0
    counts = {int(v): int(n) for v, n in zip(*np.unique(values, return_counts=True), strict=True)}
    labels = {str(v): round(counts.get(v, 0) * voxel_ml, 3) for v in label_values[1:]}
    regions_ml = {name: round(sum(counts.get(v, 0) for v in vs) * voxel_ml, 3) for name, vs in regions.items()}
    return {"labels": labels, "regions": regions_ml}


def view_payload(
    hosted: Hosted3D, prediction: Prediction3D, files: Sequence[Path], background: str | None = None
) -> dict[str, Any]:
    """JSON for the viewer: shape [X, Y, Z] (RAS), spacing in mm, uint8 class indices and grey background."""
    modalities = list(hosted.modalities)
    if background is None:
        background = "flair" if "flair" in modalities else modalities[0]
    if background not in modalities:
        from .inputs import RequestError

        raise RequestError(422, f"background {background!r} is not a modality of this model: {modalities}")
    affine = prediction.affine
    values_ijk = np.swapaxes(prediction.values, 0, 2)  # (k, j, i) -> (i, j, k)
    lookup = np.zeros(256, np.uint8)
    for index, value in enumerate(hosted.label_values):
        lookup[value] = index
    classes = _to_ras(lookup[values_ijk], affine)
    grey = np.asanyarray(nib.load(files[modalities.index(background)]).dataobj)
    grey = _to_ras(grey.reshape(grey.shape[:3]), affine)
    ornt = io_orientation(affine)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))  # (i, j, k) mm
    spacing = [float(zooms[int(np.flatnonzero(ornt[:, 0] == axis)[0])]) for axis in range(3)]
    legend = [
        {
            "index": index,
            "value": int(value),
            "colour": [int(c) for c in OVERLAY_COLOURS[(index - 1) % len(OVERLAY_COLOURS)]],
        }
        for index, value in enumerate(hosted.label_values)
        if index > 0
    ]
    return {
        "model": hosted.source.name,
        "shape": list(classes.shape),
        "spacing": [round(s, 4) for s in spacing],
        "orientation": "RAS",
        "background": background,
        "image": _b64(_window(grey)),
        "labels": _b64(classes.astype(np.uint8)),
        "legend": legend,
        "volumes_ml": label_volumes_ml(prediction.values, affine, hosted.label_values, hosted.regions),
        "nifti_gz": base64.b64encode(prediction.nifti_gz).decode("ascii"),
    }
