"""The daily commands end to end (split -> train -> resume -> predict -> evaluate) and their bad-input exits."""

import json
import re

import numpy as np
import pytest
from PIL import Image

from rwkvseg.cli import main
from rwkvseg.data.synthetic import write_synthetic_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    write_synthetic_dataset(root, n=6, shape=(37, 41), seed=4)
    return root


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_split_train_resume_predict_evaluate(dataset, tmp_path, capsys):
    split = tmp_path / "split.json"
    assert run(capsys, "split", dataset, "--out", split, "--val-fraction", "0.3")[0] == 0
    config = tmp_path / "c.toml"
    config.write_text(
        'epochs = 2\nmax_steps_per_epoch = 1\n[model]\nname = "urwkv_test"\n'
        "[data]\nsize = [32, 32]\nbatch_size = 2\nval_batch_size = 2\nnum_workers = 0\n"
    )
    run_dir = tmp_path / "run"
    base = ["train", config, "--data", dataset, "--out", run_dir, "--no-progress", "--set", f"data.split={split}"]
    code, out, _ = run(capsys, *base, "--set", "epochs=1")
    assert code == 0 and "best validation dice" in out
    code, _, err = run(capsys, *base)
    assert code == 2 and "pass --resume" in err
    assert run(capsys, *base, "--resume")[0] == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs_done"] == 2 and summary["steps"] == 2
    timed = tmp_path / "timed"
    budget = ["--set", "epochs=50", "--set", "max_minutes=0.0001", "--no-progress"]
    assert run(capsys, "train", config, "--data", dataset, "--out", timed, *budget)[0] == 0
    assert json.loads((timed / "summary.json").read_text())["epochs_done"] == 1
    assert json.loads((run_dir / "split.json").read_text()) == json.loads(split.read_text())

    pred = tmp_path / "pred"
    code, out, _ = run(
        capsys,
        "predict",
        run_dir / "best.safetensors",
        dataset / "images",
        "--out",
        pred,
        "--overlay",
        "--batch-size",
        "2",
    )
    assert code == 0 and "wrote 6 masks" in out
    assert Image.open(pred / "lesion_003.png").size == (41, 37)
    code, out, _ = run(capsys, "evaluate", pred, dataset, "--out", tmp_path / "ev")
    assert code == 0 and "dice" in out
    ev = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert ev["cases"] == 6 and 0.0 <= ev["dice"]["mean"] <= 1.0


def test_bad_inputs_exit_nonzero_and_name_the_file(dataset, tmp_path, capsys):
    code, _, err = run(capsys, "split", tmp_path / "missing", "--out", tmp_path / "s.json")
    assert code == 2 and "missing does not exist" in err
    (tmp_path / "empty" / "images").mkdir(parents=True)
    (tmp_path / "empty" / "masks").mkdir()
    code, _, err = run(
        capsys, "train", "--data", tmp_path / "empty", "--out", tmp_path / "r", "--set", "model.name=urwkv_test"
    )
    assert code == 2 and "holds no images" in err
    code, _, err = run(capsys, "train", "--set", "optim.lr=fast")
    assert code == 2 and "optim.lr must be a number" in err
    code, _, err = run(capsys, "predict", tmp_path / "nothing.safetensors", dataset / "images", "--out", tmp_path / "p")
    assert code == 2 and "nothing.json not found" in err
    code, _, err = run(capsys, "evaluate", tmp_path / "nopred", dataset)
    assert code == 2 and "nopred does not exist" in err
    gray = tmp_path / "gray"
    gray.mkdir()
    Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(gray / "x.png")
    code, _, err = run(capsys, "split", gray, "--out", tmp_path / "s.json")
    assert code == 2 and "no image/mask folder pair" in err


def _copy_dataset(src, dst):
    for sub in ("images", "masks"):
        (dst / sub).mkdir(parents=True)
        for f in sorted((src / sub).iterdir())[:6]:
            (dst / sub / f.name).write_bytes(f.read_bytes())
    return dst


def _truncate(data):
    """Keep the header (so the pre-flight check passes) and cut the pixels: fails only when decoded in a worker."""
    path = data / "images" / "lesion_004.png"
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "masks" / "lesion_001.png").unlink(), r"no mask in .*masks for 1 image\(s\).*lesion_001\.png"),
        (
            lambda d: Image.fromarray(np.zeros((5, 7), np.uint8)).save(d / "masks" / "lesion_002.png"),
            r"mask .*lesion_002\.png is 7x5 \(WxH\) but image .*lesion_002\.png is 41x37",
        ),
        (
            lambda d: (d / "images" / "lesion_003.png").write_bytes(b"\x89PNG broken"),
            r"cannot read image .*lesion_003\.png",
        ),
        (lambda d: (d / "images" / "notes.docx").write_bytes(b"x"), r"notes\.docx.*--skip-non-images"),
        (_truncate, r"^rwkvseg: error: .*cannot read image .*lesion_004\.png \(image file is truncated\)"),
    ],
    ids=["missing-mask", "mask-size", "unreadable-image", "non-image-file", "truncated-in-a-worker"],
)
def test_train_refuses_bad_datasets_before_writing(dataset, tmp_path, capsys, damage, message):
    data = _copy_dataset(dataset, tmp_path / "d")
    damage(data)
    args = ["train", "--data", data, "--out", tmp_path / "run", "--no-progress", "--set", "model.name=urwkv_test"]
    code, _, err = run(capsys, *args, "--set", "data.size=[32,32]", "--set", "data.num_workers=1")
    assert code == 2 and re.search(message, err, flags=re.MULTILINE), err
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "state.pt").exists()


def test_predict_wrong_channels_keeps_earlier_outputs(tmp_path, capsys):
    from rwkvseg.checkpoint import CheckpointMeta, save_checkpoint
    from rwkvseg.models import create_model
    from rwkvseg.records import Preprocessing2D

    meta = CheckpointMeta("urwkv_test", 1, 1, preprocessing=Preprocessing2D(1, (32, 32)).to_dict())
    save_checkpoint(tmp_path / "gray", create_model("urwkv_test", 1, 1), meta)
    images = tmp_path / "in"
    images.mkdir()
    Image.fromarray(np.full((20, 24), 90, np.uint8)).save(images / "a_gray.png")
    rgb = np.zeros((20, 24, 3), np.uint8)
    rgb[..., 1] = 200
    Image.fromarray(rgb).save(images / "b_rgb.png")
    out = tmp_path / "out"
    code, _, err = run(capsys, "predict", tmp_path / "gray.safetensors", images, "--out", out, "--batch-size", "1")
    assert code == 2 and re.search(r"b_rgb\.png has 3 channels, the model expects 1", err)
    assert Image.open(out / "a_gray.png").size == (24, 20)
    code, _, err = run(capsys, "predict", tmp_path / "gray.safetensors", images / "a_gray.png", "--out", out)
    assert code == 2 and "--overwrite" in err
