"""Opening the array of a Zarr store: a bare array, a member of a plain group, or a level of an OME-Zarr pyramid.

OME-Zarr 0.4 (``multiscales`` at the top level) and 0.5 (under ``ome``) are read; the spacing and translation
of the chosen level come from its ``coordinateTransformations`` (times the multiscale's global ones).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

from vesuvius_monai.errors import VesuviusError

Spacing = tuple[float, float, float]


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


def open_zarr_array(path: Path, level: int, key: str | None) -> tuple[zarr.Array, Spacing | None, np.ndarray | None]:
    """Open the zarr array to read.

    Returns (array, OME spacing (z, y, x) or None, OME translation (z, y, x) or None).
    """
    try:
        node = zarr.open(str(path), mode="r")
    except Exception as exc:
        raise VesuviusError(f"{path}: not a readable zarr array or group ({exc})") from exc
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
