from pathlib import Path

import numpy as np
import pytest

sitk = pytest.importorskip("SimpleITK")
pydicom = pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")

from rwkvseg.data.dicom import (  # noqa: E402
    SegmentSpec,
    case_series,
    find_series,
    is_dicom_folder,
    modality_of,
    read_dicom_series,
    segments_for,
    write_dicom_seg,
)
from rwkvseg.data.specs import dataset_spec  # noqa: E402
from rwkvseg.data.volumes import read_volume  # noqa: E402

SIZE = (11, 13, 7)  # (i, j, k): columns, rows, slices
SPACING = (0.9, 1.1, 2.0)
ORIGIN = (12.5, -30.25, 41.0)
# columns of the direction matrix (LPS): i -> +P, j -> -S (down), k -> -L; a sagittal-like stack, right-handed
SAGITTAL = (0, 0, -1, 1, 0, 0, 0, -1, 0)
STUDY = "1.2.826.0.1.3680043.8.498.1"
FRAME = "1.2.826.0.1.3680043.8.498.2"


def make_image(seed=0, size=SIZE, direction=SAGITTAL) -> "sitk.Image":
    array = np.random.default_rng(seed).integers(-200, 2000, size=size[::-1]).astype(np.int16)  # [K, J, I]
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    image.SetDirection(direction)
    return image


def write_series(
    image,
    folder: Path,
    description: str,
    series_uid: str,
    sop_class="1.2.840.10008.5.1.4.1.1.4",
    prefix="IM",
    thickness=True,
) -> Path:
    """One MR slice per file, with the tags a scanner writes for a 3-D stack (after SimpleITK's DICOM example)."""
    folder.mkdir(parents=True, exist_ok=True)
    d = image.GetDirection()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        slice_ = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0016": sop_class,
            "0008|0018": f"{series_uid}.{k + 1}",
            "0008|0060": "MR",
            "0008|103e": description,
            "0010|0020": "case01",
            "0020|000d": STUDY,
            "0020|000e": series_uid,
            "0020|0052": FRAME,
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in position),
            "0020|0037": "\\".join(str(v) for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
        }
        if thickness:  # often empty in exports: write_case leaves it out
            tags["0018|0050"] = str(SPACING[2])
        for tag, value in tags.items():
            slice_.SetMetaData(tag, value)
        # files named in reverse slice order, so the reader must sort by position, not by name
        writer.SetFileName(str(folder / f"{prefix}{image.GetDepth() - k:04d}.dcm"))
        writer.Execute(slice_)
    return folder


def write_nifti(image, path: Path) -> Path:
    sitk.WriteImage(image, str(path))
    return path


def label_map(size=SIZE) -> np.ndarray:
    labels = np.zeros(size[::-1], dtype=np.uint8)  # [K, J, I]
    labels[1:6, 3:10, 2:9] = 2
    labels[2:5, 4:8, 3:7] = 1
    labels[3, 5:7, 4:6] = 4
    return labels


@pytest.mark.parametrize(
    "direction",
    [(1, 0, 0, 0, 1, 0, 0, 0, 1), SAGITTAL, (0, 1, 0, 0, 0, -1, -1, 0, 0)],
    ids=["axial", "sagittal", "coronal-permuted"],
)
def test_series_reads_like_the_same_image_as_nifti(tmp_path, direction):
    image = make_image(direction=direction)
    folder = write_series(image, tmp_path / "dicom", "T1", "1.2.826.0.1.3680043.8.498.10")
    dicom = read_dicom_series(folder)
    nifti = read_volume(write_nifti(image, tmp_path / "t1.nii.gz"))
    np.testing.assert_array_equal(dicom.array, nifti.array)
    assert dicom.array.shape == SIZE[::-1] and dicom.array.dtype == np.int16
    assert dicom.spacing == pytest.approx(nifti.spacing)
    assert dicom.spacing == pytest.approx(SPACING[::-1])
    np.testing.assert_allclose(dicom.affine, nifti.affine, atol=1e-5)
    np.testing.assert_allclose(dicom.reference.GetOrigin(), ORIGIN, atol=1e-5)
    np.testing.assert_allclose(dicom.reference.GetDirection(), direction, atol=1e-6)
    assert dicom.path == folder


def test_left_handed_grid_comes_back_slice_reversed_at_the_same_world_positions(tmp_path):
    # DICOM has no slice direction of its own: k runs along row x column, so a flipped k axis is read reversed
    flipped = (1, 0, 0, 0, 1, 0, 0, 0, -1)
    image = make_image(direction=flipped)
    dicom = read_dicom_series(write_series(image, tmp_path / "dicom", "T1", "1.2.826.0.1.3680043.8.498.11"))
    nifti = read_volume(write_nifti(image, tmp_path / "t1.nii.gz"))
    np.testing.assert_array_equal(dicom.array, nifti.array[::-1])
    last = SIZE[2] - 1
    for index in [(0, 0, 0), (3, 5, 2), (10, 12, 6)]:  # (i, j, k) voxel centres
        i, j, k = index
        world_dicom = dicom.affine @ (i, j, k, 1)
        world_nifti = nifti.affine @ (i, j, last - k, 1)
        np.testing.assert_allclose(world_dicom, world_nifti, atol=1e-5)


@pytest.mark.parametrize(
    ("text", "modality"),
    [
        ("AX T1 pre", "t1"),
        ("T1 precontrast", "t1"),
        ("T1 w/o contrast", "t1"),
        ("T1 post-contrast", "t1ce"),
        ("t1_mprage_sag_p2_iso", "t1"),
        ("T1w", "t1"),
        ("t1n", "t1"),
        ("AX T1 POST GD", "t1ce"),
        ("T1+C", "t1ce"),
        ("t1ce", "t1ce"),
        ("t1c", "t1ce"),
        ("T1Gd", "t1ce"),
        ("t2_tse_tra", "t2"),
        ("T2w", "t2"),
        ("T2 FLAIR", "flair"),
        ("t2f", "flair"),
        ("localizer", None),
        ("DWI b1000", None),
    ],
)
def test_modality_names_from_descriptions_and_channel_names(text, modality):
    assert modality_of(text) == modality


def write_case(root: Path, descriptions=("AX T1 pre", "AX T1 POST GD", "T2 TSE", "T2 FLAIR")) -> list:
    """Series of one case, all files in one flat folder (as a PACS export often leaves them)."""
    images = []
    for index, description in enumerate(descriptions):
        image = make_image(seed=index)
        write_series(
            image, root, description, f"1.2.826.0.1.3680043.8.498.2{index}", prefix=f"S{index}_", thickness=False
        )
        images.append(image)
    return images


def test_four_series_of_a_case_folder_map_to_the_model_modalities(tmp_path):
    images = write_case(tmp_path / "case01")
    localizer = make_image(seed=9, size=(11, 13, 3), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    write_series(localizer, tmp_path / "case01" / "loc", "localizer", "1.2.826.0.1.3680043.8.498.29")
    (tmp_path / "case01" / "notes.txt").write_text("not DICOM")
    assert is_dicom_folder(tmp_path / "case01") and not is_dicom_folder(tmp_path / "case01" / "missing")
    assert len(find_series(tmp_path / "case01")) == 5
    for names in [("t1", "t1ce", "t2", "flair"), ("t1n", "t1c", "t2w", "t2f"), ("flair", "t1", "t1ce", "t2")]:
        series = case_series(tmp_path / "case01", names)
        assert [s.modality for s in series] == [modality_of(n) for n in names]
    series = case_series(tmp_path / "case01", ("t1", "t1ce", "t2", "flair"))
    assert [s.description for s in series] == ["AX T1 pre", "AX T1 POST GD", "T2 TSE", "T2 FLAIR"]
    for image, one in zip(images, series, strict=True):
        np.testing.assert_array_equal(read_dicom_series(one).array, sitk.GetArrayFromImage(image))


def test_series_without_description_take_their_folder_name(tmp_path):
    case = tmp_path / "case02"
    for index, name in enumerate(("t1", "t1ce", "t2", "flair")):
        write_series(make_image(seed=index), case / name, "", f"1.2.826.0.1.3680043.8.498.3{index}")
    series = case_series(case, ("t1c", "t2f", "t1n", "t2w"))
    assert [s.folder.name for s in series] == ["t1ce", "flair", "t1", "t2"]
    assert all(s.description == "" for s in series)


def test_a_series_chosen_by_uid_where_two_match(tmp_path):
    write_case(tmp_path / "twice", descriptions=("T1", "T1 repeat", "T2", "FLAIR"))
    second = "1.2.826.0.1.3680043.8.498.21"
    series = case_series(tmp_path / "twice", ("t1", "t2"), chosen={"t1": second})
    assert [s.series_uid for s in series] == [second, "1.2.826.0.1.3680043.8.498.22"]
    with pytest.raises(ValueError, match=r"twice: no image series has SeriesInstanceUID 9\.9 \(t1\)"):
        case_series(tmp_path / "twice", ("t1",), chosen={"t1": "9.9"})


def test_bad_folders_get_one_clear_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"empty holds no DICOM files; point to a folder with the \.dcm files"):
        find_series(empty)

    write_case(tmp_path / "twice", descriptions=("T1", "T1", "T2", "FLAIR"))
    with pytest.raises(ValueError, match=r"twice: 2 series read as modality 't1': .*keep one series per modality"):
        case_series(tmp_path / "twice", ("t1", "t2", "flair"))

    write_case(tmp_path / "three", descriptions=("T1", "T2", "FLAIR"))
    with pytest.raises(ValueError, match=r"three: no DICOM series for modality 't1ce'; series found"):
        case_series(tmp_path / "three", ("t1", "t1ce", "t2", "flair"))
    with pytest.raises(ValueError, match=r"three holds 3 image series .* point to one series' folder"):
        read_dicom_series(tmp_path / "three")

    gap = write_series(make_image(), tmp_path / "gap", "T1", "1.2.826.0.1.3680043.8.498.40")
    (gap / "IM0004.dcm").unlink()
    with pytest.raises(ValueError, match=r"gap .*slice spacing is uneven \(4\.000 mm .* slices are missing"):
        read_dicom_series(gap)

    repeated = write_series(make_image(), tmp_path / "repeated", "T1", "1.2.826.0.1.3680043.8.498.43")
    copy = pydicom.dcmread(repeated / "IM0003.dcm")
    copy.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.43.99"
    copy.save_as(repeated / "IM0099.dcm")
    with pytest.raises(ValueError, match=r"repeated .*uneven \(0\.000 mm .* remove the duplicates"):
        read_dicom_series(repeated)

    tilted = write_series(make_image(), tmp_path / "tilted", "T1", "1.2.826.0.1.3680043.8.498.44")
    shifted = pydicom.dcmread(tilted / "IM0002.dcm")
    x, y, z = (float(v) for v in shifted.ImagePositionPatient)
    shifted.ImagePositionPatient = [x, y + 0.5, z]  # along a row, in the slice's plane
    shifted.save_as(tilted / "IM0002.dcm")
    with pytest.raises(ValueError, match=r"tilted .*shifted by up to 0\.500 mm off the slice normal"):
        read_dicom_series(tilted)

    report = write_series(
        make_image(), tmp_path / "sr", "T1", "1.2.826.0.1.3680043.8.498.41", "1.2.840.10008.5.1.4.1.1.88.11"
    )
    with pytest.raises(ValueError, match=r"sr .*holds Basic Text SR Storage objects, not images"):
        read_dicom_series(report)


def test_a_stack_mixed_with_another_orientation_is_refused(tmp_path):
    folder = write_series(make_image(), tmp_path / "mixed", "T1", "1.2.826.0.1.3680043.8.498.42")
    odd = pydicom.dcmread(folder / "IM0001.dcm")
    odd.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    odd.save_as(folder / "IM0001.dcm")
    with pytest.raises(ValueError, match=r"mixed .*differs from .* in size or orientation"):
        read_dicom_series(folder)


def rebuild_labels(seg, source_uids, values) -> np.ndarray:
    """Per-segment masks from the SEG on the source slices -> a label map (later segments painted on top)."""
    masks = seg.get_pixels_by_source_instance(source_uids, combine_segments=False)  # [K, J, I, S]
    labels = np.zeros(masks.shape[:3], dtype=np.uint8)
    for index, value in enumerate(values):
        labels[masks[..., index] > 0] = value
    return labels


def test_dicom_seg_references_the_series_and_rebuilds_the_label_map(tmp_path):
    image = make_image()
    folder = write_series(image, tmp_path / "case" / "t1", "T1", "1.2.826.0.1.3680043.8.498.50")
    volume = read_dicom_series(folder)
    labels = label_map()
    reference = sitk.GetImageFromArray(labels)
    reference.CopyInformation(image)
    nifti = read_volume(write_nifti(reference, tmp_path / "seg.nii.gz"))  # the NIfTI result for the same grid

    segments = segments_for(dataset_spec("brats"), names={1: "necrosis", 2: "edema", 4: "enhancing tumour"})
    out = write_dicom_seg(labels, folder, tmp_path / "out" / "seg.dcm", segments)
    assert sorted(p.name for p in out.parent.iterdir()) == ["seg.dcm"]  # no temporary file left

    seg = hd.seg.segread(out)
    source = find_series(folder)[0]
    source_uids = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in source.files]
    assert seg.SegmentationType == "BINARY" and seg.Modality == "SEG"
    assert seg.StudyInstanceUID == STUDY and seg.FrameOfReferenceUID == FRAME
    assert seg.SeriesInstanceUID != source.series_uid
    assert [s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence] == [source.series_uid]
    referenced = {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == set(source_uids)
    assert [d.SegmentLabel for d in seg.SegmentSequence] == ["necrosis", "edema", "enhancing tumour"]
    assert [d.SegmentedPropertyTypeCodeSequence[0].CodeMeaning for d in seg.SegmentSequence] == [
        "Necrosis",
        "Edema",
        "Neoplasm",
    ]
    colors = [
        hd.color.CIELabColor.from_dicom_value(d.RecommendedDisplayCIELabValue).to_rgb() for d in seg.SegmentSequence
    ]
    np.testing.assert_allclose(colors, [(255, 0, 0), (0, 255, 0), (255, 255, 0)], atol=2)
    assert int(seg.NumberOfFrames) == int(sum((labels == v).any(axis=(1, 2)).sum() for v in (1, 2, 4)))

    rebuilt = rebuild_labels(seg, source_uids, (1, 2, 4))
    np.testing.assert_array_equal(rebuilt, labels)
    np.testing.assert_array_equal(rebuilt, nifti.array)
    np.testing.assert_allclose(volume.affine, nifti.affine, atol=1e-5)
    # every frame sits where its source slice sits, with the source's pixel grid
    position_of = {
        uid: np.asarray(pydicom.dcmread(p).ImagePositionPatient, float)
        for uid, p in zip(source_uids, source.files, strict=True)
    }
    shared = seg.SharedFunctionalGroupsSequence[0]
    np.testing.assert_allclose(shared.PixelMeasuresSequence[0].PixelSpacing, (SPACING[1], SPACING[0]), atol=1e-6)
    np.testing.assert_allclose(
        shared.PlaneOrientationSequence[0].ImageOrientationPatient,
        pydicom.dcmread(source.files[0]).ImageOrientationPatient,
        atol=1e-6,
    )
    for frame in seg.PerFrameFunctionalGroupsSequence:
        uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        np.testing.assert_allclose(frame.PlanePositionSequence[0].ImagePositionPatient, position_of[uid], atol=1e-4)


def test_dicom_seg_of_overlapping_regions(tmp_path):
    folder = write_series(make_image(), tmp_path / "t1", "T1", "1.2.826.0.1.3680043.8.498.51")
    labels = label_map()
    segments = segments_for(dataset_spec("brats"), target="regions")
    assert [s.label for s in segments] == ["WT", "TC", "ET"]
    out = write_dicom_seg(labels, folder, tmp_path / "regions.dcm", segments)
    seg = hd.seg.segread(out)
    source_uids = [
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in find_series(folder)[0].files
    ]
    masks = seg.get_pixels_by_source_instance(source_uids, combine_segments=False)  # [K, J, I, 3]
    for index, values in enumerate(((1, 2, 4), (1, 4), (4,))):
        np.testing.assert_array_equal(masks[..., index] > 0, np.isin(labels, values))


def test_dicom_seg_refuses_to_overwrite_and_bad_label_maps(tmp_path):
    folder = write_series(make_image(), tmp_path / "t1", "T1", "1.2.826.0.1.3680043.8.498.52")
    segments = (SegmentSpec("tumour", (1, 2, 4)),)
    out = write_dicom_seg(label_map(), folder, tmp_path / "seg.dcm", segments)
    first = out.read_bytes()
    with pytest.raises(FileExistsError, match=r"seg\.dcm exists; remove it or pass overwrite=True"):
        write_dicom_seg(label_map(), folder, out, segments)
    assert out.read_bytes() == first
    write_dicom_seg(np.zeros_like(label_map()), folder, out, segments, overwrite=True)
    assert hd.seg.segread(out).SegmentSequence[0].SegmentLabel == "tumour"
    with pytest.raises(ValueError, match=r"labels of shape \(7, 13, 11\) do not lie on the grid \(6, 13, 11\)"):
        short = write_series(make_image(size=(11, 13, 6)), tmp_path / "short", "T1", "1.2.826.0.1.3680043.8.498.53")
        write_dicom_seg(label_map(), short, tmp_path / "x.dcm", segments)
    with pytest.raises(ValueError, match=r"labels hold values \[4\] that no segment describes"):
        write_dicom_seg(label_map(), folder, tmp_path / "x.dcm", (SegmentSpec("tumour", (1, 2)),))
    assert not (tmp_path / "x.dcm").exists()


def test_a_seg_beside_the_series_does_not_disturb_the_case(tmp_path):
    write_case(tmp_path / "case01")
    t1 = case_series(tmp_path / "case01", ("t1",))[0]
    write_dicom_seg(label_map(), t1, tmp_path / "case01" / "seg" / "seg.dcm", (SegmentSpec("T1 lesion", (1, 2, 4)),))
    assert len(find_series(tmp_path / "case01")) == 5
    series = case_series(tmp_path / "case01", ("t1", "t1ce", "t2", "flair"))
    assert series[0] == t1
    with pytest.raises(ValueError, match=r"seg .*holds Segmentation Storage objects, not images"):
        read_dicom_series(tmp_path / "case01" / "seg")
