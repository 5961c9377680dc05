"""Prediction for one unlabeled volume of any size.

``.zarr`` outputs are written block by block (bounded memory, resumable); NIfTI outputs are predicted in
memory when the volume (or region of interest) fits, carrying the input's affine and spacing.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from vesuvius_monai.config import Config
from vesuvius_monai.data.readers import Region, open_volume, sample_percentiles
from vesuvius_monai.data.transforms import normalize
from vesuvius_monai.engine.blockwise import predict_volume_blockwise
from vesuvius_monai.engine.infer import resolve_device, sliding_window_probs
from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.io.checkpoint import model_from_checkpoint
from vesuvius_monai.io.nifti import is_nifti_path, write_nifti
from vesuvius_monai.postprocess import postprocess

log = logging.getLogger(__name__)

MAX_IN_MEMORY_VOXELS = 384**3  # NIfTI output beyond this: write .zarr instead


def parse_roi(text: str | None) -> Region | None:
    """``"z0:z1,y0:y1,x0:x1"`` (empty bounds allowed, e.g. ``":,100:300,:"``) -> three slices."""
    if not text:
        return None
    parts = text.split(",")
    if len(parts) != 3 or any(p.count(":") != 1 for p in parts):
        raise VesuviusError(f"--roi '{text}' must look like z0:z1,y0:y1,x0:x1")
    try:
        return tuple(slice(*(int(v) if v else None for v in p.split(":"))) for p in parts)
    except ValueError:
        raise VesuviusError(f"--roi '{text}': bounds must be integers") from None


def _roi_affine(affine: np.ndarray, roi: Region | None) -> np.ndarray:
    """Shift the (i=x, j=y, k=z) affine so that voxel 0 of the ROI keeps its world position."""
    if roi is None:
        return affine
    start_xyz = [s.start or 0 for s in reversed(roi)]
    shifted = affine.copy()
    shifted[:3, 3] = affine[:3, :3] @ np.asarray(start_xyz, dtype=float) + affine[:3, 3]
    return shifted


def predict(cfg: Config, checkpoint: str | Path, input_path: str | Path, output: str | Path, *,
            mask_output: str | Path | None = None, roi: Region | None = None) -> Path:
    """Write the probability map of ``input_path`` (optionally within ``roi``) to ``output``."""
    output = Path(output)
    reader = open_volume(input_path, spacing=cfg.data.spacing)
    if output.resolve() == Path(input_path).resolve():
        raise VesuviusError(f"--output {output} would overwrite the input volume")
    device = resolve_device(cfg.train.device)
    model, _ = model_from_checkpoint(checkpoint, device)
    window = sample_percentiles(reader, q=cfg.transforms.percentiles)

    def predict_fn(block: np.ndarray) -> np.ndarray:
        return sliding_window_probs(model, block, cfg.infer, device=device, amp=cfg.train.amp)

    if output.suffix == ".zarr":
        if mask_output:
            raise VesuviusError("--mask is only written with a NIfTI --output; threshold the Zarr probabilities instead")
        return predict_volume_blockwise(reader, predict_fn, output, block_size=cfg.infer.block_size, halo=cfg.infer.halo,
                                        dtype=cfg.infer.out_dtype, roi=roi, normalize=lambda b: normalize(b, window))
    if not is_nifti_path(output):
        raise VesuviusError(f"--output {output}: use a .nii.gz, .nii or .zarr file name")
    region = tuple(slice(*s.indices(n)[:2]) for s, n in zip(roi or (slice(None),) * 3, reader.shape))
    if np.prod([s.stop - s.start for s in region], dtype=np.int64) > MAX_IN_MEMORY_VOXELS:
        raise VesuviusError(f"{input_path} (region {region}) is too large for a NIfTI output in memory; "
                            f"write to a .zarr output (block-wise) or give --roi")
    image = reader.read(region).astype(np.float32)
    if not np.isfinite(image).all():
        raise VesuviusError(f"image {input_path} holds NaN or inf values")
    probs = sliding_window_probs(model, normalize(image, window), cfg.infer, device=device, amp=cfg.train.amp,
                                 progress=True)
    affine = _roi_affine(reader.affine, roi)
    write_nifti(output, probs, affine=affine)
    if mask_output:
        write_nifti(mask_output, postprocess(probs, cfg.postprocess).astype(np.uint8), affine=affine)
    log.info("wrote %s", output)
    return output
