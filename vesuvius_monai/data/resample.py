"""Resampling a volume to another voxel spacing or onto another volume's grid (``vesuvius-monai resample``).

nnU-Net models run at their plan's spacing, and this project refuses a volume at another one rather than resample it
silently. ``resample`` is the explicit step: to the plan's spacing before ``predict`` (``--like MODEL_FOLDER``), and
the probabilities back onto the scan's grid after (``--like SCAN --order 1``). As nnU-Net's default preprocessing
does for isotropic data: the new shape is round(shape * spacing / target), and the volume is interpolated by
``skimage.transform.resize`` (edge mode, no anti-aliasing; order 3 for images, 0 for labels, 1 for probabilities),
the volume's extent kept up to that rounding. ``--like VOLUME`` must cover the same region (within a voxel).
Arrays are (z, y, x). The whole volume is held in memory.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from vesuvius_monai.errors import VesuviusError

log = logging.getLogger(__name__)

Spacing = tuple[float, float, float]
ORDERS = (0, 1, 3)


def target_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> tuple[int, int, int]:
    """round(shape * spacing / target) per axis, at least 1 (nnU-Net's rule)."""
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target))  # type: ignore[return-value]


def resample_array(array: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    """``array`` (z, y, x) interpolated to ``shape`` with a spline of ``order`` (0: the nearest value, for labels;
    the values of an order-0 result are values of ``array``). Floats come back float32; integers keep their dtype
    (at orders 1 and 3 they are interpolated in float64, rounded and clipped into the dtype's range, so 64-bit
    values beyond 2^53 lose their last bits)."""
    from skimage.transform import resize

    if order not in ORDERS:
        raise VesuviusError(f"--order must be one of {list(ORDERS)}, got {order}")
    shape = tuple(int(n) for n in shape)
    integer = array.dtype.kind in "iub"
    if tuple(array.shape) == shape:
        return array.copy() if integer else array.astype(np.float32)
    if integer and order == 0:
        return resize(array, shape, order=0, mode="edge", anti_aliasing=False, preserve_range=True).astype(
            array.dtype)
    data = array.astype(np.float64 if integer else np.float32)  # float64 holds every int32 exactly
    out = resize(data, shape, order=order, mode="edge", anti_aliasing=False, preserve_range=True)
    if not integer:
        return out.astype(np.float32)
    if array.dtype.kind == "b":
        return np.rint(out) > 0
    info = np.iinfo(array.dtype)  # its min is 0 or a power of two (exact in float64); a 64-bit max rounds up
    high = float(info.max) if float(info.max) <= info.max else float(np.nextafter(float(info.max), 0.0))
    return np.clip(np.rint(out), float(info.min), high).astype(array.dtype)


def resampled_affine(affine: np.ndarray, old_shape: Sequence[int], new_shape: Sequence[int],
                     new_spacing: Spacing) -> np.ndarray:
    """The NIfTI affine (x first) of a volume of ``old_shape`` (z, y, x) resampled to ``new_shape`` at
    ``new_spacing`` (z, y, x): the same orientation, each axis's voxel size ``new_spacing``, and its first voxel
    centre where resize puts it. The extent is kept up to the rounding of the shape: the far faces move by
    |new_n * new_spacing - old_n * old_spacing| at most half a new voxel (nnU-Net's rule stores the target spacing
    too)."""
    old_xyz, new_xyz = np.array(old_shape[::-1], float), np.array(new_shape[::-1], float)
    directions = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    first = (0.5 * old_xyz / new_xyz) - 0.5  # the old voxel coordinate of the new voxel 0 (per x, y, z)
    out = np.eye(4)
    out[:3, :3] = directions * np.array(new_spacing[::-1], float)
    out[:3, 3] = affine[:3, :3] @ first + affine[:3, 3]
    return out


def resample_file(source: str | Path, output: str | Path, *, spacing: Sequence[float] | None = None,
                  like: str | Path | None = None, order: int = 3) -> Path:
    """Resample the volume at ``source`` to ``spacing`` (z, y, x), or onto the grid of ``like`` (a volume: its
    shape, spacing and affine; or an nnU-Net model folder: its plan's spacing), and write it to ``output`` (NIfTI,
    atomically; an existing file is replaced only when ``predict`` or ``resample`` wrote it)."""
    from vesuvius_monai.data.readers import open_volume
    from vesuvius_monai.io.nifti import PREDICTION_MARK, check_replaceable_nifti, is_nifti_path, write_nifti

    if (spacing is None) == (like is None):
        raise VesuviusError("resample needs one of --spacing Z Y X or --like (a volume, or an nnU-Net model folder)")
    if not is_nifti_path(output):
        raise VesuviusError(f"--output {output}: the resampled volume is written as NIfTI (.nii.gz or .nii)")
    if Path(output).resolve() == Path(str(source)).resolve():
        raise VesuviusError(f"--output {output} is the --input: resample never writes over its input")
    check_replaceable_nifti(output, "--output")
    reader = open_volume(source)
    shape, affine, new_spacing = _target(reader, spacing, like)
    array = reader.read()
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise VesuviusError(f"{source}: the volume holds NaN or inf values; resampling would spread them")
    out = resample_array(array, shape, order)
    log.info("resampled %s %s at spacing %s to %s at %s (order %d)", source, reader.shape, reader.spacing, shape,
             new_spacing, order)
    return write_nifti(output, out, affine=affine, description=PREDICTION_MARK)


def _target(reader, spacing: Sequence[float] | None, like: str | Path | None) -> tuple[tuple, np.ndarray, Spacing]:
    """(shape, NIfTI affine, spacing) of the grid to resample ``reader``'s volume onto."""
    from vesuvius_monai.data.readers import open_volume
    from vesuvius_monai.models.nnunet import NnunetFolder, is_nnunet_folder

    if like is not None and is_nnunet_folder(like):
        spacing = NnunetFolder.read(like).spacing
    if spacing is not None:
        spacing = tuple(float(s) for s in spacing)
        if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
            raise VesuviusError(f"--spacing must be three positive numbers (z y x), got {list(spacing)}")
        shape = target_shape(reader.shape, reader.spacing, spacing)
        return shape, resampled_affine(reader.affine, reader.shape, shape, spacing), spacing  # type: ignore
    grid = open_volume(like)  # type: ignore[arg-type]
    gap = float(np.abs(_corners(reader.affine, reader.shape) - _corners(grid.affine, grid.shape)).max())
    if gap > max(*reader.spacing, *grid.spacing):
        raise VesuviusError(f"--like {like} covers another region than {reader.path} (their corners are up to "
                            f"{gap:.3g} apart in world coordinates, more than a voxel): resampling onto its grid "
                            f"would misplace the volume; check both files' orientation and origin")
    return grid.shape, grid.affine, grid.spacing


def _corners(affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """World coordinates (8, 3) of the outer corners of a volume of ``shape`` (z, y, x) under a NIfTI affine."""
    x, y, z = (np.array([-0.5, n - 0.5]) for n in shape[::-1])
    points = np.array([[i, j, k, 1.0] for i in x for j in y for k in z])
    return (affine @ points.T).T[:, :3]
