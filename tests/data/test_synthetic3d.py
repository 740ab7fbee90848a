import nibabel as nib
import numpy as np
import pytest

from rwkvseg.cli import main
from rwkvseg.data.specs import dataset_spec
from rwkvseg.data.synthetic3d import make_phantom, write_synthetic_volumes
from rwkvseg.data.volumes import discover_cases, load_case

BRATS = dataset_spec("brats")


def test_phantom_compartments_have_brats_like_contrasts():
    images, label = make_phantom(np.random.default_rng(3), (29, 33, 27))
    assert label.shape == (29, 33, 27) and label.dtype == np.uint8
    assert set(np.unique(label)) == {0, 1, 2, 4}
    brain = images["t1"] > 0
    assert all(((image > 0) == brain).all() for image in images.values())  # one skull-stripped brain
    assert (label[~brain] == 0).all()
    healthy = brain & (label == 0)

    def mean(modality, mask):
        return float(images[modality][mask].mean())

    assert mean("flair", label == 2) > mean("flair", healthy) + 0.3  # edema: bright FLAIR
    assert mean("t1ce", label == 4) > mean("t1ce", label == 2) + 0.2  # enhancing ring: bright T1ce
    assert mean("t1ce", label == 1) < mean("t1ce", healthy)  # necrosis: dark T1ce
    assert mean("t2", label == 1) > mean("t2", healthy)
    _, without = make_phantom(np.random.default_rng(3), (29, 33, 27), necrosis=False)
    assert 1 not in np.unique(without)


def test_written_cases_are_seeded_brats_folders_every_reader_accepts(tmp_path):
    write_synthetic_volumes(tmp_path / "a", n=4, shape=(19, 23, 17), spacing=1.5, seed=7)
    write_synthetic_volumes(tmp_path / "b", n=4, shape=(19, 23, 17), spacing=1.5, seed=7)
    cases = discover_cases(tmp_path / "a", BRATS)
    assert [c.case_id for c in cases] == [f"Phantom_{i:03d}" for i in range(4)]
    case = load_case(cases[0], BRATS)
    assert case.image.shape == (4, 17, 23, 19) and case.spacing == (1.5, 1.5, 1.5)  # (k, j, i)
    seg = tmp_path / "a" / "Phantom_003" / "Phantom_003_seg.nii.gz"
    assert 1 not in np.unique(np.asarray(nib.load(seg).dataobj))  # every fourth case has no necrosis
    for path in (tmp_path / "a").rglob("*.nii.gz"):
        twin = tmp_path / "b" / path.relative_to(tmp_path / "a")
        assert np.array_equal(np.asarray(nib.load(path).dataobj), np.asarray(nib.load(twin).dataobj))
    with pytest.raises(FileExistsError, match="not empty"):
        write_synthetic_volumes(tmp_path / "a", n=1)


def test_cli_writes_phantoms_and_rejects_bad_shapes(tmp_path, capsys):
    assert main(["synthetic3d", str(tmp_path / "s"), "--cases", "2", "--shape", "17,19,15", "--seed", "1"]) == 0
    assert "2 phantom cases" in capsys.readouterr().out
    assert nib.load(tmp_path / "s" / "Phantom_001" / "Phantom_001_t2.nii.gz").shape == (17, 19, 15)
    assert main(["synthetic3d", str(tmp_path / "t"), "--shape", "17,19"]) == 2
    assert "three sizes" in capsys.readouterr().err
