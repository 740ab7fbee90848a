"""2D validation during training: resized validation sets are read once and their batches reused."""

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from rwkvseg.records import Preprocessing2D
from rwkvseg.train import validate as validate_module
from rwkvseg.train.validate import keeps_batches, validator_2d
from writers import Bright


class Counted(Dataset):
    """Images with a bright square (the mask), half of them shifted; counts every item read."""

    def __init__(self, n=5, size=16):
        self.n, self.size, self.reads = n, size, 0

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.reads += 1
        mask = torch.zeros(1, self.size, self.size)
        mask[:, 2 + i : 9 + i, 3:12] = 1
        image = mask.expand(3, -1, -1).clone()
        if i % 2:
            image = image.roll(2, dims=2)  # the prediction misses part of the mask: Dice below 1
        return {"image": image, "mask": mask}


@pytest.mark.parametrize("resize", ["resize", "crop"])
def test_resized_sets_are_read_once_and_score_the_same(resize):
    data = Counted()
    pre = Preprocessing2D(3, (16, 16), resize, "dtype")
    validate = validator_2d(data, pre, 1, torch.device("cpu"), batch_size=2)
    first = validate(Bright(3, 1))
    assert data.reads == 5 and 0.5 < first["dice"] < 1
    again = validate(Bright(3, 1))
    assert again == first
    assert data.reads == (5 if resize == "resize" else 10)  # crop mode reads whole images every time


def test_sets_over_the_budget_are_read_every_time(monkeypatch):
    pre = Preprocessing2D(3, (16, 16), "resize", "dtype")
    need = 5 * (3 * 4 + 1) * 16 * 16  # float32 images, uint8 masks
    assert keeps_batches(5, pre, torch.device("cpu"))
    monkeypatch.setattr(validate_module, "KEEP_HOST_BYTES", need - 1)
    assert not keeps_batches(5, pre, torch.device("cpu"))
    data = Counted()
    validate = validator_2d(data, pre, 1, torch.device("cpu"), batch_size=2)
    scores = [validate(Bright(3, 1)) for _ in range(2)]
    assert data.reads == 10 and scores[0] == scores[1]
    assert np.isfinite(scores[0]["dice"])
