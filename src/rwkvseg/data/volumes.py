"""3D multimodal volumes: case discovery and checked readers (dataset specs: data.specs).

Supported layouts: BraTS 2017-2021 case folders (`<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz`), BraTS 2023+
(`<case>/<case>-{t1n,t1c,t2w,t2f,seg}.nii.gz`), MSD Task01 (4-D NIfTI + dataset.json) and nnU-Net raw
(`imagesTr/<case>_0000.nii.gz` ... + `labelsTr/` + dataset.json). NIfTI is read with nibabel; NRRD, MHA/MHD and
DICOM series (a folder of .dcm files) through SimpleITK, the optional extra `rwkvseg[itk]`.

Axis convention: every array is held in (k, j, i) voxel order, the order SimpleITK and nnU-Net use, so the slice
axis of an axial acquisition comes first and a stacked case is [M, T, H, W] as the 3D models expect. Spacing
tuples follow the same order; affines stay the file's voxel (i, j, k) -> world (RAS, mm) map.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..files import folders_below
from . import MissingExtraError
from .specs import DatasetSpec, channel_order, dataset_spec, read_json

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
MAX_VOXELS = 2**30  # 1024^3: a header claiming more is damaged or hostile (checked before reading the data)
# Affines of co-registered modalities written by different tools differ in the last float32 bits.
AFFINE_ATOL = 1e-3


@dataclass(frozen=True)
class ImageSource:
    """One modality of a case: a file, and the channel inside it for 4-D files (MSD), or a DICOM series
    (a data.dicom.DicomSeries; path is then its folder)."""

    path: Path
    channel: int | None = None
    series: Any = None

    def __str__(self) -> str:
        if self.series is not None:
            return f"{self.path} ({self.series})"
        return str(self.path) if self.channel is None else f"{self.path}[channel {self.channel}]"


@dataclass(frozen=True)
class CaseFiles:
    """Where one case lives on disk: one source per modality in model order, and an optional label file.

    channels: the input's channel names in the input's own order, as they were read (dataset.json, file suffixes,
    DICOM series descriptions, --modalities); empty where the layout itself fixes the order.
    """

    case_id: str
    images: tuple[ImageSource, ...]
    label: Path | None = None
    channels: tuple[str, ...] = ()


@dataclass
class Volume:
    """A 3D array in (k, j, i) order with its geometry and the object it was read from (to write alike)."""

    array: np.ndarray
    affine: np.ndarray  # [4, 4] voxel (i, j, k) -> world RAS mm
    spacing: tuple[float, float, float]  # (k, j, i) order, mm
    path: Path
    reference: Any = field(default=None, repr=False)  # nibabel image or SimpleITK image


@dataclass
class CaseVolumes:
    """A case loaded and checked: image [M, K, J, I] float32, label [K, J, I] class indices or None."""

    case_id: str
    image: np.ndarray
    label: np.ndarray | None
    affine: np.ndarray
    spacing: tuple[float, float, float]
    reference: Volume
    source_dtype: np.dtype


def strip_suffix(name: str) -> str:
    for suffix in (*NIFTI_SUFFIXES, *ITK_SUFFIXES):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_volume_file(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.name.endswith((*NIFTI_SUFFIXES, *ITK_SUFFIXES))


def holds_volumes(folder: str | Path) -> bool:
    """Whether a folder holds 3D volume files (NIfTI, NRRD, MHA) anywhere below it."""
    folder = Path(folder)
    return folder.is_dir() and any(is_volume_file(p) for p in folder.rglob("*"))


def import_sitk():
    try:
        import SimpleITK as sitk
    except ImportError:
        raise MissingExtraError(
            "reading NRRD, MHA/MHD or DICOM needs SimpleITK; install the extra: pip install 'rwkvseg[itk]'"
        ) from None
    return sitk


def _sitk_affine(image) -> np.ndarray:
    """SimpleITK's LPS direction/origin/spacing as a RAS voxel (i, j, k) -> world affine, like nibabel's."""
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction * np.asarray(image.GetSpacing(), dtype=np.float64)
    affine[:3, 3] = image.GetOrigin()
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine


def read_volume(path: Path | str, channel: int | None = None) -> Volume:
    """Read a 3D volume (or one channel of a 4-D file) into (k, j, i) order, with checks.

    Raises ValueError naming the file when it is 4-D where 3-D was expected, or holds NaN/Inf voxels.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_dir() or path.name.endswith(ITK_SUFFIXES):
        array, affine, spacing, reference = _read_itk(path)
    elif path.name.endswith(NIFTI_SUFFIXES):
        reference = _load_nifti(path)
        if channel is not None and len(reference.shape) == 4:
            if not 0 <= channel < reference.shape[3]:
                raise ValueError(f"{path} has {reference.shape[3]} channels, channel {channel} was asked for")
            # slicing the proxy reads one channel, not the whole 4-D file
            array = _read_data(path, lambda: np.asanyarray(reference.dataobj[..., channel]))[..., None]
            channel = 0
        else:
            array = _read_data(path, lambda: np.asanyarray(reference.dataobj))
        affine = np.asarray(reference.affine, dtype=np.float64)
        spacing = tuple(float(z) for z in reference.header.get_zooms()[:3])[::-1]
        # (i, j, k[, c]) -> (k, j, i[, c])
        array = np.swapaxes(array, 0, 2) if array.ndim >= 3 else array
    else:
        raise ValueError(
            f"{path}: unknown file type; use NIfTI (.nii, .nii.gz), NRRD, MHA/MHD or a DICOM series folder"
        )
    if array.ndim == 4 and channel is not None:
        if not 0 <= channel < array.shape[3]:
            raise ValueError(f"{path} has {array.shape[3]} channels, channel {channel} was asked for")
        array = array[..., channel]
    elif array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        shape = tuple(np.swapaxes(array, 0, 2).shape) if array.ndim >= 3 else array.shape
        raise ValueError(
            f"{path} is {array.ndim}-D with shape {shape}, a 3-D volume was expected; for 4-D multimodal "
            f"files (MSD Task01) use the msd layout, or split the file into one 3-D file per modality"
        )
    if np.issubdtype(array.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        if bad:
            raise ValueError(
                f"{path} holds {bad} NaN/Inf voxels; replace them (e.g. numpy.nan_to_num) and save the file again"
            )
    return Volume(np.ascontiguousarray(array), affine, spacing, path, reference)


def read_spacing(path: Path | str) -> tuple[float, float, float]:
    """Voxel spacing in (k, j, i) order from the header alone (no voxel data is read)."""
    path = Path(path)
    if path.name.endswith(NIFTI_SUFFIXES):
        import nibabel as nib

        return tuple(float(z) for z in nib.load(path).header.get_zooms()[:3])[::-1]
    sitk = import_sitk()
    if path.is_dir():
        return read_volume(path).spacing
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return tuple(float(s) for s in reader.GetSpacing()[:3])[::-1]


def _read_itk(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float], Any]:
    sitk = import_sitk()
    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        names = reader.GetGDCMSeriesFileNames(str(path))
        if not names:
            raise ValueError(f"{path} is a folder without a DICOM series; point to a series folder or a file")
        reader.SetFileNames(names)
        image = reader.Execute()
    else:
        image = sitk.ReadImage(str(path))
    array = sitk.GetArrayFromImage(image)  # already (k, j, i), vectors last
    if image.GetDimension() != 3:
        raise ValueError(f"{path} is {image.GetDimension()}-D, a 3-D volume was expected")
    if image.GetNumberOfComponentsPerPixel() > 1:
        raise ValueError(f"{path} has {image.GetNumberOfComponentsPerPixel()} components per voxel; expected one")
    spacing = tuple(float(s) for s in image.GetSpacing())[::-1]
    return array, _sitk_affine(image), spacing, image


def _load_nifti(path: Path) -> Any:
    """nib.load with one-line errors for empty, truncated or mislabelled files and a size check of the header."""
    import nibabel as nib

    try:
        image = nib.load(path)
    except Exception as err:  # ImageFileError, gzip / zlib errors, EOFError: the file is not a readable NIfTI
        raise ValueError(
            f"cannot read {path} as NIfTI ({type(err).__name__}: {err}); the file is empty, truncated or not "
            "NIfTI despite its name: export it again"
        ) from None
    voxels = int(np.prod(image.shape, dtype=np.float64))
    if voxels > MAX_VOXELS:
        raise ValueError(
            f"{path} claims {' x '.join(map(str, image.shape))} voxels, above the limit of {MAX_VOXELS:,}; "
            "the header is damaged, or the volume must be cropped / downsampled first"
        )
    return image


def _read_data(path: Path, read: Any) -> np.ndarray:
    """read() of a NIfTI's voxels, with a one-line error when the data is truncated or damaged."""
    try:
        return read()
    except (OSError, EOFError, ValueError) as err:
        raise ValueError(
            f"cannot read the voxels of {path} ({type(err).__name__}: {err}); the file is truncated or damaged: "
            "copy or export it again"
        ) from None


def check_intensities(case_id: str, image: np.ndarray, paths: Sequence[Any]) -> None:
    """Refuse a case whose modalities are all blank; warn about a blank or constant modality (the model was not
    trained on one: expect much worse results). image: [M, K, J, I]."""
    flat = image.reshape(image.shape[0], -1)
    low, high = flat.min(axis=1), flat.max(axis=1)
    if (high == 0).all() and (low == 0).all():
        raise ValueError(
            f"case {case_id}: every image is all zero ({', '.join(map(str, paths))}); an empty scan has nothing "
            "to segment: check the export"
        )
    for path, lo, hi in zip(paths, low, high, strict=True):
        if lo == hi:
            log.warning("case %s: %s is constant (every voxel %g); results will be unreliable", case_id, path, lo)


def _same_grid(a: Volume, b: Volume) -> bool:
    return a.array.shape == b.array.shape and np.allclose(a.affine, b.affine, atol=AFFINE_ATOL)


def labels_to_classes(label: np.ndarray, spec: DatasetSpec, path: Path) -> np.ndarray:
    """File label values -> class indices (uint8); ValueError naming the file on unknown values."""
    values = np.unique(label)
    unknown = sorted(set(values.tolist()) - set(spec.label_values))
    if unknown:
        raise ValueError(
            f"{path} holds label values {unknown} outside {list(spec.label_values)} of dataset {spec.name!r}; "
            f"fix the file or give the dataset's label values (label_values in the spec / --labels)"
        )
    lut = np.zeros(int(max(spec.label_values)) + 1, dtype=np.uint8)
    lut[list(spec.label_values)] = np.arange(len(spec.label_values), dtype=np.uint8)
    return lut[label.astype(np.int64)]


def read_source(source: ImageSource) -> Volume:
    """One modality of a case: a file (or a channel of a 4-D file) or a DICOM series."""
    if source.series is not None:
        from .dicom import read_dicom_series

        return read_dicom_series(source.series)
    return read_volume(source.path, source.channel)


def load_case(case: CaseFiles, spec: DatasetSpec, with_label: bool = True) -> CaseVolumes:
    """Read every modality and the label of a case, check they share one grid and hold valid values."""
    volumes = [read_source(src) for src in case.images]
    first = volumes[0]
    for src, vol in zip(case.images[1:], volumes[1:], strict=True):
        if not _same_grid(first, vol):
            raise ValueError(
                f"case {case.case_id}: {src} has shape {vol.array.shape[::-1]} and affine\n{vol.affine}\n"
                f"but {case.images[0]} has shape {first.array.shape[::-1]} and affine\n{first.affine}\n"
                f"register / resample the modalities to one grid (e.g. with SimpleITK) before using them"
            )
    image = np.stack([v.array.astype(np.float32, copy=False) for v in volumes])  # M x [K, J, I] -> [M, K, J, I]
    check_intensities(case.case_id, image, [src.path for src in case.images])
    label = None
    if with_label and case.label is not None:
        vol = read_volume(case.label)
        if not _same_grid(first, vol):
            raise ValueError(
                f"case {case.case_id}: label {case.label} has shape {vol.array.shape[::-1]} and affine\n"
                f"{vol.affine}\nbut the images have {first.array.shape[::-1]} and\n{first.affine}\n"
                f"the label must lie on the images' grid"
            )
        if np.issubdtype(vol.array.dtype, np.floating) and not np.all(vol.array == np.round(vol.array)):
            raise ValueError(f"{case.label} holds non-integer label values; labels must be whole numbers")
        label = labels_to_classes(vol.array, spec, case.label)
    source_dtype = np.result_type(*(v.array.dtype for v in volumes))
    return CaseVolumes(case.case_id, image, label, first.affine, first.spacing, first, source_dtype)


def _find_file(folder: Path, stem: str) -> Path | None:
    found = [folder / f"{stem}{s}" for s in (*NIFTI_SUFFIXES, *ITK_SUFFIXES) if (folder / f"{stem}{s}").is_file()]
    if len(found) > 1:
        raise ValueError(
            f"{folder} holds {len(found)} files for {stem}: {', '.join(p.name for p in found)}; "
            "keep one of them (rwkvseg does not guess which)"
        )
    return found[0] if found else None


def brats_case(folder: Path, spec: DatasetSpec, require_label: bool = True) -> CaseFiles:
    """A BraTS case folder `<case>/<case><sep><modality>.nii.gz`; ValueError naming a missing file."""
    folder = Path(folder)
    case_id = folder.name
    images = []
    for modality in spec.modalities:
        path = _find_file(folder, f"{case_id}{spec.separator}{modality}")
        if path is None:
            present = sorted(p.name for p in folder.iterdir() if is_volume_file(p))
            raise ValueError(
                f"case folder {folder} lacks modality {modality!r} "
                f"({case_id}{spec.separator}{modality}.nii.gz); found {present}. Add the file, or pick the "
                f"dataset preset / modality list that matches these names (--dataset, --modalities)"
            )
        images.append(ImageSource(path))
    label = _find_file(folder, f"{case_id}{spec.separator}{spec.seg_suffix}")
    if label is None and require_label:
        raise ValueError(
            f"case folder {folder} has no label {case_id}{spec.separator}{spec.seg_suffix}.nii.gz; "
            f"add it or run without labels (prediction only)"
        )
    return CaseFiles(case_id, tuple(images), label)


def _is_brats_folder(folder: Path, spec: DatasetSpec) -> bool:
    prefix = f"{folder.name}{spec.separator}"
    return any(p.name.startswith(prefix) and is_volume_file(p) for p in folder.iterdir())


def _channel_indices(channels: dict[str, Any], modalities: Sequence[str], path: Path) -> list[int]:
    names = {str(name).lower(): int(key) for key, name in channels.items()}
    indices = []
    for modality in modalities:
        if str(modality).isdigit():
            indices.append(int(modality))
        elif modality.lower() in names:
            indices.append(names[modality.lower()])
        else:
            raise ValueError(
                f"modality {modality!r} is not a channel of {path} (channels: {dict(channels)}); "
                f"give modalities by these names or by index"
            )
    return indices


def discover_cases(
    root: Path | str, spec: DatasetSpec, require_label: bool = True, split: str = "Tr"
) -> list[CaseFiles]:
    """All cases under root for the spec's layout, sorted by case id.

    brats: root is one case folder or any tree of case folders (HGG/LGG subfolders are fine).
    msd: root holds dataset.json, images<split>/ (4-D files) and labels<split>/.
    nnunet: root holds dataset.json, images<split>/<case>_<XXXX> files and labels<split>/.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist")
    if spec.layout == "brats":
        folders = [root] if _is_brats_folder(root, spec) else []
        folders += sorted(p for p in folders_below(root) if _is_brats_folder(p, spec))
        cases = [brats_case(f, spec, require_label) for f in folders]
    elif spec.layout == "msd":
        cases = _msd_cases(root, spec, require_label, split)
    else:
        cases = _nnunet_cases(root, spec, require_label, split)
    if not cases:
        raise ValueError(
            f"no {spec.layout} cases found under {root} for dataset {spec.name!r}; check the folder and the "
            f"dataset preset (BraTS 2023 files use '-t1n', older BraTS '_t1')"
        )
    ids = [c.case_id for c in cases]
    if len(set(ids)) != len(ids):
        raise ValueError(f"case ids under {root} are not unique: {sorted({i for i in ids if ids.count(i) > 1})}")
    return sorted(cases, key=lambda c: c.case_id)


def _msd_cases(root: Path, spec: DatasetSpec, require_label: bool, split: str) -> list[CaseFiles]:
    meta = read_json(root / "dataset.json")
    channels = _channel_indices(meta.get("modality", {}), spec.modalities, root / "dataset.json")
    cases = []
    for path in sorted((root / f"images{split}").glob("*")):
        if not is_volume_file(path):
            continue  # MSD archives carry macOS "._" resource files
        case_id = strip_suffix(path.name)
        label = _find_file(root / f"labels{split}", case_id)
        if label is None and require_label:
            raise ValueError(f"{path} has no label {root / f'labels{split}' / path.name}; add it or run without labels")
        cases.append(CaseFiles(case_id, tuple(ImageSource(path, c) for c in channels), label))
    return cases


def _nnunet_cases(root: Path, spec: DatasetSpec, require_label: bool, split: str) -> list[CaseFiles]:
    meta = read_json(root / "dataset.json")
    channels = _channel_indices(
        meta.get("channel_names") or meta.get("modality") or {}, spec.modalities, root / "dataset.json"
    )
    by_case: dict[str, dict[int, Path]] = {}
    for path in sorted((root / f"images{split}").glob("*")):
        stem = strip_suffix(path.name)
        if not is_volume_file(path) or len(stem) < 6 or stem[-5] != "_" or not stem[-4:].isdigit():
            continue
        by_case.setdefault(stem[:-5], {})[int(stem[-4:])] = path
    cases = []
    for case_id, files in sorted(by_case.items()):
        missing = [c for c in channels if c not in files]
        if missing:
            raise ValueError(
                f"case {case_id} in {root / f'images{split}'} lacks channel file(s) "
                f"{', '.join(f'{case_id}_{c:04d}' for c in missing)}; add them or drop the case"
            )
        label = _find_file(root / f"labels{split}", case_id)
        if label is None and require_label:
            raise ValueError(f"case {case_id} has no label in {root / f'labels{split}'}; add it or run without labels")
        cases.append(CaseFiles(case_id, tuple(ImageSource(files[c]) for c in channels), label))
    return cases


ORIENTATION_NOTE = (
    "nibabel axis codes of the voxel axes (i, j, k) of the training images' affines: the world direction each "
    "axis points to (LPS: i -> left, j -> posterior, k -> superior)"
)


def axcodes(affine: np.ndarray) -> str:
    """The orientation of an affine as nibabel axis codes of voxel axes (i, j, k), e.g. 'LPS' for BraTS."""
    import nibabel as nib

    return "".join(nib.aff2axcodes(np.asarray(affine, dtype=np.float64)))


def reorient(case: CaseVolumes, codes: str) -> tuple[CaseVolumes, np.ndarray]:
    """The case with its voxel axes permuted / flipped so they point as `codes` says (no resampling: exact).

    Returns the reoriented case and the nibabel orientation transform that takes an array on the new grid back
    to the case's own grid (`orient_back`). Oblique grids go to the nearest axis orientation (as nnU-Net and
    nibabel do); the affine stays exact, so world positions are unchanged.
    """
    from nibabel import orientations as nio

    own = nio.io_orientation(case.affine)
    wanted = nio.axcodes2ornt(tuple(codes))
    forward = nio.ornt_transform(own, wanted)
    back = nio.ornt_transform(wanted, own)
    if np.array_equal(forward, [[0, 1], [1, 1], [2, 1]]):  # identity: axes kept in place, unflipped
        return case, back
    ijk = np.swapaxes(case.image, 1, 3)  # [M, K, J, I] -> [M, I, J, K]
    turned = np.stack([nio.apply_orientation(channel, forward) for channel in ijk])
    affine = case.affine @ nio.inv_ornt_aff(forward, ijk.shape[1:])
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(0))  # (i, j, k)
    label = case.label
    if label is not None:
        label = np.swapaxes(nio.apply_orientation(np.swapaxes(label, 0, 2), forward), 0, 2)
    return (
        CaseVolumes(
            case.case_id,
            np.ascontiguousarray(np.swapaxes(turned, 1, 3)),
            None if label is None else np.ascontiguousarray(label),
            affine,
            tuple(float(z) for z in zooms[::-1]),
            case.reference,
            case.source_dtype,
        ),
        back,
    )


def orient_back(values: np.ndarray, back: np.ndarray) -> np.ndarray:
    """An array [K, J, I] on a reoriented grid -> the original grid (`back` from `reorient`)."""
    from nibabel import orientations as nio

    return np.ascontiguousarray(np.swapaxes(nio.apply_orientation(np.swapaxes(values, 0, 2), back), 0, 2))


def dataset_json_near(path: Path) -> Path | None:
    """The dataset.json of an MSD / nnU-Net dataset a file lies in (beside it, or one folder up: imagesTr/..)."""
    for folder in (path.parent, path.parent.parent):
        if (folder / "dataset.json").is_file():
            return folder / "dataset.json"
    return None


def json_channel_names(path: Path) -> tuple[str, ...]:
    """The channel names of an MSD (`modality`) or nnU-Net (`channel_names`) dataset.json, in channel order."""
    meta = read_json(path)
    channels = meta.get("channel_names") or meta.get("modality")
    if not channels:
        raise ValueError(f"{path} names no channels ('channel_names' or 'modality'); is it an MSD / nnU-Net file?")
    return tuple(str(channels[key]) for key in sorted(channels, key=int))


def _channel_count(path: Path) -> int:
    """Channels of an image file from its header: 1 for 3-D files, the 4th axis (or vector components) else."""
    if path.name.endswith(NIFTI_SUFFIXES):
        import nibabel as nib

        shape = nib.load(path).shape
        return int(shape[3]) if len(shape) == 4 else 1
    if path.is_dir():
        return 1
    sitk = import_sitk()
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return int(reader.GetNumberOfComponents())


def _case_prefix(stems: Sequence[str]) -> tuple[str, tuple[str, ...]]:
    """('<case>', (suffix, ...)) of per-modality file stems `<case>_<modality>` (or `-`): the longest common
    prefix that ends just before a separator in every stem."""
    prefix = stems[0]
    for stem in stems[1:]:
        n = next((i for i, (a, b) in enumerate(zip(prefix, stem, strict=False)) if a != b), min(len(prefix), len(stem)))
        prefix = prefix[:n]
    for cut in range(len(prefix), 0, -1):
        if prefix[cut - 1] not in "_-." and all(len(s) > cut and s[cut] in "_-." for s in stems):
            return prefix[:cut], tuple(s[cut + 1 :] for s in stems)
    return strip_suffix(stems[0]), tuple(stems)


def case_from_files(
    paths: Sequence[Path | str], spec: DatasetSpec, case_id: str | None = None, names: Sequence[str] = ()
) -> CaseFiles:
    """A case from explicit files, channels matched to the model's modalities by name (`channel_order`).

    One 4-D file: channel names from `names`, else from the dataset.json beside the file or one folder up (MSD
    `modality`, nnU-Net `channel_names`); a bare 4-D file without either is refused. One 3-D file per modality:
    names from `names`, else the files' suffixes after the case name (`<case>_flair.nii.gz`, nnU-Net
    `<case>_0000` channel numbers looked up in a dataset.json). The case id is the common part of the names
    (`<case>`), not the first file's name.
    """
    paths = [Path(p) for p in paths]
    names = tuple(str(n) for n in names)
    if len(paths) == 1 and _channel_count(paths[0]) > 1:
        path = paths[0]
        count = _channel_count(path)
        meta = dataset_json_near(path)
        if not names and meta is None:
            raise ValueError(
                f"{path} holds {count} channels but no dataset.json beside it says which is which; name them in "
                f"file order with --modalities (e.g. --modalities {','.join(spec.modalities)} if they are in the "
                f"model's order)"
            )
        names = names or json_channel_names(meta)
        where = f"{path} (channels named by {'--modalities' if meta is None or names else meta})"
        if len(names) != count:
            raise ValueError(f"{where}: {len(names)} names {list(names)} for {count} channels; give one per channel")
        order = channel_order(names, spec.modalities, where)
        return CaseFiles(case_id or strip_suffix(path.name), tuple(ImageSource(path, c) for c in order), None, names)
    stems = [strip_suffix(p.name) for p in paths]
    prefix, suffixes = _case_prefix(stems) if len(paths) > 1 else (stems[0], (stems[0],))
    if len(paths) == 1 and len(spec.modalities) == 1:
        return CaseFiles(case_id or prefix, (ImageSource(paths[0]),), None, names or suffixes)
    if not names:
        names = suffixes
        meta = dataset_json_near(paths[0])
        if all(n.isdigit() for n in names) and meta is not None:
            channels = json_channel_names(meta)
            names = tuple(channels[int(n)] if int(n) < len(channels) else n for n in names)
    where = f"files {', '.join(p.name for p in paths)}"
    order = channel_order(names, spec.modalities, where)
    return CaseFiles(case_id or prefix, tuple(ImageSource(paths[i]) for i in order), None, names)


def _split_folder(root: Path) -> str:
    """Ts when imagesTs/ holds images, else Tr (with a warning when imagesTs/ exists but is empty)."""
    test = root / "imagesTs"
    if test.is_dir() and any(is_volume_file(p) for p in test.iterdir()):
        return "Ts"
    if test.is_dir():
        log.warning("%s is empty: predicting the training images in %s instead", test, root / "imagesTr")
    if not (root / "imagesTr").is_dir():
        raise ValueError(f"{root} has a dataset.json but neither imagesTs/ nor imagesTr/ with images")
    return "Tr"


def dataset_cases(root: Path, spec: DatasetSpec, split: str | None = None) -> list[CaseFiles]:
    """Cases of an MSD or nnU-Net folder (labels optional), channels matched by the dataset.json's names."""
    names = json_channel_names(root / "dataset.json")
    split = split or _split_folder(root)
    order = channel_order(names, spec.modalities, f"{root / 'dataset.json'}")
    folder = root / f"images{split}"
    files = [p for p in sorted(folder.iterdir()) if is_volume_file(p)]
    nnunet = any(strip_suffix(p.name)[-5:-4] == "_" and strip_suffix(p.name)[-4:].isdigit() for p in files)
    indexed = replace(spec, layout="nnunet" if nnunet else "msd", modalities=tuple(str(i) for i in order))
    cases = _nnunet_cases(root, indexed, False, split) if nnunet else _msd_cases(root, indexed, False, split)
    if not cases:
        raise ValueError(f"{folder} holds no images; add them or point to another folder")
    return [CaseFiles(c.case_id, c.images, c.label, names) for c in cases]


def brats_cases(root: Path, spec: DatasetSpec) -> list[CaseFiles]:
    """Cases of a BraTS-style folder (or tree), whatever BraTS naming it uses, channels matched by file suffix:
    the model's own naming first, then the BraTS 2017-2021 and 2023 presets."""
    candidates = [spec] if spec.layout == "brats" else []
    candidates += [dataset_spec("brats"), dataset_spec("brats2023")]
    for source in candidates:
        try:
            order = channel_order(source.modalities, spec.modalities, f"BraTS files of {root}")
        except ValueError:
            continue
        named = replace(source, modalities=tuple(source.modalities[i] for i in order))
        folders = [root] if _is_brats_folder(root, named) else []
        folders += sorted(p for p in folders_below(root) if _is_brats_folder(p, named))
        if folders:
            return [
                CaseFiles(c.case_id, c.images, c.label, source.modalities)
                for c in (brats_case(f, named, require_label=False) for f in folders)
            ]
    return []


def dicom_cases(root: Path, spec: DatasetSpec) -> list[CaseFiles]:
    """One case per DICOM folder: root itself when it holds the series of one case, else each subfolder that
    does; series matched to the model's modalities by description or folder name (data.dicom.case_series)."""
    from .dicom import case_series, find_series

    def one(folder: Path) -> CaseFiles:
        series = case_series(folder, spec.modalities)
        images = tuple(ImageSource(s.folder, series=s) for s in series)
        found = [s for s in find_series(folder) if s in series]  # the folder's own order (by subfolder)
        return CaseFiles(folder.name, images, None, tuple(s.description or s.folder.name for s in found))

    images = [s for s in find_series(root) if s.is_image]
    subfolders = sorted({s.folder.relative_to(root).parts[0] for s in images if s.folder != root})
    if len(images) > len(spec.modalities) and len(subfolders) > 1:
        per_folder = [root / name for name in subfolders]
        if all(
            len([s for s in images if root / s.folder.relative_to(root).parts[0] == f]) >= len(spec.modalities)
            for f in per_folder
        ):
            return [one(f) for f in per_folder]
    return [one(root)]


def input_cases(inputs: Sequence[Path | str], spec: DatasetSpec, names: Sequence[str] = ()) -> list[CaseFiles]:
    """Cases to predict from command-line inputs, every channel matched by name to the model's modalities.

    Files: one 4-D file (names from --modalities or a dataset.json), or one 3-D file per modality (names from
    --modalities or the file suffixes). Folders: an MSD / nnU-Net root with its dataset.json (imagesTs/, or
    imagesTr/ with a warning when imagesTs/ is missing or empty), a BraTS case folder or tree (2017-2021 or 2023
    names), or a DICOM case folder (one series per modality) or a folder of such case folders.
    """
    paths = [Path(p) for p in inputs]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"input(s) not found: {', '.join(missing)}")
    if all(p.is_file() for p in paths):
        return [case_from_files(paths, spec, names=names)]
    if not all(p.is_dir() for p in paths):
        raise ValueError("give either case folders or image files as inputs, not a mix")
    cases = []
    for folder in paths:
        if (folder / "dataset.json").is_file():
            found = dataset_cases(folder, spec)
        else:
            found = brats_cases(folder, spec)
            if not found and not any(is_volume_file(p) for p in folder.rglob("*")):
                from .dicom import is_dicom_folder

                if is_dicom_folder(folder):
                    found = dicom_cases(folder, spec)
        if not found:
            raise ValueError(
                f"no cases found under {folder}: expected BraTS case folders (<case>/<case>_{spec.modalities[0]}"
                f".nii.gz, BraTS 2023 <case>-t1n...), an MSD / nnU-Net folder with dataset.json, or a DICOM case "
                f"folder (one series per modality); for single files pass them directly"
            )
        cases += found
    ids = [c.case_id for c in cases]
    if len(set(ids)) != len(ids):
        raise ValueError(
            f"case ids of {', '.join(map(str, paths))} are not unique: {sorted({i for i in ids if ids.count(i) > 1})}"
        )
    return cases
