"""Training configuration: frozen dataclasses read from TOML or YAML, with `--set key=value` overrides.

Unknown keys are rejected with the list of valid ones, values are converted to the field's type, and the
resolved configuration is written into the run folder, so a run can always be repeated from its own files.
`from_dict` works for any dataclass tree; TrainConfig's data section is DataConfig or VolumeDataConfig by dims.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import yaml

from ..compiling import check_compile
from ..data.images2d import NORMALIZATIONS
from ..data.patches3d import PatchConfig
from ..data.specs import DATASETS
from ..data.transforms2d import RESIZE_MODES, AugmentConfig
from ..memory_format import check_memory_format
from ..records import TARGETS
from .workers import WORKER_START

if TYPE_CHECKING:
    from ..infer.postprocess import PostProcess

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("poly", "cosine", "constant")
LOSSES = ("auto", "bce_dice", "ce_dice", "bce", "ce", "dice")
AMP_MODES = ("auto", "bf16", "fp16", "off")
GPU_RESIDENT = ("auto", "on", "off")
LOGGERS = ("csv", "tensorboard")
REGION_LOSSES = ("auto", "bce_dice", "bce", "dice")
PATCH_KEYS = ("patch_size", "samples_per_epoch", "fg_fraction", "augment", "allow_padding")  # [data.patches]


def _check_range(name: str, value: float, low: float, high: float = math.inf) -> None:
    """Refuse a setting outside [low, high] (NaN too), naming it and the range."""
    if not low <= value <= high:
        where = f"in [{low:g}, {high:g}]" if high != math.inf else f">= {low:g}"
        raise ValueError(f"{name} = {value!r} must be {where}")


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} = {value!r} is not valid; choose one of {', '.join(choices)}")


@dataclass(frozen=True)
class ModelConfig:
    """name: a registered architecture (`rwkvseg models` lists them); overrides: values that replace the variant's.
    init: the weights the run starts from (fine-tuning): a checkpoint path (its .safetensors, its .json or their
    name without suffix) or a released model's name; "" for random initialisation. Checked against the run before
    any training (rwkvseg.train.finetune); the optimizer, schedule and epochs start fresh."""

    name: str = "urwkv"
    overrides: dict[str, Any] = field(default_factory=dict)
    init: str = ""


@dataclass(frozen=True)
class DataConfig:
    """root: dataset folder (any layout discovery knows); split: JSON file (empty: a seeded split is made and
    saved in the run folder); size and resize: network input (resize the whole image, or random crops).
    num_workers: DataLoader worker processes (0: load in the training process); worker_start: how they start,
    "auto" (the platform's default: fork on Linux), "fork", "forkserver" or "spawn" (rwkvseg.train.workers; a
    process with gRPC threads, like a Flower site, must not fork them).
    extra_train: more dataset folders whose every image / mask pair joins the training set only (another
    dataset of the same task, e.g. Kvasir-SEG beside CVC-ClinicDB); validation and checkpoint choice stay on
    root's split (rwkvseg.train.images.extra_training_samples refuses a folder that overlaps root)."""

    root: str = ""
    split: str = ""
    extra_train: tuple[str, ...] = ()
    fold: int = 0
    val_fraction: float = 0.2
    channels: int = 3
    num_classes: int = 1
    class_names: tuple[str, ...] = ()
    size: tuple[int, int] = (256, 256)
    resize: str = "resize"
    normalization: str = "auto"
    batch_size: int = 4
    val_batch_size: int = 8
    num_workers: int = 2
    worker_start: str = "auto"
    skip_non_images: bool = False
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    gpu_resident: str = "auto"

    def __post_init__(self) -> None:
        _check_choice("data.gpu_resident", self.gpu_resident, GPU_RESIDENT)
        _check_choice("data.resize", self.resize, RESIZE_MODES)
        _check_choice("data.normalization", self.normalization, NORMALIZATIONS)
        for name in ("channels", "num_classes", "batch_size", "val_batch_size"):
            _check_range(f"data.{name}", getattr(self, name), 1)
        _check_range("data.num_workers", self.num_workers, 0)
        _check_choice("data.worker_start", self.worker_start, WORKER_START)
        _check_range("data.fold", self.fold, 0)
        _check_range("data.val_fraction", self.val_fraction, 0, 1)
        if len(self.size) != 2 or min(self.size) < 8:
            raise ValueError(f"data.size must be [height, width] >= 8, got {list(self.size)}")
        expected = 1 if self.num_classes == 1 else self.num_classes
        if self.class_names and len(self.class_names) != expected:
            raise ValueError(
                f"data.class_names {list(self.class_names)} must name the {self.num_classes} output class(es) "
                "(one foreground name for a binary model)"
            )


@dataclass(frozen=True)
class OptimConfig:
    """sgd + poly per iteration from 0.01 is the paper's; adamw + cosine (with warmup) is the common alternative.
    fused: torch's fused optimizer step (one kernel for the whole update, CUDA and CPU) instead of its multi-tensor
    ("foreach") kernels: the same update up to rounding; off by default until measured (docs/speed.md).
    ema: the decay of an exponential moving average of the weights (0: off, the paper's recipe; 0.999 averages
    over about the last 1000 steps), which is then what validation scores and the best and last checkpoints hold;
    ema_start: for the first ema_start optimizer steps the average copies the weights, so it does not begin at the
    random initialisation (rwkvseg.train.ema)."""

    name: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: str = "poly"
    power: float = 0.9
    warmup_steps: int = 0
    min_lr: float = 0.0
    grad_clip: float = 0.0
    fused: bool = False
    ema: float = 0.0
    ema_start: int = 0

    def __post_init__(self) -> None:
        _check_choice("optim.name", self.name, OPTIMIZERS)
        _check_choice("optim.schedule", self.schedule, SCHEDULES)
        if not self.lr > 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        for name in ("momentum", "weight_decay", "power", "warmup_steps", "min_lr", "grad_clip", "ema_start"):
            _check_range(f"optim.{name}", getattr(self, name), 0)
        if not 0 <= self.ema < 1:
            raise ValueError(f"optim.ema = {self.ema!r} must be in [0, 1): 0 is off, a decay like 0.999 averages")
        for beta in self.betas:
            _check_range("optim.betas", beta, 0, 1)


@dataclass(frozen=True)
class LossConfig:
    """auto: BCE + Dice for one output channel (binary), CE + Dice for several classes.

    batch_dice: the soft Dice of each channel over the whole batch at once (nnU-Net's batch Dice) instead of per
    sample and then averaged. Per sample, a patch without a region scores Dice 1 only if the prediction is empty
    there, so every stray probability on it is punished with a full Dice loss; over the batch, such a patch adds
    its false positives to the one Dice of the batch instead.
    region_weights: 3D region targets only, one weight per region in the dataset's order (BraTS: WT, TC, ET), e.g.
    [1, 2, 1] to weigh the tumour core double: each region's BCE and Dice enter the loss in these proportions
    (normalised to average 1, so equal weights are the plain mean); empty: every region alike.
    """

    name: str = "auto"
    ce_weight: float = 1.0
    dice_weight: float = 1.0
    batch_dice: bool = False
    region_weights: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        _check_choice("loss.name", self.name, LOSSES)
        _check_range("loss.ce_weight", self.ce_weight, 0)
        _check_range("loss.dice_weight", self.dice_weight, 0)
        if self.ce_weight + self.dice_weight == 0:
            raise ValueError("loss.ce_weight and loss.dice_weight are both 0: nothing would be learnt")
        if any(not w >= 0 for w in self.region_weights) or (self.region_weights and sum(self.region_weights) == 0):
            raise ValueError(
                f"loss.region_weights {list(self.region_weights)}: give weights >= 0, not all 0 (e.g. [1, 2, 1])"
            )


@dataclass(frozen=True)
class VolumeDataConfig:
    """root: a cache folder (with plans.json) or a raw dataset folder, preprocessed into <out>/cache first.

    dataset, modalities, label_values, regions describe a raw dataset (a preset, or `nnunet` to read its
    dataset.json; regions as a table {WT = [1, 2, 4], ...}); a cache carries its own. target_spacing: (x, y, z)
    mm in file axis order like `rwkvseg preprocess --spacing`, empty for the dataset median. target: "labels"
    (softmax over label classes, CE + Dice) or "regions" (sigmoid per region, BCE + Dice). patches: how
    training patches are drawn ([data.patches]: patch_size, samples_per_epoch, fg_fraction, augment, allow_padding).
    num_workers and worker_start: the patch loader's worker processes and how they start (as DataConfig's).
    """

    root: str = ""
    dataset: str = "brats"
    modalities: tuple[str, ...] = ()
    label_values: tuple[int, ...] = ()
    regions: dict[str, Any] = field(default_factory=dict)
    target_spacing: tuple[float, ...] = ()
    crop_nonzero: bool = True
    split: str = ""
    fold: int = 0
    val_fraction: float = 0.2
    target: str = "labels"
    patches: PatchConfig = field(default_factory=PatchConfig)
    batch_size: int = 2
    num_workers: int = 2
    worker_start: str = "auto"

    def __post_init__(self) -> None:
        _check_choice("data.dataset", self.dataset, DATASETS)
        _check_choice("data.target", self.target, TARGETS)
        if len(self.target_spacing) not in (0, 1, 3) or any(s <= 0 for s in self.target_spacing):
            raise ValueError(f"data.target_spacing {list(self.target_spacing)} needs one or three sizes > 0 (mm)")
        _check_range("data.num_workers", self.num_workers, 0)
        _check_choice("data.worker_start", self.worker_start, WORKER_START)
        _check_range("data.fold", self.fold, 0)
        _check_range("data.val_fraction", self.val_fraction, 0, 1)
        if self.batch_size < 1 or self.patches.samples_per_epoch < self.batch_size:
            raise ValueError(
                f"data.batch_size ({self.batch_size}) must be >= 1 and at most data.patches.samples_per_epoch "
                f"({self.patches.samples_per_epoch})"
            )


@dataclass(frozen=True)
class InferConfig:
    """Sliding window for validation (every val_every epochs) and the final TTA evaluation of the best
    checkpoint; the same overlap and mirror axes are stored as prediction defaults in the checkpoint.

    val_postprocess: post-processing of the predicted label map before validation scores it (a `rwkvseg predict
    --postprocess` spelling: "largest", "et-min-mm3=800", ...; "" or "none": off, as before), so that checkpoints
    are chosen on what prediction writes; the final evaluation uses it too, and the checkpoint records it as its
    prediction default (preprocessing.inference.postprocess). 3D runs only."""

    overlap: float = 0.5
    sw_batch_size: int = 2
    val_mirror_axes: tuple[int, ...] = ()
    mirror_axes: tuple[int, ...] = (0, 1, 2)
    final_eval: bool = True
    val_postprocess: str = ""

    def __post_init__(self) -> None:
        if not 0 <= self.overlap < 1:
            raise ValueError(f"infer.overlap {self.overlap} must be in [0, 1)")
        _check_range("infer.sw_batch_size", self.sw_batch_size, 1)
        if any(a not in (0, 1, 2) for a in (*self.val_mirror_axes, *self.mirror_axes)):
            raise ValueError("infer.mirror_axes and infer.val_mirror_axes index the spatial axes 0, 1, 2")
        self.postprocess()  # a clear error for a bad spelling when the config is read

    def postprocess(self) -> PostProcess:
        """val_postprocess as the post-processing config; ValueError naming infer.val_postprocess when misspelt."""
        from ..infer.postprocess import PostProcess

        try:
            return PostProcess.parse(self.val_postprocess)
        except ValueError as err:  # its message names --postprocess and the text: name the setting instead
            reason = str(err).removeprefix(f"--postprocess {self.val_postprocess!r}: ")
            raise ValueError(f"infer.val_postprocess = {self.val_postprocess!r}: {reason}") from None


@dataclass(frozen=True)
class TrainConfig:
    """One run, 2D or 3D: dims = 2 trains on images (data: DataConfig), dims = 3 on volumes (data:
    VolumeDataConfig, infer: the sliding window of validation). out: run folder (checkpoints, logs, resolved
    config, split). max_steps_per_epoch 0: whole epochs. Loaded from a file, a 3D config takes the 3D defaults
    of DIMS_DEFAULTS for what it leaves out.

    max_minutes > 0: a wall-clock budget, checked only after a validated epoch so a stopped run always leaves a
    best checkpoint. After the first epoch of the process (which may hold torch.compile) the run stops only if
    the time since training began is already past the budget; after any later epoch it stops if that time plus
    val_every x the last epoch's own duration (the estimated end of the next validation; fewer epochs where the
    run's last, always validated, comes sooner) is past the budget. The LR schedule still spans `epochs`, so a
    stopped run has not annealed fully (see fit_schedule).

    fit_schedule (needs max_minutes > 0): fit the run to its budget once, early, instead of stopping it part-way
    through its schedule (rwkvseg.train.train.budget_fit). After the first epoch of the process that is not its
    first, once a validation has been timed (train_all: none is needed; with val_every > 1 the fit waits for the
    run's first validation), the seconds per epoch (that epoch's without its validation, plus the last
    validation's / val_every) give the epochs that fit: those done + those the time left holds, less val_every - 1
    validations kept aside (the budget stop's estimate counts that many more), at least one more, at most
    `epochs`. If fewer than `epochs`, the run ends after that many, as a complete run, and the rest of the
    LR schedule is compressed in time onto them: the factor goes on from where it is (no jump) and reaches the
    schedule's end (poly, cosine: min_lr) at the fitted last epoch (rwkvseg.train.optim.compress_schedule). The fit
    is recorded in the training state, metrics.csv (fitted_epochs, in the row of the epoch it came after),
    summary.json and the checkpoints (schedule_fit). A resumed run keeps its fit (whatever fit_schedule says then)
    and is never fitted again; a run not yet fitted is fitted by the first process whose budget cannot hold it, so
    a run that is to go on over several budgets (device calls) should set fit_schedule only for its last one. The
    budget stop stays on as a safety net, reckoning to the fitted last epoch.

    threshold: the cut of the predicted probability in validation and prediction: of the foreground in a 2D binary
    run (recorded as training.threshold), of each region's sigmoid in a 3D region run (validation, the final
    evaluation, and recorded as preprocessing.inference.threshold when not 0.5); a 3D labels run takes the argmax
    and keeps 0.5.

    compile: "auto" (the training step compiled on CUDA: under CUDA graphs in one process, in the default mode
    under DDP, rwkvseg.train.run.auto_compile_mode; eager on the CPU), "on" (the default mode), "off" or a mode
    ("reduce-overhead", "max-autotune", ...); compile_backend: "inductor", or "aot_eager" (traces, no code
    generation); compile_cache: a file that carries the compiled step to the next run or machine (loaded before
    compiling, written after the first step; rwkvseg.train.compile_cache). data.gpu_resident (2D): "auto" keeps
    the whole training set on the GPU as uint8 at the network size, augmented there, when it fits; "on" insists,
    "off" reads through a DataLoader.

    train_all: train on every case of the split's fold, its validation cases included, and validate none (nnU-Net's
    fold "all"): for the final model of a recipe whose schedule (epochs) was chosen by cross-validating that recipe.
    The `best` checkpoint is then the last epoch's weights (their average with optim.ema), written after every
    epoch and recorded as chosen by no validation; max_minutes is checked after every epoch; there is no final
    evaluation (3D). The checkpoint records train_all and the number of training cases.

    memory_format: "contiguous" (NCHW / NCDHW) or "channels_last" (NHWC / NDHWC): the model's parameters are
    converted once before compiling, DDP and the optimizer, each training batch and each validation window on the
    device (rwkvseg.memory_format); the numbers are the same up to rounding, checkpoints are contiguous either way.
    Off by default until a training run on the GPU confirms the step's gain (docs/speed.md). Refused on the CPU at
    one sample per process: torch's CPU instance norm gets the input gradient wrong there in channels-last.
    """

    DATA_CONFIGS: ClassVar[dict[int, type]] = {2: DataConfig, 3: VolumeDataConfig}
    DIMS_DEFAULTS: ClassVar[dict[int, dict[str, Any]]] = {
        2: {},
        3: {"model": {"name": "mmsegrwkv"}, "data": {}, "epochs": 300, "val_every": 10, "out": "runs/run3d"},
    }

    dims: int = 2
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig | VolumeDataConfig = field(default_factory=DataConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    epochs: int = 280
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    val_every: int = 1
    threshold: float = 0.5
    select_metric: str = "dice"
    max_steps_per_epoch: int = 0
    max_minutes: float = 0.0
    logger: str = "csv"
    out: str = "runs/run"
    compile: str = "auto"
    compile_backend: str = "inductor"
    compile_cache: str = ""
    memory_format: str = "contiguous"
    train_all: bool = False
    fit_schedule: bool = False

    def __post_init__(self) -> None:
        config_dims({"dims": self.dims})
        check_compile(self.compile, self.compile_backend)
        check_memory_format(self.memory_format)
        if not isinstance(self.data, self.DATA_CONFIGS[self.dims]):
            raise ValueError(
                f"dims = {self.dims} needs a {self.DATA_CONFIGS[self.dims].__name__} data section, got "
                f"{type(self.data).__name__}; build the config with load_config or config_from_dict"
            )
        _check_choice("amp", self.amp, AMP_MODES)
        _check_choice("logger", self.logger, LOGGERS)
        if self.epochs < 1 or self.val_every < 1:
            raise ValueError("epochs and val_every must be >= 1")
        _check_range("threshold", self.threshold, 0, 1)
        _check_range("seed", self.seed, 0)
        _check_range("max_steps_per_epoch", self.max_steps_per_epoch, 0)
        _check_range("max_minutes", self.max_minutes, 0)
        if self.fit_schedule and self.max_minutes == 0:
            raise ValueError(
                "fit_schedule = true fits the LR schedule to the wall-clock budget, and max_minutes = 0 sets none: "
                "set max_minutes > 0, or fit_schedule = false"
            )
        if self.dims == 3 and self.data.target == "labels" and self.threshold != 0.5:
            raise ValueError(
                f"threshold = {self.threshold:g} needs data.target = regions (sigmoid per region); a labels run "
                "takes the argmax over classes: leave threshold at 0.5"
            )
        if self.dims == 2 and self.infer.postprocess().active:
            raise ValueError(
                f"infer.val_postprocess = {self.infer.val_postprocess!r} applies to 3D runs (dims = 3); a 2D run "
                "validates without post-processing: leave it out"
            )
        if self.dims == 3 and self.data.target == "regions" and self.loss.name not in REGION_LOSSES:
            raise ValueError(
                f"loss.name = {self.loss.name!r} does not fit data.target = regions (sigmoid per region); "
                f"choose one of {', '.join(REGION_LOSSES)}, or set data.target = labels for CE over labels"
            )


def config_dims(data: Mapping[str, Any]) -> int:
    """2 or 3: which kind of run a raw config dict (after --set overrides) is for."""
    dims = data.get("dims", 2)
    if dims not in (2, 3):
        raise ValueError(f"dims = {dims!r} is not valid; 3 for volumes, 2 (or leave it out) for images")
    return int(dims)


def config_from_dict(data: Mapping[str, Any]) -> TrainConfig:
    """The TrainConfig of a nested dict: the defaults of its dims under the given settings.

    Configs written before the [data.patches] table (patch_size ... allow_padding directly under [data]) load too.
    """
    dims = config_dims(data)
    data = _merge(TrainConfig.DIMS_DEFAULTS[dims], data)
    if dims == 3:
        flat = {k: data["data"].pop(k) for k in PATCH_KEYS if k in data["data"]}
        data["data"]["patches"] = {**flat, **data["data"].get("patches", {})}
    return from_dict(TrainConfig, data)


def _merge(defaults: Mapping[str, Any], data: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(defaults)
    for key, value in data.items():
        both = isinstance(value, Mapping) and isinstance(out.get(key), Mapping)
        out[key] = _merge(out[key], value) if both else value
    return out


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _convert(value: Any, kind: Any, key: str) -> Any:
    """value (from TOML/YAML/--set) as the annotated type kind; errors name the key."""
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, Mapping):
            raise ValueError(f"{key} must be a table of settings, got {value!r}")
        return from_dict(kind, value, prefix=f"{key}.")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], key)
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            value = [value]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise ValueError(f"{key} needs {len(args)} values, got {list(value)}")
        return tuple(_convert(v, a, key) for v, a in zip(value, args, strict=True))
    if origin is dict or kind is dict:
        if not isinstance(value, Mapping):
            raise ValueError(f"{key} must be a table, got {value!r}")
        return dict(value)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ValueError(f"{key} must be true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"{key} must be an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key} must be an integer, got {value!r}") from None
    if kind is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key} must be a number, got {value!r}") from None
    if kind is str:
        if isinstance(value, bool):  # YAML reads on / off (and TOML true / false) as booleans: on/off settings
            return "on" if value else "off"
        if isinstance(value, (dict, list)):
            raise ValueError(f"{key} must be a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    """Build dataclass cls from a nested mapping; unknown keys are an error that lists the valid ones."""
    types_ = _field_types(cls)
    if "data" in types_ and hasattr(cls, "DATA_CONFIGS"):  # the data section's class depends on dims
        types_["data"] = cls.DATA_CONFIGS[config_dims(data)]
    unknown = sorted(set(data) - set(types_))
    if unknown:
        raise ValueError(
            f"unknown setting(s) {', '.join(prefix + k for k in unknown)}; valid keys here: "
            f"{', '.join(prefix + k for k in types_)}"
        )
    return cls(**{k: _convert(v, types_[k], prefix + k) for k, v in data.items()})


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON/TOML-ready nested dict (tuples as lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A TOML (.toml) or YAML (.yaml/.yml) file as a dict; JSON (.json) too, as written into run folders."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise ValueError(f"config file {path} must end in .toml, .yaml, .yml or .json")
    except (tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError) as err:
        raise ValueError(f"config file {path} cannot be parsed: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a table of settings at the top level")
    return data


def parse_value(raw: str) -> Any:
    """A setting's value as written after `KEY=` on a command line, read as YAML (0.01, true, [256, 256], sgd); an
    empty string stays empty, and text YAML cannot read stays as written."""
    try:
        return yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return raw


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` strings (value read by parse_value) to a nested dict."""
    data = json.loads(json.dumps(data))  # deep copy
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r} must look like key=value, e.g. optim.lr=0.001")
        value = parse_value(raw)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {item!r}: {part} is a value, not a table of settings")
        node[parts[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """TrainConfig (2D, or 3D with dims = 3) from a file (or defaults) plus --set overrides."""
    data = read_config_file(path) if path else {}
    return config_from_dict(apply_overrides(data, overrides))
