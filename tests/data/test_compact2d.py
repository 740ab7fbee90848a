import numpy as np
import pytest
from PIL import Image

from rwkvseg.data.compact2d import export_compact
from rwkvseg.data.images2d import discover_pairs, read_mask
from writers import save_png


@pytest.fixture
def busi_like(tmp_path):
    """Two groups, one image with two partial masks whose union is the lesion."""
    root = tmp_path / "busi" / "data"
    rng = np.random.default_rng(0)
    for group in ("benign", "malignant"):
        for i in range(2):
            image = (rng.random((60, 90)) * 255).astype(np.uint8)
            save_png(root / group / "images" / f"{group} ({i}).png", image, "L")
            left = np.zeros((60, 90), np.uint8)
            left[10:30, 10:40] = 255
            save_png(root / group / "mask" / f"{group} ({i})_mask.png", left, "L")
            if i == 1:
                right = np.zeros((60, 90), np.uint8)
                right[10:30, 40:70] = 255
                save_png(root / group / "mask" / f"{group} ({i})_mask_1.png", right, "L")
    return tmp_path / "busi"


def test_compact_copy_keeps_cases_groups_and_mask_union(busi_like, tmp_path):
    out = tmp_path / "compact"
    summary = export_compact(busi_like, out, size=32)
    original = discover_pairs(busi_like)
    copy = discover_pairs(out)
    assert [s.case for s in copy] == [s.case for s in original]
    assert [s.label for s in copy] == ["benign", "benign", "malignant", "malignant"]
    assert summary.cases == 4 and summary.groups == ("benign", "malignant")
    merged = read_mask(out / "malignant" / "masks" / "malignant (1).png")
    assert merged.shape == (32, 32)
    # the union spans columns 10..70 of 90 -> about 3.6..24.9 of 32
    assert merged[8, 5:24].all() and not merged[8, 26:].any()
    with Image.open(out / "benign" / "images" / "benign (0).jpg") as img:
        assert img.size == (32, 32) and img.mode == "L"


def test_compact_copy_never_overwrites_without_asking(busi_like, tmp_path):
    out = tmp_path / "compact"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    for overwrite in (False, True):  # a folder compact2d did not write is never replaced
        with pytest.raises(FileExistsError, match="not written by rwkvseg"):
            export_compact(busi_like, out, size=32, overwrite=overwrite)
    assert (out / "keep.txt").read_text() == "user data"
    copy = tmp_path / "copy"
    export_compact(busi_like, copy, size=32)
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_compact(busi_like, copy, size=32)
    export_compact(busi_like, copy, size=32, overwrite=True)
