"""Issue 18, data loss: an output is never, contains or sits inside an input; --overwrite replaces only what
rwkvseg wrote; a run folder is locked while a run writes it."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from hardening.helpers import bright_checkpoint, cli, snapshot, square
from rwkvseg.data.compact2d import export_compact
from rwkvseg.demo import DemoConfig, run_demo
from rwkvseg.files import LOCK, MARKER, check_json_replaceable, folder_lock
from rwkvseg.models import registry
from writers import save_nifti, save_png


@pytest.fixture
def bright(monkeypatch):
    from hardening.helpers import Bright

    monkeypatch.setattr(registry, "_builders", lambda: {"bright": Bright})


@pytest.mark.parametrize("overwrite", [False, True])
def test_predict_2d_into_its_input_folder(tmp_path, capsys, bright, overwrite):
    ck = bright_checkpoint(tmp_path)
    src = tmp_path / "in"
    save_png(src / "a.png", square())
    before = snapshot(src)
    code, err = cli(capsys, "predict", ck, src, "--out", src, *(["--overwrite"] if overwrite else []))
    assert code == 2 and "is the input" in err and str(src) in err and "--overwrite" not in err
    assert snapshot(src) == before


def test_predict_2d_out_inside_or_around_the_input(tmp_path, capsys, bright):
    ck = bright_checkpoint(tmp_path)
    src = tmp_path / "data" / "images"
    save_png(src / "a.png", square())
    before = snapshot(tmp_path / "data")
    code, err = cli(capsys, "predict", ck, src, "--out", src / "pred", "--overwrite")
    assert code == 2 and "is inside the input" in err
    code, err = cli(capsys, "predict", ck, src / "a.png", "--out", tmp_path / "data", "--overwrite")
    assert code == 2 and "contains the input" in err and "a.png" in err
    assert snapshot(tmp_path / "data") == before


def test_predict_3d_into_the_folder_of_its_volumes(tmp_path, capsys, bright):
    ck = bright_checkpoint(tmp_path, dims=3)
    src = tmp_path / "case"
    t1 = save_nifti(src / "case_t1.nii.gz", np.ones((8, 8, 8), np.float32))
    before = snapshot(src)
    code, err = cli(capsys, "predict", ck, t1, "--out", src, "--overwrite")
    assert code == 2 and "contains the input" in err and "case_t1.nii.gz" in err and "--overwrite" not in err
    assert snapshot(src) == before


def test_predict_overwrite_replaces_only_rwkvseg_outputs(tmp_path, capsys, bright):
    ck = bright_checkpoint(tmp_path)
    src = tmp_path / "in"
    save_png(src / "a.png", square())
    mine = tmp_path / "mine"  # the user's folder with a file that has an output's name
    save_png(mine / "a.png", np.full((5, 5), 7, np.uint8))
    before = snapshot(mine)
    code, err = cli(capsys, "predict", ck, src, "--out", mine, "--overwrite")
    assert code == 2 and "not written by rwkvseg" in err and str(mine) in err
    assert snapshot(mine) == before
    out = tmp_path / "out"  # a folder predict made: replaced with --overwrite
    assert cli(capsys, "predict", ck, src, "--out", out)[0] == 0
    assert (out / MARKER).is_file() and (out / "a.png").is_file()
    assert cli(capsys, "predict", ck, src, "--out", out, "--overwrite")[0] == 0


def test_predict_out_is_a_file(tmp_path, capsys, bright):
    ck = bright_checkpoint(tmp_path)
    save_png(tmp_path / "in" / "a.png", square())
    (tmp_path / "out.txt").write_text("keep")
    code, err = cli(capsys, "predict", ck, tmp_path / "in", "--out", tmp_path / "out.txt")
    assert code == 2 and "out.txt is a file" in err
    assert (tmp_path / "out.txt").read_text() == "keep"


def _dataset(root):
    for i in range(2):
        save_png(root / "images" / f"c{i}.png", square())
        save_png(root / "masks" / f"c{i}.png", square())


@pytest.mark.parametrize("overwrite", [False, True])
def test_compact2d_onto_its_source(tmp_path, capsys, overwrite):
    data = tmp_path / "data"
    _dataset(data)
    before = snapshot(tmp_path)
    code, err = cli(capsys, "compact2d", data, data, "--size", 16, *(["--overwrite"] if overwrite else []))
    assert code == 2 and "is the input" in err and "--overwrite" not in err
    assert snapshot(tmp_path) == before


def test_compact2d_into_the_parent_of_its_source(tmp_path, capsys):
    parent = tmp_path / "parent"
    _dataset(parent / "data")
    (parent / "notes.txt").write_text("unrelated")
    before = snapshot(parent)
    code, err = cli(capsys, "compact2d", parent / "data", parent, "--size", 16, "--overwrite")
    assert code == 2 and "contains the input" in err
    assert snapshot(parent) == before


def test_compact2d_overwrite_replaces_only_its_own_copy(tmp_path, capsys):
    data = tmp_path / "data"
    _dataset(data)
    other = tmp_path / "other"
    (other / "keep.txt").parent.mkdir()
    (other / "keep.txt").write_text("mine")
    code, err = cli(capsys, "compact2d", data, other, "--size", 16, "--overwrite")
    assert code == 2 and "not written by rwkvseg" in err and (other / "keep.txt").read_text() == "mine"
    copy = tmp_path / "copy"
    export_compact(data, copy, size=16)
    assert (copy / MARKER).is_file()
    assert oct(copy.stat().st_mode & 0o777) == oct(0o777 & ~_umask())
    export_compact(data, copy, size=16, overwrite=True)
    assert sorted(p.name for p in (copy / "images").iterdir()) == ["c0.jpg", "c1.jpg"]


def _umask():
    old = os.umask(0)
    os.umask(old)
    return old


def test_demo_out_is_its_data(tmp_path, capsys):
    data = tmp_path / "D"
    _dataset(data)
    before = snapshot(data)
    code, err = cli(capsys, "demo", "--data", data, "--out", data, "--overwrite", "--no-3d")
    assert code == 2 and "is the input" in err and "--overwrite" not in err
    assert snapshot(data) == before


def test_demo_overwrite_never_deletes_a_folder_it_did_not_make(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(FileExistsError, match="not written by rwkvseg"):
        run_demo(DemoConfig(out=out, overwrite=True, with_3d=False))
    assert (out / "thesis.tex").read_text() == "years of work"


def test_run_folder_lock_refuses_a_second_writer_and_takes_over_a_stale_one(tmp_path):
    run = tmp_path / "runs" / "x"
    with folder_lock(run) as lock:
        assert lock == run / LOCK and lock.is_file()
        # a second process (another `rwkvseg train --out runs/x`) is refused while the first writes
        code = (
            "import sys; from rwkvseg.files import folder_lock\n"
            f"try:\n    folder_lock({str(run)!r}).__enter__()\nexcept FileExistsError as e:\n"
            "    print(e); sys.exit(3)"
        )
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        assert done.returncode == 3 and f"process {os.getpid()}" in done.stdout and "another --out" in done.stdout
    assert not (run / LOCK).exists()
    # a lock left by a process that died (kill -9): taken over
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    (run / LOCK).write_text(f"{socket.gethostname()} {int(dead.stdout)}\n")
    with folder_lock(run):
        assert (run / LOCK).read_text().split()[1] == str(os.getpid())


def test_train_cli_refuses_a_locked_run_folder(tmp_path, capsys):
    run = tmp_path / "runs" / "x"
    data = tmp_path / "data"
    _dataset(data)
    with folder_lock(run):
        code, err = cli(capsys, "train", "--data", data, "--out", run, "--set", "epochs=1")
    assert code == 2 and "is being written by another run" in err and str(run) in err
    assert sorted(p.name for p in run.iterdir()) == []


def test_refusals_offer_overwrite_only_where_it_would_be_accepted(tmp_path, capsys, bright):
    ck = bright_checkpoint(tmp_path)
    src = tmp_path / "in"
    save_png(src / "a.png", square())
    mine = tmp_path / "mine"  # the user's folder, holding a file with an output's name
    save_png(mine / "a.png", np.full((5, 5), 7, np.uint8))
    code, err = cli(capsys, "predict", ck, src, "--out", mine)
    assert code == 2 and "a.png" in err and "was not made by rwkvseg" in err and "--overwrite would not" in err
    code, err = cli(capsys, "predict", ck, src, "--out", mine, "--overwrite")  # as the first message said
    assert code == 2 and "not written by rwkvseg" in err
    out = tmp_path / "out"  # rwkvseg's own folder: --overwrite is offered, and accepted
    assert cli(capsys, "predict", ck, src, "--out", out)[0] == 0
    code, err = cli(capsys, "predict", ck, src, "--out", out)
    assert code == 2 and err.rstrip().endswith("choose another --out or pass --overwrite")
    assert cli(capsys, "predict", ck, src, "--out", out, "--overwrite")[0] == 0
    # evaluate: the same rule, and its output stays apart from the folders it scores
    (mine / "summary.json").write_text("{}")
    code, err = cli(capsys, "evaluate", out, src, "--out", mine)
    assert code == 2 and "summary.json" in err and "--overwrite would not" in err
    code, err = cli(capsys, "evaluate", out, src, "--out", out / "scores")
    assert code == 2 and "is inside the input" in err and not (out / "scores").exists()
    # split: a file of that name which is not a split is never replaced
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}')
    _dataset(tmp_path / "data")
    code, err = cli(capsys, "split", tmp_path / "data", "--out", notes, "--overwrite")
    assert code == 2 and "not a split file rwkvseg wrote" in err and "pass --overwrite" not in err
    assert notes.read_text() == '{"mine": true}'
    # synthetic3d: writes into a non-empty folder only when rwkvseg made it
    code, err = cli(capsys, "synthetic3d", mine, "--cases", 1, "--overwrite")
    assert (
        code == 2
        and "not written by rwkvseg" in err
        and sorted(p.name for p in mine.iterdir())
        == [
            "a.png",
            "summary.json",
        ]
    )


def test_a_json_output_replaces_only_its_own_kind(tmp_path):
    def ours(data):
        return isinstance(data, dict) and data.get("written_by") == "me"

    new = tmp_path / "new.json"
    check_json_replaceable(new, False, ours, "a record")  # a new path passes, with or without --overwrite
    mine = tmp_path / "mine.json"
    mine.write_text('{"written_by": "me"}')
    with pytest.raises(FileExistsError, match="choose another file or pass --overwrite"):
        check_json_replaceable(mine, False, ours, "a record")
    check_json_replaceable(mine, True, ours, "a record")
    # another JSON, text that is not JSON, bytes that are not text: never replaced, and --overwrite not offered
    for name, content in [("other.json", b'{"written_by": "you"}'), ("notes.json", b"{not json"), ("b.json", b"\xff")]:
        path = tmp_path / name
        path.write_bytes(content)
        for overwrite in (False, True):
            with pytest.raises(FileExistsError, match="is not a record rwkvseg wrote") as err:
                check_json_replaceable(path, overwrite, ours, "a record")
            assert "pass --overwrite" not in str(err.value) and path.read_bytes() == content
