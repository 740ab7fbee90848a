"""The accuracy cost of differential privacy in `rwkvseg federate`, at small scale on the CPU.

Usage: PYTHONPATH=src python scripts/federated_dp_cost.py OUT [--rounds 6] [--sites 2] [--noise 0 0.01 0.1 1]
       [--model unet_test] [--cases 32] [--size 64]

Writes a synthetic 2D dataset to OUT/data, runs the federation without DP, takes the clipping norm as the median
norm of the sites' updates in that run (the usual starting point), then runs server-fixed DP with that norm at
each noise multiplier (0: clipping only), all with the same seed. Prints a markdown table: pooled validation
Dice after the last round and the best round's, the noise standard deviation, and each run's wall time.
"""

import argparse
import logging
import math
import statistics
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from rwkvseg.data.synthetic import write_synthetic_dataset
from rwkvseg.federated.config import load_federated_config
from rwkvseg.federated.run import federate

CONFIG = """
seed = 0
device = "cpu"
[model]
name = "{model}"
[data]
size = [{size}, {size}]
batch_size = 4
val_batch_size = 4
num_workers = 0
[federated]
rounds = {rounds}
local_epochs = 1
num_sites = {sites}
client_cpus = 2
"""


def _update_norms(messages: list) -> list[float]:
    """The L2 norm of every site update (trained weights minus the global weights sent for that round), over the
    floating-point entries DP exchanges (without DP the averaged step counters come back as floats)."""
    norms, current = [], None
    for message, arrays in messages:
        if message.metadata.message_type != "train" or arrays is None:
            continue
        if "config" in message.content:
            current = arrays
        else:
            norms.append(math.sqrt(sum(float(np.sum((arrays[k] - current[k]) ** 2)) for k in current if k in arrays)))
    return norms


def _run(config_path: Path, data: Path, out: Path, overrides: list[str], record: bool) -> tuple[dict, float, list]:
    config = load_federated_config(config_path, [f"data.root={data}", f"out={out}", *overrides])
    messages: list = []

    def hook(message) -> None:
        if record and "arrays" in message.content:
            arrays = {
                k: np.asarray(a.numpy(), np.float64)
                for k, a in message.content["arrays"].items()
                if np.issubdtype(a.numpy().dtype, np.floating)
            }
            messages.append((message, arrays))

    start = time.perf_counter()
    summary = federate(config, on_message=hook)
    return summary, time.perf_counter() - start, messages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--sites", type=int, default=2)
    parser.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.01, 0.1, 1.0])
    parser.add_argument("--model", default="unet_test")
    parser.add_argument("--cases", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    data = args.out / "data"
    write_synthetic_dataset(data, n=args.cases, shape=(args.size, args.size), seed=0, overwrite=True)
    config_path = args.out / "fed.toml"
    config_path.write_text(CONFIG.format(model=args.model, size=args.size, rounds=args.rounds, sites=args.sites))

    rows = []
    summary, seconds, messages = _run(config_path, data, args.out / "off", [], record=True)
    clip = statistics.median(_update_norms(messages))
    rows.append(("off", "-", "-", summary, seconds))
    for noise in args.noise:
        privacy = [
            "federated.privacy.mode=server-fixed",
            f"federated.privacy.clipping_norm={clip}",
            f"federated.privacy.noise_multiplier={noise}",
        ]
        summary, seconds, _ = _run(config_path, data, args.out / f"server_z{noise:g}", privacy, record=False)
        rows.append(("server-fixed", f"{noise:g}", f"{noise * clip / args.sites:.2e}", summary, seconds))

    print(
        f"\nflwr {version('flwr')}, torch {version('torch')}; {args.model}, {args.cases} synthetic {args.size}x"
        f"{args.size} cases, {args.sites} sites, {args.rounds} rounds x 1 local epoch, seed 0; clipping norm "
        f"{clip:.4g} (median site update norm without DP)\n"
    )
    print("| DP | noise multiplier | noise std | val Dice (last round) | best val Dice (round) | wall s |")
    print("|---|---|---|---|---|---|")
    for mode, noise, std, summary, seconds in rows:
        last, best = summary["last"]["val_dice"], summary["best_metric"]
        print(f"| {mode} | {noise} | {std} | {last:.4f} | {best:.4f} ({summary['best_round']}) | {seconds:.0f} |")


if __name__ == "__main__":
    main()
