"""The daily commands end to end (split -> train -> resume -> predict -> evaluate) and their bad-input exits."""

import json

import numpy as np
import pytest
from PIL import Image

from rwkvseg.cli import main
from rwkvseg.data.synthetic import write_synthetic_dataset
from rwkvseg.models import list_models

pytestmark = pytest.mark.skipif("urwkv_test" not in list_models(), reason="urwkv_test is not registered yet")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    write_synthetic_dataset(root, n=10, shape=(37, 41), seed=4)
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
    assert code == 0 and "wrote 10 masks" in out
    assert Image.open(pred / "lesion_003.png").size == (41, 37)
    code, out, _ = run(capsys, "evaluate", pred, dataset, "--out", tmp_path / "ev")
    assert code == 0 and "dice" in out
    ev = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert ev["cases"] == 10 and 0.0 <= ev["dice"]["mean"] <= 1.0


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
