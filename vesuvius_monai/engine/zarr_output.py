"""Resumable Zarr outputs of block-wise inference: where they are built, when a run may resume, how they finish.

The store is built at ``<out>.partial`` (with a done-marker per block and the spills between blocks) and renamed
to ``<out>`` once every block is written, so ``<out>`` only ever exists complete. Running the same command
again resumes ``<out>.partial``; a run with other settings stops with an error naming the settings that differ.
One run at a time writes a store: it holds the lock ``<out>.lock`` (:func:`output_lock`) from before the store is
checked until it is published; a second run is refused meanwhile, and the lock of a killed run is taken over.
The driver (:func:`vesuvius_monai.engine.zarr_predict.predict_zarr`) lets one process check and create every store
(:func:`check_output_store`, :func:`open_work_store`) before it (or several processes, under torchrun) fills them,
and publishes each (:func:`publish_store`) once every process writing into it has finished.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path

import numpy as np

from vesuvius_monai.config import flatten
from vesuvius_monai.data.readers import VolumeReader
from vesuvius_monai.data.regions import Region, Triple, format_region, normalize_region, region_shape
from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.io.atomic import replace_dir
from vesuvius_monai.io.lock import Lock
from vesuvius_monai.io.nifti import PREDICTION_MARK, write_nifti
from vesuvius_monai.io.zarr_store import STORE_DTYPES, PredictionStore

logger = logging.getLogger(__name__)


def checked_roi(reader: VolumeReader, roi: Region | None) -> Region:
    """``roi`` (None: the whole volume) clipped to the volume; an empty ROI is an error naming the file."""
    region = normalize_region(roi, reader.shape)
    if min(region_shape(region)) == 0:
        raise VesuviusError(f"roi {format_region(region)} is empty for volume {reader.path} of shape {reader.shape}")
    return region


def roi_affine(affine: np.ndarray, roi: Region) -> np.ndarray:
    """The affine of the ROI sub-volume: origin moved to the ROI's first voxel (index order x, y, z)."""
    shifted = np.array(affine, dtype=np.float64)
    start_xyz = np.array([roi[2].start, roi[1].start, roi[0].start, 1.0])
    shifted[:3, 3] = (affine @ start_xyz)[:3]
    return shifted


def run_meta(reader: VolumeReader, roi: Region, block: Triple, dtype: str, extra: dict | None) -> dict:
    """What a resumed run must share with the interrupted one (JSON-serialisable)."""
    return {"source": str(reader.path.resolve()), "source_shape": list(reader.shape),
            "roi": [[s.start, s.stop] for s in roi], "block_size": list(block), "dtype": dtype, **(extra or {})}


def settings_diff(stored: dict, wanted: dict) -> list[str]:
    """``["infer.overlap 0.25 -> 0.5", ...]`` for every setting of ``wanted`` that ``stored`` has otherwise."""
    old, new = flatten(stored), flatten(wanted)
    return [f"{key} {old.get(key, '(unset)')} -> {value}" for key, value in new.items() if old.get(key) != value]


def work_path(out: Path) -> Path:
    """Where the store of ``out`` is built: ``<out>.partial``."""
    return out.with_name(out.name + ".partial")


def lock_path(out: Path) -> Path:
    """The lock file of ``out`` while a run writes it: ``<out>.lock``."""
    return out.with_name(out.name + ".lock")


def output_lock(out: str | os.PathLike) -> Lock:
    """The lock of the Zarr output ``out``: ``with output_lock(out): ...`` (a :class:`~vesuvius_monai.io.lock.Lock`)."""
    out = Path(out)
    return Lock(lock_path(out), f"Zarr output {out}", "predict")


def check_output_store(out: str | os.PathLike, dtype: str, meta: dict, resume: bool = True) -> str:
    """What building ``out`` means, without changing anything: "complete" (done already, same settings),
    "resume" (an unfinished store of the same settings) or "new". A VesuviusError when ``out`` or ``<out>.partial``
    is not a prediction store, or, with ``resume``, comes from other settings."""
    out = Path(out)
    meta = json.loads(json.dumps(meta))  # as stored: tuples become lists
    if dtype not in STORE_DTYPES:
        raise VesuviusError(f"dtype must be one of {STORE_DTYPES}, got {dtype!r}")
    if out.exists() and _finished_store_matches(out, meta, resume):
        return "complete"
    work = work_path(out)
    if not work.exists():
        return "new"
    store = PredictionStore.open(work, mode="r")
    if not resume:
        return "new"
    if settings_diff(store.meta, meta):
        raise VesuviusError(
            f"{work}: unfinished prediction with other settings ({_differs(store, meta)}); write to "
            f"another --output, or delete the unfinished folder {work} to start this one over")
    return "resume"


def open_work_store(out: str | os.PathLike, reader: VolumeReader, roi: Region, block: Triple, dtype: str,
                    meta: dict, resume: bool = True) -> PredictionStore | None:
    """The unfinished store of ``out`` at ``<out>.partial`` (resumed when ``resume``, else made afresh), or None
    when ``out`` is already complete from the same settings (see :func:`check_output_store`)."""
    out = Path(out)
    if check_output_store(out, dtype, meta, resume) == "complete":
        logger.info("%s: already complete, nothing to do", out)
        return None
    return _work_store(work_path(out), reader, roi, block, dtype, json.loads(json.dumps(meta)), resume)


def publish_store(store: PredictionStore, out: str | os.PathLike, blocks: int | None = None) -> Path:
    """Mark the filled ``store`` complete (markers and spills dropped) and rename it to ``out``.

    ``blocks``: how many blocks the store must have marked done (checked first; None: not checked). Run once,
    after every process writing into the store has finished.
    """
    out = Path(out)
    if blocks is not None and not store.meta.get("complete"):
        done = len(store.done_blocks())
        if done != blocks:
            raise VesuviusError(f"{store.path}: {done} of {blocks} blocks are written; run the same command again "
                                f"to finish the others")
    store.mark_complete()
    replace_dir(store.path, out)
    logger.info("wrote %s", out)
    return out


def _differs(store: PredictionStore, meta: dict) -> str:
    """What differs between ``store``'s run and ``meta``, as one line naming the settings (old -> new)."""
    return "; ".join(settings_diff(store.meta, meta)) or "(none)"


def _finished_store_matches(out: Path, meta: dict, resume: bool) -> bool:
    """True when ``resume`` and ``out`` is a complete store from the same run.

    VesuviusError when ``out`` is not a prediction store (it is never replaced then), or, with ``resume``, when it
    comes from a run with other settings.
    """
    store = PredictionStore.open(out, mode="r")
    if not resume:
        return False
    if settings_diff(store.meta, meta):
        raise VesuviusError(f"{out}: exists from a prediction with other settings ({_differs(store, meta)}); "
                            f"write to another --output, or delete {out} to predict it again")
    return bool(store.meta.get("complete"))


def _work_store(work: Path, reader: VolumeReader, roi: Region, block: Triple, dtype: str, meta: dict,
                resume: bool) -> PredictionStore:
    """Open the unfinished store at ``work`` to resume it, or create a fresh one there (see
    :func:`check_output_store`, which has checked it)."""
    if work.exists():
        store = PredictionStore.open(work)
        if resume:
            logger.info("%s: resuming, %d blocks already done", work, len(store.done_blocks()))
            return store
        shutil.rmtree(work)
    return PredictionStore.create(work, region_shape(roi), block_size=roi_chunks(block, roi), dtype=dtype,
                                  affine=roi_affine(reader.affine, roi), meta=meta)


def roi_chunks(block: Triple, roi: Region) -> Triple:
    """The chunks of an output of ``roi`` written in blocks of ``block`` (volume grid): the blocks, but along z a
    divisor of the ROI's offset into its first block, so that no chunk straddles two z-planes of blocks (processes
    under torchrun share an output by z-planes of blocks; each chunk keeps one writer)."""
    z = block[0] if roi[0].start % block[0] == 0 else math.gcd(block[0], roi[0].start % block[0])
    return (z, block[1], block[2])


def export_nifti(zarr_path: str | os.PathLike, nifti_path: str | os.PathLike, affine: np.ndarray | None = None, *,
                 max_voxels: int = 512**3) -> Path:
    """Write a finished block-wise prediction as a float32 probability NIfTI (whole array in memory).

    ``affine`` defaults to the store's own (the ROI's affine). Refuses stores with more than ``max_voxels``
    voxels or unfinished ones.
    """
    store = PredictionStore.open(zarr_path, mode="r")
    if not store.meta.get("complete"):
        raise VesuviusError(f"{zarr_path}: prediction is not complete; finish it before exporting")
    n_voxels = int(np.prod(store.array.shape))
    if n_voxels > max_voxels:
        raise VesuviusError(f"{zarr_path}: {n_voxels} voxels exceed max_voxels={max_voxels} for an in-memory NIfTI")
    return write_nifti(nifti_path, store.read_probabilities(), affine=store.affine if affine is None else affine,
                       dtype=np.float32, description=PREDICTION_MARK)
