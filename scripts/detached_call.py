"""Run a long command across the device calls of one warm lease: start it detached, follow it, send back what fits.

A device call runs one command for at most 10 minutes, and its machine stays warm only while calls follow one
another. A command started in a session of its own keeps running between those calls (session 34 ran its two
campaigns so, with hand-written scripts that this one replaces: `docs/campaigns/s34`). From the repository root, in
back-to-back calls of one lease:

    python3 scripts/detached_call.py start STATE -- python3 scripts/campaign.py DATA RUNS ...
    python3 scripts/detached_call.py follow STATE --seconds 540 --out "$OUT" --send RUNS/*/best.safetensors \\
        --pack RUNS --exclude '*.safetensors' --exclude state.pt
    python3 scripts/detached_call.py stop STATE

start: runs the command in a new session (setsid) and returns at once. Its output goes to STATE/log and its exit
status to STATE/exit when it ends; STATE/command.json records the command and its process group. A STATE whose
command is still running is refused.
follow: waits until the command ends or --seconds pass, then prints where it stands and the last lines of its log.
With --out it also fills OUT, within what a device call sends back: 8 files of at most 16 MiB, 64 MiB together,
less --reserve-files / --reserve-mib (room for what the caller adds after) and less what OUT holds already.
- The --pack folders go first, as one OUT/small.tgz (the --exclude patterns match file names).
- Then the --send files, smallest first. Each is named by its path with '/' as '__' and any character the device
  tool refuses in a name (all but letters, digits, '.', '_', '-') as '_' (RUNS/a/best.safetensors ->
  RUNS__a__best.safetensors).
A file left out is named in one line, with the reason (no room, too large, or its name in OUT taken: nothing there
is replaced).
stop: sends SIGINT to the command's process group (rwkvseg train and scripts/campaign.py stop cleanly on it and
keep their checkpoints), waits --grace seconds for it to end, then kills the group; before the kill it lists the
processes still there (pid, state, the kernel function each waits in, command) on stdout and in STATE/killed.txt.
Exit status: 0 done (follow: the command has ended; its own status is printed), 3 follow: still running,
2 bad usage (one line).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

MiB = 2**20
# what one device call sends back from $OUT (scripts/device_continue.py reads them here too)
MAX_FILES, MAX_FILE_BYTES, MAX_BYTES = 8, 16 * MiB, 64 * MiB
EXIT_USAGE, EXIT_RUNNING = 2, 3
KILLED = 137  # the exit status recorded when stop had to kill the group


class Usage(Exception):
    """A command line or a STATE folder the script cannot act on (exit 2, one line)."""


def _pid(state: Path) -> int | None:
    """The process group of STATE's command while it runs (no exit status recorded and the leader alive)."""
    record = state / "command.json"
    if not record.is_file() or (state / "exit").is_file():
        return None
    pid = json.loads(record.read_text(encoding="utf-8"))["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # alive, another user's
        pass
    return pid


def _write_exit(state: Path, status: int) -> None:
    tmp = state / "exit.tmp"
    tmp.write_text(f"{status}\n", encoding="utf-8")
    tmp.replace(state / "exit")


def start(state: Path, command: list[str]) -> None:
    if not command:
        raise Usage("start: give the command after --, e.g. start STATE -- python3 scripts/campaign.py ...")
    state.mkdir(parents=True, exist_ok=True)
    pid = _pid(state)
    if pid is not None:
        raise Usage(f"{state}: its command is still running (process group {pid}); follow or stop it, or use another")
    for name in ("exit", "log"):
        (state / name).unlink(missing_ok=True)
    with open(state / "log", "wb") as log:
        # this script again as the session's leader: it waits for the command and records its exit status
        leader = subprocess.Popen(
            [sys.executable, __file__, "_lead", str(state), "--", *command],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    record = {"command": command, "pid": leader.pid, "cwd": os.getcwd(), "started": time.time()}
    (state / "command.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
    print(f"started in process group {leader.pid}: {' '.join(command)} (log: {state / 'log'})")


def lead(state: Path, command: list[str]) -> int:
    """The session leader: run the command, pass SIGINT on to it by the group, record its exit status."""
    # the group's SIGINT is the command's to act on; a handler, not SIG_IGN, which the command would inherit
    signal.signal(signal.SIGINT, lambda *_: None)
    try:
        status = subprocess.run(command, check=False).returncode
    except OSError as error:
        print(f"detached_call: could not run {command[0]}: {error}", flush=True)
        status = 127
    _write_exit(state, 128 - status if status < 0 else status)  # killed by signal N: 128 + N, as a shell says
    return 0


def _tail(state: Path, lines: int) -> str:
    log = state / "log"
    if lines == 0 or not log.is_file():
        return ""
    return "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


def where(state: Path) -> tuple[bool, str]:
    """(ended, a line saying where the command stands)."""
    if not (state / "command.json").is_file():
        raise Usage(f"{state}: no command was started there (start one with: start {state} -- COMMAND)")
    if (state / "exit").is_file():
        return True, f"ended, exit status {(state / 'exit').read_text(encoding='utf-8').strip()}"
    if _pid(state) is None:
        return True, "ended without an exit status (its leader was killed)"
    return False, "still running"


def pack(folders: list[Path], excludes: list[str], archive: Path) -> None:
    """The folders' files, less those whose name matches an exclude pattern, as one gzipped tar."""
    with tarfile.open(archive, "w:gz") as tar:
        for folder in folders:
            for path in sorted(p for p in folder.rglob("*") if p.is_file()):
                if not any(fnmatch.fnmatch(path.name, pattern) for pattern in excludes):
                    tar.add(path, arcname=str(folder.name / path.relative_to(folder)))


def _sent_name(path: Path) -> str:
    """The path as one plain name: the device tool leaves out returned files whose name has characters other than
    letters, digits, '.', '_' and '-' (session 35 lost two files named tmp+s35+dpout+...)."""
    flat = "__".join(part for part in path.parts if part not in ("/", ""))  # RUNS/a/best.pt -> RUNS__a__best.pt
    return re.sub(r"[^A-Za-z0-9._-]", "_", flat)


def send(items: list[tuple[Path, str, str]], out: Path, reserve_files: int, reserve_bytes: int) -> list[str]:
    """Copy each (source, name in out, label) into out, in the order given, within the device's return limits (less
    the reserve and what out holds), never over a name out holds; the lines naming, by label, those left out."""
    held = [p for p in out.iterdir() if p.is_file()]
    count = len(held) + reserve_files
    total = sum(p.stat().st_size for p in held) + reserve_bytes
    left = []
    for source, name, label in items:
        size = source.stat().st_size
        if size > MAX_FILE_BYTES:
            left.append(f"left out {label}: {size / MiB:.1f} MiB, over the {MAX_FILE_BYTES // MiB} MiB a file may be")
        elif count + 1 > MAX_FILES or total + size > MAX_BYTES:
            left.append(f"left out {label}: no room ({count} files, {total / MiB:.1f} MiB taken or reserved)")
        elif (out / name).exists():
            left.append(f"left out {label}: {out / name} is there already (nothing in OUT is replaced)")
        else:
            shutil.copyfile(source, out / name)
            count, total = count + 1, total + size
    return left


def follow(args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.seconds
    ended, line = where(args.state)
    while not ended and time.monotonic() < deadline:
        time.sleep(min(args.poll, max(0.0, deadline - time.monotonic())))
        ended, line = where(args.state)
    if args.out is not None:
        with tempfile.TemporaryDirectory() as tmp:
            items = []  # the --pack folders first, then the --send files smallest first
            if args.pack:
                pack(args.pack, args.exclude, Path(tmp) / "small.tgz")
                items.append((Path(tmp) / "small.tgz", "small.tgz", "small.tgz (the --pack folders)"))
            items += [(p, _sent_name(p), str(p)) for p in sorted(args.send, key=lambda p: p.stat().st_size)]
            for message in send(items, args.out, args.reserve_files, args.reserve_mib * MiB):
                print(message)
    print(f"{args.state}: {line}")
    tail = _tail(args.state, args.lines)
    if tail:
        print(tail)
    return 0 if ended else EXIT_RUNNING


def group_processes(pgid: int) -> list[str]:
    """One line per live process of process group pgid: pid, state (R running, S sleeping, D in the kernel, ...),
    the kernel function it waits in and its command line (Linux /proc; [] elsewhere)."""
    lines = []
    for stat in sorted(Path("/proc").glob("[0-9]*/stat"), key=lambda p: int(p.parent.name)):
        try:
            text = stat.read_text()
            fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) ": state, ppid, pgrp, ...
            if int(fields[2]) != pgid:
                continue
            wchan = (stat.parent / "wchan").read_text().strip() or "-"
            argv = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, ValueError, IndexError):  # the process ended while it was read
            continue
        lines.append(f"{stat.parent.name} {fields[0]} {wchan} {argv[:200]}")
    return lines


def stop(state: Path, grace: float) -> None:
    pid = _pid(state)
    if pid is None:
        print(f"{state}: {where(state)[1]}")
        return
    os.killpg(pid, signal.SIGINT)
    start = time.monotonic()
    while _pid(state) is not None and time.monotonic() < start + grace:
        time.sleep(0.2)
    if _pid(state) is not None:
        # what still ran, for the next look at why SIGINT did not end it (session 51: a campaign's runs)
        left = group_processes(pid)
        (state / "killed.txt").write_text("pid state wchan command\n" + "".join(f"{line}\n" for line in left))
        os.killpg(pid, signal.SIGKILL)
        _write_exit(state, KILLED)
        print(f"{state}: killed after {grace:g} s (SIGINT did not end it); {len(left)} processes were left:")
        print("\n".join(f"  {line}" for line in left[:20]))
    else:
        print(f"{state}: {where(state)[1]}, {time.monotonic() - start:.1f} s after SIGINT")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="action", required=True)
    for name in ("start", "_lead"):
        s = sub.add_parser(name, help="start COMMAND detached" if name == "start" else argparse.SUPPRESS)
        s.add_argument("state", type=Path)
        s.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    f = sub.add_parser("follow", help="wait, report, and send back what fits")
    f.add_argument("state", type=Path)
    f.add_argument("--seconds", type=float, default=540.0, help="wait at most this long (default 540)")
    f.add_argument("--poll", type=float, default=10.0, help="seconds between looks (default 10)")
    f.add_argument("--out", type=Path, help="the folder whose files the device call sends back ($OUT)")
    f.add_argument("--send", type=Path, nargs="*", default=[], help="files to send back, smallest first")
    f.add_argument("--pack", type=Path, action="append", default=[], help="a folder to send as small.tgz")
    f.add_argument("--exclude", action="append", default=[], help="file-name pattern --pack leaves out")
    f.add_argument("--reserve-files", type=int, default=0, help="files of the return kept for the caller")
    f.add_argument("--reserve-mib", type=int, default=0, help="MiB of the return kept for the caller")
    f.add_argument("--lines", type=int, default=5, help="last lines of the log to print (default 5; 0: none)")
    s = sub.add_parser("stop", help="SIGINT to the command's group, then kill it after --grace seconds")
    s.add_argument("state", type=Path)
    s.add_argument("--grace", type=float, default=60.0, help="seconds to wait after SIGINT (default 60)")
    args = p.parse_args(argv)
    if args.action in ("start", "_lead") and args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if args.action == "follow":
        if args.out is not None and not args.out.is_dir():
            raise Usage(f"--out {args.out}: not a folder; give the device call's $OUT")
        if (args.send or args.pack) and args.out is None:
            raise Usage("--send and --pack need --out, the folder that comes back")
        missing = [str(p) for p in [*args.send, *args.pack] if not p.exists()]
        if missing:
            raise Usage(f"{', '.join(missing)}: not found (paths from the current folder)")
        if not 0 <= args.reserve_files <= MAX_FILES or not 0 <= args.reserve_mib <= MAX_BYTES // MiB:
            raise Usage(f"--reserve-files is 0-{MAX_FILES} and --reserve-mib 0-{MAX_BYTES // MiB}")
        if args.lines < 0:
            raise Usage(f"--lines {args.lines}: give 0 (no log lines) or more")
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        if args.action == "_lead":
            return lead(args.state, args.command)
        if args.action == "start":
            start(args.state, args.command)
        elif args.action == "stop":
            stop(args.state, args.grace)
        else:
            return follow(args)
    except Usage as error:
        print(f"detached_call: {error}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
