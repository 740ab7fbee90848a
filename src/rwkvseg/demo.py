"""The main job on a built-in default: `rwkvseg demo` (what `make demo` runs).

2D: a synthetic lesion dataset (or a real one with --data) -> U-RWKV-s trained for a few minutes -> predictions with
overlays on the validation images -> evaluation. 3D: synthetic multimodal BraTS-style phantoms -> MMSegRWKV (its
tiny size) -> prediction onto each case's own grid -> WT/TC/ET evaluation. Everything lands in one folder with
report.html (metrics, training curves, overlays). Every step is the same code the CLI commands run.
"""

from __future__ import annotations

import html
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .data.images2d import discover_pairs
from .data.specs import dataset_spec
from .data.synthetic import write_synthetic_dataset
from .data.synthetic3d import write_synthetic_volumes
from .eval.evaluate import evaluate_folders
from .eval.report import gallery, html_table, read_metrics_csv, svg_curves, write_report
from .files import check_apart, check_replaceable, mark_owned
from .infer.predict import PredictConfig, predict
from .train.config import load_config
from .train.train import train

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    out: Path = Path("runs/demo")
    data: Path | None = None  # a real 2D dataset folder instead of the synthetic one
    minutes_2d: float = 3.0  # training budget; the run stops after the first epoch past it
    minutes_3d: float = 2.0
    size: int = 64  # 2D network input side (the demo trains at low resolution to fit a CPU budget)
    with_3d: bool = True
    overwrite: bool = False
    configs: Path = Path(__file__).resolve().parents[2] / "configs"  # demo2d.toml, demo3d.toml of the checkout


def _run_config(cfg: DemoConfig, name: str, overrides: list[str]) -> Any:
    """configs/<name>.toml with the demo's folders and sizes set."""
    path = cfg.configs / f"{name}.toml"
    if not path.is_file():
        raise FileNotFoundError(
            f"demo config {path} not found; run the demo from a checkout of the repository (its configs/ folder)"
        )
    return load_config(path, overrides)


def _val_cases(run_dir: Path) -> list[str]:
    return json.loads((run_dir / "split.json").read_text())["folds"][0]["val"]


def _link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source, target) if source.is_dir() else shutil.copyfile(source, target)


def run_2d(cfg: DemoConfig) -> str:
    """Train, predict and evaluate in 2D; returns the report section's HTML."""
    if cfg.data is None:
        data_root = cfg.out / "data2d"
        write_synthetic_dataset(data_root, n=48, shape=(96, 96), seed=0)
        source = "synthetic lesions (rwkvseg.data.synthetic, 48 images of 96 x 96, seed 0)"
    else:
        data_root = cfg.data
        source = f"{data_root}"
    start = time.perf_counter()
    overrides = [f"data.root={data_root}", f"out={cfg.out / 'run2d'}", f"data.size=[{cfg.size}, {cfg.size}]"]
    progress = train(_run_config(cfg, "demo2d", [*overrides, f"max_minutes={cfg.minutes_2d}"]))
    train_minutes = (time.perf_counter() - start) / 60
    run = cfg.out / "run2d"
    # the validation images of the run's split, with their masks, as a folder predict and evaluate can read
    samples = {s.case: s for s in discover_pairs(data_root)}
    val = cfg.out / "val2d"
    for case in _val_cases(run):
        s = samples[case]
        _link_or_copy(s.image, val / "images" / s.image.name)
        for m in s.masks:
            _link_or_copy(m, val / "masks" / m.name)
    predict(run / "best", [val / "images"], cfg.out / "pred2d", PredictConfig(threshold=0.5, overlays=True))
    summary = evaluate_folders(cfg.out / "pred2d", val, cfg.out / "eval2d")
    metrics = ("dice", "iou", "precision", "recall", "specificity", "hd95")
    row = {
        "model": "urwkv_s",
        "data": source,
        "epochs": len(progress.history),
        "train min": round(train_minutes, 1),
        **{m: summary[m]["mean"] for m in metrics},
    }
    history = read_metrics_csv(run / "metrics.csv")
    overlays = sorted((cfg.out / "pred2d" / "overlays").glob("*.png"))[:8]
    return (
        f"<p>Data: {source}; split and checkpoints in <code>run2d/</code>; evaluation of the validation images "
        f"at their original size in <code>eval2d/</code> (empty policy: {summary['empty_policy']}).</p>"
        + html_table([row], ["model", "data", "epochs", "train min", *metrics])
        + svg_curves(history, ["train_loss"], "training loss")
        + svg_curves(history, ["val_dice", "val_iou"], "validation (network input size)")
        + gallery(overlays, cfg.out, "Predicted lesions (overlay) on validation images:")
    )


def _slice_png(image: np.ndarray, labels: np.ndarray, path: Path) -> Path:
    """Axial slice of one modality with labels 1 / 2 / 4 tinted red / green / yellow."""
    from PIL import Image

    grey = (image - image.min()) / max(float(np.ptp(image)), 1e-6)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    for value, colour in ((1, (1.0, 0.1, 0.1)), (2, (0.1, 0.9, 0.1)), (4, (1.0, 0.9, 0.1))):
        mask = labels == value
        rgb[mask] = 0.5 * rgb[mask] + 0.5 * np.array(colour)
    img = Image.fromarray((np.rot90(rgb) * 255).astype(np.uint8)).resize((200, 200), Image.Resampling.NEAREST)
    img.save(path)
    return path


def run_3d(cfg: DemoConfig) -> str:
    """Train, predict and evaluate in 3D on phantoms; returns the report section's HTML."""
    import nibabel as nib

    data_root = cfg.out / "data3d"
    write_synthetic_volumes(data_root, n=8, seed=0)
    start = time.perf_counter()

    def over_budget(_progress) -> bool:
        return time.perf_counter() - start > 60 * cfg.minutes_3d

    config = _run_config(cfg, "demo3d", [f"data.root={data_root}", f"out={cfg.out / 'run3d'}"])
    progress = train(config, stop=over_budget)
    train_minutes = (time.perf_counter() - start) / 60
    run = cfg.out / "run3d"
    val = cfg.out / "val3d"
    for case in _val_cases(run):
        _link_or_copy(data_root / case, val / case)
    written = predict(run / "best.safetensors", [val], cfg.out / "pred3d", PredictConfig(mirror_axes=(2,)))
    summary = evaluate_folders(cfg.out / "pred3d", val, cfg.out / "eval3d", spec=dataset_spec("brats"))
    rows = [
        {"region": name, "dice": r["dice"]["mean"], "hd95 (mm)": r.get("hd95", {}).get("mean", float("nan"))}
        for name, r in summary["regions"].items()
    ]
    history = read_metrics_csv(run / "metrics.csv")
    pictures = []
    for pred in written:
        case = pred.name.split(".")[0]
        flair = np.asarray(nib.load(val / case / f"{case}_flair.nii.gz").dataobj, dtype=np.float32)
        labels = np.asarray(nib.load(pred).dataobj)
        k = int(np.argmax((labels > 0).sum(axis=(0, 1)))) if labels.any() else labels.shape[2] // 2
        pictures.append(_slice_png(flair[:, :, k], labels[:, :, k], cfg.out / "pred3d" / f"{case}_slice.png"))
    return (
        f"<p>Data: 8 synthetic BraTS-style phantoms (rwkvseg.data.synthetic3d, 4 modalities, 2 mm, seed 0); "
        f"model mmsegrwkv_test trained {len(progress.history)} epochs in {train_minutes:.1f} min; predictions on "
        f"each case's own grid in <code>pred3d/</code>, evaluation in <code>eval3d/</code> "
        f"({html.escape(summary['empty_policy_text'])}).</p>"
        + html_table(rows, ["region", "dice", "hd95 (mm)"])
        + svg_curves(history, ["train_loss"], "training loss")
        + svg_curves(history, ["val_dice_WT", "val_dice_TC", "val_dice_ET"], "validation Dice per region")
        + gallery(pictures, cfg.out, "FLAIR with predicted labels (red NCR, green ED, yellow ET), largest slice:")
    )


def run_demo(cfg: DemoConfig) -> Path:
    """Run the whole demo into cfg.out; returns the report path. Refuses an existing folder unless overwrite."""
    if cfg.data is not None:
        check_apart(cfg.out, [cfg.data])
    if cfg.out.exists():
        check_replaceable(cfg.out)  # only a folder an earlier demo made is ever replaced
        if not cfg.overwrite:
            raise FileExistsError(f"{cfg.out} exists; pass --overwrite to replace it or choose another --out")
        shutil.rmtree(cfg.out)
    cfg.out.mkdir(parents=True)
    mark_owned(cfg.out, "demo")
    start = time.perf_counter()
    sections = [("2D: U-RWKV-s", run_2d(cfg))]
    if cfg.with_3d:
        sections.append(("3D: MMSegRWKV on multimodal phantoms", run_3d(cfg)))
    minutes = (time.perf_counter() - start) / 60
    sections.append(("Run", f"<p>Total wall time {minutes:.1f} min on the CPU.</p>"))
    return write_report(cfg.out / "report.html", "rwkvseg demo", sections)
