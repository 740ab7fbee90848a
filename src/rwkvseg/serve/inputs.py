"""Checks of what clients upload, before any of it is decoded in full: images, NIfTI volumes and zips of them.

Every refusal is a RequestError with an HTTP status and a message that says what to send instead.
"""

from __future__ import annotations

import io
import shutil
import stat
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from PIL import Image, UnidentifiedImageError

IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
ZIP_MAGIC = b"PK\x03\x04"
MAX_ZIP_MEMBERS = 64


class RequestError(Exception):
    """A request the service refuses: status is the HTTP code, message what to do about it."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


@dataclass(frozen=True)
class Upload:
    filename: str
    data: bytes


def check_image(upload: Upload, max_pixels: int) -> tuple[int, int]:
    """(H, W) of an image upload, from its header only; refuses non-images and decompression bombs."""
    if not upload.data:
        raise RequestError(400, f"the upload {upload.filename!r} is empty; send a PNG or JPEG image in field 'file'")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(upload.data), formats=IMAGE_FORMATS) as img:
                width, height = img.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise RequestError(413, f"the image {upload.filename!r} is too large to decode ({err})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise RequestError(
            415,
            f"the upload {upload.filename!r} is not an image this service reads; send "
            f"{', '.join(f.lower() for f in IMAGE_FORMATS)} (2D models) or NIfTI files / a zip of them (3D models)",
        ) from None
    if width * height > max_pixels or width < 1 or height < 1:
        raise RequestError(
            413, f"the image is {width}x{height} pixels; this service takes at most {max_pixels} pixels, downscale it"
        )
    return height, width


def is_nifti_name(name: str) -> bool:
    return name.lower().endswith(NIFTI_SUFFIXES)


def _safe_member_name(info: zipfile.ZipInfo) -> str | None:
    """The file name to extract a member to, None for members to skip; refuses links and escaping paths."""
    name = info.filename.replace("\\", "/")
    parts = PurePosixPath(name).parts
    if name.startswith("/") or ".." in parts or (parts and ":" in parts[0]):
        raise RequestError(400, f"the zip holds an unsafe path {info.filename!r}; zip the case's files without paths")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise RequestError(400, f"the zip holds a symbolic link {info.filename!r}; zip the files themselves")
    base = parts[-1] if parts else ""
    if info.is_dir() or not base or base.startswith(".") or "__MACOSX" in parts or not is_nifti_name(base):
        return None
    return base


def unpack_zip(upload: Upload, dest: Path, max_bytes: int) -> list[Path]:
    """The NIfTI files of a zip, written flat into dest; the total written is capped at max_bytes."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(upload.data))
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise RequestError(400, f"the upload {upload.filename!r} is not a readable zip ({err})") from None
    with archive:
        infos = archive.infolist()
        if len(infos) > MAX_ZIP_MEMBERS:
            raise RequestError(
                400, f"the zip holds {len(infos)} entries; send only the case's files (one per modality)"
            )
        names = [(info, _safe_member_name(info)) for info in infos]
        wanted = [(info, name) for info, name in names if name is not None]
        if sum(info.file_size for info, _ in wanted) > max_bytes:
            raise RequestError(413, f"the zip expands to more than {max_bytes} bytes; send a smaller case")
        seen: set[str] = set()
        paths, written = [], 0
        for info, name in wanted:
            if name in seen:
                raise RequestError(400, f"the zip holds two files named {name!r}; send one file per modality")
            seen.add(name)
            path = dest / name
            try:
                with archive.open(info) as src, path.open("wb") as out:
                    # the sizes in a zip's directory can lie: count what is really written
                    while chunk := src.read(2**20):
                        written += len(chunk)
                        if written > max_bytes:
                            raise RequestError(
                                413, f"the zip expands to more than {max_bytes} bytes; send a smaller case"
                            )
                        out.write(chunk)
            except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, RuntimeError) as err:
                raise RequestError(400, f"cannot extract {info.filename!r} from the zip ({err})") from None
            paths.append(path)
    return paths


def save_uploads(uploads: Sequence[Upload], dest: Path, max_bytes: int) -> list[Path]:
    """Write a 3D request's files into dest: a zip is unpacked, NIfTI files are kept under their own names."""
    if len(uploads) == 1 and uploads[0].data[:4] == ZIP_MAGIC:
        return unpack_zip(uploads[0], dest, max_bytes)
    paths = []
    for upload in uploads:
        name = PurePosixPath(upload.filename.replace("\\", "/")).name
        if upload.data[:4] == ZIP_MAGIC:
            raise RequestError(400, "send one zip alone, or NIfTI files alone, not a mix")
        if not is_nifti_name(name) or name.startswith("."):
            raise RequestError(
                415, f"{upload.filename!r} is not a NIfTI file (.nii.gz / .nii); 3D models take NIfTI files or a zip"
            )
        path = dest / name
        if path.exists():
            raise RequestError(400, f"two uploads are named {name!r}; send one file per modality")
        path.write_bytes(upload.data)
        paths.append(path)
    return paths


def modality_of(name: str, modalities: Sequence[str], separator: str) -> str | None:
    stem = name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else name[: -len(".nii")]
    stem = stem.lower()
    matches = [m for m in modalities if stem == m.lower() or stem.endswith(f"{separator}{m}".lower())]
    return max(matches, key=len) if matches else None


def assign_modalities(paths: Sequence[Path], modalities: Sequence[str], separator: str) -> list[Path]:
    """The files in the model's modality order, matched by their `<case><sep><modality>` names."""
    example = ", ".join(f"<case>{separator}{m}.nii.gz" for m in modalities)
    if len(modalities) == 1 and len(paths) == 1:
        return list(paths)
    if not paths:
        raise RequestError(422, f"no NIfTI file in the upload; send the case's modalities: {example}")
    found: dict[str, Path] = {}
    unknown = []
    for path in paths:
        modality = modality_of(path.name, modalities, separator)
        if modality is None:
            unknown.append(path.name)
        elif modality in found:
            raise RequestError(422, f"two files for modality {modality!r} ({found[modality].name}, {path.name})")
        else:
            found[modality] = path
    missing = [m for m in modalities if m not in found]
    if unknown or missing:
        hint = (
            " A single 4-D NIfTI is refused: its channel order cannot be checked."
            if len(paths) == 1 and not found
            else ""
        )
        raise RequestError(
            422,
            f"the model needs one file per modality, named {example}; missing {missing}, unrecognised {unknown}.{hint}",
        )
    return [found[m] for m in modalities]


def check_volumes(paths: Sequence[Path], max_voxels: int) -> None:
    """Read each NIfTI header (not the data) and refuse what is not one 3-D volume of a bounded size."""
    import nibabel as nib

    for path in paths:
        try:
            image = nib.load(path)
            shape = tuple(int(s) for s in image.shape)
            kind = image.get_data_dtype().kind
        except Exception as err:  # nibabel raises many types for bad headers; all mean "not a NIfTI we read"
            raise RequestError(400, f"{path.name} is not a readable NIfTI file ({type(err).__name__}: {err})") from None
        if kind not in "buif":
            raise RequestError(422, f"{path.name} stores {image.get_data_dtype()} voxels; send real-valued intensities")
        if len(shape) == 4 and shape[3] == 1:
            shape = shape[:3]
        if len(shape) != 3:
            raise RequestError(
                422,
                f"{path.name} has shape {shape}; send one 3-D volume per modality "
                "(a 4-D file's channel order cannot be checked)",
            )
        voxels = shape[0] * shape[1] * shape[2]
        if voxels > max_voxels or min(shape) < 1:
            raise RequestError(
                413, f"{path.name} has {shape} = {voxels} voxels; this service takes at most {max_voxels}"
            )


def clear(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
