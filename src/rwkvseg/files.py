"""Files written atomically: to a temporary name in the target's folder, then moved into place with os.replace,
so a crash mid-write never leaves a half-written file under the final name; the rules that keep outputs away
from inputs (an output is never, contains, or sits inside an input); the marker that says which folders rwkvseg
owns (only those are ever replaced); and the lock of a folder a run writes. A leaf: imports nothing of rwkvseg."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MARKER = ".rwkvseg"  # in every folder rwkvseg created for its outputs: what --overwrite may replace
LOCK = ".rwkvseg.lock"  # in a run folder while a run writes it: the writer's host and pid


def file_mode(folder: bool = False) -> int:
    """The mode a new file (or folder) gets under the process umask (mkstemp alone gives 0600, mkdtemp 0700)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if folder else 0o666) & ~umask


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], keep_suffix: bool = False) -> None:
    """Call write(tmp) on a temporary file beside path, then move it over path in one step. keep_suffix: the
    temporary name ends in path's format suffix (`.nii.gz`, `.nrrd`, ...), for writers that take the format from
    the name (nibabel, SimpleITK)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder where an output file goes; move it away or choose another --out")
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".tmp"
    if keep_suffix:
        suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, data: Any, indent: int = 2) -> None:
    """data as indented JSON with a final newline, written atomically."""
    atomic_write_text(path, json.dumps(data, indent=indent) + "\n")


def file_sha256(path: str | os.PathLike) -> str:
    """The hex sha256 digest of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folders_below(root: str | os.PathLike) -> list[Path]:
    """Every folder below root (not root itself), following links to folders once: a link that leads back into
    the tree (a loop, or a second path to the same files, which would count cases twice) and a broken link are
    errors naming the link."""
    root = Path(root)
    real_root = os.path.realpath(root)
    seen = {real_root: root}  # real path -> the first path found to it

    def through_link(path: Path) -> bool:  # reached through a link rather than by its own name
        return os.path.realpath(path) != os.path.join(real_root, path.relative_to(root))

    folders: list[Path] = []
    for top, dirs, files in os.walk(root, followlinks=True):
        for name in (*dirs, *files):
            path = Path(top) / name
            if path.is_symlink() and not path.exists():
                raise ValueError(f"{path} is a broken link (to {os.readlink(path)}); remove it or restore its target")
        for name in sorted(dirs):
            path = Path(top) / name
            real = os.path.realpath(path)
            if real in seen:
                link = seen[real] if through_link(seen[real]) and not through_link(path) else path
                raise ValueError(
                    f"{link} leads to {real}, which is already part of {root} (a link loop or a second path to the "
                    "same files: its cases would count twice); remove the link"
                )
            seen[real] = path
            folders.append(path)
    return folders


# --- outputs never touch inputs -----------------------------------------------------------------------------


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(Path(path).expanduser()))


def check_apart(output: str | os.PathLike, inputs: Iterable[str | os.PathLike], what: str = "--out") -> None:
    """Refuse an output that is, contains or sits inside an input (links resolved). --overwrite cannot help
    here (it would replace or delete input files), so the message does not offer it."""
    out = _real(output)
    for source in inputs:
        src = _real(source)
        if out == src:
            relation = "is"
        elif src.is_relative_to(out):
            relation = "contains"
        elif out.is_relative_to(src):
            relation = "is inside"
        else:
            continue
        raise ValueError(
            f"{what} {output} {relation} the input {source}; rwkvseg never writes into its inputs: "
            "choose an output folder outside the input"
        )


def is_owned(folder: str | os.PathLike) -> bool:
    """Whether rwkvseg created folder for its outputs (it holds the marker file)."""
    return (Path(folder) / MARKER).is_file()


def mark_owned(folder: str | os.PathLike, command: str) -> None:
    """Create folder if needed and mark it as written by rwkvseg `command`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not is_owned(folder):
        atomic_write_text(folder / MARKER, f"written by rwkvseg {command}; --overwrite may replace this folder\n")


def check_replaceable(folder: str | os.PathLike, existing: Iterable[str | os.PathLike] = ()) -> None:
    """With --overwrite: refuse unless folder is one rwkvseg made (marker present). existing: the output files
    that would be replaced (named in the message); without them an existing folder itself is meant."""
    folder = Path(folder)
    if not folder.exists() or is_owned(folder):
        return
    existing = [str(p) for p in existing]
    what = f"{', '.join(existing[:3])}{' ...' if len(existing) > 3 else ''} in " if existing else ""
    raise FileExistsError(
        f"{what}{folder} not written by rwkvseg (no {MARKER} marker file in it); --overwrite only replaces "
        "rwkvseg's own outputs: move those files away or choose another output folder"
    )


def refuse_existing(folder: str | os.PathLike, existing: Iterable[str | os.PathLike], option: str = "--out") -> None:
    """Refuse outputs that exist (without --overwrite), offering --overwrite only where it would be accepted:
    in a folder rwkvseg made. Elsewhere --overwrite would be refused too, so the message does not suggest it."""
    existing = [str(p) for p in existing]
    if not existing:
        return
    shown = ", ".join(existing[:3]) + (f" and {len(existing) - 3} more" if len(existing) > 3 else "")
    folder = Path(folder)
    if not folder.exists() or is_owned(folder):
        fix = f"choose another {option} or pass --overwrite"
    else:
        fix = (
            f"move them away or choose another {option} ({folder} was not made by rwkvseg, so --overwrite "
            "would not replace them either)"
        )
    raise FileExistsError(f"{len(existing)} output file(s) already exist ({shown}); {fix}")


def check_json_replaceable(path: str | os.PathLike, overwrite: bool, ours: Callable[[Any], bool], kind: str) -> None:
    """An output JSON file rwkvseg is about to write: a new path passes; an existing file is replaced only with
    --overwrite, and only when ours(its parsed content) says rwkvseg wrote it as `kind` (e.g. "a split file").
    As with refuse_existing, --overwrite is offered only where it would be accepted."""
    path = Path(path)
    if not path.exists():
        return
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        data = None
    if not ours(data):
        raise FileExistsError(
            f"{path} exists and is not {kind} rwkvseg wrote (--overwrite would not replace it either); "
            "choose another file"
        )
    if not overwrite:
        raise FileExistsError(f"{path} exists; choose another file or pass --overwrite")


@contextmanager
def output_folder(
    out: str | os.PathLike, inputs: Iterable[str | os.PathLike], overwrite: bool, command: str
) -> Iterator[Path]:
    """The checks of an output folder before a command writes into it: apart from its inputs, not a file, and
    with --overwrite one rwkvseg made (or empty). A new or empty folder is marked as rwkvseg's; when the block
    fails before writing anything there, no folder (or marker) is left behind."""
    out = Path(out)
    check_apart(out, inputs)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file; give a folder for the outputs")
    created = not out.exists()
    fresh = created or not any(out.iterdir())
    if overwrite and not fresh:
        check_replaceable(out)
    if fresh:
        mark_owned(out, command)
    try:
        yield out
    except BaseException:
        if fresh and [p.name for p in out.iterdir()] == [MARKER]:  # refused before writing: leave no folder behind
            (out / MARKER).unlink()
            if created:
                out.rmdir()
        raise


# --- the lock of a folder a run writes ----------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return float("inf")


def _lock_owner(lock: Path) -> tuple[str, int] | None:
    try:
        host, _, pid = lock.read_text(encoding="utf-8").strip().partition(" ")
        return host, int(pid)
    except (OSError, ValueError):
        return None


@contextmanager
def folder_lock(folder: str | os.PathLike) -> Iterator[Path]:
    """Hold <folder>/.rwkvseg.lock while the block runs. A second writer is refused; a lock left by a dead
    process on this host is taken over (with a warning)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK
    me = f"{socket.gethostname()} {os.getpid()}\n"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _lock_owner(lock)
            if owner is None and _age(lock) < 5:  # being written by a run that is starting this moment
                owner = ("?", -1)
            if owner is not None and (owner[0] != socket.gethostname() or owner[1] < 0 or _alive(owner[1])):
                raise FileExistsError(
                    f"{folder} is being written by another run (process {owner[1]} on {owner[0]}, lock file {lock}); "
                    "wait for it to finish or choose another --out"
                ) from None
            log.warning("taking over %s left by a process that is no longer running", lock)
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(me)
        break
    else:
        raise FileExistsError(f"could not take the lock {lock}; another run is starting there: choose another --out")
    try:
        yield lock
    finally:
        if lock.is_file() and lock.read_text(encoding="utf-8") == me:
            lock.unlink()
