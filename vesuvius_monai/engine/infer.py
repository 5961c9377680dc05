"""The one inference path: read + normalise a volume, sliding windows with blending, block by block.

:func:`infer_volume` predicts a volume (or its ROI) into memory: validation during training, ``evaluate``,
``tune-postprocess`` and ``predict`` to NIfTI call it. ``predict`` to Zarr (:mod:`vesuvius_monai.engine.predict`,
one process or a rank's share of the blocks under torchrun) builds the same :func:`volume_job` and runs it into a
resumable store. Both run MONAI's sliding-window grid block by block (see :mod:`vesuvius_monai.engine.blockwise`):
every window computed once, the output equal to MONAI's ``sliding_window_inference`` of the whole normalised
volume. Probabilities are blended (not logits), as nnU-Net v1 did (v2 blends logits). Arrays are (z, y, x); the
network sees (B, 1, z, y, x). AMP is used on CUDA only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from vesuvius_monai.config import Config, InferConfig
from vesuvius_monai.data.readers import VolumeReader, sample_percentiles
from vesuvius_monai.data.regions import Region, region_shape, relative, shift_region
from vesuvius_monai.data.transforms import normalize, read_finite
from vesuvius_monai.engine.blockwise import ArraySink, BlockJob, MemorySpills, Predictor, Reader, run_blocks
from vesuvius_monai.engine.device import autocast, channels_last, channels_last_state
from vesuvius_monai.engine.tta import tta_predict
from vesuvius_monai.engine.windows import WindowGrid
from vesuvius_monai.engine.zarr_output import checked_roi
from vesuvius_monai.io.memory import check_memory


def make_predictor(model: nn.Module, cfg: InferConfig, device: torch.device, amp: bool = True) -> Predictor:
    """(B, 1, z, y, x) tensor -> probabilities of the same shape, float32, averaged over the TTA set.

    The network runs in channels-last-3D layout (weights copied once here, input per call).
    """
    state = channels_last_state(model)

    def probs(x: torch.Tensor) -> torch.Tensor:
        with autocast(device, amp):
            logits = functional_call(model, state, (channels_last(x),))
        return torch.sigmoid(logits.float())

    def predict(x: torch.Tensor) -> torch.Tensor:
        return tta_predict(probs, x, flip_axes=tuple(cfg.tta_flip_axes), rot90=cfg.tta_rot90)

    return predict


@contextlib.contextmanager
def evaluating(model: nn.Module, cfg: InferConfig, device: torch.device) -> Iterator[Predictor]:
    """The predictor of ``model`` (:func:`make_predictor`, ``infer.amp``) with the model in eval mode; its mode is
    restored on leaving (validation predicts with the model being trained)."""
    was_training = model.training
    model.eval()
    try:
        yield make_predictor(model, cfg, device, cfg.amp)
    finally:
        model.train(was_training)


def with_tta(cfg: Config, flip_axes: list[int], rot90: bool) -> Config:
    """``cfg`` with the test-time augmentation ``infer.tta_flip_axes=flip_axes``, ``infer.tta_rot90=rot90``, every
    other setting kept."""
    return dataclasses.replace(cfg, infer=dataclasses.replace(cfg.infer, tta_flip_axes=list(flip_axes),
                                                              tta_rot90=rot90))


def without_tta(cfg: Config) -> Config:
    """``cfg`` with plain sliding-window inference: no test-time augmentation, every other setting kept."""
    return with_tta(cfg, [], False)


Normalize = Callable[[np.ndarray], np.ndarray]  # raw float32 (z, y, x) -> the network's input, pointwise


def percentile_normalizer(reader: VolumeReader, cfg: Config) -> Normalize:
    """The project's normalisation: the volume's own percentile window (``transforms.percentiles``, sampled over
    the whole volume: the same in every process) mapped to [0, 1]."""
    window = sample_percentiles(reader, q=cfg.transforms.percentiles)
    return lambda image: normalize(image, window)


def source_normalizer(source: object, reader: VolumeReader, cfg: Config) -> Normalize:
    """How ``source`` (a network source) wants ``reader`` normalised: its ``normalizer(reader, cfg)`` if it has
    one (an nnU-Net model: its plan's scheme), else :func:`percentile_normalizer`."""
    return getattr(source, "normalizer", percentile_normalizer)(reader, cfg)


def volume_reader(reader: VolumeReader, norm: Normalize, roi: Region, grid: WindowGrid) -> Reader:
    """Region of the padded ROI (grid coordinates) -> normalised float32 input, zeros where MONAI pads."""
    inside = tuple(slice(p, p + d) for p, d in zip(grid.pad_lo, grid.shape))
    to_volume = tuple(r.start - p for r, p in zip(roi, grid.pad_lo))

    def read(region: Region) -> np.ndarray:
        part = tuple(slice(max(s.start, i.start), min(s.stop, i.stop)) for s, i in zip(region, inside))
        data = norm(read_finite(reader, shift_region(part, to_volume)))  # type: ignore[arg-type]
        if part == region:
            return data
        padded = np.zeros(region_shape(region), dtype=np.float32)
        padded[relative(part, region)] = data  # type: ignore[arg-type]
        return padded

    return read


def window_grid(region: Region, icfg: InferConfig) -> WindowGrid:
    """The sliding-window grid of ``region`` with the ``infer`` window, overlap and block size."""
    return WindowGrid(region_shape(region), icfg.roi_size, icfg.overlap, icfg.block_size)


def volume_job(reader: VolumeReader, cfg: Config, predictor: Predictor, device: torch.device,
               roi: Region | None = None, norm: Normalize | None = None) -> BlockJob:
    """The engine's job of predicting ``reader`` (or its ``roi``, as a volume of its own) with ``predictor`` and
    the ``infer`` settings, normalised by ``norm`` (default :func:`percentile_normalizer`). ``device``: where the
    predictor runs."""
    region = checked_roi(reader, roi)
    grid, icfg = window_grid(region, cfg.infer), cfg.infer
    norm = norm or percentile_normalizer(reader, cfg)
    return BlockJob(grid, volume_reader(reader, norm, region, grid), predictor, icfg.sw_batch_size, icfg.blend,
                    icfg.sigma_scale, device)


def infer_volume(model: nn.Module, reader: VolumeReader, cfg: Config, *, device: torch.device | None = None,
                 roi: Region | None = None, progress: bool = False) -> np.ndarray:
    """Probabilities of ``reader`` (or its ``roi``): float32 (z, y, x) of the volume's (the ROI's) shape.

    The volume is normalised with its own percentile window (``transforms.percentiles``, sampled over the whole
    volume), then predicted with the ``infer`` settings (window, overlap, blending, TTA, batch, block size, AMP
    on CUDA). The ROI is predicted as a volume of its own. ``device``: where the model is (default: its
    parameters' device). The model is in eval mode while it predicts, and back in its own mode after. A volume whose
    prediction would not fit the host's available memory is refused (VesuviusError naming the file).
    """
    device = device or next(model.parameters()).device
    return _into_memory(evaluating(model, cfg.infer, device), reader, cfg, device, roi, progress)


def predict_source(network, reader: VolumeReader, cfg: Config, device: torch.device, *, roi: Region | None = None,
                   progress: bool = False) -> np.ndarray:
    """:func:`infer_volume` with a network source (``network.predictor(infer_cfg, device)``, see
    :mod:`vesuvius_monai.engine.networks`) instead of a model in memory: float32 (z, y, x) probabilities."""
    return _into_memory(network.predictor(cfg.infer, device), reader, cfg, device, roi, progress,
                        source_normalizer(network, reader, cfg))


def _into_memory(predicting: contextlib.AbstractContextManager, reader: VolumeReader, cfg: Config,
                 device: torch.device, roi: Region | None, progress: bool, norm: Normalize | None = None) -> np.ndarray:
    """The block engine run into an in-memory array with the predictor that ``predicting`` yields (input normalised
    by ``norm``, default the percentile window)."""
    with predicting as predictor:
        job = volume_job(reader, cfg, predictor, device, roi, norm)
        check_memory(4 * math.prod(job.grid.shape), f"{reader.path}: a float32 prediction of shape {job.grid.shape}")
        sink = ArraySink(job.grid.shape)
        run_blocks(job, sink, MemorySpills(), progress=progress)
    return sink.array


def load_normalized(reader: VolumeReader, percentiles: tuple[float, float]) -> np.ndarray:
    """A whole volume as inference sees it (read, checked finite, normalised): float32 (z, y, x), for figures."""
    return normalize(read_finite(reader), sample_percentiles(reader, q=percentiles))
