"""Index of foreground (surface) voxels of a label volume, built block by block and cached on disk.

Patch samplers use it to centre patches on the papyrus surface without loading the label volume.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from vesuvius_monai.data.readers import VolumeReader, block_grid
from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.io.atomic import atomic_path
from vesuvius_monai.io.paths import check_parents, inside

logger = logging.getLogger(__name__)


def build_foreground_index(
    label_reader: VolumeReader,
    *,
    value: int = 1,
    block: int = 64,
    max_points: int = 200_000,
    seed: int = 0,
    allowed: tuple[int, ...] | None = None,
) -> np.ndarray:
    """(N, 3) int32 (z, y, x) coordinates of the voxels where label == ``value``, sorted in C order.

    With ``allowed``, every label value is checked on the way (VesuviusError naming the file otherwise),
    so a cached index also certifies the label's values.

    Reads one ``block``^3 region at a time, so memory is bounded by the block and ``max_points``,
    whatever the volume size. With more than ``max_points`` matches it returns a uniform random subset
    of exactly ``max_points`` (without replacement, reproducible for a given ``seed`` and ``block``):
    each voxel gets a random key and the ``max_points`` smallest keys are kept.
    """
    if block < 1 or max_points < 1:
        raise VesuviusError(f"block and max_points must be >= 1, got block={block}, max_points={max_points}")
    rng = np.random.default_rng(seed)
    kept = np.empty((0, 3), dtype=np.int32)
    keys = np.empty(0, dtype=np.float64)
    grid = block_grid(label_reader.shape, (block, block, block))
    for _, region in tqdm(grid, desc=f"foreground index {label_reader.path.name}", leave=False):
        labels = label_reader.read(region)
        if allowed is not None:
            check_label_block(label_reader, labels, allowed)
        found = np.argwhere(labels == value).astype(np.int32)
        if found.size == 0:
            continue
        found += np.array([s.start for s in region], dtype=np.int32)
        kept = np.concatenate([kept, found])
        keys = np.concatenate([keys, rng.random(len(found))])
        kept, keys = _keep_smallest(kept, keys, max_points)
    order = np.lexsort((kept[:, 2], kept[:, 1], kept[:, 0]))
    logger.debug("%s: %d foreground points indexed (value %d)", label_reader.path, len(kept), value)
    return np.ascontiguousarray(kept[order])


def check_label_block(reader: VolumeReader, labels: np.ndarray, allowed: tuple[int, ...]) -> None:
    """Raise a VesuviusError naming ``reader``'s file if ``labels`` (one block of it) holds other values."""
    values = np.unique(labels)
    bad = values[~np.isin(values, allowed)]
    if bad.size:
        ignore = ", ".join(str(v) for v in sorted(allowed) if v not in (0, 1))
        raise VesuviusError(f"label {reader.path} has values {bad[:5].tolist()} outside {sorted(allowed)} "
                            f"(0 background, 1 surface, {ignore} ignore)")


@dataclass(frozen=True)
class LabelCounts:
    """Voxels of one or more label volumes: ``labelled`` (0 background or 1 surface: trained on and scored) and
    ``surface`` (1). Added with ``+``."""

    labelled: int = 0
    surface: int = 0

    def __add__(self, other: LabelCounts) -> LabelCounts:
        return LabelCounts(self.labelled + other.labelled, self.surface + other.surface)


def count_labels(labels: np.ndarray) -> LabelCounts:
    """The labelled (0 or 1) and surface (1) voxels of a label array (any shape)."""
    surface = int(np.count_nonzero(labels == 1))
    return LabelCounts(surface + int(np.count_nonzero(labels == 0)), surface)


def check_split_labels(split: str, labels: list[VolumeReader], counts: LabelCounts) -> None:
    """A split of labelled fragments needs a labelled voxel in its ``labels`` (``counts`` over all of them):
    VesuviusError naming the split and its files otherwise; labels without a surface voxel get a warning."""
    if not labels:
        return
    names = ", ".join(str(r.path) for r in labels[:5]) + (f" and {len(labels) - 5} more" if len(labels) > 5 else "")
    if counts.labelled == 0:
        raise VesuviusError(f"the {split} fragments have no labelled voxel (0 background or 1 surface), only ignore: "
                            f"{names}; there is nothing to {'train on' if split == 'train' else 'score'}")
    if counts.surface == 0:
        logger.warning("the labels of the %s fragments hold no surface voxel (1), only background: %s", split, names)


def check_training_labels(labels: list[VolumeReader], surface_points: int) -> None:
    """:func:`check_split_labels` for the training split, whose labels are read only through their foreground
    indices: ``surface_points`` (indexed over all of them) > 0 shows labelled voxels; else the labels are searched
    for a background voxel (the search stops at the first)."""
    labelled = surface_points or int(any(_holds_value(reader, 0) for reader in labels))
    check_split_labels("train", labels, LabelCounts(labelled, surface_points))


def _holds_value(reader: VolumeReader, value: int, block: int = 64) -> bool:
    """Whether the volume holds ``value`` anywhere; reads block by block and stops at the first block holding it."""
    return any(np.any(reader.read(region) == value) for _, region in block_grid(reader.shape, (block,) * 3))


def _keep_smallest(points: np.ndarray, keys: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` rows of ``points`` (N, 3) with the smallest ``keys`` (N,); all of them when N <= k."""
    if len(keys) <= k:
        return points, keys
    chosen = np.argpartition(keys, k - 1)[:k]
    return points[chosen], keys[chosen]


def _file_signature(path: Path) -> str:
    """``size:mtime_ns`` of a file; for a folder (zarr store, TIFF slices) the sum of sizes and the latest mtime."""
    if path.is_file():
        stat = path.stat()
        return f"{stat.st_size}:{stat.st_mtime_ns}"
    size, mtime = 0, path.stat().st_mtime_ns
    for root, _, files in os.walk(path):
        for name in files:
            stat = (Path(root) / name).stat()
            size, mtime = size + stat.st_size, max(mtime, stat.st_mtime_ns)
    return f"{size}:{mtime}"


def _array_in_file(reader: VolumeReader) -> str:
    """Which array of the file the reader reads: the array's path inside a Zarr store (a group member or an
    OME-Zarr level, "" for a plain array); "" for single-array formats."""
    array = getattr(reader, "_array", None)  # ZarrReader keeps the opened zarr.Array here
    return str(getattr(array, "path", "") or "")


def foreground_cache_path(
    label_reader: VolumeReader, cache_dir: str | os.PathLike, *, value: int, block: int, max_points: int, seed: int
) -> Path:
    """Cache file for an index: keyed by the label's resolved path, size, mtime, the array read inside it (a Zarr
    group's ``data.zarr_key`` / ``data.zarr_level``), its shape and the index parameters."""
    path = label_reader.path.resolve()
    key = (f"{path}|{_array_in_file(label_reader)}|{_file_signature(path)}|{label_reader.shape}|{value}|{block}|"
           f"{max_points}|{seed}")
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    stem = path.name.split(".")[0]
    return inside(cache_dir, f"fg_{stem}_{digest}.npy")


def load_or_build_foreground_index(
    label_reader: VolumeReader,
    cache_dir: str | os.PathLike,
    *,
    value: int = 1,
    block: int = 64,
    max_points: int = 200_000,
    seed: int = 0,
    allowed: tuple[int, ...] | None = None,
) -> np.ndarray:
    """:func:`build_foreground_index`, cached as ``.npy`` in ``cache_dir`` (written atomically).

    A changed label file (size or mtime) or changed parameters give a new cache entry; an unreadable
    cache file is rebuilt.
    """
    params = dict(value=value, block=block, max_points=max_points, seed=seed)
    cache = foreground_cache_path(label_reader, cache_dir, **params)
    if allowed is not None:  # an index built with the check certifies the values too
        cache = cache.with_name(cache.stem + "_checked" + "".join(f"_{v}" for v in sorted(allowed)) + ".npy")
    if cache.is_file():
        try:
            points = np.load(cache, allow_pickle=False)
            if points.ndim == 2 and points.shape[1] == 3 and points.dtype == np.int32:
                logger.debug("%s: foreground index from cache %s", label_reader.path, cache)
                return points
        except (OSError, ValueError) as exc:
            logger.warning("%s: unreadable foreground cache (%s), rebuilding", cache, exc)
    check_parents(cache, "foreground index cache")
    points = build_foreground_index(label_reader, **params, allowed=allowed)
    with atomic_path(cache) as tmp:
        np.save(tmp, points)
    return points
