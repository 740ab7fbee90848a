"""A bounded load test of the service on this machine: latency, throughput, errors, memory, hostile bursts.

`python -m rwkvseg.serve.loadtest --images DIR --model-2d urwkv_s-kvasir [--case F1 F2 F3 F4 --model-3d NAME]`
starts the service on 127.0.0.1 in a child process (or targets --url, which must be local), then for each level
of concurrent clients sends a bounded number of requests (and stops a level after --seconds), sends a burst of
malformed requests in between and checks the service still answers, and reports the child's memory (RSS) before
and after. Only localhost is ever contacted.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
import zlib
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from .config import RUNTIMES

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class LoadTestConfig:
    """What to send, how hard and for how long; every level is bounded in requests and in seconds."""

    images: tuple[Path, ...] = ()
    model_2d: str | None = "urwkv_s-kvasir"
    case: tuple[Path, ...] = ()  # one NIfTI per modality, named <case>_<modality>.nii.gz
    model_3d: str | None = None
    concurrency: tuple[int, ...] = (1, 4, 16)
    concurrency_3d: tuple[int, ...] = (1, 2)
    requests: int = 200  # per 2D level
    requests_3d: int = 4  # per 3D level
    seconds: float = 60.0  # per level
    malformed: int = 60
    zip_bomb_mib: int = 1100  # what the burst's zip bomb expands to; above the service's max_unpacked_bytes
    warmup: int = 8
    url: str | None = None  # a running local service; None starts one
    server_models: tuple[str, ...] = ()  # what the started service hosts (default: the two models above)
    torch_threads: int | None = None  # of the started service
    runtime: str = "torch"  # of the started service: "onnx" hosts exported files (server_models NAME=FILE.onnx)
    request_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if self.url is not None and urlparse(self.url).hostname not in LOCAL_HOSTS:
            raise ValueError(f"the load test only targets this machine ({', '.join(LOCAL_HOSTS)}), not {self.url}")
        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime {self.runtime!r} unknown; choose one of {', '.join(RUNTIMES)}")
        if self.model_2d and not self.images:
            raise ValueError("a 2D load test needs images (images=[...] / --images DIR)")
        if self.model_3d and not self.case:
            raise ValueError("a 3D load test needs a case (case=[t1, t1ce, ...] / --case FILES)")


@dataclass
class Level:
    kind: str
    clients: int
    requests: int
    errors: int
    p50_ms: float
    p99_ms: float
    throughput_rps: float
    wall_s: float
    statuses: dict[str, int] = field(default_factory=dict)


def _percentile(values: Sequence[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 1) if values else float("nan")


def run_level(url: str, kind: str, clients: int, total: int, seconds: float, make_request, timeout: float) -> Level:
    """`clients` threads share `total` requests (each a (files, params) from make_request(i)) until `seconds` pass."""
    import httpx

    lock = threading.Lock()
    counter = iter(range(total))
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    deadline = time.monotonic() + seconds

    def worker() -> None:
        with httpx.Client(base_url=url, timeout=timeout) as client:
            while time.monotonic() < deadline:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                path, files, params = make_request(i)
                started = time.perf_counter()
                try:
                    status = str(client.post(path, files=files, params=params).status_code)
                except httpx.HTTPError as err:
                    status = type(err).__name__
                elapsed = 1000 * (time.perf_counter() - started)
                with lock:
                    statuses[status] = statuses.get(status, 0) + 1
                    if status == "200":
                        latencies.append(elapsed)

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    sent = sum(statuses.values())
    return Level(
        kind,
        clients,
        sent,
        sent - statuses.get("200", 0),
        _percentile(latencies, 50),
        _percentile(latencies, 99),
        round(len(latencies) / wall, 2),
        round(wall, 2),
        statuses,
    )


def _fake_png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 99)) + chunk(b"IEND", b"")


def malformed_requests(
    model_2d: str | None, model_3d: str | None, sample: bytes, bomb_mib: int = 1100
) -> list[tuple[str, Any, dict]]:
    """Requests a service must refuse with a 4xx: junk, truncation, bombs, unsafe zips, wrong names and fields."""
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("../../etc/x_t1.nii.gz", b"\0" * 1000)
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("x_t1.nii.gz", "w", force_zip64=True) as member:
            zeros = bytes(2**20)
            for _ in range(bomb_mib):  # zeros: ~1 KiB zipped per MiB
                member.write(zeros)
    out = []
    if model_2d:
        p = f"/v1/models/{model_2d}/predict"
        out += [
            (p, {"file": ("a.png", b"\x00junk" * 100)}, {}),
            (p, {"file": ("a.png", sample[: len(sample) // 3])}, {}),
            (p, {"file": ("a.png", _fake_png(60000, 60000))}, {}),
            (p, {"file": ("a.png", sample)}, {"threshold": "7"}),
            (p, {"other": ("a.png", sample)}, {}),
            (p, {"file": ("a.zip", zipped.getvalue())}, {}),
            ("/v1/models/no-such-model/predict", {"file": ("a.png", sample)}, {}),
        ]
    if model_3d:
        p = f"/v1/models/{model_3d}/predict"
        out += [
            (p, {"file": ("case.zip", zipped.getvalue())}, {}),
            (p, {"file": ("case.zip", bomb.getvalue())}, {}),
            (p, {"file": ("case.nii.gz", b"\x1f\x8b junk")}, {}),
        ]
    return out


def malformed_burst(url: str, requests: list[tuple[str, Any, dict]], count: int) -> dict[str, int]:
    """Send count malformed requests (cycling); 4xx is the right answer, anything else counts as a failure."""
    import httpx

    answers = {"4xx": 0, "other": 0}
    with httpx.Client(base_url=url, timeout=60) as client:
        for i in range(count):
            path, files, params = requests[i % len(requests)]
            try:
                status = client.post(path, files=files, params=params).status_code
            except httpx.HTTPError:
                status = 0
            answers["4xx" if 400 <= status < 500 else "other"] += 1
    return answers


def rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def wait_until_ready(url: str, timeout_s: float, alive=lambda: True, poll_s: float = 0.2) -> bool:
    """Poll GET {url}/v2/health/ready until it answers 200 (True); False once alive() is false or timeout_s passed."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        if not alive() or time.monotonic() > deadline:
            return False
        time.sleep(poll_s)


@contextmanager
def started_service(
    models: Sequence[str],
    log_path: Path,
    torch_threads: int | None = None,
    ready_timeout: float = 300.0,
    runtime: str = "torch",
):
    """The service (runtime torch or onnx) in a child process on a free local port; yields (url, pid)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = (
        "from rwkvseg.serve import ServeConfig, serve; "
        f"serve(ServeConfig(models={tuple(models)!r}, port={port}, max_queue=64, max_queue_3d=8, "
        f"torch_threads={torch_threads!r}, runtime={runtime!r}))"
    )
    with log_path.open("w") as log:
        child = subprocess.Popen([sys.executable, "-c", code], stderr=log, stdout=log)
    url = f"http://127.0.0.1:{port}"
    try:
        if not wait_until_ready(url, ready_timeout, alive=lambda: child.poll() is None):
            raise RuntimeError(f"the service did not become ready; its log: {log_path}")
        yield url, child.pid
    finally:
        child.terminate()
        try:
            child.wait(30)
        except subprocess.TimeoutExpired:
            child.kill()


def _load_avg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def run_load_test(config: LoadTestConfig, log_path: Path | None = None) -> dict[str, Any]:
    """The whole test; returns levels, malformed-burst answers, memory and load figures as one dict."""
    import httpx

    images = [(p.name, p.read_bytes()) for p in config.images]
    case = [(p.name, p.read_bytes()) for p in config.case]
    models = config.server_models or tuple(m for m in (config.model_2d, config.model_3d) if m)
    log_path = log_path or Path(tempfile.mkstemp(prefix="rwkvseg-loadtest-", suffix=".log")[1])

    def image_request(i):
        name, data = images[i % len(images)]
        return f"/v1/models/{config.model_2d}/predict", {"file": (name, data)}, {}

    def case_request(i):
        return f"/v1/models/{config.model_3d}/predict", [("file", c) for c in case], {}

    @contextmanager
    def service():
        if config.url:
            yield config.url.rstrip("/"), None
        else:
            with started_service(models, log_path, config.torch_threads, runtime=config.runtime) as running:
                yield running

    report: dict[str, Any] = {"load_before": _load_avg(), "levels": [], "config": _jsonable(asdict(config))}
    report["cpu_count"] = os.cpu_count()
    with service() as (url, pid):
        report["rss_mb_start"] = rss_mb(pid)
        if config.model_2d:
            run_level(url, "warmup", 1, config.warmup, config.seconds, image_request, config.request_timeout_s)
        report["rss_mb_before"] = rss_mb(pid)
        for clients in config.concurrency if config.model_2d else ():
            level = run_level(
                url, "2D", clients, config.requests, config.seconds, image_request, config.request_timeout_s
            )
            report["levels"].append(asdict(level))
        sample = images[0][1] if images else b""
        report["malformed"] = malformed_burst(
            url, malformed_requests(config.model_2d, config.model_3d, sample, config.zip_bomb_mib), config.malformed
        )
        report["ready_after_burst"] = httpx.get(f"{url}/v2/health/ready", timeout=10).status_code == 200
        if config.model_2d:
            after = run_level(url, "2D after burst", 1, 20, config.seconds, image_request, config.request_timeout_s)
            report["levels"].append(asdict(after))
        report["rss_mb_after_2d"] = rss_mb(pid)
        for clients in config.concurrency_3d if config.model_3d else ():
            level = run_level(
                url, "3D", clients, config.requests_3d, config.seconds, case_request, config.request_timeout_s
            )
            report["levels"].append(asdict(level))
        report["rss_mb_after"] = rss_mb(pid)
    report["load_after"] = _load_avg()
    report["service_log"] = str(log_path)
    return report


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def markdown(report: dict[str, Any]) -> str:
    rows = [
        "| kind | clients | requests | errors | p50 ms | p99 ms | throughput /s |",
        "|---|---|---|---|---|---|---|",
    ]
    for lv in report["levels"]:
        rows.append(
            f"| {lv['kind']} | {lv['clients']} | {lv['requests']} | {lv['errors']} | {lv['p50_ms']} | "
            f"{lv['p99_ms']} | {lv['throughput_rps']} |"
        )
    m = report["malformed"]
    config = report["config"]
    if config["url"]:  # a service started elsewhere: its runtime, threads and memory are not this test's to know
        service = f"the service at {config['url']} (started elsewhere: its runtime and threads are not known here)"
        memory = "service RSS: not measured (the service is not this test's child)"
    else:
        service = f"service runtime {config['runtime']}, threads: {config['torch_threads'] or 'default'}"
        memory = (
            f"service RSS: {report['rss_mb_start']} MB at start, {report['rss_mb_before']} MB after warm-up, "
            f"{report['rss_mb_after_2d']} MB after the 2D levels, {report['rss_mb_after']} MB at the end"
        )
    rows += [
        "",
        f"malformed burst: {m['4xx']} answered 4xx, {m['other']} otherwise; ready after: {report['ready_after_burst']}",
        memory,
        f"load average (1, 5, 15 min): {report['load_before']} before, {report['load_after']} after, "
        f"on {report['cpu_count']} CPUs; {service}",
    ]
    return "\n".join(rows)


def _files(paths: Sequence[str], suffixes: Sequence[str]) -> tuple[Path, ...]:
    out: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist; give image files or a folder of them")
        found = sorted(f for f in p.iterdir() if f.suffix.lower() in suffixes) if p.is_dir() else [p]
        if not found:
            raise ValueError(f"{p} holds no {'/'.join(suffixes)} files; give image files or a folder of them")
        out += found
    return tuple(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rwkvseg.serve.loadtest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", nargs="*", default=[], help="image files or folders (2D requests)")
    parser.add_argument("--max-images", type=int, default=50, help="distinct images to cycle through")
    parser.add_argument("--model-2d", default="urwkv_s-kvasir")
    parser.add_argument("--case", nargs="*", default=[], help="one NIfTI per modality (3D requests)")
    parser.add_argument("--model-3d", default=None)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--concurrency-3d", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--requests-3d", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=60.0, help="limit per level")
    parser.add_argument("--malformed", type=int, default=60)
    parser.add_argument("--url", default=None, help="a running local service instead of starting one")
    parser.add_argument("--torch-threads", type=int, default=None, help="torch threads of the started service")
    parser.add_argument("--runtime", choices=RUNTIMES, default="torch", help="runtime of the started service")
    parser.add_argument(
        "--serve",
        nargs="+",
        default=[],
        metavar="MODEL",
        help="what the started service hosts (default: --model-2d and --model-3d); with --runtime onnx give "
        "NAME=FILE.onnx and use NAME as --model-2d / --model-3d",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(argv)
    try:
        images = _files(args.images, IMAGE_SUFFIXES)[: args.max_images]
        case = tuple(Path(f) for f in args.case)
        missing = [str(f) for f in case if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"--case {', '.join(missing)}: no such file; give one NIfTI file per modality")
    except (OSError, ValueError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    config = LoadTestConfig(
        images=images,
        model_2d=args.model_2d if args.images else None,
        case=case,
        model_3d=args.model_3d if args.case else None,
        concurrency=tuple(args.concurrency),
        concurrency_3d=tuple(args.concurrency_3d),
        requests=args.requests,
        requests_3d=args.requests_3d,
        seconds=args.seconds,
        malformed=args.malformed,
        url=args.url,
        torch_threads=args.torch_threads,
        runtime=args.runtime,
        server_models=tuple(args.serve),
    )
    report = run_load_test(config)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))
    bad = (
        any(lv["errors"] for lv in report["levels"]) or report["malformed"]["other"] or not report["ready_after_burst"]
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
