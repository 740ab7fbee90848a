"""Export a registered model, a checkpoint or a released model to ONNX (and a torch.export program), with the
preprocessing record and model facts inside, so onnxruntime alone can run it.

Route: torch.export.export with dynamic batch and spatial axes -> run_decompositions, which replaces the
`rwkvseg::bi_wkv` / `rwkvseg::bi_wkv_ordered` operators with the exact O(T) plain-operator form of `wkv_onnx` and
instance norms with a two-pass form (`instance_norm_two_pass`: onnxruntime's own op put a BraTS patch's MMSegRWKV
probabilities 1.0e-4 from float64, the two-pass form 2.0e-6, for 10 % more CPU time at 64 x 128^2) ->
torch.onnx.export(..., dynamo=True) -> `graph.fold_batch_norms` (BatchNorms into the 1x1 convs after them).
An ensemble release takes that route member by member, and `graph.mean_of_members` joins the members into one
file (the exporter's graph passes grow faster than the graph: 587 s against 1,386 s for five MMSegRWKV-smalls).
The record is one JSON string under the metadata key `rwkvseg` (see `METADATA_KEY` and `ExportRecord`).

Sizes: every exported axis is dynamic unless a model's computation depends on its exact value:
- U-RWKV, U-Net, CMUNeXt (2D): H, W multiples of 16, at least 32 (the models pad to 16 internally; the export
  takes the unpadded branch, so the runtime pads or refuses other sizes).
- MMSegRWKV (3D): H, W multiples of the stride (32), at least 64; the slice axis D is fixed at the export size
  (its windows split differently for every D), by default the record's patch size.
- MONAI 3D baselines: multiples of their own stride. UNETR is built for one size (`fixed_size`) and SwinUNETR
  marked `static_export` (torch.export's symbolic shapes of its window padding do not finish): both are exported
  static in space, also when dynamic axes are asked; SwinUNETR at `size`, else the record's patch size, else 96^3.
- U-RWKV as its authors' code runs it (`dual_transpose_back=False`, square maps only) is `static_export` too: at
  `size`, else the record's input size.
The record lists each axis as an int (static) or {"multiple": m, "min": n} (dynamic).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import __version__
from ..files import atomic_write
from ..records import regions_in_channel_order
from .graph import fold_batch_norms, mean_of_members
from .wkv_onnx import bi_wkv_decomposed, bi_wkv_ordered_decomposed, sums_dtype

METADATA_KEY = "rwkvseg"
RECORD_FORMAT = 1
DEFAULT_OPSET = 20  # opset 20 has Gelu: one kernel instead of five nodes (measured 1.5x faster on U-RWKV-s)
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
SOURCE_KINDS = ("registered", "checkpoint", "released")
STATIC_EXPORT_SIZE = 96  # a static-export model's example cube when neither size nor a patch size is given

log = logging.getLogger(__name__)


def _checkpoint_api():
    """The checkpoint functions this package uses, imported in one place (they may move)."""
    from ..checkpoint import load_checkpoint, read_meta

    return load_checkpoint, read_meta


def _released_api():
    from ..released import released_checkpoints, released_models

    return released_checkpoints, released_models


def architecture(model: nn.Module) -> nn.Module:
    """The module whose attributes set the export's size rules: an ensemble's first member (members share one
    preprocessing, so their input sizes; infer.ensemble.check_members), else the model itself."""
    from ..infer.ensemble import ProbabilityMean

    return model.members[0] if isinstance(model, ProbabilityMean) else model


@dataclass(frozen=True)
class ExportRecord:
    """What an exported file carries (JSON under metadata key "rwkvseg"): enough to preprocess, run and read out.

    axes: one entry per spatial axis, an int (static size) or {"multiple": m, "min": n} (dynamic).
    activation: "sigmoid" (one channel, or one sigmoid per region) or "softmax" over num_classes.
    preprocessing: the checkpoint's record (2D: size, resize, normalization, channels; 3D: spacing, patch size,
    normalisation, ...), empty for randomly initialised models.
    threshold: the checkpoint's training.threshold, a binary mask's default cut (None where it records none).
    """

    model: str
    dims: int
    in_channels: int
    num_classes: int
    axes: tuple[Any, ...]
    activation: str
    source: dict[str, Any]
    model_overrides: dict[str, Any] = field(default_factory=dict)
    preprocessing: dict[str, Any] = field(default_factory=dict)
    class_names: tuple[str, ...] = ()
    spacing: tuple[float, ...] | None = None
    threshold: float | None = None
    input_name: str = INPUT_NAME
    output_name: str = OUTPUT_NAME
    opset: int = DEFAULT_OPSET

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["axes"] = list(self.axes)
        data["class_names"] = list(self.class_names)
        data["spacing"] = None if self.spacing is None else list(self.spacing)
        # keys in their own order: a dataset spec's regions are in the order of the model's output channels
        return json.dumps({"format": RECORD_FORMAT, "rwkvseg_version": __version__, **data})

    @classmethod
    def from_json(cls, text: str) -> ExportRecord:
        data = json.loads(text)
        version = data.pop("format", None)
        writer = data.pop("rwkvseg_version", None)
        if version != RECORD_FORMAT:
            raise ValueError(f"export record format {version!r} is not supported (this reader knows {RECORD_FORMAT})")
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:  # a newer rwkvseg wrote it: its fields may change the results, so none is ignored
            raise ValueError(
                f"the export record holds fields this rwkvseg ({__version__}) does not know: {', '.join(unknown)} "
                f"(written by rwkvseg {writer}); upgrade rwkvseg to read it"
            )
        data["axes"] = tuple(data["axes"])
        data["class_names"] = tuple(data.get("class_names", ()))
        if data.get("spacing") is not None:
            data["spacing"] = tuple(data["spacing"])
        data["preprocessing"] = regions_in_channel_order(data.get("preprocessing", {}), data["class_names"])
        return cls(**data)


@dataclass(frozen=True)
class LoadedSource:
    """A model ready to export, with what the record needs to know about where it came from."""

    model: nn.Module
    name: str
    in_channels: int
    num_classes: int
    dims: int
    source: dict[str, Any]
    model_overrides: dict[str, Any] = field(default_factory=dict)
    preprocessing: dict[str, Any] = field(default_factory=dict)
    class_names: tuple[str, ...] = ()
    spacing: tuple[float, ...] | None = None
    threshold: float | None = None


def _spatial_dims(model: nn.Module) -> int:
    for m in model.modules():
        if isinstance(m, nn.Conv3d):
            return 3
    return 2


def load_source(
    source: str | os.PathLike,
    *,
    seed: int = 0,
    in_channels: int | None = None,
    num_classes: int | None = None,
    overrides: dict[str, Any] | None = None,
) -> LoadedSource:
    """A model in eval mode from a released model name, a checkpoint path, or a registered model name (randomly
    initialised with torch.manual_seed(seed); in_channels defaults to 3 in 2D and 4 in 3D, num_classes to 1 in 2D
    and 4 in 3D). A released ensemble loads as one model, its members' mean probability
    (infer.ensemble.ProbabilityMean), so that it exports as one graph; its source records the member count."""
    from ..infer.ensemble import load_checkpoints
    from ..models import create_model, list_models

    load_checkpoint, _ = _checkpoint_api()
    released_checkpoints, released_models = _released_api()
    text = str(source)
    released = [m.name for m in released_models()]
    if text in released:
        checkpoints = released_checkpoints(text)
        model, meta = load_checkpoints(checkpoints)  # one checkpoint, or the members checked to agree
        kind = {"kind": "released", "name": text} | ({"members": len(checkpoints)} if len(checkpoints) > 1 else {})
    elif Path(text).suffix in (".safetensors", ".json") or Path(text + ".json").is_file():
        model, meta = load_checkpoint(text)
        kind = {"kind": "checkpoint", "path": str(Path(text).resolve())}
    elif text in list_models():
        overrides = dict(overrides or {})
        torch.manual_seed(seed)
        model = create_model(text, in_channels or 3, num_classes or 1, **overrides)
        dims = _spatial_dims(model)
        if dims == 3 and (in_channels is None or num_classes is None):
            torch.manual_seed(seed)
            model = create_model(text, in_channels or 4, num_classes or 4, **overrides)
        cin = in_channels or (4 if dims == 3 else 3)
        k = num_classes or (4 if dims == 3 else 1)
        return LoadedSource(
            model.eval(),
            text,
            cin,
            k,
            dims,
            {"kind": "registered", "name": text, "seed": seed, "in_channels": cin, "num_classes": k},
            overrides,
        )
    else:
        raise ValueError(
            f"{text!r} is neither a released model ({', '.join(released) or 'none installed'}), a checkpoint "
            f"(<name>.safetensors with <name>.json beside it) nor a registered model ({', '.join(list_models())})"
        )
    dims = int(meta.preprocessing.get("dims", _spatial_dims(architecture(model))))
    return LoadedSource(
        model.eval(),
        meta.model,
        meta.in_channels,
        meta.num_classes,
        dims,
        kind,
        dict(meta.model_overrides),
        dict(meta.preprocessing),
        tuple(meta.class_names),
        meta.spacing,
        meta.training.get("threshold"),
    )


def _activation(loaded: LoadedSource) -> str:
    if loaded.preprocessing.get("target") == "regions" or loaded.num_classes == 1:
        return "sigmoid"
    return "softmax"


def size_rule(model: nn.Module, dims: int) -> tuple[int, ...]:
    """Per spatial axis: the multiple its size must have, or 0 where the axis is exported static."""
    model = architecture(model)
    cfg = getattr(model, "cfg", None)
    if cfg is not None and hasattr(cfg, "windows") and hasattr(cfg, "stride"):  # MMSegRWKV: windows on the D axis
        return (0, cfg.stride, cfg.stride)
    multiple = getattr(model, "multiple", None)  # MONAI 3D baselines wrapped with their stride
    if multiple is not None:  # and a coarsest level that needs whole voxels (BasicUNet: multiple 1, coarse 16)
        multiple = max(int(multiple), int(getattr(model, "coarse", None) or 1))
        static = getattr(model, "fixed_size", None) or getattr(model, "static_export", False)
        return (0,) * dims if static else (multiple,) * dims
    if getattr(model, "static_export", False):  # U-RWKV's untransposed Dual branch: square maps only
        return (0,) * dims
    return (16,) * dims


def _example_shape(loaded: LoadedSource, rule: tuple[int, ...], size: tuple[int, ...] | None) -> tuple[int, ...]:
    """Distinct, conforming example sizes per axis (distinct so that no size equality gets baked in)."""
    if size is not None:
        return tuple(size)
    patch = loaded.preprocessing.get("patch_size") or loaded.preprocessing.get("size")
    model = architecture(loaded.model)
    if loaded.dims == 3:
        fixed = getattr(model, "fixed_size", None)
        if fixed:
            return tuple(fixed)
        if getattr(model, "static_export", False):
            return tuple(int(s) for s in patch) if patch else (STATIC_EXPORT_SIZE,) * 3
        d = int(patch[0]) if patch else 64
        return tuple(d if m == 0 else m * (3 + i) for i, m in enumerate(rule))
    if not any(rule):  # static in space: the size the model was trained for
        return tuple(int(s) for s in patch) if patch else (256,) * loaded.dims
    return tuple(m * (3 + i) for i, m in enumerate(rule))


def export_program(loaded: LoadedSource, *, dynamic: bool = True, size: tuple[int, ...] | None = None):
    """(decomposed ExportedProgram, example input, axes entry for the record)."""
    rule = size_rule(loaded.model, loaded.dims)
    shape = _example_shape(loaded, rule, size)
    if any(m and s % m for s, m in zip(shape, rule, strict=True)):
        raise ValueError(f"export size {shape} must be a multiple of {rule} on its dynamic axes")
    if dynamic and getattr(architecture(loaded.model), "static_export", False):
        log.info(
            "%s is exported static at %s (its forward takes no other size class: SwinUNETR's window padding does "
            "not finish symbolically, U-RWKV's untransposed Dual branch needs square maps); --size picks another",
            loaded.name,
            "x".join(map(str, shape)),
        )
    example = torch.randn(2, loaded.in_channels, *shape, generator=torch.Generator().manual_seed(0))
    dynamic_shapes = (
        {
            0: _axis_dim(dynamic, "batch", 0),
            **{2 + i: _axis_dim(dynamic and m, f"s{i}", m, loaded.dims) for i, m in enumerate(rule)},
        },
    )
    with torch.no_grad():
        ep = torch.export.export(loaded.model, (example,), dynamic_shapes=dynamic_shapes)
    sums = torch.float64
    if any(str(n.target).startswith("rwkvseg.") for n in ep.graph.nodes):  # one eager pass, only where it matters
        sums = sums_dtype(loaded.model, example)
        log.info("%s: Bi-WKV prefix sums in %s", loaded.name, str(sums).removeprefix("torch."))
    ep = decompose_bi_wkv(ep, sums)
    axes = []
    val = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name == _user_input(ep)).meta["val"]
    for i, m in enumerate(rule):
        s = val.shape[2 + i]
        if isinstance(s, int) or not dynamic:
            axes.append(int(shape[i]))
        else:
            low = ep.range_constraints[s.node.expr].lower if s.node.expr in ep.range_constraints else m
            axes.append({"multiple": m, "min": int(math.ceil(max(int(low), m) / m) * m)})
    return ep, example, tuple(axes)


def _axis_dim(dynamic: bool, name: str, multiple: int, dims: int = 0):
    """How torch.export sees one axis. 2D: Dim.AUTO (explicit dims would turn U-RWKV's square-map shortcut into a
    violated guard; AUTO keeps the general branch taken by the non-square example). 3D: an explicit multiple of a
    named dim (AUTO's guard solver fails on the 3D models' stride arithmetic)."""
    if not dynamic:
        return torch.export.Dim.STATIC
    if dims == 3:
        return multiple * torch.export.Dim(name, min=2)
    return torch.export.Dim.AUTO


def _user_input(ep) -> str:
    spec = next(
        s for s in ep.graph_signature.input_specs if s.kind == torch.export.graph_signature.InputKind.USER_INPUT
    )
    return spec.arg.name


def decompose_bi_wkv(ep, sums: torch.dtype = torch.float64):
    """Replace the rwkvseg Bi-WKV operators in an ExportedProgram with the plain-operator form (exact, O(T)), its
    prefix sums in `sums` (float32 only where `wkv_onnx.sums_dtype` allows it), and instance norms with their
    two-pass form (`instance_norm_two_pass`)."""
    from .. import ops  # noqa: F401  (importing rwkvseg.ops registers the operators)

    table: dict[Any, Callable] = {
        torch.ops.rwkvseg.bi_wkv.default: functools.partial(bi_wkv_decomposed, sums=sums),
        torch.ops.rwkvseg.bi_wkv_ordered.default: functools.partial(bi_wkv_ordered_decomposed, sums=sums),
        torch.ops.aten.instance_norm.default: instance_norm_two_pass,
    }
    return ep.run_decompositions(decomp_table=table)


def _staged_mean(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    """The mean over dims one axis at a time (the same value): onnxruntime's ReduceMean sums in one float32 run,
    whose rounding grows with the count; a few hundred values a stage keep it at float32's own precision."""
    for d in reversed(dims):
        x = x.mean(d, keepdim=True)
    return x


def instance_norm_two_pass(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    use_input_stats: bool,
    momentum: float,
    eps: float,
    cudnn_enabled: bool,
) -> Tensor:
    """aten.instance_norm for export: the variance of the centred values (two passes, staged means), then one
    per-channel multiply-add, not onnxruntime's InstanceNormalization, whose float32 statistics lose digits with
    the map's mean (measured on the CPU with a 64^3 map of unit variance: largest error 7.6e-6 at mean 0, 9.7e-5 at
    mean 50, 5.0e-4 at mean 500, against torch's 3.6e-7 / 3.7e-6 / 2.6e-5; on a BraTS patch it put MMSegRWKV's
    probabilities 1.0e-4 from float64 where torch's float32 stays within 1.7e-6, this form 2.0e-6).
    x: [B, C, *spatial] -> the same."""
    if not use_input_stats:  # running statistics (track_running_stats in eval): torch's own form
        return torch.nn.functional.batch_norm(x, running_mean, running_var, weight, bias, False, momentum, eps)
    dims = tuple(range(2, x.dim()))
    mean = _staged_mean(x, dims)  # [B, C, 1, ...]
    rstd = torch.rsqrt(_staged_mean((x - mean).square(), dims) + eps)
    channel = (1, -1) + (1,) * len(dims)  # [C] -> [1, C, 1, ...]
    scale = rstd if weight is None else rstd * weight.view(channel)
    shift = -mean * scale if bias is None else bias.view(channel) - mean * scale
    # one multiply-add over the map (as precise as scaling x - mean: the rounding of x * scale is that of x itself)
    return x * scale + shift


def _refuse_existing(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; choose another path or pass overwrite=True")


def build_record(loaded: LoadedSource, axes: tuple[Any, ...], opset: int) -> ExportRecord:
    return ExportRecord(
        model=loaded.name,
        dims=loaded.dims,
        in_channels=loaded.in_channels,
        num_classes=loaded.num_classes,
        axes=axes,
        activation=_activation(loaded),
        source=loaded.source,
        model_overrides=loaded.model_overrides,
        preprocessing=loaded.preprocessing,
        class_names=loaded.class_names,
        spacing=loaded.spacing,
        threshold=loaded.threshold,
        opset=opset,
    )


def export_onnx(
    source: str | os.PathLike | LoadedSource,
    out_path: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    dynamic: bool = True,
    overwrite: bool = False,
    size: tuple[int, ...] | None = None,
    seed: int = 0,
    in_channels: int | None = None,
    num_classes: int | None = None,
    program_path: str | os.PathLike | None = None,
) -> ExportRecord:
    """Export `source` (released model name, checkpoint path, or registered model name) to an ONNX file.

    dynamic: batch and the spatial axes the model allows are dynamic (module docstring); size: the export
    example's spatial size (defaults conform to the rules). program_path: also save the decomposed
    ExportedProgram there (`.pt2`, loadable with torch.export.load without rwkvseg). Files are written atomically
    and never replaced unless overwrite=True. Returns the record embedded in the file.
    """
    import onnx

    from ..infer.ensemble import ProbabilityMean

    out = Path(out_path)
    _refuse_existing(out, overwrite)
    if program_path is not None:
        _refuse_existing(Path(program_path), overwrite)
    loaded = (
        source
        if isinstance(source, LoadedSource)
        else load_source(source, seed=seed, in_channels=in_channels, num_classes=num_classes)
    )
    if isinstance(loaded.model, ProbabilityMean):  # member by member, then joined (graph.mean_of_members)
        parts = [_onnx_model(dataclasses.replace(loaded, model=m), dynamic, size, opset) for m in loaded.model.members]
        if len({json.dumps(axes) for _, _, axes in parts}) > 1:
            raise ValueError(f"{loaded.name}: its members export with different size rules; export them one by one")
        axes = parts[0][2]
        proto = mean_of_members([p for p, _, _ in parts], loaded.model.activation, INPUT_NAME, OUTPUT_NAME)
        ep = export_program(loaded, dynamic=dynamic, size=size)[0] if program_path is not None else None
    else:
        proto, ep, axes = _onnx_model(loaded, dynamic, size, opset)
    record = build_record(loaded, axes, opset)
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, record.to_json()
    proto.producer_name = "rwkvseg"
    proto.producer_version = __version__
    atomic_write(out, lambda tmp: onnx.save_model(proto, str(tmp)), keep_suffix=True)
    if program_path is not None:
        extra = _extra(record)
        program = Path(program_path)
        atomic_write(program, lambda tmp: torch.export.save(ep, str(tmp), extra_files=extra), keep_suffix=True)
    return record


def _onnx_model(loaded: LoadedSource, dynamic: bool, size: tuple[int, ...] | None, opset: int):
    """(ONNX ModelProto with the BatchNorms folded, decomposed ExportedProgram, axes entry) of one network."""
    ep, example, axes = export_program(loaded, dynamic=dynamic, size=size)
    program = torch.onnx.export(
        ep,
        (example,),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        opset_version=opset,
        dynamo=True,
        verbose=False,
    )
    proto = program.model_proto
    folded = fold_batch_norms(proto.graph)
    if folded:
        log.info("%s: %d BatchNorms folded into the 1x1 convolutions after them", loaded.name, folded)
    return proto, ep, axes


def _extra(record: ExportRecord) -> dict[str, str]:
    return {METADATA_KEY + ".json": record.to_json()}


def read_record(path: str | os.PathLike) -> ExportRecord:
    """The record embedded in an exported ONNX file (read with onnxruntime; no model code involved)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return record_of(session, path)


def record_of(session, path: str | os.PathLike = "<session>") -> ExportRecord:
    meta = session.get_modelmeta().custom_metadata_map
    if METADATA_KEY not in meta:
        raise ValueError(f"{path} has no {METADATA_KEY!r} metadata; it was not exported by rwkvseg export_onnx")
    try:
        return ExportRecord.from_json(meta[METADATA_KEY])
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
