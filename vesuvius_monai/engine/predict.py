"""Prediction for one unlabeled volume of any size.

``.zarr`` outputs are written block by block (bounded memory, resumable); NIfTI outputs are predicted in
memory when the volume (or region of interest) fits, carrying the input's affine and spacing.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from vesuvius_monai.config import Config, InferConfig, Triple, to_dict
from vesuvius_monai.data.readers import Region, open_volume, sample_percentiles
from vesuvius_monai.data.transforms import normalize
from vesuvius_monai.engine.blockwise import export_nifti, predict_volume_blockwise, roi_affine
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


def seamless_geometry(cfg: InferConfig) -> tuple[Triple, Triple, Triple]:
    """Block size, halo and window stride that make block-wise inference equal whole-volume inference.

    MONAI's sliding window steps by ``int(roi * (1 - overlap))``; blocks and halo are rounded up to
    multiples of that stride and the halo to at least the reach of the windows covering a block voxel.
    """
    stride = tuple(max(1, int(r * (1 - cfg.overlap))) for r in cfg.roi_size)
    block = tuple(-(-b // s) * s for b, s in zip(cfg.block_size, stride))
    halo = tuple(s * max(-(-h // s), (r - 1) // s) for h, r, s in zip(cfg.halo, cfg.roi_size, stride))
    return block, halo, stride


def _run_info(cfg: Config, checkpoint: str | Path) -> dict:
    """What a resumed block-wise run must share with the interrupted one, beyond the geometry."""
    path = Path(checkpoint).resolve()
    return {"checkpoint": str(path), "checkpoint_mtime_ns": path.stat().st_mtime_ns,
            "infer": to_dict(cfg.infer), "percentiles": list(cfg.transforms.percentiles)}


def predict(cfg: Config, checkpoint: str | Path, input_path: str | Path, output: str | Path, *,
            mask_output: str | Path | None = None, nifti_output: str | Path | None = None,
            roi: Region | None = None) -> Path:
    """Write the probability map of ``input_path`` (optionally within ``roi``) to ``output``.

    A ``.zarr`` output is predicted block by block and resumes an interrupted run; ``nifti_output`` then
    also exports it as NIfTI (when it fits in memory).
    """
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
        block, halo, stride = seamless_geometry(cfg.infer)
        log.info("block-wise: blocks %s, halo %s (window %s, stride %s)", block, halo, cfg.infer.roi_size, stride)
        predict_volume_blockwise(reader, predict_fn, output, block_size=block, halo=halo, dtype=cfg.infer.out_dtype,
                                 roi=roi, normalize=lambda b: normalize(b, window), run_info=_run_info(cfg, checkpoint),
                                 windows=(cfg.infer.roi_size, stride))
        if nifti_output:
            export_nifti(output, nifti_output)
        return output
    if nifti_output:
        raise VesuviusError("--nifti goes with a .zarr --output (the NIfTI --output is written directly)")
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
    affine = roi_affine(reader.affine, region)
    write_nifti(output, probs, affine=affine)
    if mask_output:
        write_nifti(mask_output, postprocess(probs, cfg.postprocess).astype(np.uint8), affine=affine)
    log.info("wrote %s", output)
    return output
