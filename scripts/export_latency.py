"""CPU latency of U-RWKV-s and U-RWKV per 256 x 256 image, PyTorch eager and compiled (Inductor, default mode,
frozen as CPU prediction compiles) vs onnxruntime fp32 vs int8, in one run, and the int8 Dice change on Kvasir-SEG
validation images.

    PYTHONPATH=src python scripts/export_latency.py EXPORT_DIR [--threads 2] [--images 40] [--runs 30]

EXPORT_DIR holds (or receives) <released>.onnx files from rwkvseg.export.export_onnx; int8 files are written
beside them. Prints markdown tables with the machine load (uptime) next to the timings.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from rwkvseg.compiling import compile_callable
from rwkvseg.export.onnx import export_onnx, load_source
from rwkvseg.export.runtime import OnnxPredictor, quantize_int8, read_pixels
from rwkvseg.export.verify import dice

KVASIR = Path("/work/shared/data/kvasir_seg/Kvasir-SEG")
MODELS = ("urwkv_s-kvasir", "urwkv-kvasir")


def timed(fn, runs: int) -> tuple[float, float]:
    for _ in range(3):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return min(times), statistics.median(times)


def load() -> str:
    return "load average " + ", ".join(f"{v:.2f}" for v in os.getloadavg())


def validation_ids(count: int) -> list[str]:
    split = json.loads(Path("splits/kvasir_seg.json").read_text())
    return split["folds"][0]["val"][:count]


def mean_dice(predictor: OnnxPredictor, ids: list[str]) -> float:
    scores = []
    for name in ids:
        truth = (read_pixels(KVASIR / "masks" / f"{name}.jpg", 1)[..., 0] > 127).astype(np.uint8)
        scores.append(dice(predictor.predict_mask(KVASIR / "images" / f"{name}.jpg"), truth))
    return float(np.mean(scores))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--calibration", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ids = validation_ids(args.images)
    train = json.loads(Path("splits/kvasir_seg.json").read_text())["folds"][0]["train"][: args.calibration]
    latency, quality = [], []
    x = np.random.default_rng(0).random((1, 3, 256, 256), dtype=np.float32)
    for name in MODELS:
        path = args.folder / f"{name}.onnx"
        loaded = load_source(name)
        if not path.exists():
            export_onnx(loaded, path)
        fp32 = OnnxPredictor(path, threads=args.threads)
        calibration = [fp32.preprocess(read_pixels(KVASIR / "images" / f"{i}.jpg", 3))[None] for i in train]
        variants = {"fp32": fp32}
        for mode, data in (("int8-static", calibration), ("int8-dynamic", None)):
            target = args.folder / f"{name}.{mode}.onnx"
            if not target.exists():
                quantize_int8(path, target, calibration=data)
            variants[mode] = OnnxPredictor(target, threads=args.threads)
        xt = torch.from_numpy(x)
        torch._dynamo.reset()
        compiled = compile_callable(loaded.model, "default", freeze=True)  # as `rwkvseg predict` compiles on the CPU
        with torch.inference_mode():
            t_torch = timed(lambda m=loaded.model, t=xt: m(t), args.runs)
            t_compiled = timed(lambda m=compiled, t=xt: m(t), args.runs)  # the warm-up calls compile it
        row = {"model": name, "torch eager": t_torch, "torch compiled": t_compiled, "load": load()}
        for mode, predictor in variants.items():
            row[mode] = timed(lambda p=predictor: p.logits(x), args.runs)
        latency.append(row)
        base = mean_dice(fp32, ids)
        quality.append(
            {"model": name, "fp32": base, **{m: mean_dice(p, ids) - base for m, p in variants.items() if m != "fp32"}}
        )
    print(f"threads {args.threads}, input 1 x 3 x 256 x 256, {args.runs} runs after 3 warm-ups; min / median ms")
    print("| model | torch eager | torch compiled | ORT fp32 | ORT int8 static | ORT int8 dynamic | load |")
    print("|---|---|---|---|---|---|---|")
    columns = ("torch eager", "torch compiled", "fp32", "int8-static", "int8-dynamic")
    for r in latency:
        cells = [f"{r[k][0]:.1f} / {r[k][1]:.1f}" for k in columns]
        print(f"| {r['model']} | " + " | ".join(cells) + f" | {r['load']} |")
    print(f"\nKvasir-SEG validation Dice vs ground truth, first {len(ids)} images of fold 0")
    print("| model | fp32 Dice | int8 static change | int8 dynamic change |")
    print("|---|---|---|---|")
    for q in quality:
        print(f"| {q['model']} | {q['fp32']:.4f} | {q['int8-static']:+.4f} | {q['int8-dynamic']:+.4f} |")


if __name__ == "__main__":
    main()
