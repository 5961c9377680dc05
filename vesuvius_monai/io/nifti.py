"""NIfTI input/output with the project's (z, y, x) axis order.

NIfTI stores voxel axes (i, j, k) = (x, y, z). Arrays in this project are (z, y, x), so the reader
reverses the axes and the writer reverses them back. The 4x4 ``affine`` is always the file's own
(i, j, k) -> world matrix and passes through unchanged.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import nibabel as nib
import numpy as np

from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.io.atomic import atomic_path, check_replaceable_file
from vesuvius_monai.io.memory import format_bytes

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti_path(path: str | os.PathLike) -> bool:
    """True when the file name ends in ``.nii`` or ``.nii.gz``."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def spacing_to_affine(spacing_zyx: tuple[float, float, float]) -> np.ndarray:
    """4x4 affine ``diag(sx, sy, sz, 1)`` for a (z, y, x) spacing; all spacings must be finite and > 0."""
    spacing = tuple(float(s) for s in spacing_zyx)
    if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise VesuviusError(f"spacing must be three finite numbers > 0 in (z, y, x) order, got {spacing_zyx!r}")
    return np.diag([spacing[2], spacing[1], spacing[0], 1.0])


def affine_to_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """(z, y, x) voxel spacing from a 4x4 (i, j, k) -> world affine: norms of the first three columns, reversed."""
    zooms = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    return (float(zooms[2]), float(zooms[1]), float(zooms[0]))


def load_nifti_image(path: str | os.PathLike) -> nib.Nifti1Image:
    """Open a NIfTI file lazily (header only; data stay on disk, uncompressed files are memory-mapped).

    Raises VesuviusError naming the file when it is missing, unreadable or not 3D, or when it cannot hold the data
    its header claims (a truncated ``.nii``, a ``.nii.gz`` too small by far).
    """
    path = Path(path)
    if not path.is_file():
        raise VesuviusError(f"{path}: NIfTI file not found")
    try:
        img = nib.load(str(path), mmap="r")
    except Exception as exc:  # nibabel raises many types for a bad header
        raise VesuviusError(f"{path}: not a readable NIfTI file ({exc})") from exc
    if len(img.shape) != 3:
        raise VesuviusError(f"{path}: expected a 3D NIfTI volume, got shape {tuple(img.shape)} (x, y, z, ...)")
    _check_data_size(path, img)
    return img


# deflate (gzip) expands at most about 1032:1; a compressed file claiming more data than that is damaged or hostile
MAX_DEFLATE_RATIO = 1032


def _check_data_size(path: Path, img: nib.Nifti1Image) -> None:
    """Raise VesuviusError when the file cannot hold the data its header claims: an uncompressed ``.nii`` shorter
    than its data (truncated), or a ``.nii.gz`` claiming more than :data:`MAX_DEFLATE_RATIO` times its size."""
    header = img.header
    needed = int(header.get_data_offset()) + math.prod(img.shape) * header.get_data_dtype().itemsize
    size = path.stat().st_size
    if not str(path).lower().endswith(".gz"):
        if size < needed:
            raise VesuviusError(f"{path}: NIfTI file is truncated ({size} bytes, header needs {needed})")
        return
    if needed > MAX_DEFLATE_RATIO * size + 1024:  # + the gzip header and a little slack
        shape = "x".join(str(d) for d in img.shape)
        raise VesuviusError(f"{path}: NIfTI header claims {shape} voxels of {header.get_data_dtype()} "
                            f"({format_bytes(needed)}), more than a gzip file of {format_bytes(size)} can hold "
                            f"(at most {format_bytes(MAX_DEFLATE_RATIO * size)}); the header is damaged")


def read_nifti_header_spacing(path: str | os.PathLike) -> tuple[float, float, float]:
    """(z, y, x) voxel spacing from a NIfTI header's pixdim (zooms reversed); reads the header only."""
    zooms = load_nifti_image(path).header.get_zooms()[:3]
    return (float(zooms[2]), float(zooms[1]), float(zooms[0]))


def read_nifti(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a whole 3D NIfTI volume.

    Returns ``(array, affine)``: array (z, y, x) in the file's stored dtype (float when the header has a
    scale slope/intercept), affine the file's 4x4 (i, j, k) -> world matrix.
    """
    img = load_nifti_image(path)
    try:
        data = np.asarray(img.dataobj)
    except Exception as exc:  # truncated .nii.gz, bad gzip stream, ...
        raise VesuviusError(f"{path}: cannot read NIfTI data ({exc})") from exc
    return np.ascontiguousarray(data.transpose(2, 1, 0)), np.array(img.affine, dtype=np.float64)


# The header description of every NIfTI file that ``predict`` writes: such a file may be replaced by a later run.
PREDICTION_MARK = "vesuvius_monai prediction"


def check_replaceable_nifti(path: str | os.PathLike, flag: str) -> None:
    """Raise unless ``path`` is free or a NIfTI file that ``predict`` wrote (header ``descrip`` =
    :data:`PREDICTION_MARK`): a command never replaces a file it did not write. ``flag`` names the option."""
    check_replaceable_file(
        path, lambda p: bytes(nib.load(str(p)).header["descrip"]).rstrip(b"\0").decode() == PREDICTION_MARK,
        f"{flag} {path} already exists and was not written by predict or resample; choose another name or move it "
        f"away "
        f"(nothing was written)")


def write_nifti(
    path: str | os.PathLike,
    array_zyx: np.ndarray,
    *,
    affine: np.ndarray | None = None,
    spacing: tuple[float, float, float] | None = None,
    dtype: str | np.dtype | None = None,
    description: str = "",
) -> Path:
    """Write a (z, y, x) array as a NIfTI-1 file atomically; returns the path.

    ``affine`` (4x4, (i, j, k) -> world, i.e. x first) is stored unchanged; without it the affine is
    ``diag(sx, sy, sz, 1)`` from ``spacing`` (z, y, x), default 1. Header zooms follow the affine.
    ``dtype`` casts the data first (bool is stored as uint8). The path must end in .nii or .nii.gz.
    ``description`` goes to the header's ``descrip`` field (at most 80 bytes), e.g. :data:`PREDICTION_MARK`.
    """
    path = Path(path)
    if not is_nifti_path(path):
        raise VesuviusError(f"{path}: NIfTI output name must end in .nii or .nii.gz")
    data = _nifti_data(path, array_zyx, dtype)
    matrix = _resolve_affine(path, affine, spacing)
    img = nib.Nifti1Image(data.transpose(2, 1, 0), matrix)
    img.header.set_xyzt_units("mm")
    if description:
        img.header["descrip"] = description.encode()[:80]
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    logger.debug("wrote %s shape %s dtype %s", path, data.shape, data.dtype)
    return path


def _nifti_data(path: Path, array_zyx: np.ndarray, dtype: str | np.dtype | None) -> np.ndarray:
    """Validate a (z, y, x) array for NIfTI output and cast it to ``dtype`` (bool -> uint8)."""
    data = np.asarray(array_zyx)
    if data.ndim != 3:
        raise VesuviusError(f"{path}: array to write must be 3D (z, y, x), got shape {data.shape}")
    target = np.dtype(dtype) if dtype is not None else data.dtype
    if target == np.bool_:
        target = np.dtype(np.uint8)
    if target.kind in "iu" and data.dtype.kind == "f" and not np.isfinite(data).all():
        raise VesuviusError(f"{path}: cannot write NaN/inf values as integer dtype {target}")
    return data.astype(target, copy=False)


def _resolve_affine(
    path: Path, affine: np.ndarray | None, spacing: tuple[float, float, float] | None
) -> np.ndarray:
    """The 4x4 affine to store: ``affine`` if given (validated), else from ``spacing``, else identity."""
    if affine is None:
        try:
            return spacing_to_affine(spacing if spacing is not None else (1.0, 1.0, 1.0))
        except VesuviusError as exc:
            raise VesuviusError(f"{path}: {exc}") from None
    matrix = np.asarray(affine, dtype=np.float64)
    if matrix.shape != (4, 4) or not np.isfinite(matrix).all():
        raise VesuviusError(f"{path}: affine must be a finite 4x4 matrix, got shape {matrix.shape}")
    if abs(np.linalg.det(matrix[:3, :3])) == 0:
        raise VesuviusError(f"{path}: affine is singular (zero voxel size)")
    if spacing is not None and not np.allclose(affine_to_spacing(matrix), spacing, rtol=1e-5):
        raise VesuviusError(f"{path}: spacing {tuple(spacing)} disagrees with the affine's {affine_to_spacing(matrix)}")
    return matrix
