"""`rwkvseg predict`: masks / label volumes from a checkpoint or a released model (rwkvseg.infer.predict)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..infer.postprocess import PostProcess
    from ..infer.predict import PredictConfig


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="masks for an image or a folder of images, from a checkpoint or a released model",
        usage="rwkvseg predict (CHECKPOINT [CHECKPOINT ...] | --model NAME) INPUT --out OUT [options]",
    )
    p.add_argument(
        "sources",
        nargs="+",
        metavar="[CHECKPOINT ...] INPUT",
        help="a checkpoint (.safetensors with its .json sidecar) and an image file or folder; several checkpoints "
        "of one task predict as an ensemble (their probabilities averaged, e.g. the folds of a cross-validation); "
        "with --model only the input",
    )
    p.add_argument("--model", default=None, help="a released model by name instead of a checkpoint (rwkvseg models)")
    p.add_argument("--out", required=True, help="output folder (masks <name>.png at the input's size)")
    p.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:1, or auto (the default: the GPU where torch sees one)"
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="2D images per forward pass (default: 1 on the CPU, where larger batches run slower per image; 8 on a "
        "GPU and with --runtime onnx)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="probability threshold of a 2D binary checkpoint (default: the checkpoint's) or of each region of a 3D "
        "region checkpoint (default 0.5)",
    )
    p.add_argument("--overlay", action="store_true", help="also write overlays/<name>.png")
    p.add_argument(
        "--probabilities",
        action="store_true",
        help="also write probabilities/<name>.png|.npy (2D) or probabilities/<case>.nii.gz (3D: one channel per "
        "region or class on the input's grid, 8-bit NIfTI beside NIfTI inputs): the model's raw outputs (with its "
        "flips, an ensemble's mean), never thresholded or post-processed",
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--skip-non-images", action="store_true", help="skip (with a warning) files that are not images")
    p.add_argument(
        "--compile",
        default="auto",
        metavar="MODE",
        help="compile the model: auto (on CUDA, the default), on, off, or a torch.compile mode (frozen on the CPU "
        "and on CUDA: the weights become constants of the graph; the first call takes longer)",
    )
    p.add_argument("--compile-backend", default="inductor", metavar="NAME", help="inductor (default) or aot_eager")
    p.add_argument(
        "--memory-format",
        default="contiguous",
        choices=("contiguous", "channels_last"),
        help="layout of the model and its inputs: contiguous (the default) or channels_last (NHWC / NDHWC)",
    )
    p.add_argument(
        "--precision",
        default="fp32",
        choices=("fp32", "bf16"),
        help="arithmetic of the model: fp32 (the default) or bf16 (bfloat16 autocast, on a GPU or a CPU with native "
        "bfloat16 such as AVX512-BF16 / AMX; about 2-3x faster 3D prediction on such a CPU, see docs/speed.md)",
    )
    p.add_argument(
        "--runtime",
        default="torch",
        choices=("torch", "onnx"),
        help="torch (default), or onnx: onnxruntime on an exported .onnx file given as CHECKPOINT (2D images and "
        "3D volumes)",
    )
    p.add_argument("--threads", type=int, default=None, help="onnxruntime CPU threads (--runtime onnx)")
    p.add_argument(
        "--mirror-axes",
        default=None,
        help="test-time augmentation: the logits averaged over every flip of these axes, '' for none. 2D: 0 "
        "(height), 1 (width), e.g. 0,1 (4 passes per image; default: the checkpoint's, chosen on validation at "
        "release, none where it records none). 3D: 0,1,2 (default: the checkpoint's on a GPU, none on the CPU, where "
        "0,1,2 costs 8 forward passes per window, about 6x the time)",
    )
    p.add_argument(
        "--postprocess",
        default=None,
        metavar="SPEC",
        help="post-process each label map before writing it (beyond the papers' recipes; probabilities stay raw): "
        "default: the checkpoint's own choice (the released BraTS models record largest, chosen on validation; "
        "none otherwise); none: off; largest: keep the largest connected foreground component (8-connected in "
        "2D, 26 in 3D); fill-holes: fill the mask's holes (binary models); et-min-mm3=V: (3D BraTS) relabel "
        "a predicted enhancing tumour of less than V cubic millimetres as NCR/NET, converted with each output's "
        "voxel spacing (800: 100 voxels at 2 mm, 800 at 1 mm); et-min-voxels=N: the same rule counting N voxels "
        "of the output grid, whatever their size; join several with commas, e.g. largest,fill-holes",
    )
    g = p.add_argument_group("3D volumes (checkpoints trained with `rwkvseg preprocess`)")
    g.add_argument("--overlap", type=float, default=None, help="sliding-window overlap (3D; default: the checkpoint's)")
    g.add_argument("--sw-batch-size", type=int, default=1, help="windows per forward pass (3D)")
    g.add_argument(
        "--more-modalities",
        nargs="+",
        default=(),
        metavar="FILE",
        help="(3D) when INPUT is the first of one 3-D file per modality: the other files, in the model's order",
    )
    g.add_argument(
        "--modalities",
        default=None,
        help="(3D) the input's channel names in its order, where it does not name them itself (a 4-D file without "
        "dataset.json, files without modality suffixes), e.g. FLAIR,T1w,T1gd,T2w; matched by name to the model's",
    )
    g.add_argument(
        "--out-format",
        choices=("nifti", "dicom-seg"),
        default="nifti",
        help="(3D) nifti (default; the input's format for NRRD / MHA) or dicom-seg (DICOM inputs: a DICOM SEG "
        "referencing the first modality's series)",
    )
    p.set_defaults(func=run)


def checkpoints_and_input(args: argparse.Namespace) -> tuple[list[str], str]:
    """(checkpoints, input) from `CHECKPOINT [CHECKPOINT ...] INPUT` or `--model NAME INPUT`."""
    if args.model:
        if len(args.sources) != 1:
            raise ValueError(f"with --model {args.model} give only the input, got {args.sources}")
        from ..released import released_checkpoints

        return [str(path) for path in released_checkpoints(args.model)], args.sources[0]  # an ensemble's members
    if len(args.sources) < 2:
        raise ValueError(f"give a checkpoint and an input (or --model NAME and an input), got {args.sources}")
    return args.sources[:-1], args.sources[-1]


def mirror_axes(text: str | None) -> tuple[int, ...] | None:
    """None (the checkpoint's axes) when not given, () for '', else the axes."""
    from ._options import ints

    if text is None:
        return None
    return () if not text.strip() else ints(text, "--mirror-axes")


def postprocess_option(text: str) -> PostProcess:
    """--postprocess read as an argparse type (for the scripts that pass it on): a bad spelling is argparse's error."""
    from ..infer.postprocess import PostProcess

    try:
        return PostProcess.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def run(args: argparse.Namespace) -> int:
    from ..infer.postprocess import PostProcess
    from ..infer.predict import PredictConfig, is_3d_checkpoint, predict
    from ._options import device_name

    checkpoints, source = checkpoints_and_input(args)
    config = PredictConfig(
        device=device_name(args.device),
        overwrite=args.overwrite,
        batch_size=args.batch_size,
        threshold=args.threshold,
        overlays=args.overlay,
        probabilities=args.probabilities,
        skip_non_images=args.skip_non_images,
        overlap=args.overlap,
        mirror_axes=mirror_axes(args.mirror_axes),
        sw_batch_size=args.sw_batch_size,
        modalities=tuple(m.strip() for m in args.modalities.split(",")) if args.modalities else (),
        out_format=args.out_format,
        compile=args.compile,
        compile_backend=args.compile_backend,
        memory_format=args.memory_format,
        precision=args.precision,
        postprocess=None if args.postprocess is None else PostProcess.parse(args.postprocess),
    )
    if args.runtime == "onnx":
        if config.precision != "fp32":
            raise ValueError(
                f"--precision {config.precision} is for checkpoints; --runtime onnx runs the exported file as it was "
                "exported (float32, or its int8 export): drop --precision"
            )
        if len(checkpoints) > 1:
            raise ValueError(
                f"--runtime onnx runs one exported file, got {len(checkpoints)} ({', '.join(checkpoints)}); ensemble "
                "the checkpoints with the torch runtime, or export an ensemble release as one file (`rwkvseg export "
                "NAME --out FILE.onnx`) and give that"
            )
        return _run_onnx(args, checkpoints[0], source, config)
    volumes = is_3d_checkpoint(checkpoints)
    refuse_more_modalities(args, volumes)
    inputs = [source, *args.more_modalities] if volumes else [source]
    written = predict(checkpoints, inputs, args.out, config)
    members = f" (an ensemble of {len(checkpoints)} checkpoints)" if len(checkpoints) > 1 else ""
    print(f"wrote {len(written)} {'label volumes' if volumes else 'masks'} to {args.out}{members}")
    return 0


def refuse_more_modalities(args: argparse.Namespace, volumes: bool) -> None:
    if args.more_modalities and not volumes:
        raise ValueError(
            f"--more-modalities {' '.join(args.more_modalities)}: for 3D checkpoints, and this one is 2D: drop it "
            "(a 2D checkpoint predicts one image file or folder)"
        )


def _run_onnx(args: argparse.Namespace, model: str, source: str, config: PredictConfig) -> int:
    """Masks (2D, onnxruntime and numpy alone) or label volumes (3D, the checkpoint path's sliding window and
    resampling around onnxruntime) from a file `rwkvseg export` wrote (its metadata holds the record)."""
    from dataclasses import replace
    from pathlib import Path

    from ..data.images2d import list_inputs
    from ..export.runtime import BATCH_SIZE, OnnxPredictor, predict_files
    from ..files import output_folder
    from ..infer.predict import refuse_other_dims_options

    if Path(model).suffix != ".onnx":
        raise ValueError(f"--runtime onnx needs an exported .onnx file, got {model}; make one with `rwkvseg export`")
    predictor = OnnxPredictor(model, threads=args.threads)
    refuse_more_modalities(args, predictor.dims == 3)
    if predictor.dims == 2:  # 3D: Predictor3D refuses the 2D options itself
        refuse_other_dims_options(config, 2)
        # as the checkpoint path: given, else the recorded defaults (3D: the sliding window's)
        from ..infer.postprocess import chosen_postprocess
        from ..infer.predict2d import log_recorded_flips, recorded_mirror_axes

        inference, record = predictor.preprocessing.get("inference"), f"the record of {model}"
        predictor.mirror_axes = recorded_mirror_axes(config.mirror_axes, inference, record)
        log_recorded_flips(config.mirror_axes, predictor.mirror_axes)
        config = replace(config, postprocess=chosen_postprocess(config.postprocess, inference, record))
    if predictor.dims == 3:
        from ..export.volumes import predict_volumes

        inputs = [source, *args.more_modalities]
        with output_folder(args.out, inputs, args.overwrite, "predict") as out:
            written = predict_volumes(predictor, inputs, out, config)
        print(f"wrote {len(written)} label volumes to {args.out} (onnxruntime)")
        return 0
    with output_folder(args.out, [source], args.overwrite, "predict") as out:
        written = predict_files(
            predictor,
            list_inputs(source, args.skip_non_images),
            out,
            threshold=args.threshold,  # None: the record's (the checkpoint's, as the torch path)
            batch_size=args.batch_size or BATCH_SIZE,
            overwrite=args.overwrite,
            postprocess=config.postprocess,
            overlays=config.overlays,
            save_probabilities=config.probabilities,
        )
    print(f"wrote {len(written)} masks to {args.out} (onnxruntime)")
    return 0
