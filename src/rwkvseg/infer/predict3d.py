"""3D prediction on volumes, case folders and DICOM series, at any voxel spacing, written on the input's own grid.

Channels are matched by name to the modalities the checkpoint records (data.volumes.input_cases). The input is
turned to the orientation the model was trained in (axes permuted / flipped, no resampling; the checkpoint's
`orientation`, LPS for checkpoints without one), preprocessed with the training plans stored in the checkpoint (crop
to nonzero, z-score, resample to the training spacing), predicted with the sliding window (overlap and mirror axes:
the checkpoint's on a GPU, none on the CPU, unless given), and the probabilities are resampled back to the cropped
grid, turned into label values, pasted into the uncropped grid and turned back to the input's orientation. The
output file takes the first modality's header and affine, so shape, affine and orientation match the input exactly;
DICOM inputs may instead get a DICOM SEG referencing the first modality's series.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..compiling import maybe_compile, prediction_freezes
from ..data.preprocess3d import prepare_for_model, resample
from ..data.regions import classes_to_values, regions_to_values
from ..data.specs import DatasetSpec
from ..data.volumes import (
    NIFTI_SUFFIXES,
    CaseFiles,
    Volume,
    input_cases,
    load_case,
    orient_back,
    reorient,
)
from ..devices import placed
from ..files import atomic_write, refuse_existing
from ..memory_format import fed_in, module_to
from ..records import DEFAULT_ORIENTATION, recorded_threshold
from .ensemble import Given, load_checkpoints
from .postprocess import check_postprocess, chosen_postprocess, et_min_voxels_at, postprocess
from .precision import for_precision, in_precision
from .predict import PredictConfig, refuse_other_dims_options
from .sliding_window import SlidingWindowConfig, activate, predict_logits

log = logging.getLogger(__name__)

OUT_FORMATS = ("nifti", "dicom-seg")


def probabilities_to_values(probs: torch.Tensor, spec: DatasetSpec, target: str, threshold: float = 0.5) -> np.ndarray:
    """probs [K, *S] (softmax over classes, or sigmoid per region) -> label values [*S] uint8; a region is in where
    its probability is above threshold (labels: argmax, no threshold)."""
    if target == "labels":
        return classes_to_values(probs.argmax(0), spec)
    return regions_to_values(probs > threshold, spec)


def paste(cropped: np.ndarray, properties: dict[str, Any], fill: float | Sequence[float] = 0) -> np.ndarray:
    """Values [*C, *cropped] -> [*C, *original]: the cropped grid put back into the full original grid, fill
    outside the crop box (one value, or one per leading channel: e.g. a certain background class)."""
    lead = cropped.shape[:-3]
    full = np.empty((*lead, *properties["original_shape"]), dtype=cropped.dtype)
    full[...] = np.reshape(fill, (*np.shape(fill), 1, 1, 1)) if np.ndim(fill) else fill
    box = tuple(slice(lo, hi) for lo, hi in zip(properties["crop_lo"], properties["crop_hi"], strict=True))
    full[(..., *box)] = cropped
    return full


def _writes_nifti(reference: Volume, path: Path) -> bool:
    """Whether an output at path beside this input is written as NIfTI with nibabel (else SimpleITK)."""
    return reference.path.name.endswith(NIFTI_SUFFIXES) and path.name.endswith(NIFTI_SUFFIXES)


def _save_nifti_like(data: np.ndarray, reference: Volume, path: Path, scaled: bool, description: str = "") -> None:
    """data (i, j[, k[, c]]) as a uint8 NIfTI with the reference's header, affine and qform / sform codes; scaled:
    nibabel fits the floats into uint8 with a scale factor (scl_slope, scl_inter), else the values are stored as
    they are."""
    import nibabel as nib

    source = reference.reference
    header = source.header.copy()
    header.set_data_dtype(np.uint8)
    if not scaled:
        header.set_slope_inter(None, None)  # labels are stored as they are, never rescaled
    image = type(source)(np.ascontiguousarray(data), source.affine, header)
    image.set_qform(source.header.get_qform(), int(source.header["qform_code"]))
    image.set_sform(source.header.get_sform(), int(source.header["sform_code"]))
    if description:
        image.header["descrip"] = description[:79].encode()
    nib.save(image, path)


def _save_itk_like(image: Any, reference: Volume, path: Path, what: str) -> None:
    """A SimpleITK image with the reference's ITK information (origin, spacing, direction), written compressed."""
    from ..data.volumes import import_sitk

    if reference.reference is None or not hasattr(reference.reference, "GetDirection"):
        raise ValueError(f"{path}: write {what} for NIfTI inputs as .nii.gz, not {path.name}")
    image.CopyInformation(reference.reference)
    import_sitk().WriteImage(image, str(path), useCompression=True)


def write_like(values: np.ndarray, reference: Volume, path: Path) -> Path:
    """Write values [K, J, I] with the reference's geometry (NIfTI header and affine, or ITK information)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if _writes_nifti(reference, path):
        _save_nifti_like(np.swapaxes(values, 0, 2), reference, path, scaled=False)  # (k, j, i) -> (i, j, k)
    else:
        from ..data.volumes import import_sitk

        _save_itk_like(import_sitk().GetImageFromArray(values), reference, path, "predictions")
    return path


def write_probabilities(probs: np.ndarray, channels: Sequence[str], reference: Volume, path: Path) -> Path:
    """Write probabilities [C, K, J, I] with the reference's geometry: a NIfTI beside NIfTI inputs is 4-D (i, j, k,
    channel) in 8 bits (uint8 with nibabel's scale factor, read back as floats within 1/255), the channels named in
    its description; other inputs get an ITK vector image of float32 (one component per channel)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if _writes_nifti(reference, path):
        data = np.transpose(probs, (3, 2, 1, 0))  # (c, k, j, i) -> (i, j, k, c)
        _save_nifti_like(data, reference, path, scaled=True, description=f"rwkvseg probabilities: {','.join(channels)}")
    else:
        from ..data.volumes import import_sitk

        image = import_sitk().GetImageFromArray(np.moveaxis(probs, 0, -1).astype(np.float32), isVector=True)
        image.SetMetaData("rwkvseg_channels", ",".join(channels))
        _save_itk_like(image, reference, path, "probabilities")
    return path


def recorded_axes(recorded: dict[str, Any]) -> tuple[int, ...]:
    """The mirror-TTA axes a checkpoint's inference record holds (what a GPU prediction uses by default)."""
    return tuple(int(a) for a in recorded.get("mirror_axes", (0, 1, 2)))  # checkpoints that record none: all three


def region_threshold(target: str, given: float | None, recorded: Any) -> float:
    """The cut of each region's sigmoid: given (--threshold), else the record's (inference.threshold, chosen on
    validation at release), else 0.5. Label checkpoints (target "labels") take the argmax and refuse either."""
    if target == "labels":
        if given is not None:
            raise ValueError(
                f"--threshold {given:g}: this 3D checkpoint predicts labels (argmax over classes); a threshold "
                "applies to region checkpoints (data.target = regions) and 2D ones: drop --threshold"
            )
        if recorded is not None:
            raise ValueError(
                f"the checkpoint records inference.threshold {recorded!r}, but it predicts labels (argmax over "
                "classes), which take no threshold: remove it from its sidecar"
            )
        return 0.5
    if given is not None:
        return given
    return recorded_threshold(recorded, "the checkpoint's inference record", "fix its sidecar")


def recorded_region_threshold(preprocessing: dict[str, Any]) -> float | None:
    """The cut a 3D checkpoint's (or export's) preprocessing record makes prediction apply when no --threshold is
    given: its inference.threshold, else 0.5, for region checkpoints; None for label checkpoints (argmax).
    ValueError for a record prediction refuses (region_threshold)."""
    target = preprocessing.get("target", "labels")
    cut = region_threshold(target, None, (preprocessing.get("inference") or {}).get("threshold"))
    return None if target == "labels" else cut


def default_mirror_axes(given: Sequence[int] | None, recorded: dict[str, Any], device: torch.device) -> tuple[int, ...]:
    """The mirror-TTA axes: given ones (--mirror-axes) as they are; else the checkpoint's on a GPU, and none on the
    CPU, where flipping over 3 axes costs 8 forward passes per window (about 6x the time: ~51 s instead of 8.5 s
    per BraTS case at 2 mm). Only resolves: log_mirror_off says so once per prediction run."""
    if given is not None:
        return tuple(given)
    return () if device.type == "cpu" else recorded_axes(recorded)


def log_mirror_off(given: Sequence[int] | None, recorded: dict[str, Any], device: torch.device) -> None:
    """The one log line for the checkpoint's flips left off on the CPU (none when given or when there are none)."""
    axes = recorded_axes(recorded)
    if given is None and device.type == "cpu" and axes:
        log.info(
            "mirror TTA off on the CPU (8x the forward passes); pass --mirror-axes %s to use it",
            ",".join(map(str, axes)),
        )


@dataclass(frozen=True)
class CasePrediction:
    """One case predicted on its original grid."""

    values: np.ndarray  # label values [K, J, I], post-processed as asked
    reference: Volume  # the volume whose geometry the outputs share
    probabilities: np.ndarray | None = None  # [C, K, J, I] float32 (C: regions or classes), raw; None unless asked


class Predictor3D:
    """A model with its 3D metadata: predicts cases on their original grids. The model is put on options.device in
    options.memory_format in place, and on the CPU its plain 3-D convolutions become rwkvseg.cpu_convs.OneDnnConv3d
    (in place too: the sliding window's batch-1 windows would otherwise run PyTorch's slow path); with precision
    bf16 its convolution and linear weights are held in bfloat16 (in place: infer.precision.hold_bf16_weights)."""

    def __init__(self, model: nn.Module, metadata: dict[str, Any], options: PredictConfig | None = None):
        options = options or PredictConfig()
        if metadata.get("dims") != 3:
            raise ValueError("this checkpoint was not trained on 3D volumes (preprocessing.dims != 3)")
        self.model = module_to(placed(model, options.device).eval(), options.memory_format, 3)  # before compiling
        for_precision(self.model, options.precision)  # bf16: convolution and linear weights held in bf16
        frozen = prediction_freezes(options.device)
        compiled = maybe_compile(
            self.model, options.compile, options.device, "the model", options.compile_backend, freeze=frozen
        )
        # each window batch in the model's layout and precision, its logits back as float32
        self.forward = in_precision(fed_in(compiled, options.memory_format), options.precision, options.device)
        self.metadata = metadata
        self.spec = DatasetSpec.from_dict(metadata["dataset"])
        self.target = metadata["target"]
        refuse_other_dims_options(options, 3)
        recorded = metadata.get("inference", {})  # the defaults training (and a release's validation) wrote
        self.threshold = region_threshold(self.target, options.threshold, recorded.get("threshold"))
        if self.target == "regions" and options.threshold is None and recorded.get("threshold") is not None:
            log.info("region threshold %g (the checkpoint's default; --threshold 0.5: the plain cut)", self.threshold)
        self.device = torch.device(options.device)
        if options.out_format not in OUT_FORMATS:
            raise ValueError(f"output format {options.out_format!r} unknown; choose one of {', '.join(OUT_FORMATS)}")
        self.options = options
        self.orientation = str(metadata.get("orientation") or DEFAULT_ORIENTATION)
        self.postprocess = chosen_postprocess(options.postprocess, recorded)
        check_postprocess(self.postprocess, self.spec.num_classes - 1, self.spec)
        if self.postprocess.active:
            given = "" if options.postprocess is not None else " (the checkpoint's default; --postprocess none: off)"
            log.info("post-processing each label volume: %s%s", self.postprocess.spelling(), given)
        overlap = options.overlap if options.overlap is not None else float(recorded.get("overlap", 0.5))
        mirror = default_mirror_axes(options.mirror_axes, recorded, self.device)
        log_mirror_off(options.mirror_axes, recorded, self.device)
        self.window = SlidingWindowConfig(
            patch_size=tuple(metadata["patch_size"]),
            overlap=overlap,
            sw_batch_size=options.sw_batch_size,
            mirror_axes=tuple(mirror),
            activation="softmax" if self.target == "labels" else "sigmoid",
        )

    @classmethod
    def from_checkpoint(cls, path: Given, options: PredictConfig | None = None) -> Predictor3D:
        """From one checkpoint, or several predicting as one ensemble (infer.ensemble)."""
        options = options or PredictConfig()
        given = {"threshold": options.threshold, "postprocess": options.postprocess}
        given |= {"mirror_axes": options.mirror_axes, "overlap": options.overlap}
        overridden = [name for name, value in given.items() if value is not None]  # members' records may differ
        model, meta = load_checkpoints(path, options.device, overridden)
        return cls(model, meta.preprocessing, options)

    def predict_case(self, case: CaseFiles) -> tuple[np.ndarray, Volume]:
        """Label values [K, J, I] on the case's original grid, and the volume whose geometry it shares."""
        prediction = self.predict(case)
        return prediction.values, prediction.reference

    def predict(self, case: CaseFiles, probabilities: bool = False) -> CasePrediction:
        """The case's label values on its original grid and, with probabilities, the model's probabilities there
        (the members' mean for an ensemble, with the flips of mirror TTA; never post-processed)."""
        volumes = load_case(case, self.spec, with_label=False)
        oriented, back = reorient(volumes, self.orientation)  # axes as in training, same world positions
        image, props = prepare_for_model(oriented, self.metadata)  # [M, k, j, i] at the training spacing
        logits = predict_logits(self.forward, torch.from_numpy(image)[None], self.window, self.device)[0]
        probs = activate(logits[None], self.window.activation)[0]  # [K, *resampled]
        cropped_shape = [hi - lo for lo, hi in zip(props["crop_lo"], props["crop_hi"], strict=True)]
        probs = resample(probs, cropped_shape)  # [K, *resampled] -> [K, *cropped]
        values = paste(probabilities_to_values(probs, self.spec, self.target, self.threshold), props)
        full = None
        if probabilities:  # [K, *cropped] -> [K, *original] -> each channel on the input's own axes
            certain = np.eye(probs.shape[0])[0] if self.target == "labels" else 0  # outside: background
            pasted = paste(probs.float().cpu().numpy(), props, certain)
            full = np.stack([orient_back(channel, back) for channel in pasted])
        if self.postprocess.active:  # on the input's own grid: et-min-voxels counts its voxels, et-min-mm3 its mm3
            if self.postprocess.et_min_mm3:
                voxels = et_min_voxels_at(self.postprocess, volumes.spacing)
                mm = "x".join(f"{s:.4g}" for s in volumes.spacing[::-1])
                log.info(
                    "%s: et-min-mm3=%g is %.4g voxels of %s mm", case.case_id, self.postprocess.et_min_mm3, voxels, mm
                )
            values = postprocess(values, self.postprocess, self.spec, volumes.spacing)
        return CasePrediction(orient_back(values, back), volumes.reference, full)

    def output_path(self, case: CaseFiles, out_dir: Path | str) -> Path:
        """`<out_dir>/<case_id>.nii.gz` (the input's format for ITK files, `.dcm` for a DICOM SEG)."""
        first = case.images[0]
        if self.options.out_format == "dicom-seg":
            if first.series is None:
                raise ValueError(
                    f"case {case.case_id} is not DICOM ({first.path}); --out-format dicom-seg needs DICOM series "
                    f"inputs (a DICOM SEG references its source series), use the default nifti output"
                )
            return Path(out_dir) / f"{case.case_id}.dcm"
        path = first.path
        suffix = ".nii.gz" if path.is_dir() or path.name.endswith(NIFTI_SUFFIXES) else "".join(path.suffixes)
        return Path(out_dir) / f"{case.case_id}{suffix}"

    def probabilities_path(self, case: CaseFiles, out_dir: Path | str) -> Path:
        """`<out_dir>/probabilities/<case_id>.nii.gz` (the input's ITK format for ITK files; NIfTI beside a DICOM
        SEG)."""
        name = self.output_path(case, out_dir).name
        if self.options.out_format == "dicom-seg":
            name = f"{case.case_id}.nii.gz"
        return Path(out_dir) / "probabilities" / name

    def output_paths(self, case: CaseFiles, out_dir: Path | str) -> list[Path]:
        """Every file predict_to_file writes for the case: the labels, and the probabilities when asked for."""
        paths = [self.output_path(case, out_dir)]
        return [*paths, self.probabilities_path(case, out_dir)] if self.options.probabilities else paths

    def predict_to_file(self, case: CaseFiles, out_dir: Path | str, overwrite: bool = False) -> Path:
        """Predict one case and write `<out_dir>/<case_id>.nii.gz` (or the input's ITK format, or a DICOM SEG), and
        with options.probabilities `<out_dir>/probabilities/<case_id>.nii.gz` beside it."""
        out = self.output_path(case, out_dir)
        paths = self.output_paths(case, out_dir)
        if not overwrite and (existing := [p for p in paths if p.exists()]):
            refuse_existing(out.parent, existing)
        if case.channels:
            log.info("%s: input channels %s read as %s", case.case_id, list(case.channels), list(self.spec.modalities))
        prediction = self.predict(case, probabilities=self.options.probabilities)
        values, reference = prediction.values, prediction.reference
        if prediction.probabilities is not None:  # first: a mask is never left without the probabilities asked for
            channels = self.spec.output_names(self.target)
            probs_path = paths[1]
            atomic_write(
                probs_path,
                lambda tmp: write_probabilities(prediction.probabilities, channels, reference, tmp),
                keep_suffix=True,
            )
            log.info("%s -> %s", case.case_id, probs_path)
        if self.options.out_format == "dicom-seg":
            from ..data.dicom import segments_for, write_dicom_seg

            target = "regions" if self.spec.regions else "labels"
            segments = segments_for(self.spec, target)
            write_dicom_seg(values, case.images[0].series, out, segments, overwrite=overwrite)
            log.info("%s -> %s", case.case_id, out)
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        # written beside the target and moved into place: an interrupted run leaves no half file
        atomic_write(out, lambda tmp: write_like(values, reference, tmp), keep_suffix=True)
        log.info("%s -> %s", case.case_id, out)
        return out


def prediction_cases(
    inputs: Sequence[Path | str], spec: DatasetSpec, modalities: Sequence[str] = ()
) -> list[CaseFiles]:
    """Cases from command-line inputs, labels optional, channels matched by name (data.volumes.input_cases)."""
    return input_cases(inputs, spec, modalities)


def predict_paths(
    checkpoint: Given,
    inputs: Sequence[Path | str],
    out_dir: Path | str,
    options: PredictConfig | None = None,
) -> list[Path]:
    """Every case found in inputs -> a label file in out_dir (replacing existing ones only with options.overwrite)."""
    options = options or PredictConfig()
    return predict_cases(Predictor3D.from_checkpoint(checkpoint, options), inputs, out_dir, options.overwrite)


def predict_cases(
    predictor: Predictor3D, inputs: Sequence[Path | str], out_dir: Path | str, overwrite: bool = False
) -> list[Path]:
    """Every case found in inputs -> a label file in out_dir, by a ready predictor (its options name the
    modalities); existing files are refused unless overwrite."""
    cases = prediction_cases(inputs, predictor.spec, predictor.options.modalities)
    if not overwrite:
        refuse_existing(out_dir, [p for c in cases for p in predictor.output_paths(c, out_dir) if p.exists()])
    return [predictor.predict_to_file(case, out_dir, overwrite) for case in cases]
