"""The one inference path: read + normalise a volume, sliding windows with blending, block by block.

:func:`infer_volume` predicts a volume (or its ROI) into memory: validation during training, ``evaluate``,
``tune-postprocess`` and ``predict`` to NIfTI call it. ``predict`` to Zarr (:mod:`vesuvius_monai.engine.predict`,
one process or a rank's share of the blocks under torchrun) builds the same :func:`volume_job` and runs it into a
resumable store. Both run MONAI's sliding-window grid block by block (see :mod:`vesuvius_monai.engine.blockwise`):
every window computed once, the output equal to MONAI's ``sliding_window_inference`` of the whole normalised
volume. Probabilities are blended (not logits), as nnU-Net v1 did; with ``infer.blend_space=logit`` the windows'
(TTA-averaged) logits are blended and the sigmoid applied once after, as nnU-Net v2 does (:func:`logit_finish`).
Arrays are (z, y, x); the network sees (B, 1, z, y, x). AMP is used on CUDA only.
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
from vesuvius_monai.data.regions import Region, region_shape
from vesuvius_monai.data.transforms import normalize, read_finite
from vesuvius_monai.engine.blockwise import BlockJob, Predictor, run_blocks
from vesuvius_monai.engine.sinks import ArraySink, MemorySpills
from vesuvius_monai.engine.device import autocast, channels_last, channels_last_state
from vesuvius_monai.engine.support import VolumeInput, support_mask
from vesuvius_monai.engine.tta import tta_predict
from vesuvius_monai.engine.windows import WindowGrid
from vesuvius_monai.engine.zarr_output import checked_roi
from vesuvius_monai.io.memory import check_memory


EMPTY_LOGIT = -30.0  # blend_space logit: what a skipped window counts as predicting (sigmoid ~ 1e-13)


def make_predictor(model: nn.Module, cfg: InferConfig, device: torch.device, amp: bool = True) -> Predictor:
    """(B, 1, z, y, x) tensor -> probabilities of the same shape, float32, averaged over the TTA set (with
    ``infer.blend_space=logit``: the logits, averaged over the TTA set).

    The network runs in channels-last-3D layout (weights copied once here, input per call).
    """
    state = channels_last_state(model)
    logit_space = cfg.blend_space == "logit"

    def probs(x: torch.Tensor) -> torch.Tensor:
        with autocast(device, amp):
            logits = functional_call(model, state, (channels_last(x),))
        return logits.float() if logit_space else torch.sigmoid(logits.float())

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


def window_grid(region: Region, icfg: InferConfig) -> WindowGrid:
    """The sliding-window grid of ``region`` with the ``infer`` window, overlap, block size and starts (``grid``)."""
    return WindowGrid(region_shape(region), icfg.roi_size, icfg.overlap, icfg.block_size, icfg.grid)


def logit_finish(blended: np.ndarray) -> np.ndarray:
    """The sigmoid of blended logits (float32, any shape): the probabilities of ``infer.blend_space=logit``."""
    return torch.sigmoid(torch.from_numpy(blended)).numpy()


def volume_grid(reader: VolumeReader, roi: Region, icfg: InferConfig) -> tuple[WindowGrid, list]:
    """The window grid of the whole volume of ``reader`` and the blocks of it that write part of ``roi``."""
    grid = window_grid(tuple(slice(0, d) for d in reader.shape), icfg)  # type: ignore[arg-type]
    return grid, grid.blocks_touching(roi)


def volume_job(reader: VolumeReader, cfg: Config, predictor: Predictor, device: torch.device,
               roi: Region | None = None, norm: Normalize | None = None) -> BlockJob:
    """The engine's job of predicting ``reader`` (or its ``roi``) with ``predictor`` and the ``infer`` settings,
    normalised by ``norm`` (default :func:`percentile_normalizer`). ``device``: where the predictor runs.

    The windows are those of the whole volume's grid: an ROI's prediction is the whole volume's restricted to it
    (its edge windows read their context from outside the ROI). Empty space is skipped as ``infer`` says
    (:mod:`vesuvius_monai.engine.support`)."""
    region, icfg = checked_roi(reader, roi), cfg.infer
    grid = volume_grid(reader, region, icfg)[0]
    norm = norm or percentile_normalizer(reader, cfg)
    source = VolumeInput(reader, norm, grid, icfg.skip_background, support_mask(reader, icfg))
    whole = region_shape(region) == grid.shape
    logits = {"finish": logit_finish, "empty": EMPTY_LOGIT} if icfg.blend_space == "logit" else {}
    return BlockJob(grid, source.read, predictor, icfg.sw_batch_size, icfg.blend, icfg.sigma_scale, device,
                    roi=None if whole else region, content=source.content if source.skips else None, **logits)


def infer_volume(model: nn.Module, reader: VolumeReader, cfg: Config, *, device: torch.device | None = None,
                 roi: Region | None = None, progress: bool = False) -> np.ndarray:
    """Probabilities of ``reader`` (or its ``roi``): float32 (z, y, x) of the volume's (the ROI's) shape.

    The volume is normalised with its own percentile window (``transforms.percentiles``, sampled over the whole
    volume), then predicted with the ``infer`` settings (window, overlap, blending, TTA, batch, block size, AMP
    on CUDA). An ROI's prediction is the whole volume's restricted to it (:func:`volume_job`). ``device``: where
    the model is (default: its parameters' device). The model is in eval mode while it predicts, and back in its
    own mode after. A volume whose prediction would not fit the host's available memory is refused
    (VesuviusError naming the file).
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
        shape = region_shape(job.output_roi())
        check_memory(4 * math.prod(shape), f"{reader.path}: a float32 prediction of shape {shape}")
        sink = ArraySink(shape)
        run_blocks(job, sink, MemorySpills(), progress=progress)
    return sink.array


def load_normalized(reader: VolumeReader, percentiles: tuple[float, float]) -> np.ndarray:
    """A whole volume as inference sees it (read, checked finite, normalised): float32 (z, y, x), for figures."""
    return normalize(read_finite(reader), sample_percentiles(reader, q=percentiles))
