"""One row of `rwkvseg bench models` to examine: the arguments and checks shared by the scripts that explain a row
(scripts/profile_model.py: where its time goes; scripts/memory_plan.py and scripts/memory_trace.py: what makes its
memory peak). Not a command.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class BenchRow:
    """The model (on its device, seeded), its dimension, the bench input shape, the create_model settings and the
    bench settings its step runs with (bench.models.make_step)."""

    model: Any  # torch.nn.Module: torch is imported when the row is built, not when this module is
    dims: int
    shape: tuple[int, ...]
    settings: dict[str, Any]
    config: Any  # bench.models.ModelBenchConfig

    def title(self, args: argparse.Namespace) -> str:
        """One line naming the row as the scripts report it: model, phase, input, device, compile mode,
        precision, layout and settings."""
        from ..bench.models import bf16_autocast

        precision = "bf16 autocast" if bf16_autocast(self.config) else "float32"
        weights = ", bf16 weights" if self.config.bf16_weights else ""
        inductor = f", Inductor options {self.config.inductor}" if self.config.inductor else ""
        return (
            f"{args.model}, {args.phase}, input {list(self.shape)}, {self.config.device}, compile mode "
            f"{args.compile_mode}, {precision}{weights}, {args.memory_format}, settings {self.settings}{inductor}"
        )


def add_row_arguments(parser: argparse.ArgumentParser, out_help: str) -> None:
    """model, --out, --dims, --side, --batch, --phase, --compile-mode, --no-amp, --bf16-weights, --memory-format,
    --set, --inductor, --device."""
    import torch

    from ..bench.models import COMPILE_MODES, PHASES, PROBLEMS
    from ..memory_format import MEMORY_FORMATS

    parser.add_argument("model", help="a registered model (rwkvseg models lists them)")
    parser.add_argument("--out", required=True, help=out_help)
    parser.add_argument("--dims", type=int, choices=sorted(PROBLEMS), help="default: the model's own")
    parser.add_argument("--side", type=int, help="input side; default: the bench's smallest for the device")
    parser.add_argument("--batch", type=int, help="default: the bench's (1 for inference; 8 in 2D, 2 in 3D training)")
    parser.add_argument("--phase", choices=PHASES, default="infer")
    parser.add_argument("--compile-mode", choices=COMPILE_MODES, default="default")
    parser.add_argument("--no-amp", action="store_true", help="float32 on CUDA too (default: bf16 autocast)")
    parser.add_argument(
        "--bf16-weights",
        action="store_true",
        help="an inference step with the convolution and linear weights held in bfloat16, as bench models "
        "--bf16-weights (bf16 autocast only)",
    )
    parser.add_argument(
        "--memory-format",
        choices=MEMORY_FORMATS,
        default="contiguous",
        help="layout of the parameters and the input, as bench models --memory-format (default: contiguous)",
    )
    parser.add_argument(
        "--set", dest="settings", action="append", default=[], metavar="KEY=VALUE", help="a create_model setting"
    )
    parser.add_argument(
        "--inductor",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an Inductor option for the compiled step, as bench models --inductor takes it (repeatable)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))


def bench_row(args: argparse.Namespace, parser: argparse.ArgumentParser, **bench_settings: Any) -> BenchRow:
    """The row args name, its step's ModelBenchConfig from args' --device, --compile-mode, --no-amp,
    --memory-format and --inductor and bench_settings (e.g. fullgraph=True), or parser.error with what to change: an
    unknown model, a missing GPU, a bad setting, a dimension the model does not have."""
    import torch

    from ..bench.models import INFER_BATCHES, PROBLEMS, SIDES, TRAIN_BATCH, ModelBenchConfig, input_shape, model_dims
    from ..models import create_model, list_models
    from ..train.config import apply_overrides
    from .bench import inductor_settings

    if args.model not in list_models():
        parser.error(f"unknown model {args.model!r}; choose from {', '.join(list_models())}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device; use --device cpu")
    try:  # create_model settings, read as bench models --override reads them: fused_norm=true, depths=[1,1]
        settings = apply_overrides({}, args.settings)
    except ValueError as err:
        parser.error(f"--set: {err}")
    try:  # an unknown or invalid setting: create_model names the valid ones
        dims = args.dims or model_dims(create_model(args.model, *PROBLEMS[2], **settings))
        torch.manual_seed(0)
        model = create_model(args.model, *PROBLEMS[dims], **settings).to(args.device)
    except ValueError as err:
        parser.error(f"--set: {err}")
    if model_dims(model) != dims:
        parser.error(f"{args.model} is a {model_dims(model)}D model; drop --dims {dims}")
    if args.bf16_weights and args.phase == "train":  # the optimizer would step bfloat16 weights
        parser.error("--bf16-weights is for inference steps; drop it or use --phase infer")
    side = args.side or min(SIDES[(torch.device(args.device).type, dims)])
    batch = args.batch or (INFER_BATCHES[dims][0] if args.phase == "infer" else TRAIN_BATCH[dims])
    try:
        inductor = inductor_settings(args.inductor)
    except ValueError as err:
        parser.error(str(err))
    try:  # e.g. cpu_bf16 on a CPU without native bfloat16
        config = ModelBenchConfig(
            dims=dims,
            device=args.device,
            compile_mode=args.compile_mode,
            amp=not args.no_amp,
            memory_format=args.memory_format,
            bf16_weights=args.bf16_weights,
            inductor=inductor,
            **bench_settings,
        )
    except ValueError as err:
        parser.error(str(err))
    return BenchRow(model=model, dims=dims, shape=input_shape(dims, batch, side), settings=settings, config=config)
