"""Training: set-up of a run (run folder, data, resume checks) and validation; the loop itself is
:class:`vesuvius_monai.engine.trainer.Trainer` (AdamW, warm-up + cosine/poly decay on steps or on a time budget,
masked Dice(+BCE, clDice, Skeleton Recall) losses, best/last checkpoints, exact resume, CSV + TensorBoard logs).

The run folder (``cfg.output_dir``) and its layout are :class:`vesuvius_monai.io.run_dir.RunDir`'s: ``train``
starts only in a new or empty folder, or in one of its own runs interrupted before its first checkpoint (started
again); a folder holding anything else is refused untouched. ``train`` checks its config, data and model before it
creates anything, holds the run folder's lock for the whole run (rank 0 under torchrun; a second command into the
folder is refused meanwhile), and removes a folder it made when it fails before its first checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from vesuvius_monai.config import Config, TrainConfig, TuneConfig, config_from_raw, flatten, save_config, to_dict
from vesuvius_monai.data.dataset import Fragment, load_splits
from vesuvius_monai.data.patches import PatchDataset, PatchSource, prepare_sources, rank_items
from vesuvius_monai.engine.distributed import DistContext, init_distributed, on_main
from vesuvius_monai.engine.infer import infer_volume, without_tta
from vesuvius_monai.engine.runlog import NullLog, RunLog, log_fields
from vesuvius_monai.engine.schedule import RunClock
from vesuvius_monai.engine.trainer import Trainer, TrainState, build_state, restore_state
from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.io.atomic import write_text
from vesuvius_monai.io.checkpoint import Checkpoint
from vesuvius_monai.io.run_dir import RunDir
from vesuvius_monai.losses import build_loss
from vesuvius_monai.metrics.overlap import dice
from vesuvius_monai.models import check_input_sizes, check_model
from vesuvius_monai.models.memory import check_training_memory
from vesuvius_monai.report import plot_learning_curve

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- set-up


def check_sizes(cfg: Config) -> None:
    """Patch and window sizes must be multiples of what the model can pool."""
    check_input_sizes(cfg.model.name, cfg.model.kwargs,
                      {"transforms.patch_size": cfg.transforms.patch_size, "infer.roi_size": cfg.infer.roi_size})


# Keys a resumed run may change. train.batch_size too: the patch stream goes on from the patches drawn so far, and
# with the same effective batch (processes x batch_size, e.g. 2 x 2 resumed as 1 x 4) the run is the same.
RESUME_MAY_DIFFER = {"train.max_minutes", "train.num_workers", "train.num_threads", "train.device",
                     "train.log_every", "data.cache_dir", "data.missing_chunks", "train.batch_size",
                     "data.remote_cache_mb", "data.remote_cache_dir", "data.remote_retries", "data.remote_backoff_s",
                     "data.remote_timeout_s",
                     *(f"tune.{f.name}" for f in dataclasses.fields(TuneConfig))}  # tune: used after training only


def check_resume_config(cfg: Config, saved: dict, path: Path) -> None:
    """A resumed run must have the config it was started with (except harmless keys), or it is not exact.

    The saved config is read as any stored config is (old keys upgraded, keys added since then at their defaults).
    """
    now, then = flatten(to_dict(cfg)), flatten(to_dict(config_from_raw(saved)))
    differ = sorted(k for k in now.keys() | then.keys() if now.get(k) != then.get(k) and k not in RESUME_MAY_DIFFER)
    if differ:
        detail = ", ".join(f"{k}: {then.get(k)!r} -> {now.get(k)!r}" for k in differ[:5])
        raise VesuviusError(f"cannot resume {path} with another config ({detail}); resume with the run's own "
                            f"config.yaml or start a new output_dir")


def check_resume_splits(saved: dict[str, list[str]] | None, ids: dict[str, list[str]], path: Path) -> None:
    """A resumed run must split its fragments as it did when it started; name the fragments that moved."""
    if saved is None:
        log.warning("%s records no split: cannot check that the data split is unchanged", path)
        return
    before = {fid: name for name, items in saved.items() for fid in items}
    after = {fid: name for name, items in ids.items() for fid in items}
    moved = [f"{fid}: {before.get(fid, 'absent')} -> {after.get(fid, 'absent')}"
             for fid in sorted(before.keys() | after.keys()) if before.get(fid) != after.get(fid)]
    if moved:
        more = f" and {len(moved) - 5} more" if len(moved) > 5 else ""
        raise VesuviusError(f"cannot resume {path}: the data split changed since the run started "
                            f"({', '.join(moved[:5])}{more}); resume with the run's data (data.root / data.dataset, "
                            f"its splits.json) or start a new output_dir")


def prepare_run_dir(cfg: Config, resume: bool) -> tuple[RunDir, Checkpoint | None]:
    """Mark the run folder (a new one checked first, see :meth:`RunDir.check_new`), or check the one to resume;
    write the resolved config. Returns the run folder and, when resuming, its ``last.pt`` checked against the config.
    """
    run = RunDir(cfg.output_dir)
    last = None
    if resume:
        run.check_resumable()
        last = Checkpoint.load(run.last)
        check_resume_config(cfg, last.config, run.last)
    else:
        run.check_new()
    run.mark()
    run.checkpoints.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run.config)
    return run, last


def record_splits(run: RunDir, splits: dict[str, list[Fragment]]) -> dict[str, list[str]]:
    """Write splits.json (fragment ids per split) and return it for the checkpoints."""
    ids = {name: [f.id for f in items] for name, items in splits.items()}
    write_text(run.splits, json.dumps(ids, indent=2))
    return ids


def set_threads(cfg: TrainConfig) -> None:
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    log.info("torch threads: %d", torch.get_num_threads())


# --------------------------------------------------------------------------- validation


def validate(model: nn.Module, fragments: list[Fragment], cfg: Config, device: torch.device) -> float:
    """Mean Dice (ignore region excluded) of thresholded sliding-window probabilities over whole val fragments.

    Fragments are read one at a time, so memory is bounded by the largest one. Test-time augmentation is left out
    here (it would multiply the cost of every validation pass); evaluate, predict and tune-postprocess apply it.
    """
    plain = without_tta(cfg)
    scores = []
    for fragment in fragments:
        probs = infer_volume(model, fragment.image, plain, device=device)
        label = fragment.label.read()
        scores.append(dice(probs > cfg.postprocess.threshold, label, ignore_index=cfg.data.ignore_index))
    return float(np.mean(scores))


# --------------------------------------------------------------------------- entry


def make_loader(dataset: PatchDataset, cfg: TrainConfig, first_item: int, steps: int,
                ctx: DistContext | None = None) -> DataLoader:
    """This process's batches of ``steps`` steps, in order, the first step's global batch starting at item
    ``first_item`` (item indices fix the batch of each step; see :func:`rank_items`)."""
    ctx = ctx or DistContext()
    items = rank_items(first_item, steps, cfg.batch_size, ctx.rank, ctx.world_size)
    return DataLoader(dataset, batch_size=cfg.batch_size, sampler=items, num_workers=cfg.num_workers,
                      persistent_workers=False)


def train(cfg: Config, *, resume: bool = False, stop_at_step: int | None = None) -> Path:
    """Train a model as ``cfg`` says and return the run folder.

    Under torchrun every process calls this; they train together (see :mod:`vesuvius_monai.engine.distributed`).
    ``stop_at_step`` ends the run early after that step (saving ``last.pt``) as an interruption would;
    a later ``resume=True`` call continues it exactly. The config, the data split, the model and the loss are
    checked before anything is created; the run folder is then locked for the whole run (:func:`open_run`).
    """
    clock = RunClock(budget_s=cfg.train.max_minutes * 60)
    check_model(cfg.model.name, cfg.model.kwargs)
    check_sizes(cfg)
    check_training_memory(cfg)
    ctx, device = init_distributed(cfg.train.device)
    set_threads(cfg.train)
    splits = load_splits(cfg.data)
    state = build_state(cfg, device)
    loss_fn = build_loss(cfg.train.loss, ignore_index=cfg.data.ignore_index)
    with contextlib.ExitStack() as held:
        run, resumed = on_main(ctx, open_run, held, cfg, resume)
        state.splits = on_main(ctx, _check_and_record_splits, run, splits, resumed)
        if resumed is not None:
            restore_state(state, clock, resumed)
            if ctx.is_main:
                _check_effective_batch(resumed, cfg.train, ctx)
        log.info("loss terms and weights: %s", loss_fn.weights.active())
        stop = min(stop_at_step or cfg.train.steps, cfg.train.steps)
        loader = _training_batches(cfg, run, splits["train"], state, stop, ctx)
        _fit(cfg, run, splits["val"], state, loss_fn, clock, stop, loader, ctx, device, resume)
    return run.path


def open_run(held: contextlib.ExitStack, cfg: Config, resume: bool) -> tuple[RunDir, Checkpoint | None]:
    """Lock the run folder for this run (until ``held`` closes), then prepare it (:func:`prepare_run_dir`).

    A folder that is not a run is checked before it is locked (nothing is written into a folder that is not ours);
    temporary files of a save that never finished are removed. When this call makes the folder, a failure before
    the run's first checkpoint removes it again (:meth:`RunDir.discard`).
    """
    run = RunDir(cfg.output_dir)
    if not run.is_run() and resume:
        run.check_resumable()
    elif not run.is_run():
        run.check_new()
    lock = held.enter_context(run.lock("train"))
    if lock.made is not None:  # a new folder: removed again on a failure (its new parents too, by the lock)
        held.enter_context(_discard_on_error(run))
    for leftover in run.checkpoint_leftovers():
        log.info("removing %s, left by a save that never finished", leftover)
        leftover.unlink(missing_ok=True)
    return prepare_run_dir(cfg, resume)


@contextlib.contextmanager
def _discard_on_error(run: RunDir) -> Iterator[None]:
    """On an error in the block, remove the run folder this process made (see :meth:`RunDir.discard`)."""
    try:
        yield
    except Exception:
        run.discard()
        raise


def _fit(cfg: Config, run: RunDir, val: list[Fragment], state: TrainState, loss_fn: nn.Module, clock: RunClock,
         stop: int, loader: DataLoader, ctx: DistContext, device: torch.device, resume: bool) -> None:
    """Train until ``stop`` with its logs, then draw the learning curve (rank 0)."""
    runlog = _open_log(run, loss_fn.weights.active(), state.step if resume else -1) if ctx.is_main else NullLog()
    trainer = Trainer(cfg, state, loss_fn=loss_fn, device=device, runlog=runlog, clock=clock, ctx=ctx,
                      validate=(lambda model: validate(model, val, cfg, device)) if val else None)
    try:
        trainer.fit(loader, stop)
    except KeyboardInterrupt:
        log.warning("interrupted: %s holds the last periodic save; continue with --resume", run.last)
        raise
    finally:
        runlog.close()
    if ctx.is_main:
        plot_learning_curve(run.train_log, run.learning_curve)
        log.info("run saved in %s (step %d, best val Dice %.4f)", run.path, state.step, state.best_metric)


def _check_and_record_splits(run: RunDir, splits: dict[str, list[Fragment]], resumed: Checkpoint | None) -> dict:
    """On resume, check that the split is the run's; then write splits.json. Returns the ids per split."""
    ids = {name: [f.id for f in items] for name, items in splits.items()}
    if resumed is not None:
        check_resume_splits(resumed.splits or None, ids, run.last)
    return record_splits(run, splits)


def _check_effective_batch(last: Checkpoint, cfg: TrainConfig, ctx: DistContext) -> None:
    """Say so when a run resumes with another effective batch (processes x train.batch_size)."""
    world, batch = last.world_size, last.config["train"]["batch_size"]
    if world * batch != ctx.world_size * cfg.batch_size:
        log.warning("resuming with another effective batch (%d processes x %d = %d before, %d x %d = %d now): "
                    "training goes on, but not as the uninterrupted run would have", world, batch, world * batch,
                    ctx.world_size, cfg.batch_size, ctx.world_size * cfg.batch_size)


def _training_sources(cfg: Config, run: RunDir, fragments: list[Fragment], ctx: DistContext) -> list[PatchSource]:
    """Intensity windows and surface indices of the training fragments, prepared (and cached) by rank 0."""
    cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else run.cache

    def prepare() -> list[tuple]:
        return [(s.window, s.surface) for s in prepare_sources(fragments, cfg.transforms, cache_dir,
                                                                cfg.data.ignore_index)]

    prepared = on_main(ctx, prepare)
    return [PatchSource(fragment=f, window=window, surface=surface)
            for f, (window, surface) in zip(fragments, prepared)]


def _training_batches(cfg: Config, run: RunDir, fragments: list[Fragment], state: TrainState, stop: int,
                      ctx: DistContext) -> DataLoader:
    """This process's loader of the training patches of steps ``state.step + 1 .. stop``."""
    sources = _training_sources(cfg, run, fragments, ctx)
    steps = max(stop - state.step, 0)
    length = state.items + steps * ctx.world_size * cfg.train.batch_size
    dataset = PatchDataset(sources, cfg.transforms, seed=cfg.seed, length=length, ignore_index=cfg.data.ignore_index)
    return make_loader(dataset, cfg.train, state.items, steps, ctx)


def _open_log(run: RunDir, terms: dict, keep_until: int) -> RunLog:
    """The run's CSV + TensorBoard log, without rows and events after step ``keep_until`` (-1: none kept)."""
    purge = keep_until + 1 if run.tensorboard.exists() else None
    runlog = RunLog(run, log_fields(terms), purge_step=purge)
    runlog.truncate_after(keep_until)
    return runlog
