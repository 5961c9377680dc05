"""Prediction for one unlabeled volume of any size.

``.zarr`` outputs are written block by block (bounded memory, resumable); NIfTI outputs are predicted in
memory when the volume (or region of interest) fits, carrying the input's affine and spacing.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from vesuvius_monai.config import Config, InferConfig, Triple, to_dict
from vesuvius_monai.data.readers import (
    Region,
    VolumeReader,
    format_region,
    open_volume,
    region_shape,
    sample_percentiles,
)
from vesuvius_monai.data.transforms import normalize, read_normalized
from vesuvius_monai.engine.blockwise import checked_roi, export_nifti, predict_volume_blockwise, roi_affine
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
    if output.suffix != ".zarr" and not is_nifti_path(output):
        raise VesuviusError(f"--output {output}: use a .nii.gz, .nii or .zarr file name")
    device = resolve_device(cfg.infer.device)
    model, _ = model_from_checkpoint(checkpoint, device)
    window = sample_percentiles(reader, q=cfg.transforms.percentiles)
    if output.suffix == ".zarr":
        return _predict_zarr(cfg, checkpoint, reader, model, window, output, region, nifti_output, mask_output)
    if nifti_output:
        raise VesuviusError("--nifti goes with a .zarr --output (the NIfTI --output is written directly)")
    if np.prod(region_shape(region), dtype=np.int64) > MAX_IN_MEMORY_VOXELS:
        raise VesuviusError(f"{input_path} (region {format_region(region)}) is too large for a NIfTI output in "
                            f"memory; write to a .zarr output (block-wise) or give --roi")
    probs = sliding_window_probs(model, read_normalized(reader, window, region), cfg.infer, device=device,
                                 amp=cfg.infer.amp, progress=True)
    affine = roi_affine(reader.affine, region)
    write_nifti(output, probs, affine=affine)
    if mask_output:
        write_nifti(mask_output, postprocess(probs, cfg.postprocess).astype(np.uint8), affine=affine)
    log.info("wrote %s", output)
    return output


def _predict_zarr(cfg: Config, checkpoint: str | Path, reader: VolumeReader, model: torch.nn.Module,
                  window: tuple[float, float], output: Path, region: Region, nifti_output: str | Path | None,
                  mask_output: str | Path | None) -> Path:
    """Block-wise prediction into a resumable Zarr store (plus an optional NIfTI export)."""
    if mask_output:
        raise VesuviusError("--mask is only written with a NIfTI --output; threshold the Zarr probabilities instead")
    device = next(model.parameters()).device
    block, halo, stride = seamless_geometry(cfg.infer)
    log.info("block-wise: blocks %s, halo %s (window %s, stride %s)", block, halo, cfg.infer.roi_size, stride)

    def predict_fn(image: np.ndarray) -> np.ndarray:
        return sliding_window_probs(model, image, cfg.infer, device=device, amp=cfg.infer.amp)

    predict_volume_blockwise(reader, predict_fn, output, block_size=block, halo=halo, dtype=cfg.infer.out_dtype,
                             roi=region, normalize=lambda b: normalize(b, window), run_info=_run_info(cfg, checkpoint),
                             windows=(cfg.infer.roi_size, stride))
    if nifti_output:
        export_nifti(output, nifti_output)
    return output
