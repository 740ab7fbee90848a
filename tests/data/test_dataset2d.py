import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from rwkvseg.data.dataset2d import SegDataset2D
from rwkvseg.data.images2d import discover_pairs, read_sample
from rwkvseg.data.synthetic import write_synthetic_dataset
from rwkvseg.data.transforms2d import AugmentConfig, eval_transform, train_transform


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    write_synthetic_dataset(root, n=6, shape=(37, 45), seed=5, empty_fraction=0.34)
    return root


def test_synthetic_is_deterministic_and_readable(synthetic, tmp_path):
    write_synthetic_dataset(tmp_path, n=6, shape=(37, 45), seed=5, empty_fraction=0.34)
    for name in ("images/lesion_000.png", "masks/lesion_005.png"):
        assert (tmp_path / name).read_bytes() == (synthetic / name).read_bytes()
    samples = discover_pairs(synthetic)
    fractions = [read_sample(s, 3)[1].mean() for s in samples]
    assert sum(f == 0 for f in fractions) == 2 and all(0.01 < f < 0.6 for f in fractions if f)
    with pytest.raises(FileExistsError, match="already holds"):
        write_synthetic_dataset(tmp_path, n=2)


def test_augmentation_depends_only_on_seed_epoch_index(synthetic):
    samples = discover_pairs(synthetic)
    aug = AugmentConfig(affine=True, intensity=True)
    ds = SegDataset2D(samples, 3, transform=train_transform((32, 32), "resize", aug), seed=7)
    first = [ds[i]["image"] for i in range(len(ds))]
    loader = DataLoader(ds, batch_size=2, num_workers=2, shuffle=False)
    batched = torch.cat([b["image"] for b in loader])
    torch.testing.assert_close(batched, torch.stack(first), rtol=0, atol=0)
    ds.set_epoch(1)
    assert not torch.equal(ds[0]["image"], first[0]) or not torch.equal(ds[1]["image"], first[1])
    item = ds[2]
    assert item["image"].shape == (3, 32, 32) and item["mask"].shape == (1, 32, 32)
    assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}


def test_crop_mode_pads_small_images_and_keeps_whole_images_for_eval(synthetic):
    samples = discover_pairs(synthetic)
    crop = SegDataset2D(samples, 3, transform=train_transform((48, 40), "crop"))
    assert crop[0]["image"].shape == (3, 48, 40)
    whole = SegDataset2D(samples, 3, transform=eval_transform((48, 40), "crop"))[0]
    _, mask = read_sample(samples[0], 3)
    np.testing.assert_array_equal(whole["mask"][0].numpy(), mask)
    assert whole["image"].shape == (3, 37, 45)
