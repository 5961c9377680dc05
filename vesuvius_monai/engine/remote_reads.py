"""What a prediction reads from a remote volume, planned before it starts, so that each chunk is fetched once.

The reads of a run are known in advance: the percentile sample (:func:`~vesuvius_monai.data.readers.sample_regions`)
then each block's input (its extent, see :mod:`vesuvius_monai.engine.windows`) in the engine's block order (C
order, see :mod:`vesuvius_monai.engine.blockwise`). A block's extent reaches into its successors, so the chunks of
that halo are read again by up to 7 later blocks, the last of them a z-plane of blocks later.
:func:`plan_remote_reads` hands the chunk cache every planned read
(:meth:`~vesuvius_monai.data.chunk_cache.ChunkCache.expect`): the memory cache then drops the chunks no later read
needs first, and a chunk is fetched once as long as the chunks still needed fit (:func:`peak_live_chunks`, logged,
with a warning when ``data.remote_cache_mb`` is smaller and no ``data.remote_cache_dir`` is set).
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Iterable, Iterator

from vesuvius_monai.data.readers import SAMPLE_VOXELS, VolumeReader, sample_regions
from vesuvius_monai.data.regions import Region, Triple, intersect, shift_region
from vesuvius_monai.engine.windows import WindowGrid

logger = logging.getLogger(__name__)

Chunk = tuple[int, int, int]


def block_input(grid: WindowGrid, roi: Region, index: Triple, written: Region | None = None) -> Region | None:
    """The volume region the engine reads for block ``index`` of ``grid`` over ``roi`` (the block's extent inside
    the volume; with ``written``, the part of the volume being predicted, only where the windows touching it reach:
    :func:`~vesuvius_monai.engine.blockwise.run_blocks`), or None when nothing is read for it."""
    if not grid.n_own_windows(index):
        return None
    part = intersect(grid.extent(index), grid.inside)
    if part is not None and written is not None:
        part = intersect(part, grid.reach(shift_region(written, grid.pad_lo)))
    if part is None:
        return None
    return shift_region(part, tuple(r.start - p for r, p in zip(roi, grid.pad_lo)))


def planned_reads(reader: VolumeReader, grid: WindowGrid, roi: Region, blocks: Iterable[Triple],
                  sample: bool = True, written: Region | None = None) -> Iterator[list[Chunk]]:
    """The chunks of each read of a run, in order: the percentile sample's (when ``sample``), then each block's."""
    if sample:
        for region in sample_regions(reader.shape, SAMPLE_VOXELS):
            yield reader.chunks_of(region)  # type: ignore[attr-defined]
    for index in blocks:
        region = block_input(grid, roi, index, written)
        if region is not None:
            yield reader.chunks_of(region)  # type: ignore[attr-defined]


def peak_live_chunks(reads: list[list[Chunk]]) -> int:
    """The most chunks held at once by a cache that keeps a chunk from its first read to its last and no longer:
    with room for that many, each chunk of ``reads`` is fetched once."""
    left = Counter(c for read in reads for c in read)
    held: set[Chunk] = set()
    peak = 0
    for read in reads:
        held.update(read)
        peak = max(peak, len(held))
        for chunk in read:
            left[chunk] -= 1
            if not left[chunk]:
                held.discard(chunk)
    return peak


def plan_remote_reads(reader: VolumeReader, grid: WindowGrid, roi: Region, blocks: list[Triple], cache_mb: float,
                      cache_dir: str | None, written: Region | None = None) -> None:
    """Tell the chunk cache of a remote ``reader`` the reads of this run (``blocks``, in order, after the percentile
    sample); log the memory it needs to fetch each chunk once, warning when ``cache_mb`` is less and there is no
    ``cache_dir``. Nothing for a local volume."""
    store = getattr(reader, "store", None)
    if store is None:
        return
    reads = list(planned_reads(reader, grid, roi, blocks, written=written))
    store.expect(reader.chunk_key(c) for read in reads for c in read)  # type: ignore[attr-defined]
    size = reader.chunk_bytes  # type: ignore[attr-defined]
    needed_mb = peak_live_chunks(reads) * size / 2**20
    unique = len({c for read in reads for c in read})
    logger.info("%s: %d chunks to read (%.0f MiB uncompressed); fetching each once takes a memory cache of up to "
                "%.0f MiB (data.remote_cache_mb=%g%s)", reader.path, unique, unique * size / 2**20, needed_mb,
                cache_mb, f", disk cache {cache_dir}" if cache_dir else "")
    if needed_mb > cache_mb and not cache_dir:
        logger.warning("%s: data.remote_cache_mb=%g may be too small to fetch each chunk once (up to %.0f MiB needed, "
                       "less when the chunks are compressed): raise it, or set data.remote_cache_dir", reader.path,
                       cache_mb, needed_mb)


def log_fetched(reader: VolumeReader) -> None:
    """One line: what the run fetched from a remote ``reader``'s store (nothing for a local volume)."""
    store = getattr(reader, "store", None)
    if store is not None:
        stats = store.stats
        logger.info("%s: fetched %.1f MiB in %d requests (%d missing chunks, %d retried tries, %d chunks from the disk "
                    "cache)", reader.path, stats["bytes"] / 2**20, stats["requests"], stats["missing"],
                    stats["retried"], stats["disk_hits"])
