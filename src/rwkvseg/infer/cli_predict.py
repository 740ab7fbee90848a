"""`rwkvseg predict`: thin argparse wiring over predict_2d."""

from __future__ import annotations

import argparse


def add_predict_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="masks for an image or a folder of images, from a checkpoint or a released model",
        usage="rwkvseg predict (CHECKPOINT | --model NAME) INPUT --out OUT [options]",
    )
    p.add_argument(
        "sources",
        nargs="+",
        metavar="[CHECKPOINT] INPUT",
        help="a checkpoint (.safetensors with its .json sidecar) and an image file or folder; "
        "with --model only the input",
    )
    p.add_argument("--model", default=None, help="a released model by name instead of a checkpoint (rwkvseg models)")
    p.add_argument("--out", required=True, help="output folder (masks <name>.png at the input's size)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, or auto")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threshold", type=float, default=None, help="binary threshold (default: the checkpoint's)")
    p.add_argument("--overlay", action="store_true", help="also write overlays/<name>.png")
    p.add_argument("--probabilities", action="store_true", help="also write probabilities/<name>.png|.npy")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--skip-non-images", action="store_true", help="skip (with a warning) files that are not images")
    from ..data.cli3d import add_predict3d_arguments

    add_predict3d_arguments(p)
    p.set_defaults(func=_run_predict)


def _resolve_sources(args: argparse.Namespace) -> None:
    """Set args.checkpoint and args.input from `CHECKPOINT INPUT` or `--model NAME INPUT`."""
    if args.model:
        if len(args.sources) != 1:
            raise ValueError(f"with --model {args.model} give only the input, got {args.sources}")
        from ..released import released_checkpoint

        args.checkpoint, args.input = str(released_checkpoint(args.model)), args.sources[0]
    else:
        if len(args.sources) != 2:
            raise ValueError(f"give a checkpoint and an input (or --model NAME and an input), got {args.sources}")
        args.checkpoint, args.input = args.sources


def _run_predict(args: argparse.Namespace) -> int:
    from ..data.cli3d import is_3d_checkpoint, run_predict3d

    _resolve_sources(args)

    if is_3d_checkpoint(args.checkpoint):  # NIfTI / case folders through the 3D predictor
        return run_predict3d(args)
    from ..checkpoint import read_meta
    from .predict2d import predict_2d

    threshold = args.threshold
    if threshold is None:
        threshold = float(read_meta(args.checkpoint).training.get("threshold", 0.5))
    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    written = predict_2d(
        args.checkpoint,
        args.input,
        args.out,
        device=device,
        batch_size=args.batch_size,
        threshold=threshold,
        overlays=args.overlay,
        save_probabilities=args.probabilities,
        overwrite=args.overwrite,
        skip_non_images=args.skip_non_images,
    )
    print(f"wrote {len(written)} masks to {args.out}")
    return 0
