"""DICOM in and DICOM SEG out: case folders of DICOM series, and segmentations a PACS viewer shows.

A case folder holds one series per modality, flat or in subfolders. `find_series` groups the files by
SeriesInstanceUID (headers read with pydicom), orders each series' slices along the slice normal and names its
modality from SeriesDescription, or from the subfolder name when the description says nothing (`t1`, `t1ce`, `t2`,
`flair`). `read_dicom_series` checks the slices form one evenly spaced 3-D grid and reads the voxels through
SimpleITK, so the result is the `Volume` that `volumes.read_volume` returns for NIfTI and ITK files: (k, j, i)
order, k along the slice normal, a RAS affine. `write_dicom_seg` writes a label map on that grid as a BINARY DICOM
Segmentation (highdicom) that references the source series.

Needs the extra `rwkvseg[dicom]` (pydicom, highdicom, SimpleITK).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import MissingExtraError
from .specs import modality_of
from .volumes import DatasetSpec, Volume, _sitk_affine, import_sitk

log = logging.getLogger(__name__)

# Slices whose spacing differs from the series' median by more than this (relative) are a gap or an overlap.
SPACING_RTOL = 1e-2
# Rows/columns of two slices must agree to this (direction cosines), and slices must lie on the normal to this (mm).
ORIENTATION_ATOL = 1e-4
POSITION_ATOL = 1e-2
# ITK-SNAP's first label colours, so a label keeps its usual colour across viewers.
LABEL_COLORS = (
    (255, 0, 0),
    (0, 255, 0),
    (0, 0, 255),
    (255, 255, 0),
    (0, 255, 255),
    (255, 0, 255),
    (255, 239, 213),
    (0, 0, 205),
    (205, 133, 63),
    (210, 180, 140),
)


def _import_pydicom():
    try:
        import pydicom
    except ImportError:
        raise MissingExtraError(
            "reading DICOM needs pydicom; install the extra: pip install 'rwkvseg[dicom]'"
        ) from None
    return pydicom


def _import_highdicom():
    try:
        import highdicom
    except ImportError:
        raise MissingExtraError(
            "writing DICOM SEG needs highdicom; install the extra: pip install 'rwkvseg[dicom]'"
        ) from None
    return highdicom


@dataclass(frozen=True)
class DicomSeries:
    """One series of a case folder: its files in slice order (along the slice normal) and what it is."""

    folder: Path  # the folder holding all its files
    series_uid: str
    study_uid: str
    description: str  # SeriesDescription, "" when absent
    modality: str | None  # t1 / t1ce / t2 / flair from the description or the folder name, else None
    sop_classes: tuple[str, ...]  # SOPClassUIDs found, as UIDs
    files: tuple[Path, ...]
    positions: tuple[tuple[float, float, float], ...] | None  # ImagePositionPatient per file; None if absent

    @property
    def is_image(self) -> bool:
        """Whether every file is an image storage (not SEG, RTSTRUCT, SR, a presentation state...)."""
        from pydicom.uid import UID

        return all(UID(uid).name.endswith(" Image Storage") for uid in self.sop_classes)

    def __str__(self) -> str:
        return f"series {self.series_uid} ({self.description or 'no description'}, {len(self.files)} files)"


def _has_part10_marker(path: Path) -> bool:
    """Whether a file starts as a DICOM Part-10 file does: a 128-byte preamble, then b"DICM"."""
    try:
        with path.open("rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _dicom_headers(folder: Path) -> Iterator[tuple[Path, Any]]:
    """(path, header) of each DICOM file below a folder that belongs to a series.

    Without pydicom, a folder none of whose files carries the Part-10 marker holds no DICOM (probing an empty or
    NIfTI folder needs no extra); one that does raises MissingExtraError naming the extra.
    """
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        return
    try:
        pydicom = _import_pydicom()
    except MissingExtraError:
        if any(_has_part10_marker(path) for path in files):
            raise
        return
    from pydicom.errors import InvalidDicomError

    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError):
            continue  # not DICOM: notes, NIfTI files and the like may sit beside the series
        if "SeriesInstanceUID" in ds and "SOPClassUID" in ds:  # a DICOMDIR has neither
            yield path, ds


def _slice_normal(ds: Any) -> np.ndarray:
    row, col = np.asarray(ds.ImageOrientationPatient, dtype=np.float64).reshape(2, 3)
    return np.cross(row, col)


def _make_series(folder: Path, items: list[tuple[Path, Any]]) -> DicomSeries:
    first = items[0][1]
    if all("ImagePositionPatient" in ds and "ImageOrientationPatient" in ds for _, ds in items):
        # the order GDCM and ITK use: ascending along the normal, so k runs along row x column
        normal = _slice_normal(first)
        items = sorted(items, key=lambda item: float(np.dot(normal, np.asarray(item[1].ImagePositionPatient, float))))
        positions = tuple(tuple(float(v) for v in ds.ImagePositionPatient) for _, ds in items)
    else:
        items = sorted(items, key=lambda item: int(item[1].get("InstanceNumber") or 0))
        positions = None
    files = tuple(path for path, _ in items)
    common = Path(os.path.commonpath([p.parent for p in files]))
    description = str(first.get("SeriesDescription", "") or "").strip()
    modality = modality_of(description)
    if modality is None and common != folder:
        modality = modality_of(str(common.relative_to(folder)))
    return DicomSeries(
        folder=common,
        series_uid=str(first.SeriesInstanceUID),
        study_uid=str(first.get("StudyInstanceUID", "")),
        description=description,
        modality=modality,
        sop_classes=tuple(sorted({str(ds.SOPClassUID) for _, ds in items})),
        files=files,
        positions=positions,
    )


def find_series(folder: Path | str) -> list[DicomSeries]:
    """Every DICOM series under a folder (searched recursively), grouped by SeriesInstanceUID.

    Raises ValueError naming the folder when it holds no DICOM file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"DICOM folder {folder} does not exist")
    groups: dict[str, list[tuple[Path, Any]]] = {}
    for path, ds in _dicom_headers(folder):
        groups.setdefault(str(ds.SeriesInstanceUID), []).append((path, ds))
    if not groups:
        raise ValueError(
            f"{folder} holds no DICOM files; point to a folder with the .dcm files of one case (one series per "
            f"modality), or convert the case to NIfTI"
        )
    return sorted((_make_series(folder, items) for items in groups.values()), key=lambda s: (str(s.folder), s.files))


def is_dicom_folder(folder: Path | str) -> bool:
    """Whether a folder (or one below it) holds at least one DICOM file with a series UID.

    Needs pydicom only where a file carries the DICOM Part-10 marker; without pydicom, MissingExtraError there.
    """
    folder = Path(folder)
    return folder.is_dir() and next(_dicom_headers(folder), None) is not None


def match_series(
    series: Sequence[DicomSeries],
    modalities: Sequence[str],
    folder: Path | str,
    chosen: Mapping[str, str] | None = None,
) -> tuple[DicomSeries, ...]:
    """The image series for each modality, in the order given (the model's channel order).

    A series matches a modality when both name the same MRI modality (`modality_of`: `t1c` matches a series
    described `T1 post Gd`), or when its description or folder name equals the modality's name (other modalities,
    e.g. `adc`). `chosen` maps a modality to the SeriesInstanceUID to use where several series match.
    Non-image series (an earlier DICOM SEG, a structured report) are left out.
    """
    folder, chosen = Path(folder), dict(chosen or {})
    images = [s for s in series if s.is_image]
    found = "; ".join(f"{s.description or s.folder.name!r} -> {s.modality}" for s in images) or "none"
    picked = []
    for modality in modalities:
        if modality in chosen:
            candidates = [s for s in images if s.series_uid == chosen[modality]]
            if not candidates:
                raise ValueError(f"{folder}: no image series has SeriesInstanceUID {chosen[modality]} ({modality})")
        else:
            wanted, name = modality_of(modality), modality.lower()
            candidates = [
                s
                for s in images
                if (wanted is not None and s.modality == wanted)
                or name in (s.description.lower(), s.folder.name.lower())
            ]
        if not candidates:
            raise ValueError(
                f"{folder}: no DICOM series for modality {modality!r}; series found (description -> modality): "
                f"{found}. Give the series a SeriesDescription naming it, or put it in a subfolder named "
                f"{modality!r}"
            )
        if len(candidates) > 1:
            listed = ", ".join(f"{s.series_uid} ({s.description or s.folder.name!r})" for s in candidates)
            raise ValueError(
                f"{folder}: {len(candidates)} series read as modality {modality!r}: {listed}; keep one series per "
                f"modality in the case folder, or choose one by SeriesInstanceUID"
            )
        picked.append(candidates[0])
    uids = [s.series_uid for s in picked]
    if len(set(uids)) != len(uids):
        raise ValueError(f"{folder}: one series matched several of the modalities {list(modalities)}; rename them")
    return tuple(picked)


def _check_series(series: DicomSeries) -> tuple[float, ...]:
    """The slice gaps of a readable 3-D series; ValueError naming the folder and the fix otherwise."""
    pydicom = _import_pydicom()
    from pydicom.uid import UID

    where = f"{series.folder} ({series})"
    if not series.is_image:
        names = ", ".join(UID(uid).name for uid in series.sop_classes)
        raise ValueError(
            f"{where} holds {names} objects, not images; point to the folder of an image series (MR, CT, PET)"
        )
    headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in series.files]
    for path, ds in zip(series.files, headers, strict=True):
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise ValueError(
                f"{where}: {path.name} is a multi-frame image; convert the series to single-frame files "
                f"(e.g. dcm2niix to NIfTI) first"
            )
    if series.positions is None:
        raise ValueError(
            f"{where} lacks ImagePositionPatient / ImageOrientationPatient, so its slices have no 3-D geometry; "
            f"export the series from the scanner or PACS as cross-sectional images"
        )
    if len(series.files) < 2:
        raise ValueError(f"{where} has one slice; a 3-D volume needs a series of at least two slices")
    first = headers[0]
    for path, ds in zip(series.files, headers, strict=True):
        if (ds.Rows, ds.Columns) != (first.Rows, first.Columns) or not np.allclose(
            ds.ImageOrientationPatient, first.ImageOrientationPatient, atol=ORIENTATION_ATOL
        ):
            raise ValueError(
                f"{where}: {path.name} differs from {series.files[0].name} in size or orientation; the series mixes "
                f"acquisitions (e.g. a localizer), keep the files of one 3-D stack in the folder"
            )
    normal = _slice_normal(first)
    positions = np.asarray(series.positions)  # [K, 3]
    offsets = positions - positions[0]
    off_normal = np.abs(offsets - np.outer(offsets @ normal, normal)).max()
    if off_normal > POSITION_ATOL:
        raise ValueError(
            f"{where}: slices are shifted by up to {off_normal:.3f} mm off the slice normal (a tilted gantry or a "
            f"mixed series); resample the series to an orthogonal grid before predicting"
        )
    gaps = np.diff(offsets @ normal)
    median = float(np.median(gaps))
    if median <= POSITION_ATOL or np.any(np.abs(gaps - median) > SPACING_RTOL * median):
        worst = int(np.argmax(np.abs(gaps - median)))
        raise ValueError(
            f"{where}: slice spacing is uneven ({gaps[worst]:.3f} mm between {series.files[worst].name} and "
            f"{series.files[worst + 1].name}, {median:.3f} mm elsewhere): slices are missing or repeated; add the "
            f"missing files or remove the duplicates"
        )
    return tuple(float(g) for g in gaps)


def _one_series(source: DicomSeries | Path | str, series_uid: str | None = None) -> DicomSeries:
    if isinstance(source, DicomSeries):
        return source
    folder = Path(source)
    found = find_series(folder)
    if series_uid is not None:
        found = [s for s in found if s.series_uid == series_uid]
        if not found:
            raise ValueError(f"{folder} holds no series with SeriesInstanceUID {series_uid}")
        return found[0]
    images = [s for s in found if s.is_image] or found  # a lone SEG still gets its own error message
    if len(images) > 1:
        listed = "; ".join(str(s) for s in images)
        raise ValueError(
            f"{folder} holds {len(images)} image series ({listed}); point to one series' folder, pass its "
            f"SeriesInstanceUID, or read the folder as a case (match_series)"
        )
    return images[0]


def read_dicom_series(source: DicomSeries | Path | str, series_uid: str | None = None) -> Volume:
    """One DICOM image series as a `Volume` (the type `read_volume` returns), after checking its geometry.

    source: a DicomSeries from `find_series`, or a folder holding one image series (or several, with series_uid).
    The array is (k, j, i) = (slice, row, column) with k ascending along row x column direction, which is
    how SimpleITK reads a series; `reference` is the SimpleITK image, so outputs can be written alike.
    Raises ValueError naming the folder for non-image objects, missing or repeated slices and mixed stacks.
    """
    series = _one_series(source, series_uid)
    _check_series(series)
    sitk = import_sitk()
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(p) for p in series.files])
    image = reader.Execute()
    if image.GetNumberOfComponentsPerPixel() > 1:
        raise ValueError(f"{series.folder}: {series} holds colour images; a single-channel series was expected")
    array = sitk.GetArrayFromImage(image)  # [K, J, I]
    spacing = tuple(float(s) for s in image.GetSpacing())[::-1]
    return Volume(np.ascontiguousarray(array), _sitk_affine(image), spacing, series.folder, image)


@dataclass(frozen=True)
class SegmentSpec:
    """One segment of a DICOM SEG: the voxels whose label value is in `values` (one label, or a region's labels).

    color: recommended display colour (RGB 0-255); category / type: coded concepts as (value, scheme, meaning),
    derived from the label name when None (tumour regions, edema, necrosis; otherwise `Tissue`).
    """

    label: str
    values: tuple[int, ...]
    color: tuple[int, int, int] | None = None
    category: tuple[str, str, str] | None = None
    type: tuple[str, str, str] | None = None

    def __post_init__(self) -> None:
        if not self.label.strip():
            raise ValueError("a DICOM SEG segment needs a non-empty label name")
        if not self.values or 0 in self.values:
            raise ValueError(f"segment {self.label!r} has label values {self.values}; give foreground values (not 0)")


def segments_for(
    spec: DatasetSpec, target: str = "labels", names: Mapping[int, str] | None = None
) -> tuple[SegmentSpec, ...]:
    """Segments for a dataset: one per foreground label (`target="labels"`), or one per region (`"regions"`)."""
    if target == "regions":
        return tuple(
            SegmentSpec(name, tuple(values), LABEL_COLORS[i % len(LABEL_COLORS)])
            for i, (name, values) in enumerate(spec.regions)
        )
    if target != "labels":
        raise ValueError(f"target {target!r} unknown; choose labels or regions")
    names = dict(names or {})
    return tuple(
        SegmentSpec(names.get(value, f"label {value}"), (value,), LABEL_COLORS[(value - 1) % len(LABEL_COLORS)])
        for value in spec.label_values[1:]
    )


def _codes(segment: SegmentSpec) -> tuple[Any, Any]:
    from highdicom.sr import CodedConcept
    from pydicom.sr.codedict import codes

    name = segment.label.lower()
    if re.search(r"edema|oedema|\bed\b|snfh", name):
        category, kind = codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Edema
    elif re.search(r"necro|\bncr\b", name):
        category, kind = codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Necrosis
    elif re.search(r"tumou?r|\b(wt|tc|et|net|netc)\b|enhanc|lesion|neoplasm", name):
        category, kind = codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Neoplasm
    else:
        category, kind = codes.SCT.Tissue, codes.SCT.Tissue
    if segment.category is not None:
        category = CodedConcept(*segment.category)
    if segment.type is not None:
        kind = CodedConcept(*segment.type)
    return category, kind


def write_dicom_seg(
    labels: np.ndarray,
    source: DicomSeries | Path | str,
    out_path: Path | str,
    segments: Sequence[SegmentSpec],
    *,
    overwrite: bool = False,
    series_description: str = "rwkvseg segmentation",
    algorithm_name: str = "rwkvseg",
    algorithm_version: str | None = None,
    series_number: int = 900,
) -> Path:
    """Write a label map on a series' grid as a BINARY DICOM SEG that references the series; returns out_path.

    labels: label values [K, J, I] in the order `read_dicom_series` returns for that series. Each segment holds
    the voxels whose value is in its `values` (segments may overlap, e.g. BraTS WT / TC / ET). The file is
    written beside out_path and moved into place, so an interrupted run leaves no half file.
    """
    hd = _import_highdicom()
    pydicom = _import_pydicom()
    from pydicom.sr.codedict import codes

    from .. import __version__

    out_path = Path(out_path)
    if out_path.exists() and not overwrite:
        raise FileExistsError(f"{out_path} exists; remove it or pass overwrite=True (--overwrite)")
    series = _one_series(source)
    gaps = _check_series(series)
    datasets = [pydicom.dcmread(path) for path in series.files]
    grid = (len(datasets), int(datasets[0].Rows), int(datasets[0].Columns))
    if labels.shape != grid:
        raise ValueError(
            f"labels of shape {labels.shape} do not lie on the grid {grid} (slices, rows, columns) of {series}; "
            f"write a label map predicted on the series' own grid"
        )
    if not segments:
        raise ValueError("no segments given; describe at least one label or region (segments_for(spec))")
    described = {v for s in segments for v in s.values}
    stray = sorted(set(np.unique(labels).tolist()) - described - {0})
    if stray:
        raise ValueError(
            f"labels hold values {stray} that no segment describes ({[s.label for s in segments]}); add segments "
            f"for them"
        )
    if "FrameOfReferenceUID" not in datasets[0]:
        raise ValueError(f"{series.folder}: {series} has no FrameOfReferenceUID, which a DICOM SEG must reference")
    for ds in datasets:  # in memory only: highdicom copies it, and exports often leave this type-2 tag empty
        if not ds.get("SliceThickness"):
            ds.SliceThickness = float(np.median(gaps))
    masks = np.stack([np.isin(labels, s.values) for s in segments], axis=-1)  # [K, J, I, S] per segment
    version = algorithm_version or __version__
    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name, family=codes.DCM.ArtificialIntelligence, version=version
    )
    descriptions = []
    for number, segment in enumerate(segments, start=1):
        category, kind = _codes(segment)
        color = None if segment.color is None else hd.color.CIELabColor.from_rgb(*segment.color)
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=segment.label,
                segmented_property_category=category,
                segmented_property_type=kind,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
                display_color=color,
            )
        )
    seg = hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=masks,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="rwkvseg",
        manufacturer_model_name=algorithm_name,
        software_versions=f"rwkvseg {__version__}",
        device_serial_number="none",
        series_description=series_description,
        omit_empty_frames=bool(masks.any()),  # a SEG needs at least one frame
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.partial")
    try:
        seg.save_as(tmp)
        os.replace(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    log.info("DICOM SEG with %d segments for %s -> %s", len(segments), series, out_path)
    return out_path


def case_series(
    folder: Path | str, modalities: Sequence[str], chosen: Mapping[str, str] | None = None
) -> tuple[DicomSeries, ...]:
    """The series of a DICOM case folder in the model's modality order (`find_series` + `match_series`)."""
    return match_series(find_series(folder), modalities, folder, chosen)
