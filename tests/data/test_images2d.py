import numpy as np
import pytest
from PIL import Image

from rwkvseg.data.images2d import (
    check_pairs,
    discover_pairs,
    list_inputs,
    read_image,
    read_mask,
    read_sample,
)
from writers import SHARED_DATA, save_png


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_image_modes_become_float_hwc(tmp_path, rng):
    rgb = rng.integers(0, 256, (13, 17, 3), dtype=np.uint8)
    gray = rgb[..., 0]
    save_png(tmp_path / "rgb.png", rgb)
    save_png(tmp_path / "gray.png", gray)
    save_png(tmp_path / "rgba.png", np.dstack([rgb, np.full((13, 17), 200, np.uint8)]))
    Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE).save(tmp_path / "pal.png")
    wide = (rng.integers(0, 4096, (13, 17))).astype(np.uint16)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    assert read_image(tmp_path / "rgb.png").shape == (13, 17, 3)
    np.testing.assert_allclose(read_image(tmp_path / "rgb.png")[..., 1], rgb[..., 1] / 255.0, rtol=1e-6)
    g3 = read_image(tmp_path / "gray.png", channels=3)
    assert g3.shape == (13, 17, 3) and np.array_equal(g3[..., 0], g3[..., 2])
    assert read_image(tmp_path / "gray.png", channels=1).shape == (13, 17, 1)
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.png", channels=3), read_image(tmp_path / "rgb.png"))
    assert read_image(tmp_path / "pal.png", channels=3).shape == (13, 17, 3)
    w = read_image(tmp_path / "wide.png", channels=1)
    assert w.dtype == np.float32 and w.min() == 0.0 and w.max() == 1.0  # percentile-scaled, not /255
    dt = read_image(tmp_path / "wide.png", channels=1, normalization="dtype")
    np.testing.assert_allclose(dt[..., 0], wide / 65535.0, rtol=1e-6)
    with pytest.raises(ValueError, match=r"rgb\.png has 3 channels, the model expects 1"):
        read_image(tmp_path / "rgb.png", channels=1)


def test_mask_encodings(tmp_path, rng):
    truth = np.zeros((21, 23), np.uint8)
    truth[4:15, 6:18] = 1
    save_png(tmp_path / "zero_one.png", truth)
    save_png(tmp_path / "zero_255.png", truth * 255)
    save_png(tmp_path / "rgb.png", np.dstack([truth * 255] * 3))
    Image.fromarray(truth.astype(bool)).save(tmp_path / "bits.png")
    noisy = np.clip(truth * 255.0 + rng.normal(0, 20, truth.shape), 0, 255).astype(np.uint8)
    save_png(tmp_path / "jpeg.jpg", np.dstack([noisy] * 3), quality=70)
    for name in ("zero_one.png", "zero_255.png", "rgb.png", "bits.png"):
        np.testing.assert_array_equal(read_mask(tmp_path / name), truth, err_msg=name)
    assert (read_mask(tmp_path / "jpeg.jpg") != truth).mean() < 0.02
    labels = np.zeros((21, 23), np.uint8)
    labels[2:6, 2:6], labels[10:20, 10:20] = 1, 2
    pal = Image.fromarray(labels, mode="P")
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    pal.save(tmp_path / "palette.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "palette.png", num_classes=3), labels)
    with pytest.raises(ValueError, match=r"palette\.png holds class labels \[0, 1, 2\]"):
        read_mask(tmp_path / "palette.png", num_classes=1)
    with pytest.raises(ValueError, match=r"palette\.png holds values \[0, 1, 2\], expected class labels 0\.\.1"):
        read_mask(tmp_path / "palette.png", num_classes=2)


def _pair(root, image_rel, mask_rels, shape=(11, 13), channels=3, rng=None, ext=".png"):
    rng = rng or np.random.default_rng(0)
    image = rng.integers(0, 256, (*shape, channels), dtype=np.uint8)
    save_png(root / image_rel, image[..., 0] if channels == 1 else image)
    for k, rel in enumerate(mask_rels):
        m = np.zeros(shape, np.uint8)
        m[k : k + 3, 2:5] = 255
        save_png(root / rel, m)


def test_layouts_busi_isic_cvc_ph2(tmp_path):
    busi = tmp_path / "busi"
    _pair(
        busi,
        "data/benign/images/benign (3).png",
        ["data/benign/mask/benign (3)_mask.png", "data/benign/mask/benign (3)_mask_1.png"],
        channels=1,
    )
    _pair(busi, "data/malignant/images/malignant (1).png", ["data/malignant/mask/malignant (1)_mask.png"])
    samples = discover_pairs(busi)
    assert [(s.case, s.label, len(s.masks)) for s in samples] == [
        ("benign/benign (3)", "benign", 2),
        ("malignant/malignant (1)", "malignant", 1),
    ]
    image, mask = read_sample(samples[0], channels=3)
    assert image.shape == (11, 13, 3) and mask[0:4, 2:5].all() and mask.sum() == 12  # union of rows 0-2 and 1-3

    isic = tmp_path / "isic"
    for sub in ("train", "val"):
        _pair(
            isic,
            f"{sub}/images/ISIC_00{sub == 'val':d}1.jpg",
            [f"{sub}/masks/ISIC_00{sub == 'val':d}1_segmentation.png"],
        )
    assert [(s.case, s.group, s.label) for s in discover_pairs(isic)] == [
        ("train/ISIC_0001", "train", None),
        ("val/ISIC_0011", "val", None),
    ]

    cvc = tmp_path / "cvc"
    for i in (1, 2, 10):
        _pair(cvc, f"PNG/Original/{i}.png", [f"PNG/Ground Truth/{i}.png"])
    assert [s.case for s in discover_pairs(cvc)] == ["1", "10", "2"]

    isic18 = tmp_path / "isic18"
    _pair(
        isic18,
        "ISIC2018_Task1-2_Training_Input/ISIC_0000000.jpg",
        ["ISIC2018_Task1_Training_GroundTruth/ISIC_0000000_segmentation.png"],
    )
    for folder in ("ISIC2018_Task1-2_Training_Input", "ISIC2018_Task1_Training_GroundTruth"):
        (isic18 / folder / "LICENSE.txt").write_text("CC-BY-NC")  # shipped with the release: skipped quietly
        (isic18 / folder / "ATTRIBUTION.txt").write_text("ISIC")
    assert [(s.case, len(s.masks)) for s in discover_pairs(isic18)] == [("ISIC_0000000", 1)]

    ph2 = tmp_path / "ph2"
    _pair(ph2, "images/IMD002.jpg", ["masks/IMD002_lesion.png"])
    (ph2 / "labels.csv").write_text("image,clinical_diagnosis\nIMD002,1\n")
    assert [(s.case, s.label) for s in discover_pairs(ph2)] == [("IMD002", "1")]


def test_mask_matching_prefers_the_exact_image(tmp_path):
    _pair(tmp_path, "images/img.png", ["masks/img.png"])
    _pair(tmp_path, "images/img_1.png", ["masks/img_1.png"])
    samples = discover_pairs(tmp_path)
    assert [(s.case, [m.name for m in s.masks]) for s in samples] == [("img", ["img.png"]), ("img_1", ["img_1.png"])]


def test_bad_inputs_name_the_file(tmp_path):
    root = tmp_path / "ds"
    _pair(root, "images/a.png", ["masks/a.png"])
    _pair(root, "images/b.png", [])
    with pytest.raises(ValueError, match=r"no mask in .*masks for 1 image\(s\).*: b\.png"):
        discover_pairs(root)
    _pair(root, "masks/b.png", [], channels=1, shape=(12, 13))
    (b,) = [s for s in discover_pairs(root) if s.case == "b"]
    with pytest.raises(ValueError, match=r"mask .*b\.png is 13x12 \(WxH\) but image .*b\.png is 13x11"):
        read_sample(b, 3)
    (root / "images" / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"not images \(notes\.txt\).*--skip-non-images"):
        discover_pairs(root)
    assert len(discover_pairs(root, skip_non_images=True)) == 2
    truncated = root / "images" / "a.png"
    truncated.write_bytes(truncated.read_bytes()[:60])
    (a,) = [s for s in discover_pairs(root, skip_non_images=True) if s.case == "a"]
    with pytest.raises(ValueError, match=r"cannot read image .*a\.png .*truncated or not an image"):
        read_sample(a, 3)
    fake = root / "images" / "fake.jpg"
    fake.write_text("not a jpeg")
    with pytest.raises(ValueError, match=r"cannot read image .*fake\.jpg"):
        read_image(fake)
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    (empty / "masks").mkdir()
    with pytest.raises(ValueError, match=r"empty.images holds no images"):
        discover_pairs(empty)
    with pytest.raises(ValueError, match="no image/mask folder pair found"):
        discover_pairs(tmp_path / "empty" / "images")
    with pytest.raises(ValueError, match="holds no images"):
        list_inputs(empty / "images")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_inputs(tmp_path / "nowhere")


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="shared data not present")
@pytest.mark.parametrize(
    ("name", "count", "groups"),
    [
        ("kvasir_seg", 900, {""}),
        ("cvc_clinicdb", 550, {""}),
        ("busi", 518, {"benign", "malignant"}),
        ("isic2017", 1750, {"train", "val"}),
        ("ph2", 160, {""}),
    ],
)
def test_real_layouts(name, count, groups):
    samples = discover_pairs(SHARED_DATA / name)
    assert len(samples) == count and {s.group for s in samples} == groups
    image, mask = read_sample(samples[-1], channels=3)
    assert image.shape[:2] == mask.shape and image.shape[2] == 3
    assert set(np.unique(mask)) == {0, 1}


def test_check_pairs_lists_every_problem_before_training(tmp_path):
    _pair(tmp_path, "images/a.png", ["masks/a.png"])
    _pair(tmp_path, "images/b.png", ["masks/b.png"])
    save_png(tmp_path / "masks" / "b.png", np.zeros((5, 5), np.uint8))
    (tmp_path / "images" / "a.png").write_bytes(b"garbage")
    samples = discover_pairs(tmp_path)
    with pytest.raises(ValueError, match=r"2 image/mask problem\(s\)(.|\n)*a\.png(.|\n)*b\.png is 5x5"):
        check_pairs(samples)
