"""Training: AdamW with warm-up and cosine/poly decay, masked Dice(+CE) losses, sliding-window validation,
best/last checkpoints, exact resume, CSV + TensorBoard logs and a learning-curve PNG.

Run folder (``cfg.output_dir``)::

    config.yaml          resolved config of the run
    splits.json          fragment ids of train / val / test (also stored in every checkpoint)
    train_log.csv        step, loss (and its parts), lr, seconds, steps/s, val_dice
    tensorboard/         the same scalars for TensorBoard
    checkpoints/last.pt  latest state, for ``--resume``
    checkpoints/best.pt  best validation Dice
    learning_curve.png
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from vesuvius_monai.config import Config, TrainConfig, save_config, to_dict, upgrade_raw
from vesuvius_monai.data.dataset import Fragment, load_splits
from vesuvius_monai.data.patches import PatchDataset, prepare_sources
from vesuvius_monai.engine.infer import autocast, load_normalized, resolve_device, sliding_window_probs
from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.io.atomic import write_text
from vesuvius_monai.io.checkpoint import load_checkpoint, save_checkpoint
from vesuvius_monai.losses import build_loss
from vesuvius_monai.metrics.overlap import dice
from vesuvius_monai.models import build_model, size_divisor
from vesuvius_monai.report import plot_learning_curve

log = logging.getLogger(__name__)

LOG_FIELDS = ["step", "loss", "lr", "seconds", "steps_per_s", "val_dice"]


# --------------------------------------------------------------------------- set-up


def lr_factor(cfg: TrainConfig) -> Callable[[int], float]:
    """Multiplier of the base learning rate at each step: linear warm-up, then cosine or poly decay."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
        progress = min(progress, 1.0)
        if cfg.schedule == "cosine":
            return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))
        if cfg.schedule == "poly":
            return max((1 - progress) ** 0.9, 0.01)
        return 1.0

    return factor


def check_sizes(cfg: Config) -> None:
    """Patch and window sizes must be multiples of what the model can pool."""
    divisor = size_divisor(cfg.model.name, **cfg.model.kwargs)
    for key, size in (("transforms.patch_size", cfg.transforms.patch_size), ("infer.roi_size", cfg.infer.roi_size)):
        if any(s % divisor for s in size):
            raise VesuviusError(f"config key '{key}': {list(size)} must be multiples of {divisor} for model "
                                f"'{cfg.model.name}' with these kwargs")


RESUME_MAY_DIFFER = {"train.max_minutes", "train.num_workers", "train.num_threads", "train.device",
                     "train.log_every", "data.cache_dir"}


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "kwargs":
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_resume_config(cfg: Config, saved: dict, path: Path) -> None:
    """A resumed run must have the config it was started with (except harmless keys), or it is not exact."""
    now, then = _flatten(to_dict(cfg)), _flatten(upgrade_raw(saved))
    differ = sorted(k for k in now.keys() | then.keys() if now.get(k) != then.get(k) and k not in RESUME_MAY_DIFFER)
    if differ:
        detail = ", ".join(f"{k}: {then.get(k)!r} -> {now.get(k)!r}" for k in differ[:5])
        raise VesuviusError(f"cannot resume {path} with another config ({detail}); resume with the run's own "
                            f"config.yaml or start a new output_dir")


def prepare_run_dir(cfg: Config, resume: bool) -> tuple[Path, dict | None]:
    """Create the run folder; refuse to train over an existing run, or to resume it with another config.

    Returns the run folder and, when resuming, the loaded ``last.pt`` to restore from.
    """
    run = Path(cfg.output_dir)
    last = run / "checkpoints" / "last.pt"
    if resume and not last.is_file():
        raise VesuviusError(f"cannot resume: {last} does not exist")
    if not resume and last.exists():
        raise VesuviusError(f"output_dir {run} already holds a run ({last}); pass --resume to continue it "
                            f"or set output_dir to a new folder")
    payload = load_checkpoint(last) if resume else None
    if payload is not None:
        check_resume_config(cfg, payload["config"], last)
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    save_config(cfg, run / "config.yaml")
    return run, payload


def record_splits(run: Path, splits: dict[str, list[Fragment]]) -> dict[str, list[str]]:
    """Write splits.json (fragment ids per split) and return it for the checkpoints."""
    ids = {name: [f.id for f in items] for name, items in splits.items()}
    write_text(run / "splits.json", json.dumps(ids, indent=2))
    return ids


def set_threads(cfg: TrainConfig) -> None:
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    log.info("torch threads: %d", torch.get_num_threads())


# --------------------------------------------------------------------------- logging


@dataclass
class RunLog:
    """Appends rows to ``train_log.csv`` and scalars to TensorBoard."""

    run: Path
    purge_step: int | None = None  # on resume: TensorBoard drops events logged after this step
    writer: object = field(init=False, default=None)

    def __post_init__(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.run / "tensorboard"), purge_step=self.purge_step)
        self.path = self.run / "train_log.csv"

    def write(self, row: dict) -> None:
        new = not self.path.exists()
        with self.path.open("a", newline="") as handle:
            out = csv.DictWriter(handle, fieldnames=LOG_FIELDS, extrasaction="ignore")
            if new:
                out.writeheader()
            out.writerow({k: row.get(k, "") for k in LOG_FIELDS})
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, row["step"])

    def truncate_after(self, step: int) -> None:
        """On resume, drop rows logged after the checkpoint's step (they will be logged again)."""
        if not self.path.exists():
            return
        with self.path.open(newline="") as handle:
            rows = [r for r in csv.DictReader(handle) if int(r["step"]) <= step]
        with self.path.open("w", newline="") as handle:
            out = csv.DictWriter(handle, fieldnames=LOG_FIELDS)
            out.writeheader()
            out.writerows(rows)

    def close(self) -> None:
        self.writer.close()


# --------------------------------------------------------------------------- steps


@dataclass
class TrainState:
    """Everything that changes while training and is restored on resume."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    step: int = 0
    best_metric: float = -math.inf
    splits: dict = field(default_factory=dict)  # fragment ids per split, saved in every checkpoint


def build_state(cfg: Config, device: torch.device) -> TrainState:
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model.name, **cfg.model.kwargs).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg.train))
    fp16 = device.type == "cuda" and cfg.train.amp and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda", enabled=fp16)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model %s %s: %.2f M parameters on %s", cfg.model.name, cfg.model.kwargs, n_params / 1e6, device)
    return TrainState(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)


def restore_state(state: TrainState, payload: dict) -> None:
    """Put a loaded checkpoint's weights, optimiser, schedule, scaler and counters into ``state``."""
    state.model.load_state_dict(payload["model"])
    state.optimizer.load_state_dict(payload["optimizer"])
    state.scheduler.load_state_dict(payload["scheduler"])
    state.scaler.load_state_dict(payload["scaler"])
    state.step = payload["step"]
    state.best_metric = payload["best_metric"]
    log.info("resumed at step %d", state.step)


def save_state(path: Path, cfg: Config, state: TrainState) -> None:
    save_checkpoint(path, cfg=cfg, model=state.model, step=state.step, optimizer=state.optimizer,
                    scheduler=state.scheduler, scaler=state.scaler, best_metric=state.best_metric, splits=state.splits)


def train_step(state: TrainState, batch: dict, loss_fn: nn.Module, cfg: TrainConfig,
               device: torch.device) -> tuple[float, float]:
    """One optimiser step on a batch {"image", "label"} of (B, 1, Z, Y, X); returns (loss, learning rate)."""
    image = batch["image"].to(device, non_blocking=True)
    label = batch["label"].to(device, non_blocking=True)
    state.model.train()
    state.optimizer.zero_grad(set_to_none=True)
    with autocast(device, cfg.amp):
        logits = state.model(image)
    loss = loss_fn(logits.float(), label)
    if not torch.isfinite(loss):
        raise VesuviusError(f"training loss became {loss.item()} at step {state.step + 1}; lower train.lr or check "
                            f"the data (last.pt keeps the last good state)")
    lr = state.scheduler.get_last_lr()[0]
    state.scaler.scale(loss).backward()
    if cfg.grad_clip > 0:
        state.scaler.unscale_(state.optimizer)
        nn.utils.clip_grad_norm_(state.model.parameters(), cfg.grad_clip)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.scheduler.step()
    state.step += 1
    return float(loss.detach()), lr


def validate(model: nn.Module, fragments: list[Fragment], cfg: Config, device: torch.device) -> float:
    """Mean Dice (ignore region excluded) of thresholded sliding-window probabilities over whole val fragments.

    Fragments are read one at a time, so memory is bounded by the largest one.
    """
    scores = []
    for fragment in fragments:
        image = load_normalized(fragment.image, cfg.transforms.percentiles)
        probs = sliding_window_probs(model, image, cfg.infer, device=device, amp=cfg.infer.amp)
        scores.append(dice(probs > cfg.postprocess.threshold, fragment.label.read(), ignore_index=cfg.data.ignore_index))
    return float(np.mean(scores))


# --------------------------------------------------------------------------- loop


def make_loader(dataset: PatchDataset, cfg: TrainConfig, start_step: int) -> DataLoader:
    """Batches for steps ``start_step .. cfg.steps - 1``, in order (item indices fix the batch of each step)."""
    indices = range(start_step * cfg.batch_size, cfg.steps * cfg.batch_size)
    return DataLoader(dataset, batch_size=cfg.batch_size, sampler=list(indices), num_workers=cfg.num_workers,
                      persistent_workers=False)


def train(cfg: Config, *, resume: bool = False, stop_at_step: int | None = None) -> Path:
    """Train a model as ``cfg`` says and return the run folder.

    ``stop_at_step`` ends the run early after that step (saving ``last.pt``) as an interruption would;
    a later ``resume=True`` call continues it exactly.
    """
    check_sizes(cfg)
    run, resumed = prepare_run_dir(cfg, resume)
    set_threads(cfg.train)
    device = resolve_device(cfg.train.device)
    splits = load_splits(cfg.data)
    cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else run / "cache"
    sources = prepare_sources(splits["train"], cfg.transforms, cache_dir, cfg.data.ignore_index)
    dataset = PatchDataset(sources, cfg.transforms, seed=cfg.seed, length=cfg.train.steps * cfg.train.batch_size,
                           ignore_index=cfg.data.ignore_index)
    val = splits["val"]
    state = build_state(cfg, device)
    state.splits = record_splits(run, splits)
    loss_fn = build_loss(cfg.train.loss, ignore_index=cfg.data.ignore_index)
    log.info("loss terms and weights: %s", loss_fn.weights.active())
    last, best = run / "checkpoints" / "last.pt", run / "checkpoints" / "best.pt"
    if resumed is not None:
        restore_state(state, resumed)
    runlog = RunLog(run, purge_step=state.step + 1 if resume else None)
    runlog.truncate_after(state.step)
    stop = min(stop_at_step or cfg.train.steps, cfg.train.steps)
    try:
        _loop(state, make_loader(dataset, cfg.train, state.step), loss_fn, val, cfg, device, runlog, stop)
    except KeyboardInterrupt:
        log.warning("interrupted: %s holds the last periodic save; continue with --resume", last)
        raise
    finally:
        runlog.close()
    save_state(last, cfg, state)
    if not val:  # nothing to select on: the last model is the best we know
        save_state(best, cfg, state)
    plot_learning_curve(run / "train_log.csv", run / "learning_curve.png")
    log.info("run saved in %s (step %d, best val Dice %.4f)", run, state.step, state.best_metric)
    return run


def _checkpoint(state: TrainState, val: list[Fragment], cfg: Config, device: torch.device, row: dict) -> None:
    """Validate (when there are val fragments), keep the best model, save the last."""
    ckpt = Path(cfg.output_dir) / "checkpoints"
    if val:
        row["val_dice"] = validate(state.model, val, cfg, device)
        if row["val_dice"] > state.best_metric:
            state.best_metric = row["val_dice"]
            save_state(ckpt / "best.pt", cfg, state)
        log.info("step %d: val Dice %.4f (best %.4f)", state.step, row["val_dice"], state.best_metric)
    save_state(ckpt / "last.pt", cfg, state)


def _loop(state: TrainState, loader: DataLoader, loss_fn: nn.Module, val: list[Fragment], cfg: Config,
          device: torch.device, runlog: RunLog, stop: int) -> None:
    with tqdm(total=stop - state.step, desc="train", unit="step", dynamic_ncols=True, mininterval=1.0) as bar:
        _steps(state, loader, loss_fn, val, cfg, device, runlog, stop, bar)


def _steps(state: TrainState, loader: DataLoader, loss_fn: nn.Module, val: list[Fragment], cfg: Config,
           device: torch.device, runlog: RunLog, stop: int, bar: tqdm) -> None:
    """Train until step ``stop``: log every ``log_every``, validate and save every ``val_every`` steps."""
    tc = cfg.train
    start_time, start_step, losses = time.perf_counter(), state.step, []
    for batch in loader:
        if state.step >= stop:
            break
        loss, lr = train_step(state, batch, loss_fn, tc, device)
        losses.append(loss)
        elapsed = time.perf_counter() - start_time
        speed = (state.step - start_step) / elapsed
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}", it_s=f"{speed:.2f}")
        row = {"step": state.step, "loss": float(np.mean(losses)), "lr": lr,
               "seconds": elapsed, "steps_per_s": speed}
        out_of_time = bool(tc.max_minutes) and elapsed > tc.max_minutes * 60
        if state.step % tc.val_every == 0 or state.step in (tc.steps, stop) or out_of_time:
            _checkpoint(state, val, cfg, device, row)
        if state.step % tc.log_every == 0 or "val_dice" in row:
            runlog.write(row)
            losses = []
        if out_of_time:
            log.warning("train.max_minutes=%.1f reached: stopping at step %d of %d", tc.max_minutes, state.step, tc.steps)
            break
