"""A training run carried between machines in parts: what `rwkvseg train --resume` needs, as one tar archive split
into numbered parts of at most `part_mib` MiB, with a JSON manifest that names every part and file with its size
and sha256 (docs/checkpoint_format.md, "Carrying a run").

What travels: config.json, split.json and state.pt (what --resume reads), the `best` checkpoint (a resume rewrites
it only when a later epoch scores better), and the small records metrics.csv, summary.json, final_val.json and
tensorboard/. A checkpoint whose tensors equal the model in state.pt, or with optim.ema its average of the weights
(`last` always, `best` when the last epoch was the best), travels as its safetensors header alone and is rebuilt on
unpack from state.pt, byte for byte (its sha256 is checked). A `last` checkpoint that differs from state.pt (a run
killed between the two writes) is left out: the next epoch writes it again. Left out too: a 3D run's cache/ (a
resume preprocesses data.root into it again), the lock of a running run, and files rwkvseg did not write (named in
the manifest).

The archive is plain tar (stdlib tarfile), not compressed: float32 weights and optimizer moments gain about 8 %
from gzip (measured on U-RWKV's state.pt) at 30 MiB/s on one core, too little to change the number of parts.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from safetensors.torch import save as safetensors_save

from .. import __version__
from ..data.splits import SPLIT_FILE
from ..files import LOCK, atomic_write, file_mode, file_sha256, folder_lock, write_json
from .loop import METRICS_FILE, STATE_FILE, SUMMARY_FILE
from .run import CONFIG_FILE
from .state import read_state
from .volumes import CACHE_DIR, FINAL_FILE

log = logging.getLogger(__name__)

MANIFEST_FORMAT = 1
MANIFEST_KIND = "rwkvseg run parts"
MANIFEST_SUFFIX = ".manifest.json"
RESUME_FILES = (CONFIG_FILE, SPLIT_FILE, STATE_FILE)  # --resume reads these; a run folder without them is refused
RECORD_FILES = (METRICS_FILE, SUMMARY_FILE, FINAL_FILE)  # the run's own records, carried when present
RECORD_FOLDERS = ("tensorboard",)
CHECKPOINTS = ("best", "last")
HEADER_SUFFIX = ".header"  # an archive member holding a safetensors header; the tensors come from state.pt
MiB = 2**20

_LEFT_OUT = {CACHE_DIR: "the 3D preprocessed cache: a resume preprocesses data.root into it again"}


@dataclass(frozen=True)
class Part:
    """One part of a pack: its file name (beside the manifest), size in bytes and sha256."""

    name: str
    size: int
    sha256: str


# --- safetensors files rebuilt from the model in state.pt -------------------------------------------------------


class _NotRebuildable(Exception):
    """The tensors at hand do not reproduce a weights file (a different epoch, or tensors it does not hold)."""


def _read_header(weights: Path) -> bytes:
    """The first 8 + n bytes of a safetensors file: its little-endian length n, then n bytes of JSON."""
    with open(weights, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or 8 + n > weights.stat().st_size:
            raise ValueError(f"{weights} is not a safetensors file (its header length is wrong); copy it again")
        return head + f.read(n)


def _safetensors_bytes(header: bytes, tensors: Mapping[str, Any]) -> bytes:
    """The safetensors file with this header whose tensors are `tensors` (state-dict names), written by
    safetensors itself from the names and metadata the header lists (as checkpoint.save_checkpoint's save_model
    wrote it); _NotRebuildable when the result is not that header's file (other tensors, dtypes or shapes)."""
    table = json.loads(header[8:])
    metadata = table.pop("__metadata__", None)
    try:
        data = safetensors_save({name: tensors[name].contiguous() for name in table}, metadata=metadata)
    except (KeyError, AttributeError, TypeError, ValueError) as err:
        raise _NotRebuildable(str(err)) from None
    if not data.startswith(header):
        raise _NotRebuildable("the tensors do not give this header (other names, dtypes or shapes)")
    return data


def _rebuilt_sha256(header: bytes, tensors: Mapping[str, Any]) -> str | None:
    try:
        return hashlib.sha256(_safetensors_bytes(header, tensors)).hexdigest()
    except (_NotRebuildable, ValueError):
        return None


# --- packing ----------------------------------------------------------------------------------------------------


def _part_names(run: str, count: int) -> list[str]:
    """RUN.tar.000, RUN.tar.001, ...: one width for all, so the names sort in order."""
    width = max(3, len(str(count - 1)))
    return [f"{run}.tar.{i:0{width}d}" for i in range(count)]


def run_name(run_dir: str | os.PathLike) -> str:
    """The run folder's name in the characters every transfer keeps (letters, digits, '.', '_', '-')."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", Path(os.path.abspath(run_dir)).name).lstrip(".")
    return name or "run"


class _PartWriter(io.RawIOBase):
    """A write-only stream cut into files of at most part_bytes in folder (000000.part, ...), each hashed."""

    def __init__(self, folder: Path, part_bytes: int) -> None:
        self.folder, self.part_bytes = folder, part_bytes
        self.parts: list[tuple[Path, int, str]] = []  # (file, size, sha256) of the finished parts
        self._file: Any = None
        self._digest = hashlib.sha256()
        self._written = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        while len(view):
            if self._file is None:
                self._file = open(self.folder / f"{len(self.parts):06d}.part", "wb")
                self._digest, self._written = hashlib.sha256(), 0
            chunk = view[: self.part_bytes - self._written]
            self._file.write(chunk)
            self._digest.update(chunk)
            self._written += len(chunk)
            view = view[len(chunk) :]
            if self._written == self.part_bytes:
                self._finish_part()
        return len(data)

    def _finish_part(self) -> None:
        self._file.close()
        self.parts.append((Path(self._file.name), self._written, self._digest.hexdigest()))
        self._file = None

    def close(self) -> None:
        if self._file is not None and not self.closed:
            self._finish_part()
        super().close()


class _HashingReader:
    """Reads a file for tarfile while hashing it: the sha256 in the manifest is of the bytes that were packed."""

    def __init__(self, f: Any) -> None:
        self.f, self.digest, self.size = f, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.digest.update(data)
        self.size += len(data)
        return data


def _tar_info(name: str, size: int, mtime: float) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, int(mtime), 0o644
    return info


def _run_entries(run_dir: Path, state: dict[str, Any]) -> tuple[list[tuple[str, Path | bytes]], dict, list]:
    """What to pack: (archive member, file or bytes) pairs, the manifest's entry of every file the unpacked
    folder holds (path -> record; rebuilt files carry their header's record), and what is left out (with why)."""
    members: list[tuple[str, Path | bytes]] = []
    files: dict[str, dict[str, Any]] = {}
    left_out: list[dict[str, str]] = []
    sources = {"model": state["model"], **({"ema": state["ema"]["module"]} if "ema" in state else {})}
    for name in RESUME_FILES:
        if not (run_dir / name).is_file():
            raise FileNotFoundError(
                f"{run_dir / name} is missing; {run_dir} is not a complete rwkvseg training run "
                f"(rwkvseg train --resume needs {', '.join(RESUME_FILES)})"
            )
    for name in (*RESUME_FILES, *RECORD_FILES):
        if (run_dir / name).is_file():
            members.append((name, run_dir / name))
    for folder in RECORD_FOLDERS:
        for path in sorted((run_dir / folder).rglob("*")) if (run_dir / folder).is_dir() else ():
            if path.is_file() and not path.is_symlink():
                members.append((path.relative_to(run_dir).as_posix(), path))
    for checkpoint in CHECKPOINTS:
        weights, sidecar = run_dir / f"{checkpoint}.safetensors", run_dir / f"{checkpoint}.json"
        if not weights.is_file() or not sidecar.is_file():
            continue
        header, sha256 = _read_header(weights), file_sha256(weights)
        source = next((key for key, tensors in sources.items() if _rebuilt_sha256(header, tensors) == sha256), None)
        if source is not None:
            members.append((sidecar.name, sidecar))
            members.append((weights.name + HEADER_SUFFIX, header))
            files[weights.name] = {
                "size": weights.stat().st_size,
                "sha256": sha256,
                "rebuilt_from": STATE_FILE,
                **({"tensors": source} if source != "model" else {}),
                "header": {"member": weights.name + HEADER_SUFFIX},
            }
        elif checkpoint == "best":
            members += [(sidecar.name, sidecar), (weights.name, weights)]
        else:
            why = f"its weights differ from {STATE_FILE} (stopped between the two writes); the next epoch writes it"
            left_out += [{"path": weights.name, "why": why}, {"path": sidecar.name, "why": why}]
    packed = {name for name, _ in members} | set(files) | set(RECORD_FOLDERS) | {x["path"] for x in left_out}
    for path in sorted(run_dir.iterdir()):
        if path.name in packed or path.name == LOCK:  # the lock: pack_run's own while it reads the folder
            continue
        why = _LEFT_OUT.get(path.name, "not a file rwkvseg train --resume reads or writes")
        left_out.append({"path": path.name + ("/" if path.is_dir() else ""), "why": why})
    return members, files, left_out


def pack_run(
    run_dir: str | os.PathLike, out_dir: str | os.PathLike, part_mib: float = 16, name: str | None = None
) -> Path:
    """Pack what `rwkvseg train --resume` needs from run_dir into out_dir as NAME.tar.000, NAME.tar.001, ... (each
    at most part_mib MiB) and NAME.manifest.json; returns the manifest's path.

    name defaults to the run folder's name. Existing files of a pack of that name in out_dir are never replaced
    (an error names the first). The run folder is locked while it is read (a run writing it is refused, and no run
    starts meanwhile) and state.pt is checked against its digest first. Parts are written under a temporary
    folder and moved into place when the archive is complete; the manifest is written last, so a manifest
    always describes a complete set of parts.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not part_mib > 0:
        raise ValueError(f"--part-mib must be positive, got {part_mib}")
    part_bytes = max(1, int(part_mib * MiB))
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} not found; give the --out folder of rwkvseg train")
    if not (run_dir / STATE_FILE).is_file():
        raise FileNotFoundError(
            f"{run_dir} holds no {STATE_FILE}: not a training run, or one that has not finished an epoch yet"
        )
    real_out, real_run = Path(os.path.realpath(out_dir)), Path(os.path.realpath(run_dir))
    if real_out == real_run or real_out.is_relative_to(real_run):
        raise ValueError(f"the parts folder {out_dir} is inside the run {run_dir}; pack into a folder outside it")
    name = run_name(run_dir) if name is None else name
    if run_name(name) != name:
        raise ValueError(f"pack name {name!r} must be letters, digits, '.', '_' and '-' (not starting with '.')")
    _refuse_existing(out_dir, name)
    with folder_lock(run_dir):
        state = read_state(run_dir / STATE_FILE)
        members, files, left_out = _run_entries(run_dir, state)
        for item in left_out:
            log.info("not packed: %s (%s)", item["path"], item["why"])
        created = not out_dir.exists()
        out_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".{name}.packing-"))
        writer = _PartWriter(staging, part_bytes)
        moved: list[Path] = []
        try:
            with tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                for member, source in members:
                    record = _add_member(tar, member, source)
                    if isinstance(source, bytes):  # the header of a checkpoint rebuilt from state.pt
                        files[member.removesuffix(HEADER_SUFFIX)]["header"].update(record)
                    else:
                        files[member] = record
            writer.close()
            names = _part_names(name, len(writer.parts))
            parts = [Part(n, size, sha) for n, (_, size, sha) in zip(names, writer.parts, strict=True)]
            manifest = _manifest(name, run_dir, state, parts, files, left_out, part_bytes)
            for (tmp, _, _), part in zip(writer.parts, parts, strict=True):
                target = out_dir / part.name
                if target.exists():  # written there since the check above
                    raise FileExistsError(f"{target} appeared while packing; pack into an empty folder")
                os.chmod(tmp, file_mode())
                os.replace(tmp, target)
                moved.append(target)
            write_json(out_dir / f"{name}{MANIFEST_SUFFIX}", manifest)
        except BaseException:
            for path in moved:
                path.unlink(missing_ok=True)
            raise
        finally:
            writer.close()
            shutil.rmtree(staging, ignore_errors=True)
            if created and not any(out_dir.iterdir()):  # failed: no empty folder left behind
                out_dir.rmdir()
    return out_dir / f"{name}{MANIFEST_SUFFIX}"


def _refuse_existing(out_dir: Path, name: str) -> None:
    pattern = glob.escape(name)
    taken = sorted(out_dir.glob(f"{pattern}.tar.*")) + sorted(out_dir.glob(f"{pattern}{MANIFEST_SUFFIX}"))
    if taken:
        raise FileExistsError(
            f"{taken[0]} already exists ({len(taken)} file(s) of an earlier pack of {name}); parts are never "
            "replaced: pack into an empty folder, or move those files away"
        )


def _add_member(tar: tarfile.TarFile, member: str, source: Path | bytes) -> dict[str, Any]:
    if isinstance(source, bytes):
        tar.addfile(_tar_info(member, len(source), time.time()), io.BytesIO(source))
        return {"size": len(source), "sha256": hashlib.sha256(source).hexdigest()}
    with open(source, "rb") as f:
        stat = os.fstat(f.fileno())
        reader = _HashingReader(f)
        tar.addfile(_tar_info(member, stat.st_size, stat.st_mtime), reader)
    return {"size": reader.size, "sha256": reader.digest.hexdigest()}


def _manifest(
    name: str,
    run_dir: Path,
    state: dict[str, Any],
    parts: list[Part],
    files: dict[str, dict[str, Any]],
    left_out: list[dict[str, str]],
    part_bytes: int,
) -> dict[str, Any]:
    config = json.loads((run_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    progress = state["progress"]
    fit = progress.get("schedule_fit")  # a run fitted to its time budget ends after its fitted epochs
    return {
        "format": MANIFEST_FORMAT,
        "kind": MANIFEST_KIND,
        "run": name,
        "rwkvseg_version": __version__,
        "packed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "progress": {
            "epoch": progress["epoch"],
            "epochs": config.get("epochs") if fit is None else fit["epochs"],
            "step": progress["step"],
            "best_epoch": progress["best_epoch"],
            "best_metric": progress["best_metric"],
        },
        "part_bytes": part_bytes,
        "parts": [{"name": p.name, "size": p.size, "sha256": p.sha256} for p in parts],
        "total_bytes": sum(p.size for p in parts),
        "files": [{"path": path, **files[path]} for path in sorted(files)],
        "files_bytes": sum(record["size"] for record in files.values()),
        "left_out": left_out,
    }


# --- reading a pack ---------------------------------------------------------------------------------------------


def read_manifest(source: str | os.PathLike) -> tuple[dict[str, Any], Path]:
    """(the manifest, its file) of a parts folder (holding one manifest) or a manifest file; the parts are
    expected beside the manifest. Every path the manifest names is checked to stay inside a run folder."""
    source = Path(source)
    if source.is_dir():
        found = sorted(source.glob(f"*{MANIFEST_SUFFIX}"))
        if not found:
            raise FileNotFoundError(
                f"{source} holds no *{MANIFEST_SUFFIX}; give the folder rwkvseg pack wrote (or its manifest file)"
            )
        if len(found) > 1:
            raise ValueError(
                f"{source} holds the manifests of {len(found)} packs ({', '.join(p.name for p in found)}); "
                "give the manifest file of the one to use"
            )
        source = found[0]
    if not source.is_file():
        raise FileNotFoundError(f"{source} not found; give a parts folder or its {MANIFEST_SUFFIX} file")
    try:
        manifest = json.loads(source.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{source} is not a readable manifest ({err}); copy it again from the pack") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != MANIFEST_KIND:
        raise ValueError(f"{source} is not the manifest of an rwkvseg pack")
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(
            f"{source} is a pack of format {manifest.get('format')!r}; this rwkvseg reads format {MANIFEST_FORMAT}: "
            "unpack it with the rwkvseg version that packed it"
        )
    try:
        _ = manifest["run"], manifest["progress"]["epoch"], manifest["total_bytes"]
        for record in manifest["files"]:
            _member_path(record["path"], Path("RUN"), source)
            if "header" in record:
                _member_path(record["header"]["member"], Path("RUN"), source)
        for part in manifest["parts"]:
            if "/" in part["name"] or part["name"] in ("", ".", "..") or int(part["size"]) < 0:
                raise ValueError(f"{source} names a part {part['name']!r} outside its folder; pack the run again")
            _ = part["sha256"]
    except (KeyError, TypeError):
        raise ValueError(f"{source} is an incomplete manifest (it lacks keys of format 1); copy it again") from None
    return manifest, source


def manifest_parts(manifest: Mapping[str, Any]) -> list[Part]:
    return [Part(p["name"], int(p["size"]), p["sha256"]) for p in manifest["parts"]]


def parts_status(source: str | os.PathLike, digests: bool = True) -> list[tuple[Part, str]]:
    """Each part of a pack with "ok", "missing" or "damaged" (wrong size, or with digests: wrong sha256)."""
    manifest, path = read_manifest(source)
    folder = path.parent
    status = []
    for part in manifest_parts(manifest):
        path = folder / part.name
        if not path.is_file():
            state = "missing"
        elif path.stat().st_size != part.size or (digests and file_sha256(path) != part.sha256):
            state = "damaged"
        else:
            state = "ok"
        status.append((part, state))
    return status


def check_parts(source: str | os.PathLike) -> tuple[dict[str, Any], Path]:
    """read_manifest, after checking that every part is there with its size and sha256 (one error naming the
    missing or damaged parts and what to do)."""
    manifest, path = read_manifest(source)
    folder = path.parent
    status = parts_status(path)
    missing = [p.name for p, s in status if s == "missing"]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of the {len(status)} parts of run {manifest['run']} are missing in {folder} "
            f"({_names(missing)}); copy them there from where the run was packed, then unpack again"
        )
    damaged = [p.name for p, s in status if s == "damaged"]
    if damaged:
        raise ValueError(
            f"part(s) {_names(damaged)} in {folder} are damaged (their size or sha256 differs from the manifest); "
            "copy them again from where the run was packed, then unpack again"
        )
    return manifest, path


def _names(names: list[str], shown: int = 4) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def part_indices(text: str, count: int) -> list[int]:
    """'0-3,6' -> [0, 1, 2, 3, 6] (indices into a pack of count parts)."""
    indices: list[int] = []
    for item in filter(None, text.replace(" ", "").split(",")):
        first, sep, last = item.partition("-")
        try:
            lo, hi = int(first), int(last) if sep else int(first)
        except ValueError:
            raise ValueError(f"parts {text!r} must look like 0-3 or 0,2,5 (part numbers)") from None
        if not 0 <= lo <= hi < count:
            raise ValueError(f"parts {item} are not in this pack (its parts are 0-{count - 1})")
        indices += [i for i in range(lo, hi + 1) if i not in indices]
    if not indices:
        raise ValueError(f"parts {text!r} name no part; give e.g. 0-3")
    return indices


def copy_parts(source: str | os.PathLike, dest_dir: str | os.PathLike, indices: Iterable[int]) -> list[Path]:
    """Copy the manifest and the parts with these indices (each checked against its sha256) to dest_dir, for
    sending a pack over several transfers; existing files there are never replaced. Returns the copies."""
    manifest, manifest_path = read_manifest(source)
    folder, parts = manifest_path.parent, manifest_parts(manifest)
    dest_dir = Path(dest_dir)
    if os.path.realpath(dest_dir) == os.path.realpath(folder):
        raise ValueError(f"{dest_dir} is the parts folder itself; copy the parts to another folder")
    sources = [manifest_path] + [folder / parts[i].name for i in indices]
    taken = [str(dest_dir / p.name) for p in sources if (dest_dir / p.name).exists()]
    if taken:
        raise FileExistsError(f"{_names(taken, 2)} already exist; copy into an empty folder (nothing is replaced)")
    for i in indices:
        if file_sha256(folder / parts[i].name) != parts[i].sha256:
            raise ValueError(f"part {folder / parts[i].name} is damaged (sha256 differs from the manifest); pack again")
    dest_dir.mkdir(parents=True, exist_ok=True)
    copied: list[Path] = []
    try:
        for path in sources:
            _copy_new(path, dest_dir / path.name)
            copied.append(dest_dir / path.name)
    except BaseException:
        for path in copied:
            path.unlink(missing_ok=True)
        raise
    return copied


def _copy_new(source: Path, target: Path) -> None:
    """Copy through a temporary file beside target (files.atomic_write), refused if target exists by then."""

    def copy(tmp: Path) -> None:
        shutil.copyfile(source, tmp)
        if target.exists():
            raise FileExistsError(f"{target} appeared while copying; copy into an empty folder")

    atomic_write(target, copy)


def call_batches(source: str | os.PathLike, max_files: int, max_bytes: int) -> list[list[int]]:
    """The part indices grouped, in order, into transfers of at most max_files files and max_bytes bytes each,
    the manifest going with every transfer."""
    manifest, manifest_path = read_manifest(source)
    manifest_bytes = manifest_path.stat().st_size
    if max_files < 2:
        raise ValueError("a transfer needs room for the manifest and one part (at least 2 files)")
    batches: list[list[int]] = []
    used = 0
    for i, part in enumerate(manifest_parts(manifest)):
        if part.size + manifest_bytes > max_bytes:
            raise ValueError(
                f"part {part.name} ({part.size / MiB:.2f} MiB) and the manifest do not fit one transfer of "
                f"{max_bytes / MiB:.2f} MiB; pack again with a smaller --part-mib"
            )
        if not batches or len(batches[-1]) + 2 > max_files or used + part.size > max_bytes:
            batches.append([])
            used = manifest_bytes
        batches[-1].append(i)
        used += part.size
    return batches


# --- unpacking --------------------------------------------------------------------------------------------------


class _JoinedParts(io.RawIOBase):
    """The parts, read one after the other as one stream (the archive)."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths, self._index, self._file = list(paths), 0, None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while self._index < len(self.paths):
            if self._file is None:
                self._file = open(self.paths[self._index], "rb")
            n = self._file.readinto(buffer)
            if n:
                return n
            self._file.close()
            self._file, self._index = None, self._index + 1
        return 0

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        super().close()


def _member_path(name: str, dest: Path, source: Path) -> PurePosixPath:
    """The archive member's path below the run folder, refusing any that would land outside it."""
    path = PurePosixPath(name)
    if not name or "\\" in name or path.is_absolute() or any(p in ("", ".", "..") for p in name.split("/")):
        raise ValueError(
            f"archive member {name!r} in {source} would be written outside {dest}; these parts were not written "
            "by rwkvseg pack (or were altered): nothing was unpacked"
        )
    return path


def unpack_run(source: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Restore the run packed in a parts folder (or given by its manifest file) as the folder dest; returns it.

    Every part is checked against the manifest first (missing or damaged parts: one error naming them). dest
    must not exist or be empty: nothing there is replaced. The archive is extracted into a temporary folder
    beside dest (members that would land outside it, links, and members the manifest does not list are refused),
    rebuilt checkpoints are written from state.pt, every file is checked against its sha256, and only then is
    the folder renamed to dest.
    """
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise NotADirectoryError(f"{dest} is a file; give a new folder for the run")
    if dest.is_dir() and any(dest.iterdir()):
        first = sorted(dest.iterdir())[0]
        raise FileExistsError(
            f"{dest} already holds files ({first.name}, ...); unpack into a new or empty folder: nothing there "
            "is replaced (to continue the run that is there, rwkvseg train --resume --out it)"
        )
    manifest, manifest_path = check_parts(source)
    folder = manifest_path.parent
    files = {record["path"]: record for record in manifest["files"]}
    expected = {}  # archive member -> (its record, whether it is a header kept in memory)
    for path, record in files.items():
        if "header" in record:
            expected[record["header"]["member"]] = (record["header"], True)
        else:
            expected[path] = (record, False)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.unpacking-"))
    try:
        try:
            headers = _extract(folder, manifest, expected, staging, dest)
        except tarfile.TarError as err:
            raise ValueError(
                f"the parts in {folder} do not hold a readable archive ({err}); pack the run again"
            ) from None
        for rebuilt in (False, True):  # the files as packed (state.pt among them) first, then those made from it
            if rebuilt:
                _rebuild(staging, files, headers)
            for path, record in files.items():
                target = staging / path
                if ("header" in record) == rebuilt and (
                    target.stat().st_size != record["size"] or file_sha256(target) != record["sha256"]
                ):
                    raise ValueError(
                        f"{path} unpacked from {folder} differs from its sha256 in the manifest; "
                        "pack the run again where it was made"
                    )
        os.chmod(staging, file_mode(folder=True))
        if dest.is_dir():
            dest.rmdir()  # empty, checked above
        os.rename(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dest


def _extract(
    folder: Path, manifest: Mapping[str, Any], expected: dict[str, tuple[dict, bool]], staging: Path, dest: Path
) -> dict[str, bytes]:
    """Write the archive's files into staging; returns the safetensors headers (member -> bytes)."""
    headers: dict[str, bytes] = {}
    seen: set[str] = set()
    stream = _JoinedParts([folder / p.name for p in manifest_parts(manifest)])
    with stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            path = _member_path(member.name, dest, folder)
            if not member.isfile():
                raise ValueError(
                    f"archive member {member.name!r} in {folder} is not a plain file (a link or device); "
                    "these parts were not written by rwkvseg pack: nothing was unpacked"
                )
            if member.name not in expected or member.name in seen:
                raise ValueError(
                    f"archive member {member.name!r} in {folder} is not listed in the manifest (or repeats); "
                    "the parts and the manifest belong to different packs: nothing was unpacked"
                )
            seen.add(member.name)
            record, in_memory = expected[member.name]
            if member.size != record["size"]:
                raise ValueError(f"archive member {member.name!r} has another size than the manifest says")
            data = tar.extractfile(member)
            if in_memory:
                headers[member.name] = data.read()
                continue
            target = staging / path
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "wb") as out:
                shutil.copyfileobj(data, out, 1 << 20)
            os.utime(target, (member.mtime, member.mtime))
    missing = sorted(expected.keys() - seen)
    if missing:
        raise ValueError(f"the archive in {folder} lacks {_names(missing)}, which the manifest lists; pack again")
    return headers


def _rebuild(staging: Path, files: Mapping[str, dict[str, Any]], headers: Mapping[str, bytes]) -> None:
    """Write each checkpoint packed as its header from the tensors of the unpacked state.pt: its model, or its
    average of the weights for a record with "tensors": "ema"."""
    rebuilt = [path for path, record in files.items() if "header" in record]
    if not rebuilt:
        return
    state = torch.load(staging / STATE_FILE, map_location="cpu", weights_only=True)
    for path in rebuilt:
        header = headers[files[path]["header"]["member"]]
        if hashlib.sha256(header).hexdigest() != files[path]["header"]["sha256"]:
            raise ValueError(f"the header of {path} differs from its sha256 in the manifest; pack the run again")
        try:
            tensors = state["ema"]["module"] if files[path].get("tensors") == "ema" else state["model"]
            (staging / path).write_bytes(_safetensors_bytes(header, tensors))
        except (_NotRebuildable, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path} cannot be rebuilt from {STATE_FILE} ({err}); pack the run again") from None
