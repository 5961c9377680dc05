"""Prediction of unlabeled volumes of any size, in one process or spread over the processes of ``torchrun``.

``.zarr`` outputs are written block by block (bounded memory, resumable, shared between the processes of torchrun)
by :func:`vesuvius_monai.engine.zarr_predict.predict_zarr`, the one path of every Zarr output; an ensemble's by
:mod:`vesuvius_monai.engine.ensemble_zarr` through it. NIfTI outputs are predicted in memory when the volume (or
region of interest) fits, carrying the input's affine and spacing. A folder output (a name without suffix) gets one
``<id>.zarr`` per input volume; the inputs are volumes and folders of volumes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from vesuvius_monai.config import Config
from vesuvius_monai.data.dataset import VOLUME_SUFFIXES, volume_id
from vesuvius_monai.data.readers import Region, format_region, region_shape, volume_kind
from vesuvius_monai.data.remote import RemoteAddress, as_location, is_remote
from vesuvius_monai.engine.distributed import (init_distributed, on_main)
from vesuvius_monai.engine.ensemble import Ensemble, as_ensemble, ensemble_volume
from vesuvius_monai.engine.ensemble_zarr import predict_ensemble_zarr
from vesuvius_monai.engine.zarr_predict import open_input, predict_zarr
from vesuvius_monai.engine.zarr_output import (checked_roi, roi_affine)
from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.io.checkpoint import Checkpoint
from vesuvius_monai.io.nifti import PREDICTION_MARK, check_replaceable_nifti, is_nifti_path, write_nifti
from vesuvius_monai.io.paths import check_parents, inside, safe_name
from vesuvius_monai.postprocess import postprocess
from vesuvius_monai.postprocess.blockwise import check_mask_target, write_mask_zarr

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



def _check_outputs(inputs: Sequence[Path | RemoteAddress], outputs: dict[str, Path | None]) -> None:
    """No output may replace an input volume or another output; outputs are local files."""
    seen = {as_location(p).resolve(): f"--input {p}" for p in inputs}
    for flag, path in outputs.items():
        if path is None:
            continue
        if is_remote(str(path)):
            raise VesuviusError(f"{flag} {path}: outputs are written to local files, not to addresses")
        resolved = Path(path).resolve()
        if resolved in seen:
            raise VesuviusError(f"{flag} {path} is the same file as {seen[resolved]}; nothing was written")
        seen[resolved] = flag


def is_folder_output(output: Path) -> bool:
    """A folder of ``<id>.zarr`` stores: a name without suffix, or an existing folder that is not a Zarr."""
    return output.suffix == "" or (output.is_dir() and output.suffix != ".zarr")


def _check_kind(output: Path, region: Region, input_path: str | Path, mask_output: str | Path | None,
                nifti_output: str | Path | None) -> None:
    """The output kind (.zarr or NIfTI) goes with the other flags, and a NIfTI output fits in memory."""
    if output.suffix != ".zarr" and not is_nifti_path(output):
        raise VesuviusError(f"--output {output}: use a .nii.gz, .nii or .zarr file name, or a folder name without "
                            f"suffix (one <id>.zarr per input volume)")
    if mask_output and (Path(mask_output).suffix == ".zarr") != (output.suffix == ".zarr"):
        raise VesuviusError(f"--mask {mask_output}: a .zarr --output takes a .zarr --mask (post-processed block by "
                            f"block), a NIfTI --output a NIfTI --mask")
    if output.suffix != ".zarr" and nifti_output:
        raise VesuviusError("--nifti goes with a .zarr --output (the NIfTI --output is written directly)")
    if output.suffix != ".zarr" and np.prod(region_shape(region), dtype=np.int64) > MAX_IN_MEMORY_VOXELS:
        raise VesuviusError(f"{input_path} (region {format_region(region)}) is too large for a NIfTI output in "
                            f"memory; write to a .zarr output (block-wise) or give --roi")


def folder_targets(inputs: Sequence[Path | RemoteAddress], output: Path) -> list[tuple[Path | RemoteAddress, Path]]:
    """(input volume, ``output/<id>.zarr``) for every volume of ``inputs``, in order.

    An input folder that is not a Zarr stands for the volumes in it (files ``.nii(.gz)``, ``.tif(f)``, ``.npy``,
    ``.zarr`` folders and folders of TIFF slices; hidden names skipped); an address is one volume, its id the last
    component of its path. Two volumes with the same id, an output
    folder inside an input folder, or an output that is an existing file are errors.
    """
    if output.exists() and not output.is_dir():
        raise VesuviusError(f"--output {output} is an existing file, not a folder; choose another --output")
    volumes: list[Path | RemoteAddress] = []
    for path in inputs:
        if not path.is_dir() or volume_kind(path) == "zarr":
            volumes.append(path)  # (a missing volume is named when it is opened)
            continue
        if path.resolve() == output.resolve() or path.resolve() in output.resolve().parents:
            raise VesuviusError(f"--output {output} is inside the input folder {path}; choose a folder outside it")
        entries = [p for p in sorted(path.iterdir()) if not p.name.startswith(".")]
        found = [p for p in entries if volume_kind(p) is not None]
        skipped = [p.name for p in entries if p not in found]
        if skipped:
            log.info("--input %s: skipped %d entries that are not volumes: %s", path, len(skipped),
                     ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else ""))
        if not found:
            raise VesuviusError(f"--input {path}: no volumes in this folder ({', '.join(VOLUME_SUFFIXES)} or "
                                f"folders of TIFF slices)")
        volumes += found
    by_id: dict[str, Path | RemoteAddress] = {}
    for path in volumes:
        vid = volume_id(path)
        if vid in by_id:
            raise VesuviusError(f"--input {by_id[vid]} and {path} would both be written to {output / (vid + '.zarr')}; "
                                f"predict them into different --output folders")
        by_id[vid] = path
    targets = [(path, inside(output, safe_name(vid, f"the id of --input {path}") + ".zarr"))
               for vid, path in by_id.items()]
    _check_outputs(list(inputs) + volumes, {f"--output {out}": out for _, out in targets})
    return targets


def predict(cfg: Config, checkpoint: str | Path | Checkpoint | Ensemble, input_path: str | Path | Sequence[str | Path],
            output: str | Path, *, mask_output: str | Path | None = None, nifti_output: str | Path | None = None,
            roi: Region | None = None) -> Path:
    """Write the probability map of ``input_path`` (optionally within ``roi``) to ``output``; returns ``output``.

    ``checkpoint``: read once by the caller (a path is read here), or an ensemble of several (see
    :mod:`vesuvius_monai.engine.ensemble`; a Zarr output then goes through
    :func:`~vesuvius_monai.engine.ensemble_zarr.predict_ensemble_zarr`). ``input_path``: one volume, or several
    volumes and folders of volumes with a folder ``output`` (one ``<id>.zarr`` each, see :func:`folder_targets`; ``roi``
    applies to each). A ``.zarr`` output is predicted block by block and resumes an interrupted run (under torchrun
    the ranks share the blocks); ``nifti_output`` then also exports it as NIfTI (when it fits in memory).
    """
    _check_outputs([], {"--output": output, "--mask": mask_output, "--nifti": nifti_output})  # (no address)
    ensemble = as_ensemble(checkpoint, cfg)
    ensemble.check_windows()
    inputs = [as_location(p) for p in ([input_path] if isinstance(input_path, (str, Path)) else input_path)]
    output = Path(output)
    for flag, path in (("--output", output), ("--mask", mask_output), ("--nifti", nifti_output)):
        if path is not None:
            check_parents(path, flag)  # an output path through an existing file: refused before anything is written
    if is_folder_output(output):
        if mask_output or nifti_output:
            raise VesuviusError("--mask and --nifti go with one volume; a folder --output holds one <id>.zarr per "
                                "input volume")
        _predict_zarr(cfg, ensemble, folder_targets(inputs, output), roi)
        return output
    if len(inputs) != 1:
        raise VesuviusError(f"{len(inputs)} --input volumes need a folder --output (a name without suffix, one "
                            f"<id>.zarr per volume); {output} names one file")
    input_path = inputs[0]
    if input_path.is_dir() and volume_kind(input_path) is None:
        raise VesuviusError(f"--input {input_path} is a folder of volumes, not a volume (no TIFF slices in it): give "
                            f"a folder --output (a name without suffix) for one <id>.zarr per volume")
    _check_outputs(inputs, {"--output": output, "--mask": mask_output, "--nifti": nifti_output})
    reader = open_input(input_path, cfg)
    region = checked_roi(reader, roi)
    _check_kind(output, region, input_path, mask_output, nifti_output)
    for flag, path in (("--output", output), ("--mask", mask_output), ("--nifti", nifti_output)):
        if path is not None and is_nifti_path(Path(path)):
            check_replaceable_nifti(path, flag)
    if output.suffix == ".zarr":
        if mask_output:
            check_mask_target(mask_output, region_shape(region), cfg.postprocess)
        _predict_zarr(cfg, ensemble, [(input_path, output)], roi, nifti_output=nifti_output)
        if mask_output:
            on_main(init_distributed(cfg.infer.device)[0], write_mask_zarr, output, mask_output, cfg.postprocess)
        return output
    ctx, device = init_distributed(cfg.infer.device)
    if ctx.active:
        raise VesuviusError(f"--output {output}: a NIfTI output is predicted in memory by one process and cannot be "
                            f"shared by the {ctx.world_size} processes of torchrun; write a .zarr --output (the "
                            f"processes share its blocks, and --nifti exports it), or run without torchrun")
    return _predict_nifti(cfg, ensemble, reader, region, output, mask_output, device)


def _predict_zarr(cfg: Config, ensemble: Ensemble, targets: list[tuple[Path, Path]], roi: Region | None,
                  nifti_output: str | Path | None = None) -> None:
    """One network: :func:`predict_zarr` with its own config; several: their stores fused block by block."""
    if ensemble.single:
        member = ensemble.members[0]
        predict_zarr(member.cfg, member.network, targets, roi, nifti_output=nifti_output)
        return
    predict_ensemble_zarr(cfg, ensemble, targets, roi, nifti_output=nifti_output)


def _predict_nifti(cfg: Config, ensemble: Ensemble, reader, region: Region, output: Path,
                   mask_output: str | Path | None, device) -> Path:
    probs = ensemble_volume(ensemble, reader, device, roi=region, progress=True)
    affine = roi_affine(reader.affine, region)
    write_nifti(output, probs, affine=affine, description=PREDICTION_MARK)
    if mask_output:
        write_nifti(mask_output, postprocess(probs, cfg.postprocess).astype(np.uint8), affine=affine,
                    description=PREDICTION_MARK)
    log.info("wrote %s", output)
    return output
