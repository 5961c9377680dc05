"""Opening the array of a Zarr store: a bare array, a member of a plain group, or a level of an OME-Zarr pyramid;
and noticing the chunks missing from a store.

OME-Zarr 0.4 (``multiscales`` at the top level) and 0.5 (under ``ome``) are read; the spacing and translation
of the chosen level come from its ``coordinateTransformations`` (times the multiscale's global ones).

Zarr reads a chunk whose file is missing as the array's fill value, without a word. :class:`MissingChunks` looks
for such chunks among those a read filled with the fill value alone (a chunk holding any other value exists), asks
the store once per chunk, and warns, raises or stays silent as ``data.missing_chunks`` says.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import numpy as np
import zarr
from zarr.core.sync import sync

from vesuvius_monai.data.regions import Region, format_region
from vesuvius_monai.errors import VesuviusError

logger = logging.getLogger(__name__)

Spacing = tuple[float, float, float]
PREDICTION_KEY = "vesuvius_prediction"  # attrs of a prediction store (io.zarr_store), which leaves empty blocks out


def _ome_multiscales(attrs: dict) -> list | None:
    """The OME-Zarr ``multiscales`` list (v0.4 top level or v0.5 under ``ome``), or None."""
    if "multiscales" in attrs:
        return attrs["multiscales"]
    ome = attrs.get("ome")
    return ome.get("multiscales") if isinstance(ome, dict) else None


def _ome_transform(transforms: list | None, kind: str) -> list[float] | None:
    """The ``scale`` or ``translation`` vector of an OME coordinateTransformations list, or None."""
    for t in transforms or []:
        if t.get("type") == kind and kind in t:
            return [float(v) for v in t[kind]]
    return None


def open_zarr_array(path: Path, level: int, key: str | None,
                    store=None) -> tuple[zarr.Array, Spacing | None, np.ndarray | None]:
    """Open the zarr array to read (from ``store`` when given: a remote store of the address ``path``).

    Returns (array, OME spacing (z, y, x) or None, OME translation (z, y, x) or None).
    """
    node = open_zarr_node(path, store)
    if isinstance(node, zarr.Array):
        return node, None, None
    multiscales = _ome_multiscales(dict(node.attrs))
    if key is not None:
        return _group_member(path, node, key), None, None
    if multiscales:
        return _ome_level(path, node, multiscales[0], level)
    arrays = sorted(node.array_keys())
    if len(arrays) != 1:
        raise VesuviusError(f"{path}: zarr group holds arrays {arrays}; pass key= to choose one")
    return node[arrays[0]], None, None


def open_zarr_node(path: Path, store=None) -> zarr.Array | zarr.Group:
    """The zarr array or group at ``path`` (or in ``store``), read-only; VesuviusError naming the path when it is
    neither."""
    try:
        return zarr.open(store if store is not None else str(path), mode="r")
    except VesuviusError:
        raise
    except Exception as exc:
        if store is not None:
            raise VesuviusError(f"{path}: no Zarr array or group at this address ({type(exc).__name__})") from exc
        raise VesuviusError(f"{path}: not a readable zarr array or group ({exc})") from exc


def leaves_out_empty_chunks(path: Path, store=None) -> bool:
    """True for a store written to leave chunks of the fill value out (a prediction store of this package)."""
    node = open_zarr_node(path, store)
    return PREDICTION_KEY in node.attrs


def _group_member(path: Path, group: zarr.Group, key: str) -> zarr.Array:
    """The array ``key`` of a zarr group, or VesuviusError naming the path and the available arrays."""
    try:
        member = group[key]
    except KeyError:
        raise VesuviusError(f"{path}: zarr group has no array {key!r}; it holds {sorted(group.array_keys())}") from None
    if not isinstance(member, zarr.Array):
        raise VesuviusError(f"{path}: {key!r} is a zarr group, not an array")
    return member


def _ome_level(
    path: Path, group: zarr.Group, multiscale: dict, level: int
) -> tuple[zarr.Array, Spacing | None, np.ndarray | None]:
    """Array, spacing and translation of pyramid ``level`` of one OME-Zarr multiscale."""
    datasets = multiscale.get("datasets", [])
    if not 0 <= level < len(datasets):
        raise VesuviusError(f"{path}: level={level} out of range; the OME-Zarr pyramid has {len(datasets)} levels")
    dataset = datasets[level]
    array = _group_member(path, group, dataset["path"])
    scale = _ome_transform(dataset.get("coordinateTransformations"), "scale")
    shift = _ome_transform(dataset.get("coordinateTransformations"), "translation")
    global_scale = _ome_transform(multiscale.get("coordinateTransformations"), "scale")
    if scale is not None and global_scale is not None:
        scale = [a * b for a, b in zip(scale, global_scale)]
    spacing = tuple(scale[-3:]) if scale is not None and len(scale) >= 3 else None
    translation = np.array(shift[-3:], dtype=np.float64) if shift is not None and len(shift) >= 3 else None
    return array, spacing, translation  # type: ignore[return-value]


class MissingChunks:
    """The chunks of ``array`` missing from its store, noticed read by read (see the module docstring).

    ``path``: the store, for messages; ``lead``: leading singleton axes the reader drops; ``mode``: ``warn`` (a
    warning, once, with the count and the first missing chunk), ``error`` (VesuviusError) or ``allow`` (silent).
    Each chunk is asked for once: the answers are kept.
    """

    def __init__(self, path: Path, array: zarr.Array, lead: int, mode: str) -> None:
        self.path, self.array, self.lead, self.mode = path, array, lead, mode
        self.grid = tuple((array.shards or array.chunks)[lead:])  # the chunks the store holds files for
        self.fill = array.fill_value if array.fill_value is not None else 0
        self.fill_is_nan = np.asarray(self.fill).dtype.kind == "f" and bool(np.isnan(self.fill))
        self.known: dict[tuple[int, ...], bool] = {}  # storage chunk -> exists
        self.warned = False

    def check(self, region: Region, data: np.ndarray) -> None:
        """Look for missing chunks among those ``region`` (z, y, x) touches that ``data`` (its values) shows as all
        fill value; warn or raise as ``mode`` says."""
        if self.mode == "allow" or not self._holds_fill(data).any():
            return
        missing = [c for c in self._filled_chunks(region, data) if not self._exists(c)]
        if not missing:
            return
        first = self.key(missing[0])
        if self.mode == "error":
            raise VesuviusError(f"{self.path}: chunk {first} is missing from the store ({len(missing)} missing in "
                                f"region {format_region(region)}); an unfinished download or copy? Complete the "
                                f"store, or set data.missing_chunks=warn (or allow) to read them as {self.fill}")
        if not self.warned:
            self.warned = True
            logger.warning("%s: %d of the chunks of region %s are missing from the store (first: %s) and read as "
                           "%s: an unfinished download or copy? data.missing_chunks=error stops on them, allow reads "
                           "them silently; this warning is given once per volume", self.path, len(missing),
                           format_region(region), first, self.fill)

    def _holds_fill(self, data: np.ndarray) -> np.ndarray:
        return np.isnan(data) if self.fill_is_nan else data == self.fill

    def _filled_chunks(self, region: Region, data: np.ndarray) -> list[tuple[int, ...]]:
        """Storage chunks touched by ``region`` whose part of ``data`` is all fill value, not yet known to exist."""
        ranges = [range(s.start // c, -(-s.stop // c)) for s, c in zip(region, self.grid)]
        out = []
        for chunk in itertools.product(*ranges):
            part = tuple(slice(max(s.start, i * c) - s.start, min(s.stop, (i + 1) * c) - s.start)
                         for s, i, c in zip(region, chunk, self.grid))
            if not self.known.get(chunk, False) and self._holds_fill(data[part]).all():
                out.append(chunk)
        return out

    def key(self, chunk: tuple[int, ...]) -> str:
        """The store key of a storage chunk (z, y, x), e.g. ``0/c/0/1/2``."""
        key = self.array.metadata.encode_chunk_key((0,) * self.lead + tuple(chunk))
        prefix = self.array.store_path.path
        return f"{prefix}/{key}" if prefix else key

    def _exists(self, chunk: tuple[int, ...]) -> bool:
        if chunk not in self.known:
            self.known[chunk] = bool(sync(self.array.store_path.store.exists(self.key(chunk))))
        return self.known[chunk]
