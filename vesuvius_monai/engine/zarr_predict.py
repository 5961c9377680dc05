"""The one Zarr driver: :func:`predict_zarr` writes volumes block by block into resumable stores (bounded memory),
in one process or spread over the processes of ``torchrun``, with any source of the network (see
:mod:`vesuvius_monai.engine.networks`). Every Zarr output goes through it: ``predict``'s, an ensemble's members
(:mod:`vesuvius_monai.engine.ensemble_zarr`), the tests' and the benchmarks'.

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
from typing import Callable, TypeVar

from vesuvius_monai.config import Config, to_dict
from vesuvius_monai.data.readers import Region, VolumeReader, open_volume, region_shape
from vesuvius_monai.data.regions import Triple
from vesuvius_monai.data.remote import RemoteAddress, RemoteOptions, as_location
from vesuvius_monai.engine.blockwise import RunStats, run_blocks
from vesuvius_monai.engine.distributed import (DistContext, gather_results, init_distributed, make_wait_group,
                                               on_main, split_contiguous)
from vesuvius_monai.engine.infer import source_normalizer, volume_grid, volume_job
from vesuvius_monai.engine.networks import NetworkSource
from vesuvius_monai.engine.remote_reads import log_fetched, plan_remote_reads
from vesuvius_monai.engine.zarr_output import (check_output_store, checked_roi, export_nifti, open_work_store,
                                               output_lock, publish_store, run_meta, work_path)
from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.io.pyramid import n_levels
from vesuvius_monai.io.zarr_store import PredictionStore


log = logging.getLogger(__name__)
T = TypeVar("T")

FINISH_HINT = "the blocks written so far are kept: run the same command again (with any number of processes) to finish"


def open_input(path: Path | RemoteAddress, cfg: Config) -> VolumeReader:
    """The volume at ``path`` as ``data`` says to read it (spacing, Zarr level and key, remote chunk cache)."""
    return open_volume(path, spacing=cfg.data.spacing, level=cfg.data.zarr_level, key=cfg.data.zarr_key,
                       missing_chunks=cfg.data.missing_chunks, remote=RemoteOptions.from_config(cfg.data))




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
        reader = open_input(input_path, cfg)
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
        results = shared_run(ctx, lambda: _run_share(network, cfg, work, ctx, device) if work.shares[ctx.rank]
                             else RunStats(), RunStats())
        if ctx.active:
            _log_shares(results)
        on_main(ctx, _publish, work, nifti_output)


def shared_run(ctx: DistContext, work: Callable[[], T], empty: T) -> list[T]:
    """Run this process's ``work`` and gather every rank's result (``empty`` for a rank that failed). Under torchrun
    a failure is logged and gathered, so that every rank stops with one error naming it and the way to finish."""
    error, result = None, empty
    try:
        result = work()
    except Exception as err:
        if not ctx.active:
            raise
        if not isinstance(err, VesuviusError):
            log.exception("rank %d failed", ctx.rank)
        error = str(err) if isinstance(err, VesuviusError) else f"{type(err).__name__}: {err}"
    try:
        return gather_results(ctx, error, result)
    except VesuviusError as err:
        raise VesuviusError(f"{err}; {FINISH_HINT}") from None


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
            reader = open_input(volume.input, cfg)
            grid, touching = volume_grid(reader, volume.region, cfg.infer)
            done = store.done_blocks()
            todo = [b for b in (sorted(blocks) if ctx.active else touching) if b not in done]
            whole = tuple(slice(0, n) for n in reader.shape)  # blocks read their context beyond an ROI
            plan_remote_reads(reader, grid, whole, todo, cfg.data.remote_cache_mb, cfg.data.remote_cache_dir,
                              None if volume.region == whole else volume.region)
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
