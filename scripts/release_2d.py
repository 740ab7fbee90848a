"""Write the released 2D models' index and model cards from their training runs and CPU evaluations.

Usage (after scripts/train_2d_real.sh on a GPU, `export_release` of each best checkpoint into
src/rwkvseg/weights/, and `rwkvseg predict --model NAME VAL_IMAGES --out P && rwkvseg evaluate P VAL_GT --out E`
for each on the validation split):
    python scripts/release_2d.py RUNS EVALS
RUNS holds <dataset>-<arch>/ run folders (metrics.csv, config.json), EVALS holds eval-<name>/summary.json.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from rwkvseg.bench.complexity import count_parameters
from rwkvseg.models import create_model
from rwkvseg.released import INDEX_FILE, ReleasedModel, index_entry, weights_dir

RELEASES = {  # name -> (run folder, dataset, human name of the data)
    "urwkv-kvasir": ("kvasir_seg-urwkv", "kvasir_seg", "Kvasir-SEG (colonoscopy, polyp)"),
    "urwkv_s-kvasir": ("kvasir_seg-urwkv_s", "kvasir_seg", "Kvasir-SEG (colonoscopy, polyp)"),
    "urwkv-busi": ("busi-urwkv", "busi", "BUSI (breast ultrasound, lesion)"),
    "urwkv_s-busi": ("busi-urwkv_s", "busi", "BUSI (breast ultrasound, lesion)"),
}
SPLITS = {"kvasir_seg": "720 train / 180 val, seed 0", "busi": "414 train / 104 val, seed 0, stratified"}

CARD = """# {name}: {arch_title} trained on {data}

Released with rwkvseg {version}. Load it by name, offline: `rwkvseg predict --model {name} IMAGES --out MASKS`.

| | |
|---|---|
| architecture | `{arch}` ({params:.3f} M parameters), 3-channel input resized to 256 x 256, 1 logit (sigmoid, threshold 0.5) |
| weights | fp16 matrices and kernels, fp32 vectors (decay, bonus, token-shift mixes, norms, BatchNorm statistics) |
| data | training portion of {data} in `../shared/data/{dataset}`; split `splits/{dataset}.json` ({split}) |
| input prep | `rwkvseg compact2d ../shared/data/{dataset} .gpudata/d2/{dataset}` (256 x 256 copies, JPEG q95, masks merged) |
| recipe | SGD momentum 0.9, weight decay 1e-4, lr 0.01 with poly decay (power 0.9) per iteration over the planned epochs, BCE + Dice, batch 4, random rot90 + flips, bf16 autocast |
| schedule | planned {planned} epochs; stopped by the run's time limit after epoch {ran} (poly schedule not finished); best validation epoch {best} |
| hardware | one NVIDIA H100, shared with five other runs of the same command, {minutes:.1f} min |
| command | `scripts/train_2d_real.sh .gpudata/d2 RUNS 40 70` (all six runs of the comparison at once) |

## Validation ({n} images of the split's validation list; these images chose the checkpoint, so the numbers are optimistic)

| where | Dice | IoU | precision | recall | specificity | HD95 (px) |
|---|---|---|---|---|---|---|
| during training, at 256 x 256 (GPU, fp32 weights) | {t_dice:.4f} | {t_iou:.4f} | {t_precision:.4f} | {t_recall:.4f} | {t_specificity:.4f} | - |
| these released weights, original image size (CPU, `rwkvseg predict` + `rwkvseg evaluate`) | {dice:.4f} | {iou:.4f} | {precision:.4f} | {recall:.4f} | {specificity:.4f} | {hd95:.1f} |

Means over images; empty prediction and empty ground truth together count as perfect (`rwkvseg evaluate` policy
"perfect"). Held-out test sets were not available here.

## Limitations
A short schedule ({ran} epochs against the paper's 280) on one random split: below the paper's protocol and below
this project's targets (Kvasir-SEG Dice >= 0.89, BUSI >= 0.80 on held-out tests). Research use only; not a
medical device.
"""


def _run_summary(run: Path) -> dict:
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    best = max(rows, key=lambda r: float(r["val_dice"]))
    config = json.loads((run / "config.json").read_text())
    seconds = sum(float(r["train_seconds"]) + float(r["val_seconds"]) for r in rows)
    return {
        "planned": config["epochs"],
        "ran": len(rows),
        "best": int(best["epoch"]),
        "minutes": seconds / 60,
        **{f"t_{k}": float(best[f"val_{k}"]) for k in ("dice", "iou", "precision", "recall", "specificity")},
    }


def main(runs: Path, evals: Path) -> None:
    from rwkvseg import __version__

    folder = weights_dir()
    entries = []
    for name, (run, dataset, data) in RELEASES.items():
        arch = run.split("-", 1)[1]
        summary = json.loads((evals / f"eval-{name}" / "summary.json").read_text())
        scores = {k: summary[k]["mean"] for k in ("dice", "iou", "precision", "recall", "specificity", "hd95")}
        info = _run_summary(runs / run)
        params = count_parameters(create_model(arch, 3, 1)) / 1e6
        title = {"urwkv": "U-RWKV", "urwkv_s": "U-RWKV-s"}[arch]
        card = CARD.format(
            name=name,
            arch=arch,
            arch_title=title,
            data=data,
            dataset=dataset,
            params=params,
            split=SPLITS[dataset],
            version=__version__,
            n=summary["cases"],
            **info,
            **scores,
        )
        (folder / f"{name}.md").write_text(card)
        metrics = {"val_dice": round(scores["dice"], 4), "val_iou": round(scores["iou"], 4), "epochs": info["ran"]}
        entries.append(
            index_entry(ReleasedModel(name, arch, dataset, f"splits/{dataset}.json", metrics, f"card: {name}.md"))
        )
    (folder / INDEX_FILE).write_text(json.dumps({"models": entries}, indent=2) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
