"""Prediction of unlabeled volumes of any size, in one process or spread over the processes of ``torchrun``.

``.zarr`` outputs are written block by block (bounded memory, resumable) by :func:`predict_zarr`, the one path of
every Zarr output (the command's, the tests' and the benchmarks'), which runs any source of the network (see
:mod:`vesuvius_monai.engine.networks`). NIfTI outputs are predicted in memory when the volume (or region of
interest) fits, carrying the input's affine and spacing. A folder output (a name without suffix) gets one
``<id>.zarr`` per input volume; the inputs are volumes and folders of volumes.

Under torchrun (see :mod:`vesuvius_monai.engine.distributed`) the blocks of every Zarr output are split between the
ranks. Rank 0 checks every output and creates (or resumes) the stores while the others wait; the unfinished
z-planes of blocks of all volumes, in order, are then cut into one contiguous run per rank with about the same
number of windows (:func:`split_work`), so a rank shares a volume with at most its two neighbours, at a whole
z-plane of blocks. A rank's first plane needs the spills of the plane below, which the rank before it writes only at
the end of its run: it recomputes the windows of that plane that reach across (one z-plane of windows per seam for
``overlap`` <= 0.5) unless they are on disk already (see :mod:`vesuvius_monai.engine.blockwise`). When every rank
is done, rank 0 alone publishes the stores. Markers stay per block: a run in which any process died is finished by
the same command with any number of processes. Rank 0 holds the lock of every output store (``<out>.lock``) from
before it checks them until they are published; the other ranks of its job work under it, and another run into
any of the stores is refused before it computes anything.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from vesuvius_monai.config import Config, to_dict
from vesuvius_monai.data.dataset import VOLUME_SUFFIXES, volume_id
from vesuvius_monai.data.readers import (Region, VolumeReader, format_region, open_volume, region_shape,
                                         volume_kind)
from vesuvius_monai.data.regions import Triple
from vesuvius_monai.data.remote import RemoteAddress, RemoteOptions, as_location, is_remote
from vesuvius_monai.engine.blockwise import RunStats, run_blocks
from vesuvius_monai.engine.distributed import (DistContext, gather_results, init_distributed, make_wait_group,
                                               on_main, split_contiguous)
from vesuvius_monai.engine.ensemble import Ensemble, as_ensemble, ensemble_volume
from vesuvius_monai.engine.infer import source_normalizer, volume_grid, volume_job
from vesuvius_monai.engine.networks import NetworkSource
from vesuvius_monai.engine.remote_reads import log_fetched, plan_remote_reads
from vesuvius_monai.engine.zarr_output import (check_output_store, checked_roi, export_nifti, open_work_store,
                                               output_lock, publish_store, roi_affine, run_meta, work_path)
from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.io.checkpoint import Checkpoint
from vesuvius_monai.io.nifti import PREDICTION_MARK, check_replaceable_nifti, is_nifti_path, write_nifti
from vesuvius_monai.io.paths import check_parents, inside, safe_name
from vesuvius_monai.io.pyramid import n_levels
from vesuvius_monai.io.zarr_store import PredictionStore
from vesuvius_monai.postprocess import postprocess
from vesuvius_monai.postprocess.blockwise import check_mask_target, write_mask_zarr

log = logging.getLogger(__name__)

MAX_IN_MEMORY_VOXELS = 384**3  # NIfTI output beyond this: write .zarr instead
FINISH_HINT = "the blocks written so far are kept: run the same command again (with any number of processes) to finish"


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


def _open(path: Path | RemoteAddress, cfg: Config) -> VolumeReader:
    """The volume at ``path`` as ``data`` says to read it (spacing, Zarr level and key, remote chunk cache)."""
    return open_volume(path, spacing=cfg.data.spacing, level=cfg.data.zarr_level, key=cfg.data.zarr_key,
                       missing_chunks=cfg.data.missing_chunks, remote=RemoteOptions.from_config(cfg.data))


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
    reader = _open(input_path, cfg)
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
    from vesuvius_monai.engine.ensemble_zarr import predict_ensemble_zarr

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


# --------------------------------------------------------------------------- Zarr outputs, one or many processes


@dataclass(frozen=True)
class OutputVolume:
    """One Zarr output of a run: its input, final store, region, number of blocks, whether it is done and its
    number of OME-Zarr pyramid levels."""

    input: Path | RemoteAddress
    output: Path
    region: Region
    n_blocks: int
    complete: bool
    levels: int = 1


@dataclass(frozen=True)
class Work:
    """The volumes of a run and each rank's share: ``shares[rank]`` = [(volume index, its blocks), ...]."""

    volumes: list[OutputVolume]
    shares: list[list[tuple[int, list[Triple]]]]


def split_work(units: list[tuple[int, list[Triple]]], costs: list[float], world: int) -> list[list]:
    """Cut the (volume index, blocks of one z-plane) ``units`` into ``world`` contiguous runs of about equal cost.

    Returns per rank [(volume index, blocks), ...] with the planes of one volume joined.
    """
    shares: list[list[tuple[int, list[Triple]]]] = []
    for part in split_contiguous(costs, world):
        share: list[tuple[int, list[Triple]]] = []
        for v, blocks in (units[i] for i in part):
            if share and share[-1][0] == v:
                share[-1][1].extend(blocks)
            else:
                share.append((v, list(blocks)))
        shares.append(share)
    return shares


def output_meta(reader: VolumeReader, region: Region, cfg: Config, run_info: dict) -> dict:
    """What a Zarr output's resumed run must share with the interrupted one (see ``run_meta``): the geometry, the
    ``infer`` settings, the normalisation and the network's ``run_info``."""
    extra = {"percentiles": list(cfg.transforms.percentiles), "infer": to_dict(cfg.infer), **run_info}
    return run_meta(reader, region, volume_grid(reader, region, cfg.infer)[0].block_size, cfg.infer.out_dtype, extra)


def prepare_outputs(cfg: Config, network: NetworkSource, targets: list[tuple[Path, Path]], roi: Region | None,
                    world: int, resume: bool = True) -> Work:
    """Check every output (before creating any), create or resume their stores, and split the blocks not done yet.

    Run by one process (rank 0) while the others wait. The cost of a block is its own windows plus one. The stores
    record ``network.run_info()``; with ``resume`` False every output is predicted afresh.
    """
    opened, run_info = [], network.run_info()
    for input_path, out in targets:
        reader = _open(input_path, cfg)
        if hasattr(network, "check_volume"):  # e.g. an nnU-Net model refuses a volume at another spacing
            network.check_volume(reader)
        region = checked_roi(reader, roi)
        meta = output_meta(reader, region, cfg, run_info)
        opened.append((reader, region, meta, check_output_store(out, cfg.infer.out_dtype, meta, resume)))
    volumes, units, costs = [], [], []
    for v, ((input_path, out), (reader, region, meta, state)) in enumerate(zip(targets, opened)):
        grid, blocks = volume_grid(reader, region, cfg.infer)
        volumes.append(OutputVolume(as_location(input_path), Path(out), region, len(blocks), state == "complete",
                                    n_levels(region_shape(region), cfg.infer.pyramid_levels)))
        if state == "complete":
            log.info("%s: already complete, nothing to do", out)
            continue
        store = open_work_store(out, reader, region, grid.block_size, cfg.infer.out_dtype, meta, resume)
        done = set(blocks) if store.meta.get("complete") else store.done_blocks()  # type: ignore[union-attr]
        planes: dict[int, list[Triple]] = {}  # the blocks not done yet, by z-plane, in the grid's order
        for block in blocks:
            if block not in done:
                planes.setdefault(block[0], []).append(block)
        for z in sorted(planes):
            units.append((v, planes[z]))
            costs.append(sum(grid.n_own_windows(b) + 1 for b in planes[z]))
    return Work(volumes, split_work(units, costs, world))


def predict_zarr(cfg: Config, network: NetworkSource, targets: list[tuple[Path, Path]], roi: Region | None, *,
                 nifti_output: str | Path | None = None, resume: bool = True) -> None:
    """Predict every (input, ``.zarr`` output) of ``targets`` with ``network`` on ``infer.device``, in this process
    or shared by torchrun's ranks: the one path of every Zarr output.

    ``roi`` applies to each input. An output already complete from the same settings and network is kept as it is;
    an unfinished one is resumed (with ``resume`` False: predicted afresh). ``nifti_output``: also export the first
    output as NIfTI.
    """
    ctx, device = init_distributed(cfg.infer.device)
    make_wait_group(ctx)
    with contextlib.ExitStack() as locks:
        work = on_main(ctx, _lock_and_prepare, locks, cfg, network, targets, roi, ctx.world_size, resume)
        error, stats = None, RunStats()
        try:
            if work.shares[ctx.rank]:
                stats = _run_share(network, cfg, work, ctx, device)
        except Exception as err:
            if not ctx.active:
                raise
            if not isinstance(err, VesuviusError):
                log.exception("rank %d failed", ctx.rank)
            error = str(err) if isinstance(err, VesuviusError) else f"{type(err).__name__}: {err}"
        try:
            results = gather_results(ctx, error, stats)
        except VesuviusError as err:
            raise VesuviusError(f"{err}; {FINISH_HINT}") from None
        if ctx.active:
            _log_shares(results)
        on_main(ctx, _publish, work, nifti_output)


def _lock_and_prepare(locks: contextlib.ExitStack, cfg: Config, network: NetworkSource,
                      targets: list[tuple[Path, Path]], roi: Region | None, world: int, resume: bool) -> Work:
    """Take the lock of every output store (held until ``locks`` closes), then :func:`prepare_outputs`."""
    for _, out in targets:
        locks.enter_context(output_lock(out))
    return prepare_outputs(cfg, network, targets, roi, world, resume)


def _run_share(network: NetworkSource, cfg: Config, work: Work, ctx: DistContext, device) -> RunStats:
    """Predict this rank's blocks of every volume of ``work`` into their stores."""
    stats = RunStats()
    with network.predictor(cfg.infer, device) as predictor:
        for v, blocks in work.shares[ctx.rank]:
            volume = work.volumes[v]
            store = PredictionStore.open(work_path(volume.output))
            if len(work.volumes) > 1 or ctx.active:
                log.info("%s -> %s: %d of its %d blocks in this process", volume.input, volume.output, len(blocks),
                         volume.n_blocks)
            reader = _open(volume.input, cfg)
            grid, touching = volume_grid(reader, volume.region, cfg.infer)
            done = store.done_blocks()
            todo = [b for b in (sorted(blocks) if ctx.active else touching) if b not in done]
            whole = tuple(slice(0, n) for n in reader.shape)  # blocks read their context beyond an ROI
            plan_remote_reads(reader, grid, whole, todo, cfg.data.remote_cache_mb, cfg.data.remote_cache_dir)
            job = volume_job(reader, cfg, predictor, device, volume.region,  # (reads the percentile sample)
                             source_normalizer(network, reader, cfg))
            stats += run_blocks(job, store, store.spills(), blocks=blocks if ctx.active else None,
                                progress=ctx.is_main)
            log_fetched(reader)
            if not ctx.active:  # one process: publish each volume when done (under torchrun: after every rank is)
                _finish_store(store, volume)
    return stats


def _log_shares(results: list[RunStats]) -> None:
    """One line per rank and the total of windows recomputed at the seams between ranks."""
    for rank, stats in enumerate(results):
        log.info("rank %d: %d blocks, %d windows, %d windows recomputed for %d blocks of its neighbours", rank,
                 stats.blocks, stats.windows, stats.recomputed, stats.recomputed_blocks)
    windows = sum(s.windows for s in results)
    recomputed = sum(s.recomputed for s in results)
    log.info("%d processes: %d blocks, %d windows, %d more (%.1f%%) recomputed at the seams between ranks",
             len(results), sum(s.blocks for s in results), windows, recomputed, 100 * recomputed / max(windows, 1))


def _finish_store(store: PredictionStore, volume: OutputVolume) -> None:
    """Build the pyramid of a store whose blocks are all written (in this process, once), log the windows it ran
    and skipped, and publish it."""
    if len(store.done_blocks()) == volume.n_blocks or store.meta.get("complete"):
        store.build_pyramid(volume.levels, progress=True)
    counts = store.window_counts()
    if counts and counts["skipped"]:
        log.info("%s: %d windows run, %d skipped (empty space or outside the ROI)", volume.output, counts["run"],
                 counts["skipped"])
    publish_store(store, volume.output, blocks=volume.n_blocks)


def _publish(work: Work, nifti_output: str | Path | None) -> None:
    """Publish every store of ``work`` (once, after every process has finished), then the optional NIfTI export."""
    for volume in work.volumes:
        if not volume.complete and work_path(volume.output).exists():  # (one process published it already)
            _finish_store(PredictionStore.open(work_path(volume.output)), volume)
    if nifti_output:
        export_nifti(work.volumes[0].output, nifti_output)
