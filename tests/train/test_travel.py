"""A run carried in parts (rwkvseg pack / unpack): byte-identical files, an exact resume from the unpacked folder,
and clear refusals of missing, damaged, foreign or clobbering input."""

import csv
import hashlib
import io
import json
import shutil
import tarfile

import pytest
import torch

from rwkvseg.checkpoint import CheckpointMeta, save_checkpoint
from rwkvseg.cli import main
from rwkvseg.models import create_model
from rwkvseg.train.config import load_config
from rwkvseg.train.train import train
from rwkvseg.train.travel import (
    MiB,
    call_batches,
    copy_parts,
    pack_run,
    part_indices,
    parts_status,
    read_manifest,
    unpack_run,
)
from writers import write_tiny_2d_run_config

PART_MIB = 0.05  # urwkv_test's run is about 0.5 MiB: several parts


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    return write_tiny_2d_run_config(tmp_path_factory.mktemp("travel"), epochs=3)


def _train(config, out, stop_after=None, resume=False):
    stop = (lambda p: p.epoch >= stop_after) if stop_after else None
    return train(load_config(config, [f"out={out}"]), resume=resume, stop=stop)


@pytest.fixture(scope="module")
def half_run(config, tmp_path_factory):
    """A run of 3 epochs stopped after the first (what a call that ran out of time leaves)."""
    run = tmp_path_factory.mktemp("half") / "run"
    assert _train(config, run, stop_after=1).epoch == 1
    return run


@pytest.fixture(scope="module")
def packed(half_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("parts")
    return pack_run(half_run, out, part_mib=PART_MIB)


def _parts(tmp_path, packed):
    """A copy of the packed parts that a test may damage."""
    copy = tmp_path / "parts"
    shutil.copytree(packed.parent, copy)
    manifest, path = read_manifest(copy)
    return manifest, path, [copy / p["name"] for p in manifest["parts"]]


def _history(run):
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    return [{k: v for k, v in row.items() if "seconds" not in k} for row in rows]


def test_pack_writes_sorted_parts_within_the_size_and_unpack_restores_the_files(half_run, packed, tmp_path):
    manifest, _ = read_manifest(packed)
    names = [p["name"] for p in manifest["parts"]]
    assert len(names) >= 3 and names == sorted(names) and names[0] == "run.tar.000"
    assert sorted(p.name for p in packed.parent.iterdir()) == sorted([*names, "run.manifest.json"])
    assert all(0 < p["size"] <= PART_MIB * MiB for p in manifest["parts"])
    assert manifest["total_bytes"] == sum((packed.parent / n).stat().st_size for n in names)
    assert manifest["progress"]["epoch"] == 1 and manifest["progress"]["epochs"] == 3
    files = {f["path"]: f for f in manifest["files"]}
    required = {"config.json", "split.json", "state.pt", "best.json", "best.safetensors", "metrics.csv"}
    assert required <= files.keys()
    # after a finished epoch `last` holds the model of state.pt: it travels as its header, rebuilt on unpack
    assert files["last.safetensors"]["rebuilt_from"] == "state.pt"
    assert files["last.safetensors"]["header"]["size"] < 0.2 * files["last.safetensors"]["size"]
    assert not (half_run / ".rwkvseg.lock").exists()

    run = unpack_run(packed.parent, tmp_path / "moved")
    for name, record in files.items():
        data = (run / name).read_bytes()
        assert data == (half_run / name).read_bytes(), name
        assert hashlib.sha256(data).hexdigest() == record["sha256"]
    assert sorted(p.name for p in run.iterdir()) == sorted(files)
    assert [p.name for p in tmp_path.iterdir()] == ["moved"]  # no staging folder left behind


def test_a_run_resumed_from_its_unpacked_parts_equals_the_uninterrupted_run(config, packed, tmp_path, capsys):
    straight = tmp_path / "straight"
    assert _train(config, straight).epoch == 3
    moved = unpack_run(packed, tmp_path / "moved")
    assert main(["train", "--resume", "--out", str(moved), "--no-progress"]) == 0
    capsys.readouterr()
    assert _history(moved) == _history(straight)
    for name in ("best.safetensors", "last.safetensors"):
        assert (moved / name).read_bytes() == (straight / name).read_bytes(), name
    a = torch.load(straight / "state.pt", weights_only=True)
    b = torch.load(moved / "state.pt", weights_only=True)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert a["progress"]["step"] == b["progress"]["step"] == 3


def test_a_checkpoint_that_differs_from_the_state_travels_whole_and_a_stale_last_is_left_out(half_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(half_run, run)
    torch.manual_seed(5)
    other = create_model("urwkv_test", 3, 1)
    save_checkpoint(run / "other", other, CheckpointMeta("urwkv_test", 3, 1))
    (run / "other.safetensors").replace(run / "best.safetensors")  # a best from an earlier epoch
    shutil.copyfile(run / "best.safetensors", run / "last.safetensors")  # a last newer than state.pt
    (run / "notes.txt").write_text("mine")
    (run / "cache").mkdir()  # a 3D run's preprocessed data
    (run / "cache" / "case.npz").write_bytes(b"volume")
    (run / "tensorboard" / "a").mkdir(parents=True)
    (run / "tensorboard" / "a" / "events.out").write_bytes(b"curves")
    manifest, _ = read_manifest(pack_run(run, tmp_path / "parts", part_mib=PART_MIB))
    files = {f["path"]: f for f in manifest["files"]}
    assert "header" not in files["best.safetensors"] and "last.safetensors" not in files
    left_out = {item["path"]: item["why"] for item in manifest["left_out"]}
    assert left_out.keys() == {"last.safetensors", "last.json", "other.json", "notes.txt", "cache/"}
    assert "preprocesses data.root" in left_out["cache/"]
    moved = unpack_run(tmp_path / "parts", tmp_path / "moved")
    assert (moved / "best.safetensors").read_bytes() == (run / "best.safetensors").read_bytes()
    assert (moved / "tensorboard" / "a" / "events.out").read_bytes() == b"curves"
    assert not (moved / "cache").exists()
    assert not (moved / "last.safetensors").exists() and not (moved / "notes.txt").exists()


def test_missing_and_damaged_parts_are_named_and_nothing_is_unpacked(packed, tmp_path):
    _, path, parts = _parts(tmp_path, packed)
    dest = tmp_path / "run"
    data = bytearray(parts[1].read_bytes())
    data[len(data) // 2] ^= 1
    parts[1].write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"part\(s\) {parts[1].name} in .* are damaged.*copy them again"):
        unpack_run(path, dest)
    parts[2].unlink()
    missing = rf"1 of the {len(parts)} parts of run run are missing .*{parts[2].name}"
    with pytest.raises(FileNotFoundError, match=missing):
        unpack_run(path.parent, dest)
    assert [s for _, s in parts_status(path)][:3] == ["ok", "damaged", "missing"]
    assert not dest.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["parts"]


def test_unpack_never_replaces_a_folder_that_holds_files(packed, tmp_path):
    dest = tmp_path / "run"
    dest.mkdir()
    (dest / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match=r"already holds files .*nothing there is replaced"):
        unpack_run(packed, dest)
    assert [p.name for p in dest.iterdir()] == ["mine.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (unpack_run(packed, empty) / "state.pt").is_file()


def test_pack_never_replaces_parts_and_refuses_what_is_not_a_run(half_run, packed, tmp_path):
    with pytest.raises(FileExistsError, match=r"run\.tar\.000 already exists .*parts are never replaced"):
        pack_run(half_run, packed.parent, part_mib=PART_MIB)
    with pytest.raises(FileNotFoundError, match=r"holds no state\.pt"):
        pack_run(tmp_path, tmp_path.parent / "p")
    with pytest.raises(ValueError, match="is inside the run"):
        pack_run(half_run, half_run / "parts")
    with pytest.raises(ValueError, match="--part-mib must be positive"):
        pack_run(half_run, tmp_path / "p", part_mib=0)
    torn = tmp_path / "torn"
    shutil.copytree(half_run, torn)
    (torn / "state.pt").write_bytes((torn / "state.pt").read_bytes()[:1000])  # a copy cut short
    with pytest.raises(ValueError, match=r"cannot read training state .*torn/state\.pt"):
        pack_run(torn, tmp_path / "p")
    assert not (tmp_path / "p").exists() and not (torn / ".rwkvseg.lock").exists()


def _forged_pack(folder, member: tarfile.TarInfo, data=b"", listed=None):
    """One part holding `member` and a manifest that matches the part but lists only config.json (with the
    digest of `listed`, by default of data)."""
    folder.mkdir()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.addfile(member, io.BytesIO(data))
    part = buffer.getvalue()
    (folder / "run.tar.000").write_bytes(part)
    manifest = {
        "format": 1,
        "kind": "rwkvseg run parts",
        "run": "run",
        "progress": {"epoch": 1, "epochs": 2},
        "parts": [{"name": "run.tar.000", "size": len(part), "sha256": hashlib.sha256(part).hexdigest()}],
        "total_bytes": len(part),
        "files": [{"path": "config.json", "size": len(data), "sha256": hashlib.sha256(listed or data).hexdigest()}],
        "left_out": [],
    }
    (folder / "run.manifest.json").write_text(json.dumps(manifest))
    return folder


def test_archive_members_that_escape_the_run_folder_or_are_links_are_refused(tmp_path):
    escaping = tarfile.TarInfo("../x")
    escaping.size = 2
    with pytest.raises(ValueError, match=r"member '\.\./x' .* would be written outside .*nothing was unpacked"):
        unpack_run(_forged_pack(tmp_path / "a", escaping, b"hi"), tmp_path / "run")
    link = tarfile.TarInfo("config.json")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    with pytest.raises(ValueError, match="is not a plain file"):
        unpack_run(_forged_pack(tmp_path / "b", link), tmp_path / "run")
    stranger = tarfile.TarInfo("state.pt")
    with pytest.raises(ValueError, match="not listed in the manifest"):
        unpack_run(_forged_pack(tmp_path / "c", stranger), tmp_path / "run")
    changed = tarfile.TarInfo("config.json")
    changed.size = 2
    with pytest.raises(ValueError, match=r"config\.json unpacked from .* differs from its sha256 in the manifest"):
        unpack_run(_forged_pack(tmp_path / "d", changed, b"hi", listed=b"ho"), tmp_path / "run")
    garbage = _forged_pack(tmp_path / "e", escaping, b"hi")
    (garbage / "run.tar.000").write_bytes(b"\x01" * 1024)
    manifest = json.loads((garbage / "run.manifest.json").read_text())
    manifest["parts"][0].update(size=1024, sha256=hashlib.sha256(b"\x01" * 1024).hexdigest())
    (garbage / "run.manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="do not hold a readable archive"):
        unpack_run(garbage, tmp_path / "run")
    assert not (tmp_path / "x").exists() and not (tmp_path / "run").exists()
    manifest = json.loads((tmp_path / "a" / "run.manifest.json").read_text())
    manifest["files"][0]["path"] = "../../outside.txt"
    (tmp_path / "a" / "run.manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="would be written outside"):
        unpack_run(tmp_path / "a", tmp_path / "run")


def test_parts_go_over_several_transfers(half_run, packed, tmp_path):
    manifest, path = read_manifest(packed)
    n = len(manifest["parts"])
    batches = call_batches(path, max_files=3, max_bytes=64 * MiB)
    assert batches == [list(range(i, min(i + 2, n))) for i in range(0, n, 2)]
    limit = int(path.stat().st_size + 1.5 * PART_MIB * MiB)  # one full part (and a short last one) per transfer
    by_bytes = call_batches(path, max_files=8, max_bytes=limit)
    assert all(len(b) == 1 for b in by_bytes[:-1]) and [i for b in by_bytes for i in b] == list(range(n))
    sizes = [p["size"] for p in manifest["parts"]]
    assert all(path.stat().st_size + sum(sizes[i] for i in b) <= limit for b in by_bytes)
    with pytest.raises(ValueError, match="smaller --part-mib"):
        call_batches(path, max_files=8, max_bytes=int(0.5 * PART_MIB * MiB))
    assert part_indices("0-1, 3", n) == [0, 1, 3]
    with pytest.raises(ValueError, match=f"its parts are 0-{n - 1}"):
        part_indices(f"2-{n}", n)
    gathered = tmp_path / "gathered"
    for batch in batches:  # each transfer lands in its own folder; the receiver gathers them
        sent = copy_parts(path, tmp_path / f"sent{batch[0]}", batch)
        assert len(sent) == len(batch) + 1
        gathered.mkdir(exist_ok=True)
        for file in sent:
            shutil.copyfile(file, gathered / file.name)
    with pytest.raises(FileExistsError, match="already exist"):
        copy_parts(path, tmp_path / "sent0", [0])
    run = unpack_run(gathered, tmp_path / "run")
    assert (run / "state.pt").read_bytes() == (half_run / "state.pt").read_bytes()


def test_commands_pack_parts_unpack_and_their_errors(half_run, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["pack", str(half_run), str(out), "--part-mib", str(PART_MIB)]) == 0
    printed = capsys.readouterr().out
    assert "packed" in printed and "run.tar.000" in printed and "rebuilt from state.pt on unpack" in printed
    assert main(["parts", str(out)]) == 0
    assert "parts ok" in capsys.readouterr().out
    assert main(["parts", str(out), "--copy", "0-1", "--to", str(tmp_path / "first")]) == 0
    assert "copied 2 part(s)" in capsys.readouterr().out
    assert main(["parts", str(tmp_path / "first")]) == 1
    assert "missing" in capsys.readouterr().out
    code = main(["unpack", str(tmp_path / "first"), str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("rwkvseg: error: ") and "are missing" in err and err.count("\n") == 1
    assert main(["unpack", str(out), str(tmp_path / "run")]) == 0
    assert "rwkvseg train --resume --out" in capsys.readouterr().out
    code = main(["unpack", str(out), str(tmp_path / "run")])
    assert code == 2 and "already holds files" in capsys.readouterr().err
    code = main(["pack", str(half_run), str(out)])
    assert code == 2 and "already exists" in capsys.readouterr().err


def test_checkpoints_of_an_averaged_run_travel_as_headers_rebuilt_from_the_average(config, tmp_path):
    run = tmp_path / "run"
    train(load_config(config, [f"out={run}", "optim.ema=0.5"]), stop=lambda p: p.epoch >= 1)
    state = torch.load(run / "state.pt", weights_only=True)
    assert any(not torch.equal(v, state["ema"]["module"][k]) for k, v in state["model"].items())
    manifest, _ = read_manifest(pack_run(run, tmp_path / "parts", part_mib=PART_MIB))
    files = {f["path"]: f for f in manifest["files"]}
    for name in ("best.safetensors", "last.safetensors"):  # epoch 1 is the best and the last: both the average's
        assert files[name]["rebuilt_from"] == "state.pt" and files[name]["tensors"] == "ema", name
    moved = unpack_run(tmp_path / "parts", tmp_path / "moved")
    for name in files:
        assert (moved / name).read_bytes() == (run / name).read_bytes(), name


def test_the_manifest_of_a_run_fitted_to_its_budget_gives_its_fitted_epochs(tmp_path):
    """pack's manifest (and the lines of pack, unpack and device_continue.py that read it) gives the epochs the run
    trains for: of a run fitted to its budget (fit_schedule) the fitted ones, not the config's."""
    from rwkvseg.train.travel import _manifest

    (tmp_path / "config.json").write_text(json.dumps({"epochs": 34}))
    progress = {"epoch": 3, "step": 750, "best_epoch": 2, "best_metric": 0.5}
    plain = _manifest("run", tmp_path, {"progress": progress}, [], {}, [], MiB)
    assert plain["progress"]["epochs"] == 34
    fit = {"planned": 34, "epochs": 29, "epoch": 2, "step": 500, "seconds_per_epoch": 27.3, "seconds_left": 912.0}
    fitted = _manifest("run", tmp_path, {"progress": progress | {"schedule_fit": fit}}, [], {}, [], MiB)
    assert fitted["progress"]["epochs"] == 29 and fitted["progress"]["epoch"] == 3
