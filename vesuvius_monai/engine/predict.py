"""Prediction for one unlabeled volume of any size.

``.zarr`` outputs are written block by block (bounded memory, resumable); NIfTI outputs are predicted in
memory when the volume (or region of interest) fits, carrying the input's affine and spacing.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from vesuvius_monai.config import Config
from vesuvius_monai.data.readers import Region, format_region, open_volume, region_shape
from vesuvius_monai.engine.infer import infer_volume, resolve_device
from vesuvius_monai.engine.zarr_output import checked_roi, export_nifti, roi_affine
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


def _run_info(checkpoint: str | Path) -> dict:
    """What a resumed block-wise run must share with the interrupted one, beyond geometry and settings."""
    path = Path(checkpoint).resolve()
    return {"checkpoint": str(path), "checkpoint_mtime_ns": path.stat().st_mtime_ns}


def _check_outputs(input_path: Path, outputs: dict[str, Path | None]) -> None:
    """No output may replace the input volume or another output."""
    seen = {Path(input_path).resolve(): "--input"}
    for flag, path in outputs.items():
        if path is None:
            continue
        resolved = Path(path).resolve()
        if resolved in seen:
            raise VesuviusError(f"{flag} {path} is the same file as {seen[resolved]}; nothing was written")
        seen[resolved] = flag


def _check_kind(output: Path, region: Region, input_path: str | Path, mask_output: str | Path | None,
                nifti_output: str | Path | None) -> None:
    """The output kind (.zarr or NIfTI) goes with the other flags, and a NIfTI output fits in memory."""
    if output.suffix != ".zarr" and not is_nifti_path(output):
        raise VesuviusError(f"--output {output}: use a .nii.gz, .nii or .zarr file name")
    if output.suffix == ".zarr" and mask_output:
        raise VesuviusError("--mask is only written with a NIfTI --output; threshold the Zarr probabilities instead")
    if output.suffix != ".zarr" and nifti_output:
        raise VesuviusError("--nifti goes with a .zarr --output (the NIfTI --output is written directly)")
    if output.suffix != ".zarr" and np.prod(region_shape(region), dtype=np.int64) > MAX_IN_MEMORY_VOXELS:
        raise VesuviusError(f"{input_path} (region {format_region(region)}) is too large for a NIfTI output in "
                            f"memory; write to a .zarr output (block-wise) or give --roi")


def predict(cfg: Config, checkpoint: str | Path, input_path: str | Path, output: str | Path, *,
            mask_output: str | Path | None = None, nifti_output: str | Path | None = None,
            roi: Region | None = None) -> Path:
    """Write the probability map of ``input_path`` (optionally within ``roi``) to ``output``.

    A ``.zarr`` output is predicted block by block and resumes an interrupted run; ``nifti_output`` then
    also exports it as NIfTI (when it fits in memory).
    """
    output = Path(output)
    _check_outputs(Path(input_path), {"--output": output, "--mask": mask_output, "--nifti": nifti_output})
    reader = open_volume(input_path, spacing=cfg.data.spacing, level=cfg.data.zarr_level, key=cfg.data.zarr_key)
    region = checked_roi(reader, roi)
    _check_kind(output, region, input_path, mask_output, nifti_output)
    model, _ = model_from_checkpoint(checkpoint, resolve_device(cfg.infer.device))
    if output.suffix == ".zarr":
        infer_volume(model, reader, cfg, roi=region, output=output, run_info=_run_info(checkpoint), progress=True)
        if nifti_output:
            export_nifti(output, nifti_output)
        return output
    probs = infer_volume(model, reader, cfg, roi=region, progress=True)
    affine = roi_affine(reader.affine, region)
    write_nifti(output, probs, affine=affine)
    if mask_output:
        write_nifti(mask_output, postprocess(probs, cfg.postprocess).astype(np.uint8), affine=affine)
    log.info("wrote %s", output)
    return output
