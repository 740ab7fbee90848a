"""Probing a folder for DICOM needs pydicom only where a file looks like DICOM: on an install without the dicom
extra an empty or NIfTI folder is simply not DICOM, and a folder with a Part-10 file names the extra to install.

Unlike tests/data/test_dicom.py these run without pydicom: the install they are about lacks it."""

import sys

import numpy as np
import pytest

from rwkvseg.data.dicom import find_series, is_dicom_folder
from writers import save_nifti


def part10_file(path):
    """A file with the DICOM Part-10 marker (b"DICM" after a 128-byte preamble) and no readable data set."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(128) + b"DICM" + bytes(16))
    return path


@pytest.fixture
def without_pydicom(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydicom", None)  # `import pydicom` fails, as on an install without the extra


def test_without_pydicom_empty_and_nifti_folders_are_not_dicom(tmp_path, without_pydicom):
    (tmp_path / "empty").mkdir()
    save_nifti(tmp_path / "nifti" / "scan.nii.gz", np.zeros((4, 5, 6), np.int16))
    (tmp_path / "nifti" / "notes.txt").write_text("not DICOM either")
    assert not is_dicom_folder(tmp_path / "empty")
    assert not is_dicom_folder(tmp_path / "nifti")
    with pytest.raises(ValueError, match="holds no DICOM files"):
        find_series(tmp_path / "nifti")


def test_without_pydicom_a_part10_file_asks_for_the_extra(tmp_path, without_pydicom):
    save_nifti(tmp_path / "case" / "scan.nii.gz", np.zeros((4, 5, 6), np.int16))
    (tmp_path / "case" / "t1").mkdir()
    (tmp_path / "case" / "t1" / "IM0001").write_bytes(bytes(132))  # no marker: not DICOM
    assert not is_dicom_folder(tmp_path / "case")
    part10_file(tmp_path / "case" / "t1" / "IM0002")
    with pytest.raises(ImportError, match=r"pip install 'rwkvseg\[dicom\]'"):
        is_dicom_folder(tmp_path / "case")


def test_with_pydicom_the_probe_reads_headers_as_before(tmp_path):
    pytest.importorskip("pydicom")
    part10_file(tmp_path / "junk" / "IM0001")  # the marker alone, no series UID: not a DICOM series
    assert not is_dicom_folder(tmp_path / "junk")
    assert not is_dicom_folder(tmp_path)
