"""3D prediction with onnxruntime: an exported file inside the same sliding window, resampling and label
mapping as `rwkvseg predict` with a checkpoint (infer.predict3d), so only the network runs elsewhere.

The record embedded in the file holds the checkpoint's 3D preprocessing (spacing, patch size, modalities,
regions or labels), which is all Predictor3D needs; windows are the record's patch size, so static exports
(UNETR, SwinUNETR, MMSegRWKV's slice axis) fit them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from ..infer.predict import PredictConfig
from ..infer.predict3d import Predictor3D, predict_cases
from .runtime import OnnxPredictor


class OnnxModule(nn.Module):
    """An exported file as a module for the sliding window: forward [B, C, D, H, W] -> logits [B, K, D, H, W],
    computed by onnxruntime on the CPU (float32)."""

    def __init__(self, predictor: OnnxPredictor):
        super().__init__()
        self.predictor = predictor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.predictor.logits(x.detach().float().cpu().numpy())
        return torch.from_numpy(logits).to(x.device)


def onnx_predictor_3d(
    onnx: OnnxPredictor | str | os.PathLike, options: PredictConfig, threads: int | None = None
) -> Predictor3D:
    """A Predictor3D whose network is the exported file (an open OnnxPredictor, or its path; CPU, never
    compiled, its inputs as onnxruntime takes them: contiguous)."""
    predictor = onnx if isinstance(onnx, OnnxPredictor) else OnnxPredictor(onnx, threads=threads)
    if predictor.dims != 3:
        raise ValueError(f"{predictor.path} is a {predictor.dims}D export; 3D prediction needs a volume model's export")
    return Predictor3D(
        OnnxModule(predictor),
        predictor.preprocessing,
        replace(options, device="cpu", compile="off", memory_format="contiguous"),
    )


def predict_volumes(
    onnx: OnnxPredictor | str | os.PathLike,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    options: PredictConfig,
    threads: int | None = None,
) -> list[Path]:
    """Every case in inputs -> a label file in out_dir, the network run by onnxruntime."""
    return predict_cases(onnx_predictor_3d(onnx, options, threads), inputs, out_dir, options.overwrite)
