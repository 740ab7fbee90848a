"""2D image/mask readers and dataset discovery for the common public layouts and plain user folders.

Decoding is Pillow's; what is ours is the pairing rules and the conversion of whatever a user brings (grayscale,
RGB, RGBA, palette, 16-bit; masks as JPEG, 0/1, 0/255 or palette) into one array convention:
images [H, W, C] float32, masks [H, W] int64 class labels.

Layouts found by `discover_pairs(root)` (searched below root, so the dataset folder or any parent works):
- generic:      images/ + masks/ (or mask/, labels/, gt/) with matching names
- Kvasir-SEG:   Kvasir-SEG/images/*.jpg + Kvasir-SEG/masks/*.jpg
- CVC-ClinicDB: PNG/Original/<id>.png + PNG/Ground Truth/<id>.png (also TIF/)
- BUSI:         data/<benign|malignant>/images/<x>.png + mask/<x>_mask.png, <x>_mask_1.png ... (union)
- ISIC 2017/18: ISIC_x.jpg + ISIC_x_segmentation.png (train/ val/ folders, or the official
                ISIC2018_Task1-2_Training_Input + ISIC2018_Task1_Training_GroundTruth folders)
- PH2:          images/IMDxxx.jpg + masks/IMDxxx_lesion.png (+ labels.csv)
A mask matches an image when its stem is the image's stem, optionally followed by one of MASK_SUFFIXES and an
optional `_<n>` (several masks of one image are merged). Each image/mask folder pair is a group named by its
path below root (e.g. "benign", "train"); groups give image-level labels and official subsets.
"""

from __future__ import annotations

import csv
import logging
import os
import re
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..files import folders_below

log = logging.getLogger(__name__)

MAX_PIXELS = 2**26  # 67 MP (8192^2): larger headers are refused before decoding (a bomb, or not a 2D scan)
EXIF_ORIENTATION = 0x0112
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")
MASK_SUFFIXES = ("_mask", "_segmentation", "_lesion", "_gt", "_label", "_seg", "_Segmentation")
# (image folder, mask folder) names that sit side by side, most specific first.
FOLDER_PAIRS = (
    ("images", "masks"),
    ("images", "mask"),
    ("images", "labels"),
    ("images", "gt"),
    ("image", "mask"),
    ("imgs", "masks"),
    ("Original", "Ground Truth"),
    ("ISIC2018_Task1-2_Training_Input", "ISIC2018_Task1_Training_GroundTruth"),
    ("ISIC2018_Task1-2_Validation_Input", "ISIC2018_Task1_Validation_GroundTruth"),
    ("ISIC2018_Task1-2_Test_Input", "ISIC2018_Task1_Test_GroundTruth"),
    ("ISIC-2017_Training_Data", "ISIC-2017_Training_Part1_GroundTruth"),
    ("ISIC-2017_Validation_Data", "ISIC-2017_Validation_Part1_GroundTruth"),
    ("ISIC-2017_Test_v2_Data", "ISIC-2017_Test_v2_Part1_GroundTruth"),
)
# Shipped inside image folders by the official releases (ISIC 2018: LICENSE.txt, ATTRIBUTION.txt) or left by
# file browsers; skipped quietly. Any other non-image file is an error unless skip_non_images.
COMPANION_FILES = re.compile(r"(?i)^(license|licence|attribution|readme)(\.\w+)?$|^(thumbs\.db|desktop\.ini)$")
SUBSET_NAMES = ("train", "training", "val", "valid", "validation", "test", "testing")
NORMALIZATIONS = ("auto", "dtype", "minmax", "zscore")
_MASK_RE = re.compile("^(?P<stem>.+)(?:" + "|".join(map(re.escape, MASK_SUFFIXES)) + r")(?:_\d+)?$")


@dataclass(frozen=True)
class Sample2D:
    """One image and the mask files that make its ground truth (several are merged; none: unlabelled)."""

    case: str
    image: Path
    masks: tuple[Path, ...] = ()
    group: str = ""
    label: str | None = None


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _visible_files(folder: Path) -> list[Path]:
    """Files of a folder, without hidden files and the companions datasets ship beside their images."""
    broken = [p for p in folder.iterdir() if p.is_symlink() and not p.exists()]
    if broken:
        raise ValueError(f"{broken[0]} is a broken link (to {os.readlink(broken[0])}); remove it or restore its target")
    return sorted(
        p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and not COMPANION_FILES.match(p.name)
    )


def image_files(folder: Path, skip_non_images: bool = False) -> list[Path]:
    """Image files of one folder, sorted; other files are an error unless skip_non_images (then a warning)."""
    files = _visible_files(folder)
    others = [p.name for p in files if not is_image_file(p)]
    if others:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        if not skip_non_images:
            raise ValueError(
                f"{folder} holds files that are not images ({shown}); move them out of the folder "
                f"or pass --skip-non-images (image types: {', '.join(IMAGE_EXTENSIONS)})"
            )
        log.warning("skipping %d non-image files in %s: %s", len(others), folder, shown)
    images = [p for p in files if is_image_file(p)]
    if not images:
        raise ValueError(f"{folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}); point to the folder with them")
    return images


def list_inputs(path: str | Path, skip_non_images: bool = False) -> list[Path]:
    """A single image file, or the images of a folder (not recursive)."""
    path = Path(path)
    if path.is_file():
        if not is_image_file(path):
            raise ValueError(f"{path} is not an image file ({', '.join(IMAGE_EXTENSIONS)})")
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist; give an image file or a folder of images")
    return image_files(path, skip_non_images)


def pair_folder(
    image_dir: Path, mask_dir: Path, group: str = "", skip_non_images: bool = False, allow_missing: bool = False
) -> list[Sample2D]:
    """Match every image of image_dir with its mask file(s) in mask_dir."""
    images = image_files(image_dir, skip_non_images)
    stems = {p.stem for p in images}
    by_stem: dict[str, list[Path]] = {}
    orphans = []
    for mask in image_files(mask_dir, skip_non_images):
        owner = _mask_owner(mask.stem, stems)
        if owner is None:
            orphans.append(mask.name)
        else:
            by_stem.setdefault(owner, []).append(mask)
    samples, missing = [], []
    for image in images:
        masks = tuple(sorted(by_stem.get(image.stem, ())))
        if not masks:
            missing.append(image.name)
        case = f"{group}/{image.stem}" if group else image.stem
        samples.append(Sample2D(case, image, masks, group))
    if missing and not allow_missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(
            f"no mask in {mask_dir} for {len(missing)} image(s) of {image_dir}: {shown}; add the masks "
            f"(same name, optionally with a suffix {', '.join(MASK_SUFFIXES)}) or move those images out"
        )
    if orphans:
        log.warning("%d masks in %s have no image and are ignored: %s", len(orphans), mask_dir, orphans[:5])
    return samples


def _common_parts(paths: Sequence[Path]) -> list[str]:
    parts = [p.parts for p in paths]
    common = []
    for level in zip(*parts, strict=False):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return common


def strip_mask_suffix(mask_stem: str) -> str | None:
    """`x_segmentation` / `x_mask_1` -> `x`; None when the stem has no known mask suffix."""
    match = _MASK_RE.match(mask_stem)
    return match["stem"] if match else None


def _mask_owner(mask_stem: str, image_stems: set[str]) -> str | None:
    """The image stem a mask belongs to: the same stem, or the stem + a known suffix + an optional _<n>."""
    if mask_stem in image_stems:
        return mask_stem
    stem = strip_mask_suffix(mask_stem)
    return stem if stem in image_stems else None


def _read_labels_csv(path: Path) -> dict[str, str]:
    """Image-level labels from a two-column CSV (name, label), e.g. PH2's labels.csv."""
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows or len(rows[0]) < 2:
        return {}
    return {Path(r[0]).stem: r[1] for r in rows[1:] if len(r) >= 2}


def discover_pairs(root: str | Path, skip_non_images: bool = False) -> list[Sample2D]:
    """Every (image, masks) pair below root, in a stable order; see the module docstring for the layouts."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist")
    found: list[tuple[Path, Path]] = []
    for folder in sorted([root, *folders_below(root)]):
        if any(folder.is_relative_to(img) or folder.is_relative_to(msk) for img, msk in found):
            continue
        for image_name, mask_name in FOLDER_PAIRS:
            if (folder / image_name).is_dir() and (folder / mask_name).is_dir():
                found.append((folder / image_name, folder / mask_name))
                break
    if not found:
        pairs = ", ".join(f"{a}/ + {b}/" for a, b in FOLDER_PAIRS[:7])
        raise ValueError(f"no image/mask folder pair found below {root}; expected one of: {pairs}")
    # Groups are named below the folders' common parent: BUSI's data/benign -> "benign".
    parents = [img.parent for img, _ in found]
    base = parents[0] if len(parents) == 1 else Path(*_common_parts(parents))
    several = len(found) > 1
    samples: list[Sample2D] = []
    for image_dir, mask_dir in found:
        group = image_dir.parent.relative_to(base).as_posix() if several else ""
        labels_csv = image_dir.parent / "labels.csv"
        labels = _read_labels_csv(labels_csv) if labels_csv.is_file() else {}
        # A group that is an official subset (train/val/test) is not an image label.
        group_label = group if several and group.lower() not in SUBSET_NAMES else None
        for s in pair_folder(image_dir, mask_dir, group, skip_non_images):
            samples.append(Sample2D(s.case, s.image, s.masks, group, labels.get(s.image.stem, group_label)))
    cases = [s.case for s in samples]
    if len(set(cases)) != len(cases):
        dup = sorted(c for c, n in Counter(cases).items() if n > 1)[:5]
        raise ValueError(f"image names repeat below {root} ({dup}); rename them so every image has a unique name")
    return samples


def _check_size(img: Image.Image, path: Path, what: str) -> None:
    """Refuse a header that claims more pixels than any 2D scan has, before a byte of it is decoded."""
    if img.width * img.height > MAX_PIXELS:
        raise ValueError(
            f"{what} {path} claims {img.width}x{img.height} pixels, above the limit of {MAX_PIXELS:,} "
            "(a damaged or hostile file, or a slide too large to segment whole); downsize or tile it"
        )


def _open_header(path: Path, what: str) -> Image.Image:
    """Image.open (the header only) with the size checked; Pillow's own bomb limits become the same message."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, by our own limit
            img = Image.open(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist") from None
    except Image.DecompressionBombError as err:
        raise ValueError(f"{what} {path} claims too many pixels ({err}); downsize or tile it") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ValueError(
            f"cannot read {what} {path} ({err}); the file is truncated or not an image: re-export it or remove it"
        ) from None
    try:
        _check_size(img, path, what)
    except ValueError:
        img.close()
        raise
    return img


def _open(path: Path, what: str) -> Image.Image:
    """The decoded image, turned upright as its EXIF orientation says (as viewers show it)."""
    with _open_header(path, what) as img:
        try:
            img.load()
            if img.getexif().get(EXIF_ORIENTATION, 1) != 1:
                img = ImageOps.exif_transpose(img)
            return img
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise ValueError(
                f"cannot read {what} {path} ({err}); the file is truncated or not an image: re-export it or remove it"
            ) from None


def _pixels(img: Image.Image) -> np.ndarray:
    """[H, W, C] in the file's own dtype; palette images expand to their colours."""
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        img = img.convert("RGB")
    elif img.mode == "1":
        img = img.convert("L")
    elif img.mode.startswith("I;16"):
        img = img.convert("I")  # uint16 with any byte order -> int32, values unchanged
    array = np.asarray(img)
    if array.ndim == 2:
        array = array[:, :, None]  # [H, W] -> [H, W, 1]
    if img.mode == "I" and array.size and array.min() >= 0 and array.max() <= 65535:
        array = array.astype(np.uint16)
    return array


def adapt_channels(array: np.ndarray, channels: int, path: Path | str) -> np.ndarray:
    """[H, W, c] -> [H, W, channels] where that is lossless or conventional, else a clear error."""
    c = array.shape[2]
    if c == channels:
        return array
    if c in (2, 4) and c - 1 == channels:  # drop alpha
        return array[:, :, :channels]
    if c in (1, 2) and channels == 3:  # grayscale (+ alpha) shown as RGB
        return np.repeat(array[:, :, :1], 3, axis=2)
    if (
        c in (3, 4)
        and channels == 1
        and np.array_equal(array[:, :, 0], array[:, :, 1])
        and np.array_equal(array[:, :, 0], array[:, :, 2])
    ):
        return array[:, :, :1]  # grayscale stored as RGB
    raise ValueError(
        f"image {path} has {c} channels, the model expects {channels}; convert the images or train a model "
        f"with in_channels={min(c, 3) if c != 2 else 1}"
    )


def normalize(array: np.ndarray, method: str = "auto") -> np.ndarray:
    """[H, W, C] any dtype -> float32.

    auto: 8-bit / 255; wider types: per-image 0.5-99.5 percentile min-max (16-bit scans rarely use the full range).
    dtype: divide by the dtype's maximum. minmax: per-image min-max. zscore: per-image, per-channel.
    """
    if method not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {method!r}; choose one of {', '.join(NORMALIZATIONS)}")
    x = array.astype(np.float32)
    if method == "auto":
        if array.dtype == np.uint8:
            return x / 255.0
        lo, hi = (float(v) for v in np.percentile(x, (0.5, 99.5)))
        return np.clip((x - lo) / max(hi - lo, 1e-6), 0.0, 1.0, dtype=np.float32)
    if method == "dtype":
        top = float(np.iinfo(array.dtype).max) if np.issubdtype(array.dtype, np.integer) else 1.0
        return x / top
    if method == "minmax":
        lo, hi = float(x.min()), float(x.max())
        return (x - lo) / max(hi - lo, 1e-6)
    mean = x.mean(axis=(0, 1), keepdims=True)
    std = x.std(axis=(0, 1), keepdims=True)
    return (x - mean) / np.maximum(std, 1e-6)


def read_pixels(path: str | Path, channels: int | None = None) -> np.ndarray:
    """An image file as [H, W, C] in its own dtype (uint8 for 8-bit files), C = channels when given."""
    path = Path(path)
    array = _pixels(_open(path, "image"))
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise ValueError(f"image {path} holds {bad} NaN / infinite pixel value(s); repair or re-export the image")
    return adapt_channels(array, channels, path) if channels is not None else array


def read_image(path: str | Path, channels: int | None = None, normalization: str = "auto") -> np.ndarray:
    """An image file as float32 [H, W, C] (C = channels when given)."""
    return normalize(read_pixels(path, channels), normalization)


def image_size(path: str | Path) -> tuple[int, int]:
    """(H, W) as displayed (EXIF orientation applied) without decoding the pixels."""
    with _open_header(Path(path), "image") as img:
        try:
            turned = img.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8)  # shown rotated by 90 degrees
        except (OSError, SyntaxError, ValueError) as err:  # EXIF after a truncated image's data
            raise ValueError(
                f"cannot read image {path} ({err}); the file is truncated or not an image: re-export it or remove it"
            ) from None
        return (img.width, img.height) if turned else (img.height, img.width)


def read_mask(path: str | Path, num_classes: int = 1) -> np.ndarray:
    """A mask file as int64 labels [H, W].

    Binary masks (num_classes 1, or 2 for non-palette files): 0/1 as is; 0/255 and JPEG masks with ringing are
    thresholded at half the range (128); colour masks use their brightest channel; label values like {0, 1, 2}
    are an error (they are not a binary mask). Multi-class: palette indices or gray values are the labels and
    must be < num_classes.
    """
    path = Path(path)
    img = _open(path, "mask")
    palette = img.mode == "P"
    if palette:
        labels = np.asarray(img).astype(np.int64)  # palette index is the class
    else:
        array = _pixels(img)
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            raise ValueError(f"mask {path} holds NaN / infinite values; save the mask as 0/255 or label values")
        if array.shape[2] in (2, 4):
            colour, alpha = array[:, :, :-1], array[:, :, -1]
            # the lesion drawn only as transparency on a blank layer: the alpha channel is the mask
            array = alpha[:, :, None] if colour.min() == colour.max() and alpha.min() != alpha.max() else colour
        labels = array.max(axis=2).astype(np.int64)
    if num_classes == 1:
        top = int(labels.max()) if labels.size else 0
        if top <= 1:
            return labels
        if palette or top < 128:
            # {0, 1, 2} or a palette: class labels, not an intensity to threshold.
            raise ValueError(
                f"mask {path} holds class labels {np.unique(labels)[:10].tolist()} but the task is binary "
                "(num_classes=1); set num_classes to the number of classes, or save 0/255 masks"
            )
        _refuse_pictures(labels, top, path)
        return (labels >= _threshold(labels, top)).astype(np.int64)
    if num_classes == 2 and not palette and labels.size and labels.max() > 1:
        labels = (labels >= _threshold(labels, int(labels.max()))).astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        values = np.unique(labels)[:10].tolist()
        raise ValueError(
            f"mask {path} holds values {values}, expected class labels 0..{num_classes - 1}; "
            "store masks as label images (palette or gray values = class index)"
        )
    return labels


def _threshold(labels: np.ndarray, top: int) -> int:
    """Foreground from: 8-bit 128 (half the range; JPEG ringing stays out); wider masks half their maximum, so
    16-bit 0/1000 and 0/65535 masks both read as drawn."""
    return 128 if top <= 255 else (top + 1) // 2


def _refuse_pictures(labels: np.ndarray, top: int, path: Path) -> None:
    """A binary mask is (nearly) two-valued; a photo or an overlay drawn on one has many mid-range values."""
    mid = ((labels > top // 4) & (labels < top - top // 4)).mean()
    if mid > 0.1 and len(np.unique(labels)) > 16:
        raise ValueError(
            f"mask {path} looks like a picture or an overlay, not a mask ({mid:.0%} of its pixels are mid-range); "
            "give the mask itself (0/255, or 0/1)"
        )


def check_pairs(samples: Sequence[Sample2D]) -> None:
    """Fail before training, not in epoch 12: every file opens and every mask has its image's size.

    Reads headers only (fast); a file truncated after its header is still caught when it is decoded.
    """
    problems = []
    for s in samples:
        try:
            size = image_size(s.image)
            for mask in s.masks:
                if image_size(mask) != size:
                    h, w = image_size(mask)
                    problems.append(f"mask {mask} is {w}x{h} (WxH) but image {s.image} is {size[1]}x{size[0]}")
        except (ValueError, FileNotFoundError) as err:
            problems.append(str(err))
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ValueError(
            f"{len(problems)} image/mask problem(s){more}:\n  "
            + "\n  ".join(problems[:5])
            + "\nfix or remove these files (resize masks to their images with nearest-neighbour interpolation)"
        )


def read_sample(
    sample: Sample2D, channels: int, num_classes: int = 1, normalization: str = "auto"
) -> tuple[np.ndarray, np.ndarray]:
    """(image [H, W, C] float32, mask [H, W] int64); the union of several mask files; sizes are checked."""
    image = read_image(sample.image, channels, normalization)
    if not sample.masks:
        raise ValueError(f"image {sample.image} has no mask; add one or leave the image out of training")
    mask = None
    for path in sample.masks:
        size = image_size(path)  # from the header: a size mismatch is named before the mask's content
        if size != image.shape[:2]:
            raise ValueError(
                f"mask {path} is {size[1]}x{size[0]} (WxH) but image {sample.image} is "
                f"{image.shape[1]}x{image.shape[0]}; resize the mask to the image (nearest) or remove the pair"
            )
        m = read_mask(path, num_classes)
        mask = m if mask is None else np.maximum(mask, m)  # union of lesion masks
    return image, mask


def groups(samples: Sequence[Sample2D]) -> list[str]:
    """Group names in first-seen order (e.g. ["train", "val"], ["benign", "malignant"])."""
    return list(dict.fromkeys(s.group for s in samples))
