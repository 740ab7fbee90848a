"""The `rwkvseg` command: one entry point, one module per subcommand in this package.

Each command module has `add_parser(subparsers)` and `run(args)`, a thin call of a plain function of the Python
API; heavy imports happen inside `run`, so `rwkvseg --help` starts fast.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import select
import signal
import sys
import threading

from ..data import MissingExtraError
from . import (
    bench,
    compact2d,
    compare,
    demo,
    evaluate,
    export,
    federate,
    models,
    pack,
    parts,
    predict,
    preprocess,
    serve,
    split,
    synthetic3d,
    train,
    unpack,
)

COMMANDS = (
    models,
    demo,
    bench,
    compact2d,
    preprocess,
    train,
    pack,
    unpack,
    parts,
    federate,
    split,
    synthetic3d,
    predict,
    evaluate,
    compare,
    export,
    serve,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rwkvseg", description="Medical image segmentation with RWKV models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    listen_to_sigint()
    try:
        return args.func(args)
    except BrokenPipeError as err:
        if not stdout_closed():  # another pipe (a socket, a subprocess): an error like any other
            print(f"rwkvseg: error: {one_line(err)}", file=sys.stderr)
            return 2
        # the reader of the output went away (`rwkvseg bench show FILE | head`): stop quietly, as Python's docs
        # recommend: what is left to flush goes to /dev/null, not to an "Exception ignored" message at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (ValueError, OSError, FloatingPointError, MissingExtraError) as err:
        # OSError: missing, existing, read-only, disk full; MissingExtraError: an input needs pydicom, SimpleITK...
        print(f"rwkvseg: error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rwkvseg: interrupted; files being written were discarded (none left half-written)", file=sys.stderr)
        return 130


def listen_to_sigint() -> None:
    """Ctrl-C, `kill -INT` and `timeout -s INT` stop a command cleanly (KeyboardInterrupt, exit 130) also when the
    process started with SIGINT ignored, as the background jobs of a shell script do (`rwkvseg train ... &`): Python
    then installs no handler of its own, and the signal that ends a device call's training would be lost."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)


def stdout_closed() -> bool:
    """Whether standard output is a pipe whose reader has gone away (poll reports an error on its end; on systems
    without poll, False)."""
    if not hasattr(select, "poll"):
        return False
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # replaced by an object without a file (tests, notebooks)
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & select.POLLERR for _, events in poller.poll(0))


def one_line(err: BaseException) -> str:
    """The error as one line; an OSError without rwkvseg's own message names its file and what to do."""
    if isinstance(err, OSError) and err.filename is not None and len(err.args) == 2:
        hint = {
            errno.EACCES: "check the folder's permissions or choose another output folder",
            errno.EROFS: "the file system is read-only: choose another output folder",
            errno.ENOSPC: "the disk is full: free space or choose another output folder",
            errno.EISDIR: "a folder is where a file should be: move it away",
            errno.ENOTDIR: "a file is where a folder should be: move it away",
        }.get(err.errno, "")
        return f"{err.strerror}: {err.filename}" + (f"; {hint}" if hint else "")
    return " ".join(str(err).split())


if __name__ == "__main__":
    sys.exit(main())
