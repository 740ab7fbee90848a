import pytest

from rwkvseg.train.config import TrainConfig, apply_overrides, from_dict, load_config, to_dict


def test_toml_yaml_and_overrides(tmp_path):
    (tmp_path / "c.toml").write_text(
        'epochs = 5\n[model]\nname = "urwkv_s"\n[data]\nroot = "x"\nsize = [64, 96]\n'
        '[data.augment]\naffine = true\n[optim]\nname = "adamw"\nschedule = "cosine"\nlr = 1e-3\n'
    )
    (tmp_path / "c.yaml").write_text(
        "epochs: 5\nmodel: {name: urwkv_s}\ndata: {root: x, size: [64, 96], "
        "augment: {affine: true}}\noptim: {name: adamw, schedule: cosine, lr: 0.001}\n"
    )
    a = load_config(tmp_path / "c.toml")
    assert a == load_config(tmp_path / "c.yaml")
    assert a.data.size == (64, 96) and a.data.augment.affine and a.optim.lr == 1e-3
    b = load_config(
        tmp_path / "c.toml",
        [
            "optim.lr=0.05",
            "data.size=[32,48]",
            "data.augment.flip=false",
            "model.overrides={drop_path: 0.1}",
            "data.class_names=polyp",
        ],
    )
    assert b.optim.lr == 0.05 and b.data.size == (32, 48) and not b.data.augment.flip
    assert b.model.overrides == {"drop_path": 0.1} and b.data.class_names == ("polyp",)
    assert from_dict(TrainConfig, to_dict(b)) == b  # the resolved config written to a run folder reloads


def test_unknown_keys_and_bad_values_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"unknown setting\(s\) optim\.learning_rate; valid keys here: optim\.name"):
        load_config(None, ["optim.learning_rate=0.1"])
    with pytest.raises(ValueError, match=r"unknown setting\(s\) epoch;"):
        load_config(None, ["epoch=3"])
    with pytest.raises(ValueError, match="epochs must be an integer, got 'many'"):
        load_config(None, ["epochs=many"])
    with pytest.raises(ValueError, match=r"optim\.name = 'adam' is not valid; choose one of sgd, adamw"):
        load_config(None, ["optim.name=adam"])
    with pytest.raises(ValueError, match=r"data\.size needs 2 values"):
        load_config(None, ["data.size=[1,2,3]"])
    with pytest.raises(ValueError, match="must look like key=value"):
        apply_overrides({}, ["epochs"])
    (tmp_path / "bad.toml").write_text("epochs = [")
    with pytest.raises(ValueError, match=r"bad\.toml cannot be parsed"):
        load_config(tmp_path / "bad.toml")
    with pytest.raises(FileNotFoundError, match=r"nope\.toml"):
        load_config(tmp_path / "nope.toml")


def test_changed_settings_names_what_a_resume_changes_but_not_the_moved_folder():
    from rwkvseg.train.run import changed_settings

    saved = load_config(None, ["data.root=/a/data", "out=/a/run"])
    moved = load_config(None, ["data.root=/a/data", "out=/b/run"])
    assert changed_settings(saved, moved) == []
    changed = load_config(None, ["data.root=/b/data", "out=/b/run", "optim.lr=0.5", "data.size=[32,32]"])
    assert changed_settings(saved, changed) == ["data.root", "data.size", "optim.lr"]


def test_fit_schedule_needs_a_time_budget(tmp_path):
    with pytest.raises(ValueError, match=r"max_minutes = 0 sets none: set max_minutes > 0, or fit_schedule = false$"):
        load_config(None, ["fit_schedule=true"])
    (tmp_path / "c.toml").write_text("max_minutes = 30\nfit_schedule = true\n")
    config = load_config(tmp_path / "c.toml")
    assert config.fit_schedule and config.max_minutes == 30
    assert not load_config(tmp_path / "c.toml", ["fit_schedule=false", "max_minutes=0"]).fit_schedule
    with pytest.raises(ValueError, match="fit_schedule must be true or false, got 'maybe'"):
        load_config(tmp_path / "c.toml", ["fit_schedule=maybe"])
