"""(z, y, x) regions of a volume: clipping, shapes, printing, and tiling into blocks.

A region is a tuple of three step-1 slices with non-negative bounds once normalised.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from numbers import Integral

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


class BlockIndices(Sequence[Triple]):
    """The (z, y, x) indices of a grid of ``counts`` (z, y, x) blocks per axis, in C order, made on demand: a grid
    of any size takes no memory. Supports ``len``, iteration, indexing (negative too; a slice gives a list), ``in``."""

    def __init__(self, counts: Triple) -> None:
        self.counts: Triple = tuple(int(c) for c in counts)  # type: ignore[assignment]

    def __len__(self) -> int:
        return math.prod(self.counts)

    def __iter__(self) -> Iterator[Triple]:
        nz, ny, nx = self.counts  # not itertools.product: it would hold every axis's range as a tuple
        return ((z, y, x) for z in range(nz) for y in range(ny) for x in range(nx))

    def __contains__(self, index: object) -> bool:
        return (isinstance(index, tuple) and len(index) == len(self.counts)
                and all(isinstance(i, Integral) and 0 <= i < c for i, c in zip(index, self.counts)))

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"block {i} out of range for a grid of {n} blocks")
        flat, index = i % n, []
        for c in reversed(self.counts):
            flat, j = divmod(flat, c)
            index.append(j)
        return tuple(reversed(index))

    def __repr__(self) -> str:
        return f"BlockIndices({self.counts})"


class BlockGrid(Sequence[tuple[Triple, Region]]):
    """``(block_index, region)`` of every block of a (z, y, x) volume tiled with ``block``, in C order, made on
    demand (see :class:`BlockIndices`); the last block along each axis is cut at the border."""

    def __init__(self, shape: Triple, block: Triple) -> None:
        self.shape: Triple = tuple(int(d) for d in shape)  # type: ignore[assignment]
        self.block: Triple = tuple(int(b) for b in block)  # type: ignore[assignment]
        self.indices = BlockIndices(tuple(math.ceil(d / b) for d, b in zip(self.shape, self.block)))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[tuple[Triple, Region]]:
        return (self._item(index) for index in self.indices)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self._item(index) for index in self.indices[i]]
        return self._item(self.indices[i])

    def _item(self, index: Triple) -> tuple[Triple, Region]:
        region = tuple(slice(i * b, min((i + 1) * b, d)) for i, b, d in zip(index, self.block, self.shape))
        return index, region  # type: ignore[return-value]


def block_grid(shape: tuple[int, int, int], block: tuple[int, int, int]) -> BlockGrid:
    """Tile a (z, y, x) volume with blocks; the last block along each axis is cut at the border.

    Returns the sequence ``[(block_index, region), ...]`` in C order, made on demand (no memory per block, whatever
    the volume's size); every voxel is in exactly one region.
    """
    if any(int(b) < 1 for b in block):
        raise VesuviusError(f"block size must be >= 1 along every axis, got {tuple(block)}")
    return BlockGrid(shape, block)
