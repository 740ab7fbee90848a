from pathlib import Path

import numpy as np
import pytest
import torch

from rwkvseg.data.patches3d import AUGMENT_PRESETS, PatchConfig, PatchDataset, patch_augmentation, patch_origin
from rwkvseg.data.preprocess3d import preprocess_dataset
from rwkvseg.data.specs import dataset_spec
from writers import write_brats_case

SHAPE = (21, 19, 17)  # (i, j, k)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """Two synthetic BraTS cases whose tumour is a few voxels in a corner, so random patches mostly miss it."""
    root = tmp_path_factory.mktemp("raw")
    spec = dataset_spec("brats")
    rng = np.random.default_rng(0)
    for case in ("c1", "c2"):
        images = [(rng.random(SHAPE) * 100 + 1).astype(np.float32) for _ in spec.modalities]
        seg = np.zeros(SHAPE, np.uint8)
        seg[1:3, 1:3, 1:3] = 2
        seg[1, 1, 1] = 4
        write_brats_case(root, case, images, seg, spec)
    out = tmp_path_factory.mktemp("cache")
    preprocess_dataset(root, spec, out)
    return out


def test_patch_origin_stays_inside_and_centres_on_foreground():
    rng = np.random.default_rng(0)
    for _ in range(50):
        lo = patch_origin((17, 19, 21), (5, 6, 7), rng, None)
        assert (lo >= 0).all() and (lo + np.array([5, 6, 7]) <= 17 + np.arange(0, 6, 2)).all()
    np.testing.assert_array_equal(patch_origin((17, 19, 21), (5, 6, 7), rng, np.array([8, 9, 10])), [6, 6, 7])
    np.testing.assert_array_equal(patch_origin((17, 19, 21), (5, 6, 7), rng, np.array([0, 18, 1])), [0, 13, 0])


def test_items_have_the_patch_shape_and_are_reproducible(cache):
    config = PatchConfig(patch_size=(7, 9, 5), samples_per_epoch=6)
    dataset = PatchDataset(cache, None, config, seed=3)
    item = dataset[2]
    assert item["image"].shape == (4, 7, 9, 5) and item["image"].dtype == torch.float32
    assert item["mask"].shape == (1, 7, 9, 5) and item["mask"].dtype == torch.int64
    assert item["case"] in ("c1", "c2")
    again = PatchDataset(cache, None, config, seed=3)[2]
    assert torch.equal(item["image"], again["image"]) and torch.equal(item["mask"], again["mask"])
    dataset.set_epoch(1)
    assert not torch.equal(dataset[2]["image"], item["image"])
    assert len(dataset) == 6


def test_foreground_oversampling(cache):
    def fg_share(fraction: float) -> float:
        config = PatchConfig(patch_size=(5, 5, 5), samples_per_epoch=60, fg_fraction=fraction, augment=False)
        dataset = PatchDataset(cache, ["c1"], config)
        return np.mean([bool((dataset[i]["mask"] > 0).any()) for i in range(len(dataset))])

    assert fg_share(1.0) == 1.0
    assert fg_share(0.0) < 0.5  # the tumour fills 8 of 6783 voxels


def test_regions_target_and_augmentation_keep_labels_valid(cache):
    config = PatchConfig(patch_size=(8, 8, 8), samples_per_epoch=8, fg_fraction=1.0)
    dataset = PatchDataset(cache, None, config, target="regions")
    for i in range(len(dataset)):
        item = dataset[i]
        label = item["mask"]
        assert label.shape == (3, 8, 8, 8) and label.dtype == torch.float32
        assert set(label.unique().tolist()) <= {0.0, 1.0}
        # nested regions: ET inside TC inside WT
        assert (label[2] <= label[1]).all() and (label[1] <= label[0]).all()
        assert torch.isfinite(item["image"]).all()
        # augmented patches are plain tensors: a MONAI MetaTensor slows every op of the step and breaks compile
        assert type(item["image"]) is torch.Tensor and type(label) is torch.Tensor


def test_strong_augmentation_keeps_labels_valid_and_changes_each_modality_on_its_own(cache):
    config = PatchConfig(patch_size=(8, 8, 8), samples_per_epoch=24, fg_fraction=1.0, augment_preset="strong")
    strong = PatchDataset(cache, None, config, target="regions")
    plain = PatchDataset(cache, None, PatchConfig(patch_size=(8, 8, 8), samples_per_epoch=24, fg_fraction=1.0))
    changed = 0
    for i in range(len(strong)):
        item = strong[i]
        label = item["mask"]
        assert set(label.unique().tolist()) <= {0.0, 1.0}
        assert (label[2] <= label[1]).all() and (label[1] <= label[0]).all()
        assert torch.isfinite(item["image"]).all() and type(item["image"]) is torch.Tensor
        changed += not torch.equal(item["image"], plain[i]["image"])
    assert changed > 0  # same patches, other draws
    # the channel-wise shift moves each modality by its own offset
    image = torch.zeros(4, 6, 6, 6)
    transforms = patch_augmentation((6, 6, 6), "strong", seed=0).transforms
    shift = next(t for t in transforms if type(t).__name__ == "RandShiftIntensityd")
    shift.set_random_state(seed=1)
    shift.prob = 1.0
    out = shift({"image": image, "mask": torch.zeros(1, 6, 6, 6)})["image"]
    offsets = out.flatten(1)[:, 0]
    assert (out.flatten(1) == offsets[:, None]).all() and len(set(offsets.tolist())) == 4


def test_the_nnunet_preset_is_the_default_and_unknown_presets_name_the_choices():
    assert PatchConfig().augment_preset == "nnunet" and AUGMENT_PRESETS["nnunet"].bias_field == 0
    # the transforms and order every earlier run trained with (the same order gives the same random draws)
    assert [type(t).__name__ for t in patch_augmentation((8, 8, 8)).transforms] == [
        "RandAffined",
        "RandGaussianNoised",
        "RandGaussianSmoothd",
        "RandScaleIntensityd",
        "RandScaleIntensityFixedMeand",
        "RandSimulateLowResolutiond",
        "RandAdjustContrastd",
        "RandFlipd",
        "RandFlipd",
        "RandFlipd",
        "EnsureTyped",
    ]
    assert "RandBiasFieldd" in [type(t).__name__ for t in patch_augmentation((8, 8, 8), "strong").transforms]
    with pytest.raises(ValueError, match=r"augment_preset = 'heavy' is unknown; choose one of nnunet, strong"):
        PatchConfig(augment_preset="heavy")


def test_volume_smaller_than_the_patch_names_the_case_and_the_fix(cache):
    with pytest.raises(ValueError, match=r"(?s)2 case\(s\) are smaller than the patch.*c1.npz.*at most \(17, 19, 21\)"):
        PatchDataset(cache, None, PatchConfig(patch_size=(18, 19, 21), allow_padding=False))
    padded = PatchDataset(cache, None, PatchConfig(patch_size=(18, 20, 21), allow_padding=True, fg_fraction=1.0))
    item = padded[0]
    assert item["image"].shape == (4, 18, 20, 21)
    assert (item["mask"] > 0).any()  # foreground locations moved with the padding


def test_real_brats_patches(brats_2mm, tmp_path):
    case = brats_2mm / "Brats18_2013_2_1"
    preprocess_dataset(case, dataset_spec("brats"), tmp_path)
    dataset = PatchDataset(tmp_path, None, PatchConfig(patch_size=(48, 48, 48), samples_per_epoch=4, fg_fraction=1))
    for i in range(len(dataset)):
        item = dataset[i]
        assert item["image"].shape == (4, 48, 48, 48)
        assert (item["mask"] > 0).any()
