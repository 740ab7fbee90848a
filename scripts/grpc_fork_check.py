"""Do DataLoader workers survive a parent with live gRPC threads? The hazard behind a federated site's
data.worker_start = forkserver (grpc/grpc#32758, docs/federated.md).

Usage: python scripts/grpc_fork_check.py [--starts fork forkserver] [--runs 6] [--seconds 10] [--interval 0.005]
       [--workers 8]
       GRPC_ENABLE_FORK_SUPPORT=false python scripts/grpc_fork_check.py --starts fork   # gRPC's fork handlers off

Each run is a fresh process that starts a gRPC server and a channel to it on 127.0.0.1, makes a call every
--interval seconds from a thread of its own (like a Flower ClientApp's heartbeat, more often), and meanwhile
iterates DataLoaders of --workers workers, started as data.worker_start says (rwkvseg.train.workers), again and
again for --seconds. A run crashed when a worker died (gRPC's fork handlers run in the forked child). Prints one
line per run and a markdown table of crashed runs per start method, with the versions. Timing decides whether a
fork crashes, so the counts vary from run to run and between machines.
"""

import argparse
import os
import subprocess
import sys
import threading
import time
from concurrent import futures
from importlib.metadata import version
from pathlib import Path

import grpc
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from rwkvseg.train.workers import worker_context

CRASHED = 3  # the exit status of a run whose worker died


class Numbers(Dataset):
    def __len__(self) -> int:
        return 16

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.full((4,), float(index))


def _echo(request: bytes, context: grpc.ServicerContext) -> bytes:
    return request


def trial(start: str, seconds: float, interval: float, workers: int) -> int:
    """One run in this process: the exit status (0, or CRASHED when a worker died)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handler = grpc.method_handlers_generic_handler("check.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(_echo)})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    echo = grpc.insecure_channel(f"127.0.0.1:{port}").unary_unary("/check.Echo/Echo")
    echo(b"ping", timeout=10)
    stop = threading.Event()

    def calls() -> None:
        while not stop.wait(interval):
            echo(b"ping", timeout=10)

    threading.Thread(target=calls, daemon=True).start()
    context = worker_context(start, workers)
    end, loaders = time.monotonic() + seconds, 0
    try:
        while time.monotonic() < end:
            for _ in DataLoader(Numbers(), batch_size=2, num_workers=workers, multiprocessing_context=context):
                pass
            loaders += 1
    except RuntimeError as err:
        print(f"crashed after {loaders} loaders: {' '.join(str(err).split())}", flush=True)
        return CRASHED
    finally:
        stop.set()
    print(f"ok: {loaders} loaders", flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--starts", nargs="+", default=["fork", "forkserver"], help="data.worker_start values")
    parser.add_argument("--runs", type=int, default=6, help="fresh processes per start method")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long each run starts loaders")
    parser.add_argument("--interval", type=float, default=0.005, help="seconds between gRPC calls")
    parser.add_argument("--workers", type=int, default=8, help="workers per DataLoader")
    parser.add_argument("--trial", default="", help=argparse.SUPPRESS)  # one run, in a child process
    args = parser.parse_args()
    if args.trial:
        return trial(args.trial, args.seconds, args.interval, args.workers)
    env = {**os.environ, "GRPC_VERBOSITY": "ERROR"}  # not one line per fork ("skipping fork() handlers")
    crashed = {}
    for start in args.starts:
        crashed[start] = 0
        for run in range(args.runs):
            command = [sys.executable, __file__, "--trial", start, "--seconds", str(args.seconds)]
            command += ["--interval", str(args.interval), "--workers", str(args.workers)]
            try:
                done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.seconds + 120)
                status, out = done.returncode, done.stdout.strip()
            except subprocess.TimeoutExpired:
                status, out = None, "hung"
            crashed[start] += status == CRASHED
            print(f"{start} run {run + 1}: exit {status}: {out}", flush=True)
    print(
        f"\ngrpcio {version('grpcio')}, torch {torch.__version__}, Python {sys.version.split()[0]}, {os.cpu_count()} "
        f"cores; a call every {args.interval} s, {args.workers} workers per loader, {args.seconds:g} s per run\n"
    )
    print("| data.worker_start | runs with a crashed worker |\n|---|---|")
    for start, count in crashed.items():
        print(f"| {start} | {count} of {args.runs} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
