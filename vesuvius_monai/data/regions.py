"""(z, y, x) regions of a volume: clipping, shapes, printing, and tiling into blocks.

A region is a tuple of three step-1 slices with non-negative bounds once normalised.
"""

from __future__ import annotations

import itertools
import math

from vesuvius_monai.errors import VesuviusError

Region = tuple[slice, slice, slice]
Triple = tuple[int, int, int]


def normalize_region(region: Region | None, shape: tuple[int, int, int]) -> Region:
    """Clip a (z, y, x) tuple of slices to ``shape``; None means the whole volume.

    Slices may have None / negative bounds (Python semantics) but only step None or 1.
    """
    if region is None:
        return tuple(slice(0, d) for d in shape)  # type: ignore[return-value]
    if len(region) != 3 or not all(isinstance(s, slice) for s in region):
        raise VesuviusError(f"region must be a tuple of three slices (z, y, x), got {region!r}")
    out = []
    for s, d in zip(region, shape):
        if s.step not in (None, 1):
            raise VesuviusError(f"region slices must have step 1, got {s!r}")
        start, stop, _ = s.indices(d)
        out.append(slice(start, max(start, stop)))
    return tuple(out)  # type: ignore[return-value]


def region_shape(region: Region) -> Triple:
    """Shape (z, y, x) of a normalised region."""
    return tuple(s.stop - s.start for s in region)  # type: ignore[return-value]


def format_region(region: Region) -> str:
    """Human-readable region, e.g. ``z=0:16, y=0:16, x=32:48``."""
    return ", ".join(f"{a}={s.start}:{s.stop}" for a, s in zip("zyx", region))


def shift_region(region: Region, offset: tuple[int, ...]) -> Region:
    """``region`` moved by ``offset`` (z, y, x): bounds + offset."""
    return tuple(slice(s.start + o, s.stop + o) for s, o in zip(region, offset))  # type: ignore[return-value]


def intersect(a: Region, b: Region) -> Region | None:
    """The overlap of two regions, or None when they share no voxel."""
    out = tuple(slice(max(p.start, q.start), min(p.stop, q.stop)) for p, q in zip(a, b))
    return out if all(s.start < s.stop for s in out) else None  # type: ignore[return-value]


def relative(region: Region, origin: Region) -> Region:
    """``region`` in the coordinates of ``origin`` (whose first voxel becomes 0)."""
    return shift_region(region, tuple(-s.start for s in origin))


def block_grid(shape: tuple[int, int, int], block: tuple[int, int, int]) -> list[tuple[Triple, Region]]:
    """Tile a (z, y, x) volume with blocks; the last block along each axis is cut at the border.

    Returns ``[(block_index, region), ...]`` in C order; every voxel is in exactly one region.
    """
    if any(int(b) < 1 for b in block):
        raise VesuviusError(f"block size must be >= 1 along every axis, got {tuple(block)}")
    counts = [math.ceil(d / b) for d, b in zip(shape, block)]
    grid = []
    for index in itertools.product(*(range(c) for c in counts)):
        region = tuple(slice(i * b, min((i + 1) * b, d)) for i, b, d in zip(index, block, shape))
        grid.append((tuple(index), region))
    return grid  # type: ignore[return-value]
