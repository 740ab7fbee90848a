"""The device-resident 2D training set (run here on CPU tensors: the same code as on the GPU): the same images and
masks as the DataLoader path, seeded reproducible augmentation with MONAI's semantics, and training that resumes
exactly."""

import numpy as np
import pytest
import torch
from PIL import Image

from rwkvseg.checkpoint import CheckpointMeta
from rwkvseg.data.dataset2d import SegDataset2D
from rwkvseg.data.gpu2d import NotResident, ResidentDataset2D, augment_batch, check_fits, resident_bytes
from rwkvseg.data.images2d import discover_pairs
from rwkvseg.data.synthetic import write_synthetic_dataset
from rwkvseg.data.transforms2d import AugmentConfig, eval_transform
from rwkvseg.records import Preprocessing2D
from rwkvseg.train.config import OptimConfig
from rwkvseg.train.loop import LoopConfig, Run, fit, steps_per_epoch
from rwkvseg.train.losses import SegmentationLoss
from rwkvseg.train.optim import build_optimizer, build_scheduler
from rwkvseg.train.validate import validator_2d

SHAPE = (29, 35)


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    write_synthetic_dataset(root, n=9, shape=SHAPE, seed=5)
    return discover_pairs(root)


@pytest.mark.parametrize("normalization", ["auto", "minmax", "zscore"])
def test_items_equal_the_dataloader_path_at_the_native_size(samples, normalization):
    resident = ResidentDataset2D(samples, 3, 1, SHAPE, normalization)
    plain = SegDataset2D(samples, 3, 1, eval_transform(SHAPE), normalization)
    assert resident.images.dtype == resident.masks.dtype == torch.uint8
    for i in range(len(samples)):
        a, b = resident[i], plain[i]
        torch.testing.assert_close(a["image"], b["image"], rtol=0, atol=1e-5)
        assert torch.equal(a["mask"], b["mask"]) and a["case"] == b["case"]
    assert b["mask"].sum() > 0


def test_items_equal_the_dataloader_path_after_resizing(samples):
    """uint8 storage at the network size: at most half a grey level from resizing the float image."""
    resident = ResidentDataset2D(samples, 3, 1, (24, 20))
    plain = SegDataset2D(samples, 3, 1, eval_transform((24, 20)))
    for i in range(len(samples)):
        a, b = resident[i], plain[i]
        assert a["image"].shape == (3, 24, 20)
        assert (a["image"] - b["image"]).abs().max() <= 0.5 / 255 + 1e-6
        assert torch.equal(a["mask"], b["mask"])


def _dihedral(x):
    """The 8 rot90 / flip images of x [C, S, S]."""
    out = []
    for k in range(4):
        r = torch.rot90(x, k, dims=(1, 2))
        out += [r, r.flip(1)]
    return out


def test_rot90_and_flips_are_seeded_and_move_image_and_mask_together(samples):
    resident = ResidentDataset2D(samples, 3, 1, (24, 24), augment=AugmentConfig(), seed=7)
    order = list(range(len(samples)))
    resident.set_epoch(3)
    first = list(resident.device_batches(order, 4))
    resident.set_epoch(3)
    again = list(resident.device_batches(order, 4))
    resident.set_epoch(4)
    other = list(resident.device_batches(order, 4))
    assert len(first) == 2 and first[0]["image"].shape == (4, 3, 24, 24)  # full batches only (drop_last)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    assert not all(torch.equal(a["image"], b["image"]) for a, b in zip(first, other, strict=True))
    changed = 0
    for j, i in enumerate(order[:8]):
        image, mask = first[j // 4]["image"][j % 4], first[j // 4]["mask"][j % 4]
        base = resident[i]
        # the augmented pair is one of the 8 dihedral images of the original, the same one for image and mask
        matches = [
            k
            for k, (im, m) in enumerate(zip(_dihedral(base["image"]), _dihedral(base["mask"]), strict=True))
            if torch.equal(im, image) and torch.equal(m, mask)
        ]
        assert matches, i
        changed += 0 not in matches
    assert changed >= 3  # prob 0.5 for each of three steps: most samples move


def test_affine_and_intensity_keep_labels_and_stay_reproducible(samples):
    config = AugmentConfig(rot90=False, flip=False, affine=True, intensity=True, prob=1.0)
    resident = ResidentDataset2D(samples, 3, 1, (24, 24), augment=config, seed=1)
    resident.set_epoch(1)
    batch = resident.batch(torch.arange(6))
    resident.set_epoch(1)
    assert torch.equal(batch["image"], resident.batch(torch.arange(6))["image"])
    plain = resident.batch(torch.arange(6), augment=False)
    assert set(batch["mask"].unique().tolist()) <= {0.0, 1.0}  # nearest: labels stay labels
    assert torch.isfinite(batch["image"]).all()
    moved = (batch["mask"] != plain["mask"]).flatten(1).any(1)
    assert moved.sum() >= 4  # prob * 0.6 = 0.6 per sample


def test_identity_settings_change_nothing(samples):
    resident = ResidentDataset2D(samples, 3, 1, (24, 24))
    x = resident.batch(torch.arange(5), augment=False)
    off = AugmentConfig(rot90=True, flip=True, affine=True, intensity=True, prob=0.0)
    images, masks = augment_batch(x["image"], x["mask"], off, torch.Generator().manual_seed(0))
    assert torch.equal(images, x["image"]) and torch.equal(masks, x["mask"])


def test_refuses_what_it_cannot_hold(tmp_path):
    assert resident_bytes(10, 3, (256, 256)) == 10 * 4 * 256 * 256
    check_fits(10**6, 3, (256, 256), "cpu")  # host memory is not budgeted
    for folder in ("images", "masks"):
        (tmp_path / folder).mkdir()
    Image.fromarray(np.full((8, 8), 4000, np.uint16)).save(tmp_path / "images" / "a.png")  # 16-bit
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "masks" / "a.png")
    with pytest.raises(NotResident, match="not 8-bit"):
        ResidentDataset2D(discover_pairs(tmp_path), 1, 1, (8, 8))


def _fit(samples, run_dir, resident, epochs=3, stop_after=None, resume=False):
    pre = Preprocessing2D(3, (24, 24))
    aug = AugmentConfig(affine=True, intensity=True)
    train = ResidentDataset2D(samples[:7], 3, 1, pre.size, augment=aug, seed=3) if resident else None
    val = SegDataset2D(samples[7:], 3, 1, eval_transform(pre.size))
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3, padding=1),
        torch.nn.BatchNorm2d(6),
        torch.nn.ReLU(),
        torch.nn.Conv2d(6, 1, 3, padding=1),
    )
    optim = OptimConfig(lr=0.05)
    optimizer = build_optimizer(model, optim)
    scheduler = build_scheduler(optimizer, optim, epochs * steps_per_epoch(7, 3))
    validate = validator_2d(val, pre, 1, torch.device("cpu"), batch_size=2)
    meta = CheckpointMeta("tiny", 3, 1, preprocessing=pre.to_dict())
    run = Run(model, train, SegmentationLoss(1), optimizer, scheduler, validate, meta, run_dir)
    stop = (lambda p: p.epoch >= stop_after) if stop_after else None
    return model, fit(run, LoopConfig(epochs=epochs, batch_size=3, seed=1), resume=resume, stop=stop)


def test_training_on_the_resident_set_resumes_exactly(samples, tmp_path):
    straight, p_straight = _fit(samples, tmp_path / "a", True)
    _fit(samples, tmp_path / "b", True, stop_after=1)
    resumed, p_resumed = _fit(samples, tmp_path / "b", True, resume=True)
    assert p_resumed.step == p_straight.step == 6
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    losses = [r["train_loss"] for r in p_straight.history]
    assert losses == [r["train_loss"] for r in p_resumed.history] and all(np.isfinite(losses))
