"""`rwkvseg serve`: the HTTP inference service (FastAPI + uvicorn) with its web viewer, over rwkvseg.serve."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="HTTP inference service and web viewer: released models, checkpoints or ONNX exports (OpenAPI at /docs)",
    )
    p.add_argument(
        "models",
        nargs="*",
        metavar="MODEL",
        help="released model names, checkpoint paths or NAME=PATH (default: every released model); with "
        "--runtime onnx, exported .onnx files or NAME=FILE.onnx",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--device", default="cpu", help="cpu, cuda, cuda:1, or auto (a GPU where torch sees one); default cpu"
    )
    p.add_argument(
        "--runtime",
        default="torch",
        choices=["torch", "onnx"],
        help="torch (checkpoints), or onnx: onnxruntime on the CPU for files `rwkvseg export NAME --out FILE.onnx` "
        "wrote (2D and 3D; released names and checkpoints are refused with that command to run)",
    )
    p.add_argument("--max-request-mb", type=float, default=256, help="largest request body accepted (MiB)")
    p.add_argument("--max-queue", type=int, default=64, help="2D requests admitted at once; past it 503")
    p.add_argument("--batch-size", type=int, default=8, help="2D requests of one model run in one forward")
    p.add_argument("--batch-wait-ms", type=float, default=2.0, help="how long a micro-batch waits to fill")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds a 2D request may take before 504")
    p.add_argument("--mirror-3d", action="store_true", help="mirror test-time augmentation for 3D (8x the work)")
    p.add_argument(
        "--precision",
        default="fp32",
        choices=("fp32", "bf16"),
        help="arithmetic of hosted checkpoints: fp32 (default) or bf16 (bfloat16 autocast; a GPU, or a CPU with "
        "native bfloat16 such as AVX512-BF16 / AMX), as `rwkvseg predict --precision`",
    )
    p.add_argument(
        "--postprocess",
        default=None,
        metavar="SPEC",
        help="post-process every hosted model's label maps as `rwkvseg predict --postprocess SPEC` does (largest, "
        "fill-holes, et-min-mm3=V, et-min-voxels=N, joined by commas; none: off); default: each model's own choice "
        "(the released BraTS models record largest; none otherwise). Checked against every model at start",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads of a forward pass: torch's, or each onnxruntime session's",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..serve.app import serve
    from ..serve.config import ServeConfig

    serve(
        ServeConfig(
            host=args.host,
            port=args.port,
            models=tuple(args.models),
            device=args.device,  # resolved and checked by ServeConfig (auto: the CPU for runtime onnx)
            runtime=args.runtime,
            max_request_bytes=int(args.max_request_mb * 2**20),
            max_queue=args.max_queue,
            batch_size=args.batch_size,
            batch_wait_ms=args.batch_wait_ms,
            timeout_s=args.timeout,
            mirror_3d=args.mirror_3d,
            precision=args.precision,
            postprocess=args.postprocess,
            torch_threads=args.threads,
        )
    )
    return 0
