"""The one inference path: read + normalise a volume, sliding windows with blending, into memory or a Zarr store.

Validation during training, ``evaluate``, ``tune-postprocess`` and ``predict`` to NIfTI call :func:`infer_volume`;
``predict`` to Zarr (one process, or a rank's share of the blocks under torchrun) calls the two steps it wraps,
:func:`volume_job` and :func:`run_job`, itself. It runs MONAI's sliding-window grid block by block (see
:mod:`vesuvius_monai.engine.blockwise`): every window computed once, the output equal to MONAI's
``sliding_window_inference`` of the whole normalised volume. Probabilities are blended (not logits), as nnU-Net
does. Arrays are (z, y, x); the network sees (B, 1, z, y, x). AMP is used on CUDA only.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from vesuvius_monai.config import Config, InferConfig, to_dict
from vesuvius_monai.data.readers import VolumeReader, sample_percentiles
from vesuvius_monai.data.regions import Region, Triple, region_shape, relative, shift_region
from vesuvius_monai.data.transforms import read_normalized
from vesuvius_monai.engine.blockwise import ArraySink, MemorySpills, Reader, RunStats, Sink, Spills, run_blocks
from vesuvius_monai.engine.device import CHANNELS_LAST, autocast, channels_last_state
from vesuvius_monai.engine.tta import tta_predict
from vesuvius_monai.engine.windows import WindowGrid
from vesuvius_monai.engine.zarr_output import checked_roi, predict_to_zarr, run_meta

log = logging.getLogger(__name__)

def make_predictor(model: nn.Module, cfg: InferConfig, device: torch.device, amp: bool = True) -> Callable:
    """(B, 1, z, y, x) tensor -> probabilities of the same shape, float32, averaged over the TTA set.

    The network runs in channels-last-3D layout (weights copied once here, input per call).
    """
    state = channels_last_state(model)

    def probs(x: torch.Tensor) -> torch.Tensor:
        with autocast(device, amp):
            logits = functional_call(model, state, (x.contiguous(memory_format=CHANNELS_LAST),))
        return torch.sigmoid(logits.float())

    def predict(x: torch.Tensor) -> torch.Tensor:
        return tta_predict(probs, x, flip_axes=tuple(cfg.tta_flip_axes), rot90=cfg.tta_rot90)

    return predict


def with_tta(cfg: Config, flip_axes: list[int], rot90: bool) -> Config:
    """``cfg`` with the test-time augmentation ``infer.tta_flip_axes=flip_axes``, ``infer.tta_rot90=rot90``, every
    other setting kept."""
    return dataclasses.replace(cfg, infer=dataclasses.replace(cfg.infer, tta_flip_axes=list(flip_axes),
                                                              tta_rot90=rot90))


def without_tta(cfg: Config) -> Config:
    """``cfg`` with plain sliding-window inference: no test-time augmentation, every other setting kept."""
    return with_tta(cfg, [], False)


def volume_reader(reader: VolumeReader, window: tuple[float, float], roi: Region, grid: WindowGrid) -> Reader:
    """Region of the padded ROI (grid coordinates) -> normalised float32 input, zeros where MONAI pads."""
    inside = tuple(slice(p, p + d) for p, d in zip(grid.pad_lo, grid.shape))
    to_volume = tuple(r.start - p for r, p in zip(roi, grid.pad_lo))

    def read(region: Region) -> np.ndarray:
        part = tuple(slice(max(s.start, i.start), min(s.stop, i.stop)) for s, i in zip(region, inside))
        data = read_normalized(reader, window, shift_region(part, to_volume))  # type: ignore[arg-type]
        if part == region:
            return data
        padded = np.zeros(region_shape(region), dtype=np.float32)
        padded[relative(part, region)] = data  # type: ignore[arg-type]
        return padded

    return read


@dataclass(frozen=True)
class VolumeJob:
    """One volume (or its ROI) to predict: the reader, the region, MONAI's window grid over it in blocks, and the
    reader of its normalised input in the grid's padded coordinates."""

    reader: VolumeReader
    region: Region
    grid: WindowGrid
    read: Reader


def window_grid(region: Region, icfg: InferConfig) -> WindowGrid:
    """The sliding-window grid of ``region`` with the ``infer`` window, overlap and block size."""
    return WindowGrid(region_shape(region), icfg.roi_size, icfg.overlap, icfg.block_size)


def volume_job(reader: VolumeReader, cfg: Config, roi: Region | None = None) -> VolumeJob:
    """The job of predicting ``reader`` (or its ``roi``), normalised with the volume's own percentile window
    (``transforms.percentiles``, sampled over the whole volume: the same in every process)."""
    region = checked_roi(reader, roi)
    grid = window_grid(region, cfg.infer)
    window = sample_percentiles(reader, q=cfg.transforms.percentiles)
    return VolumeJob(reader, region, grid, volume_reader(reader, window, region, grid))


def output_meta(reader: VolumeReader, region: Region, cfg: Config, run_info: dict | None = None) -> dict:
    """What a Zarr output's resumed run must share with the interrupted one (see ``run_meta``)."""
    extra = {"percentiles": list(cfg.transforms.percentiles), "infer": to_dict(cfg.infer), **(run_info or {})}
    return run_meta(reader, region, window_grid(region, cfg.infer).block_size, cfg.infer.out_dtype, extra)


def run_job(model: nn.Module, job: VolumeJob, cfg: Config, predictor: Callable, sink: Sink, spills: Spills, *,
            device: torch.device, blocks: list[Triple] | None = None, progress: bool = False) -> RunStats:
    """Run the block engine on ``job`` (its ``blocks``, default all not done) with the model in eval mode."""
    icfg = cfg.infer
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            return run_blocks(job.grid, job.read, predictor, sink, spills, batch=icfg.sw_batch_size,
                              blend=icfg.blend, sigma_scale=icfg.sigma_scale, device=device, progress=progress,
                              blocks=blocks)
    finally:
        model.train(was_training)


def infer_volume(model: nn.Module, reader: VolumeReader, cfg: Config, *, device: torch.device | None = None,
                 roi: Region | None = None, output: str | os.PathLike | None = None, run_info: dict | None = None,
                 resume: bool = True, progress: bool = False) -> np.ndarray | Path:
    """Probabilities of ``reader`` (or its ``roi``): float32 (z, y, x) in memory, or written to a Zarr ``output``.

    The volume is normalised with its own percentile window (``transforms.percentiles``, sampled over the whole
    volume), then predicted with the ``infer`` settings (window, overlap, blending, TTA, batch, block size, AMP
    on CUDA). The ROI is predicted as a volume of its own. With ``output`` (a ``.zarr`` path) the blocks go to a
    resumable store (``infer.out_dtype``); a rerun resumes an interrupted one when its settings, ``run_info``
    included, are the same. ``device``: where the model is (default: its parameters' device).
    """
    device = device or next(model.parameters()).device
    job = volume_job(reader, cfg, roi)
    predictor = make_predictor(model, cfg.infer, device, cfg.infer.amp)

    def run(sink: Sink, spills: Spills) -> None:
        run_job(model, job, cfg, predictor, sink, spills, device=device, progress=progress)

    if output is None:
        sink = ArraySink(region_shape(job.region))
        run(sink, MemorySpills())
        return sink.array
    meta = output_meta(reader, job.region, cfg, run_info)
    return predict_to_zarr(output, reader, job.region, job.grid.block_size, cfg.infer.out_dtype, meta,
                           lambda store: run(store, store.spills()), resume=resume)


def load_normalized(reader: VolumeReader, percentiles: tuple[float, float]) -> np.ndarray:
    """A whole volume as inference sees it (read, checked finite, normalised): float32 (z, y, x), for figures."""
    return read_normalized(reader, sample_percentiles(reader, q=percentiles))
