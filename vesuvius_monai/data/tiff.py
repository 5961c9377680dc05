"""TIFF details of the readers: metadata spacing, one channel or not, memory-mapping, reading page by page."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import tifffile

from vesuvius_monai.data.regions import Region, region_shape
from vesuvius_monai.errors import VesuviusError

Spacing = tuple[float, float, float]


def read_tiff_pages(tif: tifffile.TiffFile, region: Region) -> np.ndarray:
    """Read a (z, y, x) region of an open multi-page TIFF page by page (only pages z in the region)."""
    zs, ys, xs = region
    pages = tif.series[0].pages
    out = np.empty(region_shape(region), dtype=tif.series[0].dtype)
    for i, z in enumerate(range(zs.start, zs.stop)):
        out[i] = pages[z].asarray()[ys, xs]
    return out


def check_one_channel(path: Path, tif: tifffile.TiffFile) -> None:
    """Raise a VesuviusError unless the TIFF is one-channel (grayscale): several samples per pixel (axis S, e.g.
    RGB) or several channels (axis C) would be taken for a spatial axis."""
    page, series = tif.pages[0], tif.series[0]
    if page.samplesperpixel > 1:
        raise VesuviusError(f"{path}: TIFF has {page.samplesperpixel} samples per pixel (photometric "
                            f"{page.photometric.name}); expected a one-channel (grayscale) volume")
    channels = series.shape[series.axes.index("C")] if "C" in series.axes else 1
    if channels > 1:
        raise VesuviusError(f"{path}: TIFF has {channels} channels (axes {series.axes}); expected one channel")


def tiff_memmappable(path: Path) -> bool:
    """True when tifffile can memory-map the file's first series (uncompressed, contiguous)."""
    try:
        tifffile.memmap(path, mode="r")
    except ValueError:
        return False
    return True


def tiff_spacing(tif: tifffile.TiffFile) -> Spacing | None:
    """(z, y, x) spacing from OME-TIFF PhysicalSize* or ImageJ ``spacing`` + resolution tags, else None."""
    if tif.is_ome and tif.ome_metadata:
        pixels = next((e for e in ET.fromstring(tif.ome_metadata).iter() if e.tag.endswith("Pixels")), None)
        sizes = [pixels.get(f"PhysicalSize{a}") for a in "ZYX"] if pixels is not None else [None]
        if all(s is not None for s in sizes):
            return tuple(float(s) for s in sizes)  # type: ignore[return-value]
    if tif.is_imagej and tif.imagej_metadata and "spacing" in tif.imagej_metadata:
        tags = tif.pages[0].tags
        x_res, y_res = tags.get("XResolution"), tags.get("YResolution")
        if x_res is not None and y_res is not None:
            (xn, xd), (yn, yd) = x_res.value, y_res.value
            return (float(tif.imagej_metadata["spacing"]), yd / yn, xd / xn)
    return None
