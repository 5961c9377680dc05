"""OME-Zarr multiscale pyramids of prediction stores, so that a viewer (napari, neuroglancer) opens any size.

Level ``k + 1`` is level ``k`` downsampled 2x per axis: its shape is ``ceil(shape_k / 2)``, each voxel the mean
(probabilities) or the maximum (masks) of the up to 8 voxels of its 2x2x2 cell (the cells at an odd edge hold
fewer). Means are taken of the decoded probabilities and encoded again (uint8: ``round(p * 255)``). The levels are
built after level 0 is complete, one chunk of the new level at a time (memory: one chunk and its 8x source), and
each is recorded done in ``.pyramid_done/<k>``, so an interrupted build resumes at the first level not done.

OME-NGFF 0.4 metadata: level ``k`` has scale ``spacing * 2**k`` and translation ``origin + spacing * (2**k - 1) /
2`` (the centre of a cell is the mean of the centres of its voxels).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np
import zarr
from tqdm import tqdm

from vesuvius_monai.data.regions import BlockIndices

COARSEST = 128  # automatic number of levels: halve until every side is at most this
CHUNK = 128  # chunk edge of the levels >= 1 (viewer-sized)
DONE_DIR = ".pyramid_done"


def n_levels(shape: tuple[int, ...], wanted: int) -> int:
    """``wanted`` levels (level 0 included), or with 0 as many as it takes for the coarsest to be at most
    :data:`COARSEST` voxels per side."""
    if wanted:
        return wanted
    levels = 1
    while max(level_shape(shape, levels - 1)) > COARSEST:
        levels += 1
    return levels


def level_shape(shape: tuple[int, ...], k: int) -> tuple[int, ...]:
    """The shape of level ``k``: ``shape`` halved ``k`` times, rounded up."""
    for _ in range(k):
        shape = tuple(-(-d // 2) for d in shape)
    return tuple(shape)


def downsample(data: np.ndarray, method: str) -> np.ndarray:
    """2x2x2 ``mean`` (float32) or ``max`` (same dtype) of ``data`` (z, y, x); odd edges give partial cells."""
    even = tuple(d + d % 2 for d in data.shape)
    cells = tuple(x for d in even for x in (d // 2, 2))
    if method == "max":
        padded = np.full(even, np.iinfo(data.dtype).min if data.dtype.kind in "iu" else -np.inf, data.dtype)
        padded[tuple(slice(0, d) for d in data.shape)] = data
        return padded.reshape(cells).max(axis=(1, 3, 5))
    padded = np.zeros(even, np.float32)
    padded[tuple(slice(0, d) for d in data.shape)] = data
    count = np.zeros(even, np.float32)
    count[tuple(slice(0, d) for d in data.shape)] = 1.0
    return padded.reshape(cells).sum(axis=(1, 3, 5)) / count.reshape(cells).sum(axis=(1, 3, 5))


def multiscales(spacing: tuple[float, ...], origin: tuple[float, ...], levels: int, name: str) -> list[dict]:
    """OME-NGFF 0.4 ``multiscales`` of ``levels`` levels named "0", "1", ... over (z, y, x)."""
    datasets = []
    for k in range(levels):
        transforms: list[dict] = [{"type": "scale", "scale": [s * 2**k for s in spacing]}]
        shift = [o + s * (2**k - 1) / 2 for o, s in zip(origin, spacing)]
        if any(shift):
            transforms.append({"type": "translation", "translation": shift})
        datasets.append({"path": str(k), "coordinateTransformations": transforms})
    return [{"version": "0.4", "name": name, "axes": [{"name": a, "type": "space", "unit": "micrometer"}
                                                      for a in "zyx"], "datasets": datasets}]


def build_levels(group: zarr.Group, folder: Path, levels: int, method: str,
                 decode: Callable[[np.ndarray], np.ndarray], encode: Callable[[np.ndarray], np.ndarray],
                 progress: bool = False) -> None:
    """Write levels ``1 .. levels - 1`` of ``group`` (at ``folder``) from its complete level ``"0"``, skipping those
    marked done in ``folder/.pyramid_done`` (see the module docstring). ``decode``: stored values -> what is
    downsampled; ``encode``: the result -> stored values."""
    done = folder / DONE_DIR
    done.mkdir(exist_ok=True)
    for k in range(1, levels):
        if (done / str(k)).exists():
            continue
        source = group[str(k - 1)]
        shape = level_shape(source.shape, 1)
        chunks = tuple(min(CHUNK, d) for d in shape)
        target = group.create_array(str(k), shape=shape, chunks=chunks, dtype=source.dtype, fill_value=0,
                                    overwrite=True)
        counts = tuple(math.ceil(d / c) for d, c in zip(shape, chunks))
        for index in tqdm(BlockIndices(counts), desc=f"level {k}", leave=False, disable=not progress):
            region = tuple(slice(i * c, min((i + 1) * c, d)) for i, c, d in zip(index, chunks, shape))
            data = decode(np.asarray(source[tuple(slice(2 * s.start, 2 * s.stop) for s in region)]))
            target[region] = encode(downsample(data, method))
        (done / str(k)).touch()
