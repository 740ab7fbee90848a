"""Write splits/cvc_clinicdb.json: CVC-ClinicDB train / validation by whole video sequences.

CVC-ClinicDB's 612 frames come from 29 colonoscopy sequences, numbered sequence by sequence; neighbouring frames
are near-identical, so a random frame split puts copies of validation frames into training. SEQUENCES lists the
first frame of each sequence. They were checked against the frames here: the mean absolute grey-level
difference between consecutive frames (48x36 thumbnails) has a local peak at every listed boundary (20-54 grey
levels, against a median of 14 between neighbours). Whole sequences go to validation in a seeded order until they
hold at least the validation fraction of the frames present (550 of 612 here; the other 62 are held out).

    python scripts/split_cvc_sequences.py ../shared/data/cvc_clinicdb splits/cvc_clinicdb.json \
        --groups-out splits/cvc_clinicdb_sequences.csv

--groups-out also writes each frame's sequence (`case,group`, the group `seqNN` numbered as in the split's
`sequences`), for `rwkvseg compare --groups`: the frames of one sequence are near-copies, so comparisons resample
and test whole sequences.
"""

from __future__ import annotations

import argparse
import csv
import random
from pathlib import Path

from rwkvseg.data.images2d import discover_pairs
from rwkvseg.data.splits import SPLIT_FORMAT
from rwkvseg.files import write_json

# first frame of each of the 29 sequences; the last ends at frame 612
SEQUENCES = (1, 26, 51, 68, 79, 104, 127, 152, 178, 200, 206, 228, 253, 278, 298, 318, 343, 364, 384, 409, 429,
             448, 467, 479, 504, 529, 547, 572, 592)  # fmt: skip


def sequence_of(frame: int) -> int:
    """Index of the sequence that holds a frame number (1..612)."""
    return max(i for i, first in enumerate(SEQUENCES) if first <= frame)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="the CVC-ClinicDB folder (PNG/Original, PNG/Ground Truth)")
    parser.add_argument("out", type=Path, help="split file to write (must not exist)")
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--groups-out", type=Path, help="also write each frame's sequence to this CSV (case,group)")
    args = parser.parse_args()
    for out in (args.out, args.groups_out):
        if out is not None and out.exists():
            raise SystemExit(f"{out} exists; remove it first or choose another name")
    cases = [s.case for s in discover_pairs(args.data)]
    if not all(c.isdigit() for c in cases):
        raise SystemExit(f"{args.data}: case ids must be CVC-ClinicDB frame numbers, got e.g. {cases[:3]}")
    by_sequence: dict[int, list[str]] = {}
    for case in sorted(cases, key=int):
        by_sequence.setdefault(sequence_of(int(case)), []).append(case)
    order = sorted(by_sequence)
    random.Random(args.seed).shuffle(order)
    val: list[str] = []
    val_sequences = []
    for seq in order:
        if len(val) >= args.val_fraction * len(cases):
            break
        val += by_sequence[seq]
        val_sequences.append(seq)
    train = [c for c in sorted(cases, key=int) if c not in set(val)]
    doc = {
        "format": SPLIT_FORMAT,
        "method": "whole video sequences (scripts/split_cvc_sequences.py)",
        "seed": args.seed,
        "val_fraction": args.val_fraction,
        "test_fraction": 0.0,
        "stratified": False,
        "n_cases": len(cases),
        "sequences": {
            "first_frames": list(SEQUENCES),
            "val": sorted(val_sequences),
        },
        "folds": [{"train": train, "val": sorted(val, key=int)}],
        "test": [],
        "dataset": str(args.data),
    }
    write_json(args.out, doc)
    print(f"{args.out}: {len(train)} train / {len(val)} val frames; val sequences {sorted(val_sequences)}")
    if args.groups_out is not None:
        with args.groups_out.open("x", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["case", "group"])
            writer.writerows([case, f"seq{sequence_of(int(case)):02d}"] for case in sorted(cases, key=int))
        print(f"{args.groups_out}: the sequence of each of the {len(cases)} frames")


if __name__ == "__main__":
    main()
