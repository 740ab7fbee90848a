"""File writers for the formats rwkvseg reads, the shared data folder and a tiny model for test checkpoints, for
every test module.

The writers are plain functions (`from writers import save_png`, tests/ is on the pytest path), so module-level
helpers of a test file can call them too; the fixtures of tests/conftest.py hand out the shared data.
"""

import csv
import importlib.util
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import nibabel as nib
import numpy as np
import torch
from PIL import Image
from torch import nn

from rwkvseg.data.specs import DatasetSpec, dataset_spec

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


class Bright(nn.Module):
    """Logit = 40 * (mean channel - 0.5): foreground exactly where the image is bright (checkpoints whose masks the
    tests can predict by eye)."""

    def __init__(self, in_channels, num_classes):
        super().__init__()
        self.mix = nn.Conv2d(in_channels, num_classes, 1)
        with torch.no_grad():
            self.mix.weight.fill_(40.0 / in_channels)
            self.mix.bias.fill_(-20.0)

    def forward(self, x):
        return self.mix(x)


def save_png(path: Path, array: np.ndarray, mode: str | None = None, **save_kw) -> Path:
    """An image or mask file (any format Pillow writes), folders made as needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path, **save_kw)
    return path


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    """A NIfTI file (identity affine unless given), folders made as needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


def write_brats_case(
    root: Path,
    case: str,
    images: Sequence[np.ndarray],
    seg: np.ndarray,
    spec: DatasetSpec | None = None,
    affine: np.ndarray | None = None,
) -> Path:
    """<root>/<case>/<case>_<modality>.nii.gz for each image (in the spec's modality order) and <case>_seg."""
    spec = spec or dataset_spec("brats")
    folder = root / case
    for modality, data in zip(spec.modalities, images, strict=True):
        save_nifti(folder / f"{case}{spec.separator}{modality}.nii.gz", data, affine)
    save_nifti(folder / f"{case}{spec.separator}{spec.seg_suffix}.nii.gz", seg, affine)
    return folder


def write_phantoms_as(root: Path, case_ids: Sequence[str], shape: Sequence[int], seed: int = 0) -> Path:
    """Synthetic BraTS-style phantoms (rwkvseg.data.synthetic3d) under the given case ids, e.g. those of a committed
    split: <root>/<case>/<case>_<modality>.nii.gz and <case>_seg.nii.gz."""
    from rwkvseg.data.synthetic3d import write_synthetic_volumes

    for case, folder in zip(case_ids, write_synthetic_volumes(root, len(case_ids), shape, seed=seed), strict=True):
        for file in folder.iterdir():
            file.rename(folder / file.name.replace(folder.name, case, 1))
        folder.rename(root / case)
    return root


def write_run_3d(
    folder: Path, val_dice_wt: Sequence[float], val_every: int = 10, planned: int = 200, config: dict | None = None
) -> Path:
    """A 3D run folder validated every val_every epochs: each validation's WT Dice as given (TC and ET below it),
    its columns made as the validator makes them (mean_scores), metrics.csv by the loop's own writer; config.json
    a minimal one, or config (a whole saved config, e.g. train.config.to_dict) with these epochs and val_every."""
    from rwkvseg.train.loop import _write_metrics_csv
    from rwkvseg.train.validate import mean_scores

    folder.mkdir(parents=True)
    history = []
    for epoch in range(1, val_every * len(val_dice_wt) + 1):
        row = {"epoch": epoch, "step": 250 * epoch, "lr": 0.01, "train_loss": 1.5 / epoch, "train_seconds": 4.0}
        if epoch % val_every == 0:
            wt = val_dice_wt[epoch // val_every - 1]
            per_case = {"case": {"dice_WT": wt, "dice_TC": wt - 0.1, "dice_ET": wt - 0.2}}
            row |= {f"val_{k}": v for k, v in mean_scores(per_case, ("WT", "TC", "ET")).items()}
            row["val_seconds"] = 6.0
        history.append(row)
    _write_metrics_csv(folder / "metrics.csv", history)
    config = {"dims": 3, "loss": {"name": "ce"}} if config is None else config
    (folder / "config.json").write_text(json.dumps({**config, "epochs": planned, "val_every": val_every}))
    return folder


def save_conv_onnx(path: Path, weight: np.ndarray, bias: np.ndarray, record) -> Path:
    """An ONNX file of one convolution (weight [K, C, k, ...], odd k, zero padding that keeps the size) carrying an
    rwkvseg export record (rwkvseg.export.onnx.ExportRecord): what onnxruntime-side code runs without exporting a
    model. Axes the record fixes are static in the graph, the others symbolic."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    k, c = weight.shape[:2]
    pads = [n // 2 for n in weight.shape[2:]] * 2  # begins, then ends
    spatial = [a if isinstance(a, int) else f"s{i}" for i, a in enumerate(record.axes)]
    graph = helper.make_graph(
        [helper.make_node("Conv", [record.input_name, "w", "b"], [record.output_name], pads=pads)],
        record.model,
        [helper.make_tensor_value_info(record.input_name, TensorProto.FLOAT, ["B", c, *spatial])],
        [helper.make_tensor_value_info(record.output_name, TensorProto.FLOAT, ["B", k, *spatial])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 9
    entry = model.metadata_props.add()
    entry.key, entry.value = "rwkvseg", record.to_json()
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))
    return path


def write_tiny_2d_run_config(root: Path, epochs: int) -> Path:
    """root/c.toml training urwkv_test for `epochs` one-step epochs at 32 x 32 on a synthetic dataset in root/data."""
    from rwkvseg.data.synthetic import write_synthetic_dataset

    write_synthetic_dataset(root / "data", n=6, shape=(37, 41), seed=4)
    path = root / "c.toml"
    path.write_text(
        f'epochs = {epochs}\nmax_steps_per_epoch = 1\n[model]\nname = "urwkv_test"\n'
        f'[data]\nroot = "{root / "data"}"\nsize = [32, 32]\nbatch_size = 2\nval_batch_size = 2\n'
    )
    return path


def load_script(name: str) -> ModuleType:
    """scripts/<name>.py as a module (scripts/ is no package), for calling its main() and functions in-process."""
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # as an import does: dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run_metrics(run_dir: Path) -> list[dict[str, str]]:
    """A training run's metrics.csv rows without the timing columns (*seconds), which no two runs share."""
    with open(Path(run_dir) / "metrics.csv") as handle:
        return [{k: v for k, v in row.items() if not k.endswith("seconds")} for row in csv.DictReader(handle)]


def assert_same_run(a: Path, b: Path) -> None:
    """Two training runs ended bit for bit alike: last.safetensors equal tensor by tensor, metrics.csv equal
    apart from timings (a resumed run against the uninterrupted one)."""
    from safetensors.torch import load_file

    wa, wb = load_file(Path(a) / "last.safetensors"), load_file(Path(b) / "last.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
    assert run_metrics(a) == run_metrics(b)
