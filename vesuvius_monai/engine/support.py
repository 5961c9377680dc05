"""Where a volume holds scroll, so that windows over empty space are not run (``infer.skip_background``,
``infer.support``, ``infer.support_level``, ``infer.support_threshold``).

A voxel holds scroll when its raw value differs from ``skip_background`` (when set) and its support value is above
``support_threshold`` (when a support is given: a mask volume, or a coarse OME-Zarr level of the input). A support
of another shape stands for blocks of ``ceil(input / support)`` voxels per axis (a pyramid level ``k``: ``2**k``).
:class:`VolumeInput` is what the block engine reads (:mod:`vesuvius_monai.engine.blockwise`): the normalised input
of a region and, with any of these settings, its content (padded coordinates of the window grid; MONAI's padding
holds no scroll). The raw values read for the content are kept for the read that follows, so each region is read
once.
"""

from __future__ import annotations

import math
from typing import Callable
from pathlib import Path

import numpy as np

from vesuvius_monai.config import InferConfig
from vesuvius_monai.data.readers import VolumeReader, open_volume
from vesuvius_monai.data.regions import Region, intersect, region_shape, relative
from vesuvius_monai.data.transforms import read_finite
from vesuvius_monai.engine.windows import WindowGrid
from vesuvius_monai.errors import VesuviusError


class SupportMask:
    """``values > threshold`` of a support volume, at the input's resolution, region by region (volume coordinates).

    ``shape``: the input's; each support voxel stands for ``factor = ceil(shape / support shape)`` input voxels.
    """

    def __init__(self, support: VolumeReader, shape: tuple[int, int, int], threshold: float, key: str) -> None:
        self.reader, self.threshold = support, threshold
        self.factor = tuple(max(1, math.ceil(n / m)) for n, m in zip(shape, support.shape))
        fits = all(math.ceil(n / f) == m for n, f, m in zip(shape, self.factor, support.shape))
        if not fits:
            raise VesuviusError(f"{key} {support.path}: its shape {support.shape} does not fit the input's {shape} "
                                f"(it must be the input's, or the input's divided by a factor per axis, rounded up)")

    def __call__(self, region: Region) -> np.ndarray:
        """Bool (region shape): True where the support is above the threshold."""
        coarse = tuple(slice(s.start // f, -(-s.stop // f)) for s, f in zip(region, self.factor))
        mask = self.reader.read(coarse) > self.threshold
        for axis, f in enumerate(self.factor):
            mask = np.repeat(mask, f, axis=axis)
        return mask[tuple(slice(s.start - c.start * f, s.stop - c.start * f)
                          for s, c, f in zip(region, coarse, self.factor))]


def support_mask(reader: VolumeReader, icfg: InferConfig) -> SupportMask | None:
    """The support of ``infer`` for the input ``reader`` (None: none set)."""
    if icfg.support is None and icfg.support_level is None:
        return None
    path = Path(icfg.support) if icfg.support is not None else reader.path
    key = "infer.support" if icfg.support is not None else "infer.support_level"
    level = icfg.support_level or 0
    if level and not (Path(path).is_dir()):
        raise VesuviusError(f"{key}: {path} has no pyramid levels (infer.support_level={level} needs an OME-Zarr)")
    support = open_volume(path, level=level, missing_chunks="allow")
    return SupportMask(support, reader.shape, icfg.support_threshold, key)


class VolumeInput:
    """The engine's input of ``reader`` normalised by ``norm`` (raw float32 -> network input, pointwise), on ``grid``
    (padded coordinates, zeros where MONAI pads): :meth:`read`, and :meth:`content` (None when no
    setting asks for empty space to be skipped)."""

    def __init__(self, reader: VolumeReader, norm: Callable[[np.ndarray], np.ndarray], grid: WindowGrid,
                 background: float | None = None, support: SupportMask | None = None) -> None:
        self.reader, self.norm, self.background, self.support = reader, norm, background, support
        self.pad_lo = grid.pad_lo
        self.inside = grid.inside
        self._raw: dict[tuple, np.ndarray] = {}  # raw values read by content(), for the read() that follows

    @property
    def skips(self) -> bool:
        return self.background is not None or self.support is not None

    def _volume(self, part: Region) -> Region:
        return tuple(slice(s.start - p, s.stop - p) for s, p in zip(part, self.pad_lo))  # type: ignore[return-value]

    def content(self, region: Region) -> np.ndarray:
        """Bool (region shape): True where the input holds scroll."""
        out = np.zeros(region_shape(region), dtype=bool)
        part = intersect(region, self.inside)  # type: ignore[arg-type]
        if part is None:
            return out
        inner = self.support(self._volume(part)) if self.support is not None else np.ones(region_shape(part), bool)
        if self.background is not None and inner.any():
            raw = self.reader.read(self._volume(part))
            inner &= raw != self.background
            if inner.any():
                self._raw[_key(region)] = raw
        out[relative(part, region)] = inner
        return out

    def read(self, region: Region) -> np.ndarray:
        """The normalised input over ``region``: float32 (region shape)."""
        part = intersect(region, self.inside)  # type: ignore[arg-type]
        padded = np.zeros(region_shape(region), dtype=np.float32)
        if part is None:
            return padded
        raw = self._raw.pop(_key(region), None)
        volume = self._volume(part)
        data = self.norm(read_finite(self.reader, volume, raw))
        if part == region:
            return data
        padded[relative(part, region)] = data
        return padded


def _key(region: Region) -> tuple:
    """A region as a dict key (slices are not hashable before Python 3.12)."""
    return tuple((s.start, s.stop) for s in region)
