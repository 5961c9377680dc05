"""Lazy readers for 3D volumes of any size: NIfTI, TIFF (multi-page or a folder of slices), Zarr / OME-Zarr, npy.

Every reader exposes ``shape``, ``dtype``, ``spacing`` (z, y, x) and ``affine`` (4x4, (i, j, k) = (x, y, z)
-> world) and reads a (z, y, x) region with ``read(region)``, touching only the chunks / pages / bytes
the region needs where the format allows it. Open one with :func:`open_volume`.

Spacing comes from the file when it has it (NIfTI header, OME-Zarr ``coordinateTransformations``,
OME-TIFF / ImageJ TIFF metadata), else from the ``spacing`` argument (default 1, 1, 1).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import re
from pathlib import Path

import numpy as np
import tifffile
import zarr

from vesuvius_monai.data.ome_zarr import MissingChunks, leaves_out_empty_chunks, open_zarr_array
from vesuvius_monai.data.remote import RemoteAddress, RemoteOptions, as_location, is_remote, open_remote_store
from vesuvius_monai.data.regions import (  # noqa: F401  (re-exported: readers were their first home)
    Region,
    block_grid,
    format_region,
    normalize_region,
    region_shape,
)
from vesuvius_monai.data.tiff import check_one_channel, read_tiff_pages, tiff_memmappable, tiff_spacing
from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.io.memory import check_memory
from vesuvius_monai.io.nifti import is_nifti_path, load_nifti_image, spacing_to_affine

logger = logging.getLogger(__name__)

Spacing = tuple[float, float, float]

TIFF_SUFFIXES = (".tif", ".tiff")
ZARR_MARKERS = (".zarray", ".zgroup", "zarr.json")
LARGE_READ = 256 * 2**20  # reads of more bytes are first checked against the available memory


# ----------------------------------------------------------------------------------------------- readers


class VolumeReader:
    """A 3D volume on disk, read lazily region by region. Subclasses implement ``_read``.

    Attributes: ``path``, ``shape`` (z, y, x), ``dtype``, ``spacing`` (z, y, x) and ``affine`` (4x4).
    """

    def __init__(
        self,
        path: Path | RemoteAddress,
        shape: tuple[int, ...],
        dtype: np.dtype,
        spacing: Spacing,
        affine: np.ndarray | None = None,
    ) -> None:
        if len(shape) != 3:
            raise VesuviusError(f"{path}: expected a 3D volume (z, y, x), got shape {tuple(shape)}")
        self.path = path if isinstance(path, RemoteAddress) else Path(path)
        self.shape: tuple[int, int, int] = tuple(int(d) for d in shape)  # type: ignore[assignment]
        self.dtype = np.dtype(dtype)
        self.spacing: Spacing = tuple(float(s) for s in spacing)  # type: ignore[assignment]
        self.affine = spacing_to_affine(self.spacing) if affine is None else np.array(affine, dtype=np.float64)

    def read(self, region: Region | None = None) -> np.ndarray:
        """Read a (z, y, x) region (whole volume if None) into memory; returns an array of ``dtype``.

        Raises VesuviusError naming the file and the region when the data cannot be read, or would not fit the
        host's available memory.
        """
        region = normalize_region(region, self.shape)
        nbytes = math.prod(region_shape(region)) * self.dtype.itemsize
        if nbytes > LARGE_READ:
            check_memory(nbytes, f"{self.path}: reading region {format_region(region)} ({self.dtype})")
        try:
            data = self._read(region)
        except VesuviusError:
            raise
        except Exception as exc:  # corrupt chunk, truncated file, ... : the format's own error type
            raise VesuviusError(f"{self.path}: cannot read region {format_region(region)} ({exc})") from exc
        return np.ascontiguousarray(data)

    def _read(self, region: Region) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}({str(self.path)!r}, shape={self.shape}, dtype={self.dtype}, spacing={self.spacing})"


class NiftiReader(VolumeReader):
    """``.nii`` / ``.nii.gz`` via nibabel's lazy ``dataobj``; the file's (x, y, z) axes are reversed."""

    def __init__(self, path: Path) -> None:
        img = load_nifti_image(path)
        self._proxy = img.dataobj
        zooms = img.header.get_zooms()[:3]
        x, y, z = img.shape
        super().__init__(path, (z, y, x), self._probe_dtype(path, img), (zooms[2], zooms[1], zooms[0]), img.affine)

    @staticmethod
    def _probe_dtype(path: Path, img) -> np.dtype:
        """The dtype reads return: the stored one, or a float when the header scales the data."""
        if min(img.shape) == 0:
            return img.get_data_dtype()
        try:
            return np.asarray(img.dataobj[:1, :1, :1]).dtype
        except Exception as exc:  # data missing right after the header
            raise VesuviusError(f"{path}: cannot read NIfTI data ({exc})") from exc

    def _read(self, region: Region) -> np.ndarray:
        zs, ys, xs = region
        return np.asarray(self._proxy[xs, ys, zs]).transpose(2, 1, 0)


class TiffReader(VolumeReader):
    """A multi-page TIFF (first series, pages = z). Memory-mapped when uncompressed and contiguous,
    else read through tifffile's zarr store (only the strips/tiles touched), else page by page."""

    def __init__(self, path: Path, spacing: Spacing | None) -> None:
        try:
            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                shape, dtype = series.shape, series.dtype
                file_spacing = tiff_spacing(tif)
                check_one_channel(path, tif)
        except VesuviusError:
            raise
        except Exception as exc:
            raise VesuviusError(f"{path}: not a readable TIFF file ({exc})") from exc
        super().__init__(path, shape, dtype, _pick_spacing(path, file_spacing, spacing))
        self._mode = "memmap" if tiff_memmappable(path) else "zarr"

    def _read(self, region: Region) -> np.ndarray:
        if self._mode == "memmap":
            return np.array(tifffile.memmap(self.path, mode="r")[region])
        with tifffile.TiffFile(self.path) as tif:
            try:
                store = tif.aszarr(series=0, level=0)
                array = zarr.open_array(store, mode="r")
            except Exception as exc:  # layouts tifffile cannot expose as zarr
                logger.debug("%s: zarr store unavailable (%s), reading page by page", self.path, exc)
                return read_tiff_pages(tif, region)
            return np.asarray(array[region])


class TiffFolderReader(VolumeReader):
    """A folder of single-page ``.tif`` slices, one z per file in natural name order.

    Slice files carry no z spacing, so spacing comes from the ``spacing`` argument."""

    def __init__(self, path: Path, spacing: Spacing | None) -> None:
        self.files = sorted((p for p in path.iterdir() if p.suffix.lower() in TIFF_SUFFIXES), key=_natural_key)
        if not self.files:
            raise VesuviusError(f"{path}: folder holds no .tif/.tiff slices")
        try:
            with tifffile.TiffFile(self.files[0]) as tif:
                page_shape, dtype = tif.series[0].shape, tif.series[0].dtype
                check_one_channel(self.files[0], tif)
        except VesuviusError:
            raise
        except Exception as exc:
            raise VesuviusError(f"{self.files[0]}: not a readable TIFF slice ({exc})") from exc
        if len(page_shape) != 2:
            raise VesuviusError(f"{self.files[0]}: expected a 2D slice, got shape {tuple(page_shape)}")
        super().__init__(path, (len(self.files), *page_shape), dtype, _pick_spacing(path, None, spacing))

    def _read(self, region: Region) -> np.ndarray:
        zs, ys, xs = region
        out = np.empty(region_shape(region), dtype=self.dtype)
        for i, z in enumerate(range(zs.start, zs.stop)):
            out[i] = self._read_slice(self.files[z], ys, xs)
        return out

    def _read_slice(self, file: Path, ys: slice, xs: slice) -> np.ndarray:
        """Read rows ``ys`` and columns ``xs`` of one slice file, memory-mapped when possible."""
        try:
            if tiff_memmappable(file):
                page = tifffile.memmap(file, mode="r")
            else:
                page = tifffile.imread(file)
        except Exception as exc:
            raise VesuviusError(f"{file}: cannot read TIFF slice ({exc})") from exc
        if page.shape != self.shape[1:]:
            raise VesuviusError(f"{file}: slice shape {page.shape} differs from the first slice's {self.shape[1:]}")
        return np.asarray(page[ys, xs])


class ZarrReader(VolumeReader):
    """A zarr (v2 or v3) array, an array of a plain group (``key``), or a level of an OME-Zarr pyramid.

    Leading singleton axes (e.g. OME-Zarr (t, c, z, y, x) with t = c = 1) are dropped. Chunks missing from the
    store read as the fill value; ``missing_chunks`` (``data.missing_chunks``) says whether that warns (once),
    raises or stays silent (see :class:`vesuvius_monai.data.ome_zarr.MissingChunks`); a prediction store of this
    package leaves empty blocks out on purpose and is read silently.
    """

    def __init__(self, path: Path | RemoteAddress, spacing: Spacing | None, level: int = 0, key: str | None = None,
                 missing_chunks: str = "warn", remote: RemoteOptions | None = None) -> None:
        store = open_remote_store(path, remote or RemoteOptions()) if isinstance(path, RemoteAddress) else None
        self.store = store  # the ChunkCache of a remote volume (its ``stats``), else None
        array, file_spacing, translation = open_zarr_array(path, level, key, store)
        self._array = array
        self._lead = _leading_singletons(path, array.shape)
        if missing_chunks != "allow" and leaves_out_empty_chunks(path, store):
            missing_chunks = "allow"
        self._missing = MissingChunks(path, array, self._lead, missing_chunks)
        spacing_zyx = _pick_spacing(path, file_spacing, spacing)
        affine = spacing_to_affine(spacing_zyx)
        if translation is not None:
            affine[:3, 3] = translation[::-1]
        super().__init__(path, array.shape[self._lead :], array.dtype, spacing_zyx, affine)

    def chunks_of(self, region: Region) -> list[tuple[int, int, int]]:
        """The storage chunks (shards) a read of ``region`` (z, y, x) touches, as (z, y, x) chunk indices."""
        grid = self._missing.grid
        ranges = [range(s.start // c, -(-s.stop // c)) for s, c in zip(normalize_region(region, self.shape), grid)]
        return list(itertools.product(*ranges))  # type: ignore[arg-type]

    def chunk_key(self, chunk: tuple[int, int, int]) -> str:
        """The store key of a storage chunk (z, y, x), e.g. ``0/1.2.3``."""
        return self._missing.key(chunk)

    @property
    def chunk_bytes(self) -> int:
        """Bytes of one storage chunk, uncompressed."""
        return math.prod(self._missing.grid) * self.dtype.itemsize

    def _read(self, region: Region) -> np.ndarray:
        data = np.asarray(self._array[(0,) * self._lead + region])
        self._missing.check(region, data)
        return data


class NpyReader(VolumeReader):
    """A ``.npy`` file, memory-mapped (only the bytes of the region are read)."""

    def __init__(self, path: Path, spacing: Spacing | None) -> None:
        array = self._open(path)
        super().__init__(path, array.shape, array.dtype, _pick_spacing(path, None, spacing))

    @staticmethod
    def _open(path: Path) -> np.ndarray:
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as exc:
            raise VesuviusError(f"{path}: not a readable .npy file ({exc})") from exc

    def _read(self, region: Region) -> np.ndarray:
        return np.array(self._open(self.path)[region])


def open_volume(
    path: str | os.PathLike,
    *,
    spacing: Spacing | None = None,
    level: int = 0,
    key: str | None = None,
    missing_chunks: str = "warn",
    remote: RemoteOptions | None = None,
) -> VolumeReader:
    """Open a 3D volume lazily; the format is chosen from the name / folder contents.

    ``.nii``/``.nii.gz``, ``.tif``/``.tiff`` (multi-page), a folder of ``.tif`` slices, ``.zarr`` (array,
    plain group with ``key``, or OME-Zarr with pyramid ``level``) and ``.npy``. ``spacing`` (z, y, x) is
    used when the file carries none. ``missing_chunks`` (Zarr only): ``warn``, ``error`` or ``allow`` chunks
    missing from the store (see :class:`ZarrReader`). An ``http(s)://`` or ``s3://`` address (a string) is a remote
    Zarr / OME-Zarr, read through a chunk cache as ``remote`` says (default :class:`RemoteOptions`; see
    :mod:`vesuvius_monai.data.remote`). Raises VesuviusError naming the path for a missing, unknown,
    unreadable or non-3D volume (a colour TIFF included), or a NIfTI file too small for its header.
    """
    path = as_location(path)
    if isinstance(path, RemoteAddress):
        return ZarrReader(path, spacing, level=level, key=key, missing_chunks=missing_chunks, remote=remote)
    if not path.exists():
        raise VesuviusError(f"{path}: volume not found")
    kind = volume_kind(path)
    if kind == "nifti":
        if spacing is not None:
            logger.debug("%s: NIfTI spacing comes from its header; ignoring spacing=%s", path, spacing)
        return NiftiReader(path)
    if kind == "tiff":
        return TiffReader(path, spacing)
    if kind == "npy":
        return NpyReader(path, spacing)
    if kind == "zarr":
        return ZarrReader(path, spacing, level=level, key=key, missing_chunks=missing_chunks)
    if kind == "tiff_folder":
        return TiffFolderReader(path, spacing)
    raise VesuviusError(
        f"{path}: unknown volume format (expected .nii, .nii.gz, .tif/.tiff, a folder of .tif slices, .zarr or .npy)"
    )


def volume_kind(path: Path) -> str | None:
    """The format of the volume at ``path``: "nifti", "tiff", "npy", "zarr" (a folder named .zarr or holding Zarr
    metadata, or any remote address), "tiff_folder" (a folder holding TIFF slices), or None when it is no volume this
    package reads."""
    if is_remote(path):
        return "zarr"
    name = path.name.lower()
    if path.is_file():
        if is_nifti_path(name):
            return "nifti"
        if name.endswith(TIFF_SUFFIXES):
            return "tiff"
        return "npy" if name.endswith(".npy") else None
    if not path.is_dir():
        return None
    if name.endswith(".zarr") or any((path / m).exists() for m in ZARR_MARKERS):
        return "zarr"
    return "tiff_folder" if any(p.suffix.lower() in TIFF_SUFFIXES for p in path.iterdir()) else None


# ----------------------------------------------------------------------------------------------- percentiles


def sample_regions(shape: tuple[int, int, int], max_voxels: int, edge: int = 32) -> list[Region]:
    """Sub-blocks of edge ``edge`` spread evenly over the volume, ``max_voxels`` voxels in all at most.

    The whole volume is one region when it has no more than ``max_voxels`` voxels.
    """
    if math.prod(shape) <= max_voxels:
        return [tuple(slice(0, d) for d in shape)]  # type: ignore[list-item]
    edges = [min(edge, d) for d in shape]
    n_blocks = max(1, max_voxels // math.prod(edges))
    per_axis = max(1, int(n_blocks ** (1 / 3) + 1e-9))
    starts = [np.unique(np.linspace(0, d - e, per_axis).round().astype(int)) for d, e in zip(shape, edges)]
    return [
        tuple(slice(int(s), int(s) + e) for s, e in zip(corner, edges))  # type: ignore[misc]
        for corner in itertools.product(*starts)
    ]


SAMPLE_VOXELS = 2_000_000  # voxels sample_percentiles reads by default


def sample_percentiles(
    reader: VolumeReader, q: tuple[float, float] = (1.0, 99.0), max_voxels: int = SAMPLE_VOXELS
) -> tuple[float, float]:
    """Estimate two intensity percentiles of a volume of any size from at most ``max_voxels`` voxels.

    Reads a grid of small sub-blocks spread over the volume (exact when the volume is small enough).
    Raises VesuviusError naming the file when the sampled voxels contain NaN/inf, or for bad ``q``.
    """
    if len(q) != 2 or not 0.0 <= q[0] <= q[1] <= 100.0:
        raise VesuviusError(f"q must be two percentiles with 0 <= q[0] <= q[1] <= 100, got {q!r}")
    if max_voxels < 1:
        raise VesuviusError(f"max_voxels must be >= 1, got {max_voxels}")
    parts = [reader.read(r).ravel() for r in sample_regions(reader.shape, max_voxels)]
    sample = np.concatenate(parts).astype(np.float64)
    if sample.size == 0:
        raise VesuviusError(f"{reader.path}: volume is empty, shape {reader.shape}")
    if not np.isfinite(sample).all():
        raise VesuviusError(f"{reader.path}: volume contains NaN or infinite values")
    lo, hi = np.percentile(sample, q)
    return float(lo), float(hi)


# ----------------------------------------------------------------------------------------------- helpers


def _pick_spacing(path: Path, file_spacing: Spacing | None, spacing: Spacing | None) -> Spacing:
    """The file's spacing when it has one, else the argument, else (1, 1, 1); validated."""
    chosen = file_spacing if file_spacing is not None else (spacing if spacing is not None else (1.0, 1.0, 1.0))
    if file_spacing is not None and spacing is not None and not np.allclose(file_spacing, spacing):
        logger.warning("%s: using the file's spacing %s, not spacing=%s", path, tuple(file_spacing), tuple(spacing))
    try:
        spacing_to_affine(chosen)
    except VesuviusError as exc:
        raise VesuviusError(f"{path}: {exc}") from None
    return tuple(float(s) for s in chosen)  # type: ignore[return-value]


def _natural_key(path: Path) -> list:
    """Sort key so that ``2.tif`` comes before ``10.tif``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def _leading_singletons(path: Path, shape: tuple[int, ...]) -> int:
    """How many leading axes to drop to make ``shape`` 3D; they must all have size 1."""
    lead = len(shape) - 3
    if lead < 0 or any(d != 1 for d in shape[:lead]):
        raise VesuviusError(f"{path}: expected a 3D volume (z, y, x), got shape {tuple(shape)}")
    return lead
