"""Does post-processing pay on the released 2D models? Largest connected component and hole filling, scored on the
validation images of each model's split at the original size (the README's finding: it does not).

    python scripts/postprocess_check.py DATA_ROOT OUT [--names urwkv-kvasir ...] [--device cpu]

For each released 2D model (or --names): links to its validation images under OUT/<name>/images, `rwkvseg
predict` with --probabilities into OUT/<name>/pred (the released checkpoint, no TTA), then the mean Dice over the
images (empty prediction and empty truth: 1, as `rwkvseg evaluate`'s default) of the masks at 0.5 from the saved
probabilities, as they are, with only the largest connected component (8-connected), with holes filled, and both
(rwkvseg.infer.postprocess, what `rwkvseg predict --postprocess` does). The mask files predict writes are scored too,
as a check that the probabilities reproduce them. Prints a table and writes OUT/postprocess.json. DATA_ROOT is only
read; OUT must be a new folder.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from rwkvseg.data.images2d import discover_pairs, read_mask
from rwkvseg.data.splits import read_split
from rwkvseg.eval.metrics import confusion_counts, overlap_scores
from rwkvseg.infer.postprocess import fill_holes, largest_component
from rwkvseg.infer.predict import PredictConfig, is_3d_checkpoint, predict
from rwkvseg.released import released_checkpoint, released_models

ROOT = Path(__file__).resolve().parents[1]


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice as `rwkvseg evaluate` scores it (both empty: 1)."""
    return float(overlap_scores(confusion_counts(pred, truth))["dice"])


VARIANTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {  # rwkvseg predict --postprocess, on the saved masks
    "as predicted": lambda m: m,
    "largest component": largest_component,
    "holes filled": fill_holes,
    "both": lambda m: fill_holes(largest_component(m)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="folder with one subfolder per dataset (../shared/data)")
    parser.add_argument("out", type=Path, help="a new folder")
    parser.add_argument("--names", nargs="+", default=None, help="released models (default: every 2D one)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.out.exists():
        parser.error(f"{args.out} exists; choose a new folder")
    chosen = [m for m in released_models() if args.names is None or m.name in args.names]
    models = [m for m in chosen if not m.members and not is_3d_checkpoint(released_checkpoint(m.name))]  # 2D, one each
    results = {}
    for model in models:
        samples = {s.case: s for s in discover_pairs(args.data / model.dataset)}
        val = [samples[c] for c in read_split(ROOT / model.split, 0, list(samples)).val]
        images = args.out / model.name / "images"
        images.mkdir(parents=True)
        for s in val:
            os.symlink(s.image.resolve(), images / s.image.name)
        pred = args.out / model.name / "pred"
        predict(released_checkpoint(model.name), [images], pred, PredictConfig(device=args.device, probabilities=True))
        scores: dict[str, list[float]] = {name: [] for name in [*VARIANTS, "mask files"]}
        for s in val:
            truth = np.logical_or.reduce([read_mask(m) > 0 for m in s.masks])
            mask = np.asarray(Image.open(pred / "probabilities" / f"{s.image.stem}.png")) >= 128  # 0.5 of 255
            for name, variant in VARIANTS.items():
                scores[name].append(dice(variant(mask), truth))
            scores["mask files"].append(dice(np.asarray(Image.open(pred / f"{s.image.stem}.png")) > 0, truth))
        results[model.name] = {name: round(float(np.mean(v)), 4) for name, v in scores.items()} | {"images": len(val)}
        print(model.name, results[model.name], flush=True)
    (args.out / "postprocess.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
