"""What one `rwkvseg serve` process hosts and how hard it may be pushed."""

from __future__ import annotations

from dataclasses import dataclass

from ..devices import resolve_device
from ..infer.precision import check_precision

RUNTIMES = ("torch", "onnx")


@dataclass(frozen=True)
class ServeConfig:
    """Settings of the inference service; every limit is per process.

    models: released model names, checkpoint paths, or `alias=path`; empty hosts every released model. With
        runtime "onnx": exported .onnx files (`rwkvseg export NAME --out FILE.onnx`) or `alias=file`, nothing else.
    device: cpu, cuda, cuda:1, or auto (a GPU where torch sees one, else the CPU; the CPU with runtime "onnx"),
        resolved and checked when the config is made, so `device` always names a device torch has.
    runtime: "torch" (checkpoints on `device`) or "onnx" (onnxruntime on the CPU, exported files, 2D and 3D).
    max_queue: requests admitted at once (running + waiting) for 2D; past it the answer is 503 with Retry-After.
    max_queue_3d: the same for 3D cases, which run one at a time (workers_3d).
    batch_size / batch_wait_ms: a 2D micro-batch collects up to batch_size requests of one model, waiting at
        most batch_wait_ms after the first, and runs them together: onnxruntime in one forward pass, the torch
        runtime in passes of rwkvseg.infer.predict2d.default_batch_size (one image on the CPU, 8 on a GPU).
    postprocess: a `rwkvseg predict --postprocess` spelling (largest, fill-holes, et-min-mm3=V, ...) applied to the
        label maps of every hosted model, 2D and 3D; None: each model's own choice, as predict makes it (the
        checkpoint's recorded default); "none": off. Checked against each model when the app is made.
    Test-time flips: 3D only with mirror_3d; never in 2D, where a release's recorded flips (which `rwkvseg predict`
    applies) would multiply each request's forward passes: the service's masks are predict's with --mirror-axes ''.
    GET /v1/models reports each model's post-processing and flips as applied.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    models: tuple[str, ...] = ()
    device: str = "cpu"
    runtime: str = "torch"
    max_request_bytes: int = 256 * 2**20
    max_image_pixels: int = 4096 * 4096
    max_case_voxels: int = 24_000_000  # per modality; a BraTS 1 mm volume has 8.9 M
    max_unpacked_bytes: int = 1024 * 2**20  # what a zip may expand to
    max_queue: int = 64
    max_queue_3d: int = 2
    workers: int = 1  # forward passes that run at once (2D); more rarely helps on a few CPU cores
    workers_3d: int = 1
    batch_size: int = 8
    batch_wait_ms: float = 2.0
    timeout_s: float = 30.0
    timeout_3d_s: float = 600.0
    overlap_3d: float = 0.5
    mirror_3d: bool = False  # test-time flips: 8x the work for a small gain; off for a responsive service
    precision: str = "fp32"  # or "bf16": checkpoints under bfloat16 autocast (rwkvseg.infer.precision)
    postprocess: str | None = None
    log_json: bool = True
    # torch intra-op threads of the process (serve() sets them), and with runtime "onnx" each onnxruntime session's;
    # None keeps the library's default. On a machine shared with other work, 1 avoids threads spinning against
    # each other (measured 5x faster forwards under load)
    torch_threads: int | None = None

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime {self.runtime!r} unknown; choose one of {', '.join(RUNTIMES)}")
        if self.runtime == "onnx" and self.device not in ("cpu", "auto"):
            raise ValueError(
                f"runtime 'onnx' runs on the CPU (onnxruntime's CPU provider); drop device={self.device!r} "
                "or serve checkpoints with runtime 'torch'"
            )
        device = "cpu" if self.runtime == "onnx" else self.device
        object.__setattr__(self, "device", str(resolve_device(device, "--device")))
        positive = {
            "port": self.port,
            "max_request_bytes": self.max_request_bytes,
            "max_image_pixels": self.max_image_pixels,
            "max_case_voxels": self.max_case_voxels,
            "max_unpacked_bytes": self.max_unpacked_bytes,
            "max_queue": self.max_queue,
            "max_queue_3d": self.max_queue_3d,
            "workers": self.workers,
            "workers_3d": self.workers_3d,
            "batch_size": self.batch_size,
            "timeout_s": self.timeout_s,
            "timeout_3d_s": self.timeout_3d_s,
        }
        if self.torch_threads is not None:
            positive["torch_threads"] = self.torch_threads
        bad = [f"{k}={v}" for k, v in positive.items() if v <= 0]
        if bad or self.batch_wait_ms < 0:
            raise ValueError(f"serve settings must be positive: {', '.join(bad) or 'batch_wait_ms'}")
        if not 0 <= self.overlap_3d < 1:
            raise ValueError(f"overlap_3d must lie in [0, 1), got {self.overlap_3d}")
        if self.precision != "fp32" and self.runtime == "onnx":  # settings that conflict whatever the hardware
            raise ValueError(
                f"precision {self.precision!r} is for checkpoints (runtime 'torch'); an exported file runs in "
                "onnxruntime as it was exported: drop --precision or serve checkpoints"
            )
        check_precision(self.precision, self.device)
