"""Continue a training run over device calls of limited time, carrying the run between calls in parts.

A device call runs one command for at most 10 minutes; it can send back at most 8 files from $OUT (16 MiB each,
64 MiB together), and the working tree it receives (with the folders named in `carry`) is at most 64 MiB. One call:

    PYTHONPATH=src python3 scripts/device_continue.py --run runs/kvasir --config configs/urwkv_kvasir.toml \\
        --data /data/kvasir_seg --out "$OUT" [--parts travel] [--minutes 9] [--set KEY=VALUE ...]

1. Parts carried in (--parts DIR, a folder of the repository named in `carry`, holding parts and the manifest
   from an earlier call's $OUT): when RUN does not exist yet they are gathered in RUN.parts-in/ and, once all are
   there, unpacked into RUN (`rwkvseg unpack`). A pack larger than one call can carry in arrives over several
   calls while the machine stays warm (it keeps ignored folders between calls): with parts still missing the
   script names them and exits 3 without training. When RUN is here already (a warm machine that ran it) the
   parts are not needed: if they hold the same state.pt they are ignored, otherwise the script stops (exit 2).
2. Training: `rwkvseg train --resume --out RUN` when RUN holds state.pt, else `rwkvseg train CONFIG --out RUN`.
   It stops before the deadline (--minutes from the script's start, less --pack-seconds): softly through the
   run's time budget (max_minutes, set a little short of the deadline: it stops after an epoch when the next
   would not end in time; a --set max_minutes=... given here wins), and at the latest through `timeout -s INT`,
   on which rwkvseg train abandons the epoch in progress, keeps every file it wrote (state.pt of the last
   finished epoch), marks summary.json "interrupted" and exits 130 (`-k 30`: killed 30 s later if it has not
   stopped; its files are still whole, being written atomically).
3. Pack: RUN is packed (`rwkvseg pack`) into RUN.parts-out/ (replaced each call) with parts of --part-mib MiB
   (default 15.99: four parts and the manifest fit one 64 MiB return), and the first transfer of parts (at most
   8 files and 64 MiB, the manifest in each) is copied into --out. A pack that needs more transfers says so; a
   next call on the same warm machine sends the next one:

       PYTHONPATH=src python3 scripts/device_continue.py --run runs/kvasir --send 1 --out "$OUT"

For 3D runs, preprocess once into a cache and give it as --data: RUN/cache/ does not travel (a resume would
preprocess the raw data again, taking the call's time), and set infer.final_eval=false until the last call (the
final TTA evaluation runs whenever a call's training ends).

Exit status: 0 the run's parts were sent (or all transfers are done); 4 more transfers are needed (--send N);
3 parts are still missing (nothing trained); 1 training failed (what it left is packed and sent); 2 bad usage.
The last line printed says where the run stands, e.g. `run kvasir: epoch 12 of 300, sent transfer 1 of 2`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # this repository's rwkvseg, installed or not
sys.path.insert(0, str(ROOT / "scripts"))  # detached_call: the device's return limits, kept there once

from detached_call import MAX_BYTES, MAX_FILES  # noqa: E402

from rwkvseg.files import file_sha256  # noqa: E402
from rwkvseg.train.travel import (  # noqa: E402
    MiB,
    call_batches,
    copy_parts,
    pack_run,
    parts_status,
    read_manifest,
    unpack_run,
)

log = logging.getLogger("device_continue")

PARTS_IN, PARTS_OUT = ".parts-in", ".parts-out"  # beside the run folder
EXIT_FAILED, EXIT_USAGE, EXIT_MISSING, EXIT_MORE = 1, 2, 3, 4


class Usage(Exception):
    """A command line or a folder state the script cannot act on (exit 2, one line)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="run folder (kept on the device between warm calls)")
    p.add_argument("--config", help="training config to start the run from when RUN does not exist")
    p.add_argument("--data", help="dataset folder (3D: a preprocessed cache) on this machine")
    p.add_argument("--parts", help="folder of parts carried in (an earlier call's $OUT)")
    p.add_argument("--out", required=True, help="folder whose files come back ($OUT)")
    p.add_argument("--minutes", type=float, default=9.0, help="this call's time from the script's start")
    p.add_argument("--pack-seconds", type=float, default=40.0, help="time kept for packing and copying")
    p.add_argument("--part-mib", type=float, default=15.99, help="largest part (15.99: 4 parts + manifest = 64 MiB)")
    p.add_argument("--send", type=int, metavar="N", help="only copy transfer N of the last pack into --out")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return p.parse_args(argv)


def gather_parts(parts: Path, run: Path) -> bool:
    """Bring carried-in parts to RUN: True when RUN is ready to train, False when parts are still missing."""
    if not parts.is_dir() or not any(parts.glob("*.manifest.json")):
        log.info("no parts carried in (%s holds no manifest)", parts)
        return True
    manifest, manifest_path = read_manifest(parts)
    if (run / "state.pt").is_file():
        packed_state = next(f for f in manifest["files"] if f["path"] == "state.pt")
        if file_sha256(run / "state.pt") != packed_state["sha256"]:
            raise Usage(
                f"{run} is here already and differs from the parts in {parts}: remove {run} to continue from the "
                "parts, or leave out --parts to continue the run that is here"
            )
        log.info("%s is here already (same state as the parts carried in); the parts are not needed", run)
        return True
    gathered = run.with_name(run.name + PARTS_IN)
    if gathered.is_dir():
        try:
            previous = read_manifest(gathered)[0]["parts"]
        except (ValueError, OSError):
            previous = None
        if previous != manifest["parts"]:  # parts of another pack, or a gathering cut short: ours to replace
            shutil.rmtree(gathered)
    gathered.mkdir(parents=True, exist_ok=True)
    for part, state in parts_status(manifest_path):
        target = gathered / part.name
        if state == "ok" and (not target.is_file() or file_sha256(target) != part.sha256):
            shutil.copyfile(manifest_path.parent / part.name, target.with_name(target.name + ".tmp"))
            target.with_name(target.name + ".tmp").replace(target)
    shutil.copyfile(manifest_path, gathered / manifest_path.name)
    status = parts_status(gathered)
    missing = [f"{i} ({p.name})" for i, (p, s) in enumerate(status) if s != "ok"]
    if missing:
        have = len(status) - len(missing)
        print(f"have {have} of {len(status)} parts of {manifest['run']} in {gathered}; carry in: {', '.join(missing)}")
        return False
    unpack_run(gathered, run)
    shutil.rmtree(gathered)
    print(f"unpacked {manifest['run']} (epoch {manifest['progress']['epoch']}) into {run}")
    return True


def train_command(args: argparse.Namespace, run: Path, seconds: float) -> list[str]:
    """timeout -s INT ... rwkvseg train, resuming RUN when it holds a state."""
    command = ["timeout", "-s", "INT", "-k", "30", f"{max(1, int(seconds))}", sys.executable, "-m", "rwkvseg.cli"]
    command += ["train", "--out", str(run), "--no-progress"]
    if (run / "state.pt").is_file():
        command.append("--resume")
        saved = json.loads((run / "config.json").read_text(encoding="utf-8"))
        split = saved.get("data", {}).get("split", "")
        if split and not Path(split).is_file():  # a split file of the machine the run started on
            command += ["--set", f"data.split={run / 'split.json'}"]
    elif args.config:
        command.insert(command.index("train") + 1, args.config)
    else:
        raise Usage(f"{run} holds no run to resume and no --config was given to start one")
    if args.data:
        command += ["--data", args.data]
    soft = seconds - max(30.0, 0.1 * seconds)  # the child's budget starts after its imports and data setup
    command += ["--set", f"max_minutes={max(soft, 1.0) / 60:.4f}"]
    for item in args.overrides:
        command += ["--set", item]
    return command


def send(run: Path, out: Path, index: int) -> int:
    """Copy transfer `index` of RUN's last pack into out; returns the exit status."""
    packed = run.with_name(run.name + PARTS_OUT)
    manifest, manifest_path = read_manifest(packed)
    batches = call_batches(manifest_path, MAX_FILES, MAX_BYTES)
    if not 0 <= index < len(batches):
        raise Usage(f"the pack of {run} has transfers 0-{len(batches) - 1}, not {index}")
    copy_parts(manifest_path, out, batches[index])
    progress = manifest["progress"]
    first, last = batches[index][0], batches[index][-1]
    more = index + 1 < len(batches)
    print(
        f"run {manifest['run']}: epoch {progress['epoch']} of {progress['epochs']}, sent transfer {index + 1} of "
        f"{len(batches)} (parts {first}-{last} of {len(manifest['parts'])}, {manifest['total_bytes'] / MiB:.1f} MiB "
        "in all)" + (f"; next call: --send {index + 1}" if more else "")
    )
    return EXIT_MORE if more else 0


def main(argv: list[str] | None = None) -> int:
    start = time.monotonic()
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run, out = Path(args.run), Path(args.out)
    try:
        if args.send is not None:
            return send(run, out, args.send)
        if args.parts and not gather_parts(Path(args.parts), run):
            return EXIT_MISSING
        seconds = args.minutes * 60 - args.pack_seconds - (time.monotonic() - start)
        code = 0
        if seconds < 30:
            print(f"only {seconds:.0f} s left for training in this call; packing the run as it is")
        else:
            command = train_command(args, run, seconds)
            print(" ".join(command), flush=True)
            paths = [str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
            # SIGINT restored: a shell's background job inherits it ignored, and then no deadline would stop training
            code = subprocess.call(command, env=env, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
        print(f"training exited with {code} (summary: {summary.get('status')}, epoch {summary.get('epochs_done')})")
        if not (run / "state.pt").is_file():
            print(f"{run} holds no finished epoch yet; nothing to send")
            return EXIT_FAILED
        packed = run.with_name(run.name + PARTS_OUT)
        shutil.rmtree(packed, ignore_errors=True)
        pack_run(run, packed, args.part_mib)
        status = send(run, out, 0)
        stopped = code in (0, 124, 130, 137)  # done, or stopped for the deadline (124: timeout's own status)
        return status if stopped else EXIT_FAILED
    except (Usage, ValueError, OSError) as err:
        print(f"device_continue: error: {' '.join(str(err).split())}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
