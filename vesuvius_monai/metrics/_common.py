"""Input checks and small helpers shared by the metric modules.

Every metric takes ``pred`` (a binary mask, bool or 0/1 numbers) and ``label`` (values 0 background,
1 surface, ``ignore_index`` unlabeled), both 3D arrays (z, y, x) of the same shape. :func:`prepare_pair`
checks them and returns two boolean masks in which the ignored voxels are background in both,
which is what the competition's scorer does before computing any part of the score.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from vesuvius_monai.config.checks import integer, require
from vesuvius_monai.errors import VesuviusError


def _as_volume(array: np.ndarray, name: str) -> np.ndarray:
    """Return ``array`` as a NumPy array, raising unless it is a numeric 3D (z, y, x) volume."""
    array = np.asarray(array)
    if array.ndim != 3:
        raise VesuviusError(f"{name} must be a 3D (z, y, x) volume, got shape {array.shape}")
    if not (array.dtype == bool or np.issubdtype(array.dtype, np.number)):
        raise VesuviusError(f"{name} must hold numbers or booleans, got dtype {array.dtype}")
    return array


def _sample_values(values: np.ndarray, limit: int = 5) -> list:
    """Up to ``limit`` distinct values of a 1D array, for error messages."""
    return np.unique(values[: 100_000])[:limit].tolist()


def binary_mask(mask: np.ndarray, name: str = "mask") -> np.ndarray:
    """Check a binary 3D volume (bool or 0/1 numbers) and return it as bool, shape (z, y, x).

    Raises VesuviusError on NaN or on values other than 0 and 1 (threshold probabilities first).
    """
    mask = _as_volume(mask, name)
    if mask.dtype == bool:
        return mask
    if np.issubdtype(mask.dtype, np.floating) and np.isnan(mask).any():
        raise VesuviusError(f"{name} contains NaN values")
    bad = (mask != 0) & (mask != 1)
    if bad.any():
        raise VesuviusError(
            f"{name} must be a binary mask (bool or 0/1), found values {_sample_values(mask[bad])}; "
            "threshold it first"
        )
    return mask != 0


def prepare_pair(
    pred: np.ndarray, label: np.ndarray, ignore_index: int | None = 2
) -> tuple[np.ndarray, np.ndarray]:
    """Check a prediction/label pair and return boolean (pred, label) masks, both shape (z, y, x).

    ``label`` values must lie in {0, 1, ignore_index}; ``ignore_index`` is None or an integer other than 0 and 1.
    Voxels where ``label == ignore_index`` become background in both returned masks. The inputs are not modified.
    """
    if ignore_index is not None:
        require(integer("data.ignore_index", ignore_index) not in (0, 1), "data.ignore_index",
                f"must be None or differ from 0 and 1, got {ignore_index}")
    pred_bool = binary_mask(pred, "pred")
    label = _as_volume(label, "label")
    if pred_bool.shape != label.shape:
        raise VesuviusError(f"pred shape {pred_bool.shape} does not match label shape {label.shape}")
    if np.issubdtype(label.dtype, np.floating) and np.isnan(label).any():
        raise VesuviusError("label contains NaN values")
    allowed = (label == 0) | (label == 1)
    if ignore_index is not None:
        keep = label != ignore_index
        allowed |= ~keep
    if not allowed.all():
        expected = "{0, 1}" if ignore_index is None else f"{{0, 1, {ignore_index}}}"
        raise VesuviusError(f"label values must be in {expected}, found {_sample_values(label[~allowed])}")
    label_bool = label == 1
    if ignore_index is not None and not keep.all():
        pred_bool = pred_bool & keep
    return pred_bool, label_bool


def check_spacing(spacing: Sequence[float]) -> tuple[float, float, float]:
    """Return ``spacing`` as three positive finite floats (z, y, x), or raise VesuviusError."""
    try:
        values = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        raise VesuviusError(f"spacing must be three positive numbers (z, y, x), got {spacing!r}") from None
    if len(values) != 3 or not all(np.isfinite(v) and v > 0 for v in values):
        raise VesuviusError(f"spacing must be three positive numbers (z, y, x), got {spacing!r}")
    return values  # type: ignore[return-value]


def bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Smallest slices (z, y, x) holding every True voxel of ``mask``; None if it has none."""
    boxes = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        if hits.size == 0:
            return None
        boxes.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(boxes)


def check_tiles(tiles: Sequence[int], shape: tuple[int, ...]) -> tuple[int, int, int]:
    """Return ``tiles`` as three positive ints no larger than ``shape`` (z, y, x), or raise."""
    try:
        values = tuple(int(t) for t in tiles)
    except (TypeError, ValueError):
        raise VesuviusError(f"tiles must be three positive integers (z, y, x), got {tiles!r}") from None
    if len(values) != 3 or any(t < 1 for t in values):
        raise VesuviusError(f"tiles must be three positive integers (z, y, x), got {tiles!r}")
    if any(t > s for t, s in zip(values, shape)):
        raise VesuviusError(f"tiles {values} has more tiles than voxels along an axis of the volume {shape}")
    return values  # type: ignore[return-value]


def tile_slices(shape: tuple[int, ...], tiles: Sequence[int]) -> list[tuple[slice, ...]]:
    """Cut a volume of ``shape`` (z, y, x) into ``tiles`` pieces per axis, sizes differing by at most one.

    Pieces follow ``np.array_split``: the first ``n % t`` pieces along an axis get the extra voxel. ``tiles`` are
    three integers from 1 to the size of their axis (see :func:`check_tiles`).
    """
    per_axis = []
    for size, count in zip(shape, tiles):
        edges = np.cumsum([0] + [len(part) for part in np.array_split(np.arange(size), count)])
        per_axis.append([slice(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])])
    return [(sz, sy, sx) for sz in per_axis[0] for sy in per_axis[1] for sx in per_axis[2]]
