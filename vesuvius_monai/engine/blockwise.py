"""Block-wise prediction of volumes larger than memory into a resumable chunked Zarr store.

The output is tiled into blocks (= Zarr chunks). Each block is read with a halo of context (clipped at
the volume borders), predicted, cropped back to the block and written; a marker then records it as done.
Memory is bounded by one haloed block, whatever the volume size.

The store is built at ``<out>.partial`` and renamed to ``<out>`` once every block is written, so ``<out>``
only ever exists complete. An interrupted run leaves ``<out>.partial``; rerunning with ``resume=True``
skips its finished blocks (it assumes the same model: only the geometry and dtype are checked).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from vesuvius_monai.data.readers import Region, VolumeReader, block_grid, format_region, normalize_region, region_shape
from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.io.atomic import replace_dir
from vesuvius_monai.io.nifti import write_nifti
from vesuvius_monai.io.zarr_store import STORE_DTYPES, PredictionStore

logger = logging.getLogger(__name__)

Triple = tuple[int, int, int]


def predict_volume_blockwise(
    reader: VolumeReader,
    predict_fn: Callable[[np.ndarray], np.ndarray],
    out_path: str | os.PathLike,
    *,
    block_size: Triple = (128, 128, 128),
    halo: Triple = (16, 16, 16),
    dtype: str = "uint8",
    roi: Region | None = None,
    normalize: Callable[[np.ndarray], np.ndarray] | None = None,
    progress: bool = True,
    resume: bool = True,
    run_info: dict | None = None,
    windows: tuple[Triple, Triple] | None = None,
) -> Path:
    """Predict ``reader`` (or its ``roi``) block by block into the Zarr store ``out_path``; returns the path.

    ``predict_fn`` maps a float32 block (z, y, x), already passed through ``normalize``, to float32
    probabilities of the same shape. ``normalize`` must not depend on the block's own statistics
    (use a global window, e.g. from ``sample_percentiles``), or seams appear. The halo should cover the
    receptive field of ``predict_fn`` (for sliding-window inference: at least half the window overlap)
    for seam-free output. ``dtype``: "uint8" (round(p * 255)), "float16" or "float32".
    The output has the ROI's shape; its OME metadata carry the spacing and the ROI's world offset.
    ``run_info`` (JSON-serialisable, e.g. the checkpoint and inference settings) joins the geometry in what
    a resumed run must share with the interrupted one. ``windows`` = (window size, stride) of a sliding
    window inside ``predict_fn``: see :func:`grow_region` (with aligned blocks and halo the result then
    equals whole-volume sliding-window inference).
    """
    out_path = Path(out_path)
    block_size = _check_triple("block_size", block_size, minimum=1)
    halo = _check_triple("halo", halo, minimum=0)
    if dtype not in STORE_DTYPES:
        raise VesuviusError(f"dtype must be one of {STORE_DTYPES}, got {dtype!r}")
    roi = checked_roi(reader, roi)
    meta = {**_run_meta(reader, roi, block_size, halo, dtype), **(run_info or {})}
    if out_path.exists() and _finished_store_matches(out_path, meta, resume):
        logger.info("%s: already complete, nothing to do", out_path)
        return out_path
    store = _work_store(_partial_path(out_path), reader, roi, block_size, dtype, meta, resume)
    _fill_store(store, reader, predict_fn, roi, block_size, halo, normalize, progress, windows)
    store.mark_complete()
    replace_dir(store.path, out_path)
    logger.info("wrote %s", out_path)
    return out_path


def checked_roi(reader: VolumeReader, roi: Region | None) -> Region:
    """``roi`` (None: the whole volume) clipped to the volume; an empty ROI is an error naming the file."""
    region = normalize_region(roi, reader.shape)
    if min(region_shape(region)) == 0:
        raise VesuviusError(f"roi {format_region(region)} is empty for volume {reader.path} of shape {reader.shape}")
    return region


def _check_triple(name: str, value: tuple[int, ...], minimum: int) -> Triple:
    """Three ints >= ``minimum`` (z, y, x), else VesuviusError naming ``name``."""
    if len(value) != 3 or any(int(v) != v or int(v) < minimum for v in value):
        raise VesuviusError(f"{name} must be three integers >= {minimum} (z, y, x), got {tuple(value)!r}")
    return tuple(int(v) for v in value)  # type: ignore[return-value]


def _run_meta(reader: VolumeReader, roi: Region, block_size: Triple, halo: Triple, dtype: str) -> dict:
    """What a resumed run must share with the interrupted one (JSON-serialisable)."""
    return {
        "source": str(reader.path.resolve()),
        "source_shape": list(reader.shape),
        "roi": [[s.start, s.stop] for s in roi],
        "block_size": list(block_size),
        "halo": list(halo),
        "dtype": dtype,
    }


def _same_run(store: PredictionStore, meta: dict) -> bool:
    """True when ``store`` was made by a run with the same ``meta``."""
    stored = store.meta
    return all(stored.get(key) == value for key, value in meta.items())


def _partial_path(out_path: Path) -> Path:
    """Where an unfinished store lives: ``<out>.partial`` beside the output."""
    return out_path.with_name(out_path.name + ".partial")


def _finished_store_matches(out_path: Path, meta: dict, resume: bool) -> bool:
    """True when ``resume`` and ``out_path`` is a complete store from the same run.

    VesuviusError when ``out_path`` is not a prediction store (it is never replaced then), or, with
    ``resume``, when it comes from a run with different settings.
    """
    store = PredictionStore.open(out_path, mode="r")
    if not resume:
        return False
    if not _same_run(store, meta):
        raise VesuviusError(
            f"{out_path}: exists from a run with different settings ({store.meta}); "
            f"delete it or choose another output"
        )
    return bool(store.meta.get("complete"))


def roi_affine(affine: np.ndarray, roi: Region) -> np.ndarray:
    """The affine of the ROI sub-volume: origin moved to the ROI's first voxel (index order x, y, z)."""
    shifted = np.array(affine, dtype=np.float64)
    start_xyz = np.array([roi[2].start, roi[1].start, roi[0].start, 1.0])
    shifted[:3, 3] = (affine @ start_xyz)[:3]
    return shifted


def _work_store(
    work: Path, reader: VolumeReader, roi: Region, block_size: Triple, dtype: str, meta: dict, resume: bool
) -> PredictionStore:
    """Open the unfinished store at ``work`` to resume it, or create a fresh one there."""
    if work.exists():
        store = PredictionStore.open(work)
        if resume and _same_run(store, meta):
            logger.info("%s: resuming, %d blocks already done", work, len(store.done_blocks()))
            return store
        if resume:
            raise VesuviusError(
                f"{work}: unfinished output from a run with different settings ({store.meta}); "
                f"delete it or pass resume=False to start over"
            )
        shutil.rmtree(work)
    return PredictionStore.create(
        work, region_shape(roi), block_size=block_size, dtype=dtype, affine=roi_affine(reader.affine, roi), meta=meta
    )


def _fill_store(
    store: PredictionStore,
    reader: VolumeReader,
    predict_fn: Callable[[np.ndarray], np.ndarray],
    roi: Region,
    block_size: Triple,
    halo: Triple,
    normalize: Callable[[np.ndarray], np.ndarray] | None,
    progress: bool,
    windows: tuple[Triple, Triple] | None = None,
) -> None:
    """Predict and write every block of ``store`` not yet marked done."""
    grid = block_grid(region_shape(roi), block_size)
    done = store.done_blocks()
    todo = [(index, region) for index, region in grid if index not in done]
    logger.info("%s: %d blocks of %s, %d to predict", reader.path, len(grid), block_size, len(todo))
    bar = tqdm(todo, total=len(grid), initial=len(grid) - len(todo), desc="blocks", leave=False, disable=not progress)
    for index, region in bar:
        probs = predict_block(reader, predict_fn, _shift(region, roi), halo, normalize, windows)
        store.write_block(index, region, probs)


def _shift(region: Region, roi: Region) -> Region:
    """A region in ROI coordinates -> the same region in volume coordinates."""
    return tuple(slice(s.start + r.start, s.stop + r.start) for s, r in zip(region, roi))  # type: ignore[return-value]


def predict_block(
    reader: VolumeReader,
    predict_fn: Callable[[np.ndarray], np.ndarray],
    region: Region,
    halo: Triple,
    normalize: Callable[[np.ndarray], np.ndarray] | None = None,
    windows: tuple[Triple, Triple] | None = None,
) -> np.ndarray:
    """Float32 probabilities (shape of ``region``) for one block of the volume, predicted with ``halo`` context.

    Reads ``region`` grown by ``halo`` (see :func:`grow_region`), normalises it, runs ``predict_fn``
    and crops the halo off again.
    """
    grown = grow_region(region, halo, reader.shape, windows)
    block = reader.read(grown).astype(np.float32)
    if not np.isfinite(block).all():
        raise VesuviusError(f"{reader.path}: NaN or inf values in region {format_region(grown)}")
    if normalize is not None:
        block = np.asarray(normalize(block), dtype=np.float32)
    probs = np.asarray(predict_fn(block), dtype=np.float32)
    if probs.shape != block.shape:
        raise VesuviusError(f"predict_fn returned shape {probs.shape} for a block of shape {block.shape}")
    if not np.isfinite(probs).all():
        raise VesuviusError(f"predict_fn returned NaN or inf for region {format_region(grown)} of {reader.path}")
    crop = tuple(slice(s.start - g.start, s.stop - g.start) for s, g in zip(region, grown))
    return probs[crop]


def grow_region(region: Region, halo: Triple, shape: tuple[int, int, int],
                windows: tuple[Triple, Triple] | None = None) -> Region:
    """``region`` grown by ``halo`` on each side, clipped to the volume.

    With ``windows`` = (window, stride) the far end is extended further (still clipped) so that the grown
    length is window + k * stride: a sliding window started at the grown region's start then ends exactly
    on its last window, with no extra flush window off the global grid. If block starts and halo are
    multiples of the stride and the halo is at least ``stride * floor((window - 1) / stride)``, each block
    voxel is covered by exactly the windows of whole-volume inference.
    """
    grown = []
    for axis, (s, h, d) in enumerate(zip(region, halo, shape)):
        start, stop = max(0, s.start - h), min(d, s.stop + h)
        if windows is not None:
            window, stride = windows[0][axis], windows[1][axis]
            if stop - start > window:
                stop = min(d, start + window + -(-(stop - start - window) // stride) * stride)
        grown.append(slice(start, stop))
    return tuple(grown)  # type: ignore[return-value]


def export_nifti(
    zarr_path: str | os.PathLike,
    nifti_path: str | os.PathLike,
    affine: np.ndarray | None = None,
    *,
    max_voxels: int = 512**3,
) -> Path:
    """Write a finished block-wise prediction as a float32 probability NIfTI (whole array in memory).

    ``affine`` defaults to the store's own (the ROI's affine). Refuses stores with more than
    ``max_voxels`` voxels or unfinished ones.
    """
    store = PredictionStore.open(zarr_path, mode="r")
    if not store.meta.get("complete"):
        raise VesuviusError(f"{zarr_path}: prediction is not complete; finish it before exporting")
    n_voxels = int(np.prod(store.array.shape))
    if n_voxels > max_voxels:
        raise VesuviusError(f"{zarr_path}: {n_voxels} voxels exceed max_voxels={max_voxels} for an in-memory NIfTI")
    probs = store.read_probabilities()
    return write_nifti(nifti_path, probs, affine=store.affine if affine is None else affine, dtype=np.float32)
