"""Sliding-window inference: logits -> probabilities with Gaussian blending, optional TTA.

All functions take and return arrays (Z, Y, X); the network sees (B, 1, Z, Y, X). Probabilities are
blended (not logits), as nnU-Net does. AMP is used on CUDA only: on CPU there is no fast half precision.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch import nn

from vesuvius_monai.config import InferConfig
from vesuvius_monai.data.readers import VolumeReader, sample_percentiles
from vesuvius_monai.data.transforms import read_normalized
from vesuvius_monai.engine.tta import tta_predict
from vesuvius_monai.errors import VesuviusError

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise VesuviusError("device is 'cuda' (train.device / infer.device) but no CUDA device is available")
    return torch.device(name)


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 (or fp16 on older GPUs) autocast on CUDA; a no-op on CPU, where half precision is slow."""
    if enabled and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def make_predictor(model: nn.Module, cfg: InferConfig, device: torch.device, amp: bool = True) -> Callable:
    """(B, 1, z, y, x) tensor -> probabilities of the same shape, float32, averaged over the TTA set."""

    def probs(x: torch.Tensor) -> torch.Tensor:
        with autocast(device, amp):
            return torch.sigmoid(model(x).float())

    def predict(x: torch.Tensor) -> torch.Tensor:
        return tta_predict(probs, x, flip_axes=tuple(cfg.tta_flip_axes), rot90=cfg.tta_rot90)

    return predict


@torch.no_grad()
def sliding_window_probs(model: nn.Module, image: np.ndarray, cfg: InferConfig, *, device: torch.device,
                         amp: bool = True, progress: bool = False) -> np.ndarray:
    """Probabilities (Z, Y, X) float32 for a normalised image (Z, Y, X) of any size.

    Windows of ``cfg.roi_size`` overlap by ``cfg.overlap`` and are blended with a Gaussian weight
    (``cfg.blend``); volumes smaller than a window are padded and cropped back.
    """
    was_training = model.training
    model.eval()
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    try:
        out = sliding_window_inference(
            x, roi_size=cfg.roi_size, sw_batch_size=cfg.sw_batch_size, predictor=make_predictor(model, cfg, device, amp),
            overlap=cfg.overlap, mode=cfg.blend, sigma_scale=cfg.sigma_scale, sw_device=device, device="cpu",
            progress=progress,
        )
    finally:
        model.train(was_training)
    return torch.as_tensor(out).as_subclass(torch.Tensor)[0, 0].numpy().astype(np.float32, copy=False)


def load_normalized(reader: VolumeReader, percentiles: tuple[float, float]) -> np.ndarray:
    """Read a whole volume, check it is finite, and normalise it with its own percentile window."""
    return read_normalized(reader, sample_percentiles(reader, q=percentiles))
