"""Sheet hole patching (after the 1st place of the surface-detection competition): each sheet's holes are filled by
interpolating its height map, and a patch that makes the sheet's topology worse is rejected.

For each ``connectivity``-connected component (a sheet), within its bounding box:

1. the dominant axis is the one along which the sheet's projection (``comp.any(axis)``) has the largest area;
2. each projected column has a height (mean position of its voxels along that axis) and a thickness (its count);
3. the holes are the background pixels of the projection enclosed by it (2D, 4-connected background);
4. every hole pixel gets height and thickness by linear interpolation between the nearest sheet pixels of its row,
   and of its column; the two are averaged, each weighted by the inverse of its distance to the nearer of its two
   sheet pixels; the patch is the voxels ``round(h - (t - 1) / 2) .. round(h + (t - 1) / 2)`` of those columns,
   where they are background and touch no other component, and only those connected to the sheet;
5. all patches of the sheet are tried at once, and when that makes the sheet worse, each hole's patch alone. A patch
   is kept only when none of the sheet's Betti numbers (components, tunnels, cavities; foreground ``connectivity``,
   18 counted as 26) grows.
"""

from __future__ import annotations

import cc3d
import numpy as np
from scipy import ndimage
from skimage.measure import euler_number

from vesuvius_monai.metrics.components import CONNECTIVITY_RANK
from vesuvius_monai.postprocess.operators import attached

Betti = tuple[int, int, int]


def patch_holes(mask: np.ndarray, connectivity: int = 26) -> np.ndarray:
    """Fill the holes of each sheet of a bool (Z, Y, X) mask by height-map interpolation (module docstring); bool."""
    labels = cc3d.connected_components(mask, connectivity=connectivity)
    stats = cc3d.statistics(labels)
    element = ndimage.generate_binary_structure(3, CONNECTIVITY_RANK[connectivity])
    out = mask.copy()
    for i in range(1, len(stats["voxel_counts"])):
        box = tuple(slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(stats["bounding_boxes"][i],
                                                                                   mask.shape))
        crop = labels[box]
        sheet = crop == i
        patches = _hole_patches(sheet)
        if not patches:
            continue
        free = (crop == 0) & ~ndimage.binary_dilation((crop != 0) & (crop != i), element)
        out[box] |= _accepted(sheet, [attached(sheet, p & free, connectivity) for p in patches], connectivity)
    return out


def _accepted(sheet: np.ndarray, patches: list[np.ndarray], connectivity: int) -> np.ndarray:
    """The union of ``patches`` (bool, the sheet's box) if it keeps the sheet's Betti numbers from growing, else the
    union of the patches that do so one by one (each tested on the sheet alone)."""
    before = betti(sheet, connectivity)
    whole = np.logical_or.reduce(patches)
    if _not_worse(betti(sheet | whole, connectivity), before):
        return whole
    kept = np.zeros_like(sheet)
    for patch in patches if len(patches) > 1 else []:
        if patch.any() and _not_worse(betti(sheet | patch, connectivity), before):
            kept |= patch
    return kept


def _not_worse(after: Betti, before: Betti) -> bool:
    return all(a <= b for a, b in zip(after, before))


def betti(mask: np.ndarray, connectivity: int = 26) -> Betti:
    """(b0, b1, b2) of a bool (Z, Y, X) mask surrounded by background, foreground ``connectivity``-connected (18 is
    counted as 26), the background with the complementary 6 / 26: as
    :func:`vesuvius_monai.metrics.betti.betti_of_mask` (tested), with cc3d labels."""
    fg, bg = (6, 26) if connectivity == 6 else (26, 6)
    b0 = int(cc3d.connected_components(mask, connectivity=fg, return_N=True)[1])
    background = cc3d.connected_components(~mask, connectivity=bg)
    inner = np.ones(int(background.max()) + 1, dtype=bool)
    for axis in range(3):
        for index in (0, -1):
            inner[np.take(background, index, axis=axis)] = False
    inner[0] = False
    b2 = int(np.count_nonzero(inner))
    return b0, b0 + b2 - int(euler_number(mask, connectivity=1 if fg == 6 else 3)), b2


def _hole_patches(sheet: np.ndarray) -> list[np.ndarray]:
    """One bool patch (the shape of ``sheet``) per enclosed hole of the sheet's projection on its dominant axis."""
    axis = int(np.argmax([np.count_nonzero(sheet.any(axis=a)) for a in range(3)]))
    moved = np.moveaxis(sheet, axis, 0)  # (A, U, V)
    count = moved.sum(axis=0)
    known = count > 0
    holes, n = ndimage.label(ndimage.binary_fill_holes(known) & ~known)
    if n == 0:
        return []
    position = np.arange(moved.shape[0]).reshape(-1, 1, 1)
    height = np.where(known, (moved * position).sum(axis=0) / np.maximum(count, 1), 0.0)
    h, t = _interpolate(np.stack([height, count.astype(float)]), known)
    low, high = np.rint(h - (t - 1) / 2), np.rint(h + (t - 1) / 2)
    column = (position >= low) & (position <= high)  # (A, U, V)
    return [np.moveaxis(column & (holes == k), 0, axis) for k in range(1, n + 1)]


def _interpolate(values: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Fill ``values`` (C, U, V) where not ``known`` (U, V) by the inverse-distance-weighted mean of the linear
    interpolations along U and along V between the nearest known pixels (enclosed pixels have them on both sides)."""
    estimates, weights = [], []
    for axis in (1, 2):
        value, gap = _along(np.moveaxis(values, axis, -1), np.moveaxis(known, axis - 1, -1))
        estimates.append(np.moveaxis(value, -1, axis))
        weights.append(np.moveaxis(1.0 / np.maximum(gap, 1), -1, axis - 1))
    with np.errstate(invalid="ignore", divide="ignore"):  # (pixels not enclosed: NaN, never used)
        return (estimates[0] * weights[0] + estimates[1] * weights[1]) / (weights[0] + weights[1])


def _along(values: np.ndarray, known: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Linear interpolation along the last axis between the nearest known pixels before and after each pixel.

    values (C, ..., N), known (..., N) -> (interpolated values (C, ..., N), distance to the nearer known pixel
    (..., N), infinite where a side has none; there the value is the known one of the other side, or 0).
    """
    n = known.shape[-1]
    index = np.arange(n)
    before = np.maximum.accumulate(np.where(known, index, -1), axis=-1)
    after = np.flip(np.minimum.accumulate(np.flip(np.where(known, index, n), axis=-1), axis=-1), axis=-1)
    lo, hi = np.clip(before, 0, n - 1), np.clip(after, 0, n - 1)
    v_lo, v_hi = np.take_along_axis(values, lo[None], -1), np.take_along_axis(values, hi[None], -1)
    has_lo, has_hi = before >= 0, after < n
    span = np.where(has_lo & has_hi, np.maximum(after - before, 1), 1)  # (0 on a known pixel)
    frac = np.where(has_lo & has_hi, (index - before) / span, np.where(has_lo, 0.0, 1.0))
    value = v_lo + (v_hi - v_lo) * frac
    gap = np.where(has_lo & has_hi, np.minimum(index - before, after - index), np.inf).astype(float)
    return np.where(has_lo | has_hi, value, 0.0), gap
