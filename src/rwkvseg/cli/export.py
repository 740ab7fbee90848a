"""`rwkvseg export`: a registered model, checkpoint or released model as ONNX (rwkvseg.export.export_onnx)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a released model, checkpoint or registered architecture to ONNX (dynamic batch and size, "
        "preprocessing record in the metadata)",
    )
    p.add_argument(
        "source",
        help="released model name (an ensemble release exports as one graph of its members' mean probability), "
        "checkpoint (.safetensors) or registered model name",
    )
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--format", default="onnx", choices=["onnx"], help="onnx (the only format so far)")
    p.add_argument("--program", default=None, help="also save the torch.export ExportedProgram (.pt2) here")
    p.add_argument("--static", action="store_true", help="fixed batch and spatial size instead of dynamic axes")
    p.add_argument("--size", default=None, help="example spatial size, e.g. 256,256 (default: the model's)")
    p.add_argument("--in-channels", type=int, default=None, help="for a registered model: input channels")
    p.add_argument("--num-classes", type=int, default=None, help="for a registered model: output channels")
    p.add_argument("--verify", action="store_true", help="compare onnxruntime with PyTorch after exporting")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..export.onnx import export_onnx

    size = None
    if args.size:
        try:
            size = tuple(int(v) for v in args.size.split(","))
        except ValueError:
            raise ValueError(f"--size {args.size!r} must be integers like 256,256") from None
    export_onnx(
        args.source,
        args.out,
        dynamic=not args.static,
        overwrite=args.overwrite,
        size=size,
        in_channels=args.in_channels,
        num_classes=args.num_classes,
        program_path=args.program,
    )
    print(f"wrote {args.out}")
    if args.verify:
        from ..export.verify import format_table, verify_onnx

        print(format_table(verify_onnx(args.out, args.source)))
    return 0
