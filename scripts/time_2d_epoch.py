"""Time the paper's 2D training epoch (U-RWKV, batch 4, 256^2) eager / compiled, DataLoader / GPU-resident.

Usage: python scripts/time_2d_epoch.py DATA [--epochs 3] [--compile off on] [--resident off on] [--set k=v ...]
(the same as `rwkvseg bench epoch`; runs from a source checkout: PYTHONPATH=src). Prints a table: first epoch
(with compilation), steady epoch (median of the others), setup (reading the data, building the model) and
validation seconds per variant.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from rwkvseg.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "epoch", *sys.argv[1:]]))
