import json

import pytest
import torch
from torch import nn

from rwkvseg.checkpoint import CheckpointMeta, checkpoint_paths, load_checkpoint, read_meta, save_checkpoint
from rwkvseg.models import registry


class TinyNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1)
        self.head = nn.Conv2d(width, num_classes, 1)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)))


@pytest.fixture
def tiny_registry(monkeypatch):
    monkeypatch.setattr(registry, "_builders", lambda: {"tiny": TinyNet})


def test_roundtrip_rebuilds_from_sidecar(tmp_path, tiny_registry):
    torch.manual_seed(0)
    model = TinyNet(2, 3, width=5)
    meta = CheckpointMeta(
        "tiny",
        2,
        3,
        model_overrides={"width": 5},
        preprocessing={"size": [17, 19]},
        class_names=("a", "b", "c"),
        spacing=(0.5, 0.7),
        training={"best_epoch": 3},
    )
    weights, sidecar = save_checkpoint(tmp_path / "run" / "best", model, meta)
    assert weights.name == "best.safetensors" and sidecar.name == "best.json"
    loaded, meta2 = load_checkpoint(tmp_path / "run" / "best.safetensors")
    assert meta2 == meta
    assert not loaded.training
    x = torch.randn(2, 2, 17, 19)
    torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["best.json", "best.safetensors"]


def test_never_overwrites_unless_asked(tmp_path, tiny_registry):
    meta = CheckpointMeta("tiny", 1, 1)
    save_checkpoint(tmp_path / "m", TinyNet(1, 1), meta)
    before = (tmp_path / "m.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match=r"m\.safetensors"):
        save_checkpoint(tmp_path / "m", TinyNet(1, 1), meta)
    assert (tmp_path / "m.safetensors").read_bytes() == before
    save_checkpoint(tmp_path / "m", TinyNet(1, 1), meta, overwrite=True)
    assert (tmp_path / "m.safetensors").read_bytes() != before


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path, tiny_registry, monkeypatch):
    meta = CheckpointMeta("tiny", 1, 1)
    save_checkpoint(tmp_path / "m", TinyNet(1, 1), meta)
    before = (tmp_path / "m.safetensors").read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("rwkvseg.checkpoint.save_model", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "m", TinyNet(1, 1), meta, overwrite=True)
    assert (tmp_path / "m.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.safetensors"]


def test_bad_sidecars_name_the_file(tmp_path, tiny_registry):
    save_checkpoint(tmp_path / "m", TinyNet(1, 1), CheckpointMeta("tiny", 1, 1))
    _, sidecar = checkpoint_paths(tmp_path / "m")
    data = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**data, "colour": "red"}))
    with pytest.raises(ValueError, match=r"unknown keys.*colour"):
        read_meta(tmp_path / "m")
    sidecar.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_meta(tmp_path / "m")
    sidecar.unlink()
    with pytest.raises(FileNotFoundError, match=r"m\.json"):
        load_checkpoint(tmp_path / "m")


def test_weights_from_another_architecture_are_refused(tmp_path, tiny_registry):
    save_checkpoint(tmp_path / "m", TinyNet(1, 1), CheckpointMeta("tiny", 1, 1))
    _, sidecar = checkpoint_paths(tmp_path / "m")
    data = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**data, "in_channels": 3}))
    with pytest.raises(ValueError, match=r"does not fit model .tiny.*in_channels=3"):
        load_checkpoint(tmp_path / "m")
