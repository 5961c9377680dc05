"""Zarr outputs of an ensemble of several members: each member's own resumable store, then a block-wise fusion.

Layout, while an output ``<out>`` is being built (see :mod:`vesuvius_monai.engine.zarr_output`)::

    <out>.partial/                   the output store (the run's block size and ``infer.out_dtype``); its metadata
                                     records the ensemble (``ensemble.members.<i>``: checkpoint, sha256, weight,
                                     the member's window and TTA; ``ensemble.fusion``, ``ensemble.n_members``)
    <out>.partial/.members/<i>.zarr  member i's probabilities (float32), predicted by ``predict_zarr`` as any single
                                     network's output: block-wise, resumable, shared between torchrun's ranks

:func:`predict_ensemble_zarr` predicts the members one after the other (a finished member store is kept as it is,
an unfinished one resumed), then fuses them block by block into the output store (the blocks split between the
ranks; each block read from every member store, fused, written and marked done), and rank 0 publishes the output
(the member stores are dropped first). A rerun resumes wherever the run stopped: fused blocks are not fused again,
finished members not predicted again. A rerun with other members, weights or fusion is refused before anything is
computed, naming the difference (the output's metadata).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from vesuvius_monai.config import Config
from vesuvius_monai.data.regions import Region, Triple
from vesuvius_monai.engine.distributed import (init_distributed, make_wait_group, on_main,
                                               split_contiguous)
from vesuvius_monai.engine.ensemble import Ensemble, Fuser
from vesuvius_monai.engine.infer import window_grid
from vesuvius_monai.engine.zarr_predict import open_input, output_meta, predict_zarr, shared_run
from vesuvius_monai.engine.zarr_output import (check_output_store, checked_roi, export_nifti, open_work_store,
                                               output_lock, publish_store, work_path)
from vesuvius_monai.io.zarr_store import PredictionStore

log = logging.getLogger(__name__)

MEMBERS_DIR = ".members"


def member_path(out: Path, index: int) -> Path:
    """Where member ``index`` of the ensemble output ``out`` is predicted: ``<out>.partial/.members/<index>.zarr``."""
    return work_path(Path(out)) / MEMBERS_DIR / f"{index}.zarr"


def member_store_config(cfg: Config) -> Config:
    """A member's config for its store: float32 probabilities (the fusion loses nothing before ``out_dtype``)."""
    return dataclasses.replace(cfg, infer=dataclasses.replace(cfg.infer, out_dtype="float32"))


@dataclass(frozen=True)
class FusedOutput:
    """One output of the run: its input, store, the blocks not fused yet (all blocks: ``n_blocks``) and whether
    it was complete already."""

    input: Path
    output: Path
    todo: list[Triple]
    n_blocks: int
    complete: bool


def store_blocks(store: PredictionStore) -> list[tuple[Triple, Region]]:
    """Every chunk of the store's array (= prediction block) as (block index, region), in C order."""
    shape, chunks = store.array.shape, store.array.chunks
    counts = [-(-d // c) for d, c in zip(shape, chunks)]
    return [(index, tuple(slice(i * c, min((i + 1) * c, d)) for i, c, d in zip(index, chunks, shape)))
            for index in itertools.product(*(range(n) for n in counts))]  # type: ignore[misc]


def prepare_ensemble_outputs(cfg: Config, ensemble: Ensemble, targets: list[tuple[Path, Path]],
                             roi: Region | None, resume: bool) -> list[FusedOutput]:
    """Check every output (before creating any), then create or resume their stores; the blocks left to fuse."""
    opened, run_info = [], ensemble.run_info()
    for input_path, out in targets:
        reader = open_input(input_path, cfg)
        region = checked_roi(reader, roi)
        meta = output_meta(reader, region, cfg, run_info)
        opened.append((reader, region, meta, check_output_store(out, cfg.infer.out_dtype, meta, resume)))
    outputs = []
    for (input_path, out), (reader, region, meta, state) in zip(targets, opened):
        if state == "complete":
            log.info("%s: already complete, nothing to do", out)
            outputs.append(FusedOutput(Path(input_path), Path(out), [], 0, True))
            continue
        block = window_grid(region, cfg.infer).block_size
        store = open_work_store(out, reader, region, block, cfg.infer.out_dtype, meta, resume)
        blocks = [index for index, _ in store_blocks(store)]  # type: ignore[arg-type]
        done = set(blocks) if store.meta.get("complete") else store.done_blocks()  # type: ignore[union-attr]
        outputs.append(FusedOutput(Path(input_path), Path(out), [b for b in blocks if b not in done], len(blocks),
                                   False))
    return outputs


def _lock_and_prepare(locks: contextlib.ExitStack, cfg: Config, ensemble: Ensemble,
                      targets: list[tuple[Path, Path]], roi: Region | None, resume: bool) -> list[FusedOutput]:
    for _, out in targets:
        locks.enter_context(output_lock(out))
    return prepare_ensemble_outputs(cfg, ensemble, targets, roi, resume)


def predict_ensemble_zarr(cfg: Config, ensemble: Ensemble, targets: list[tuple[Path, Path]], roi: Region | None, *,
                          nifti_output: str | Path | None = None, resume: bool = True) -> None:
    """Predict every (input, ``.zarr`` output) of ``targets`` with the ensemble (module docstring), in this process or
    shared by torchrun's ranks. ``cfg``: the run config (the output's block size, dtype, device); each member
    predicts with its own. ``resume`` False: every output predicted afresh. ``nifti_output``: also export the first
    output as NIfTI."""
    ctx, _ = init_distributed(cfg.infer.device)
    make_wait_group(ctx)
    with contextlib.ExitStack() as locks:
        outputs = on_main(ctx, _lock_and_prepare, locks, cfg, ensemble, targets, roi, resume)
        pending = [o for o in outputs if o.todo]
        for i, member in enumerate(ensemble.members):
            if pending:
                log.info("member %d of %d (weight %.4g)", i + 1, len(ensemble.members), member.weight)
                predict_zarr(member_store_config(member.cfg), member.network,
                             [(o.input, member_path(o.output, i)) for o in pending], roi)
        units = [(v, block) for v, o in enumerate(pending) for block in o.todo]
        share = [units[k] for k in split_contiguous([1.0] * len(units), ctx.world_size)[ctx.rank]]
        shared_run(ctx, lambda: fuse_blocks(ensemble, pending, share, progress=ctx.is_main), 0)
        on_main(ctx, _publish, outputs, nifti_output)


def fuse_blocks(ensemble: Ensemble, outputs: list[FusedOutput], share: list[tuple[int, Triple]],
                progress: bool = False) -> int:
    """Fuse the (output index, block) of ``share``: each block read from every member store, fused
    (:class:`~vesuvius_monai.engine.ensemble.Fuser`), written into the output's store and marked done. Memory: a
    few blocks. Returns the number of blocks fused."""
    stores: dict[int, tuple[PredictionStore, list[PredictionStore], dict]] = {}
    for v, block in tqdm(share, desc="fuse", unit="block", disable=not progress, leave=False, dynamic_ncols=True):
        if v not in stores:
            out = outputs[v].output
            store = PredictionStore.open(work_path(out))
            members = [PredictionStore.open(member_path(out, i), mode="r") for i in range(len(ensemble.members))]
            stores[v] = (store, members, dict(store_blocks(store)))
        store, members, regions = stores[v]
        fuser = Fuser(ensemble.fusion)
        for member, member_store in zip(ensemble.members, members):
            fuser.add(member_store.read_probabilities(regions[block]), member.weight)
        store.write_block(block, regions[block], fuser.result())
    return len(share)


def _publish(outputs: list[FusedOutput], nifti_output: str | Path | None) -> None:
    """Drop the member stores and publish every output (once, after every process has finished); then the optional
    NIfTI export of the first output."""
    for o in outputs:
        if not o.complete:
            work = work_path(o.output)
            shutil.rmtree(work / MEMBERS_DIR, ignore_errors=True)
            publish_store(PredictionStore.open(work), o.output, blocks=o.n_blocks)
    if nifti_output:
        export_nifti(outputs[0].output, nifti_output)
