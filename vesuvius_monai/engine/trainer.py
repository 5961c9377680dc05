"""The training loop of one run: optimiser steps, learning-rate schedule, time budget, loss logging,
periodic validation and checkpoints.

:class:`Trainer` holds what the loop needs (state, loss, validation, logs, clock) so each method does one job:
``fit`` runs steps until the run's end, ``_step`` is one optimiser step, ``_after_step`` decides what the step
is followed by (a log row, a checkpoint, the end), ``_checkpoint`` validates and saves. The run folder, data
and resume checks are set up by :func:`vesuvius_monai.engine.train.train`.

Under torchrun (see :mod:`vesuvius_monai.engine.distributed`) every rank runs the same loop on its own patches
through a DistributedDataParallel wrapper; rank 0 alone validates, saves and writes the logs while the others
wait, and rank 0's clock decides the learning rate and the stop of a time-budgeted run for all ranks.

Learning-rate schedule: linear warm-up, then cosine or poly decay to 1 % of ``train.lr`` (or constant), as a
function of a *position* measured in steps. Without a time budget the position is the step. With
``train.max_minutes`` the position is the training time mapped onto the steps (the budget's end, less the time
kept for the final validation and save, is step ``train.steps``), or the step when that is further along: a
6-minute and a 6-hour run both end annealed, and ``train.steps`` only caps.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from vesuvius_monai.config import Config, TrainConfig
from vesuvius_monai.engine.distributed import DistContext, all_reduce_sum, barrier, broadcast_floats, wrap_model
from vesuvius_monai.engine.infer import autocast
from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.io.checkpoint import save_checkpoint
from vesuvius_monai.models import build_model

log = logging.getLogger(__name__)

LR_FLOOR = 0.01  # the cosine and poly schedules end at this fraction of train.lr
RESERVE_FACTOR = 1.5  # the final validation + save is given this many times its longest measured duration
RESERVE_MARGIN_S = 1.0  # plus this, for closing the logs and drawing the learning curve


# --------------------------------------------------------------------------- schedule and clock


def lr_factor(cfg: TrainConfig) -> Callable[[float], float]:
    """Multiplier of ``train.lr`` at a schedule position (in steps, may be fractional): linear warm-up over
    ``warmup_steps``, then cosine or poly decay to ``LR_FLOOR`` at ``steps`` (or constant)."""

    def factor(position: float) -> float:
        if position < cfg.warmup_steps:
            return (position + 1) / cfg.warmup_steps
        progress = (position - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
        progress = min(progress, 1.0)
        if cfg.schedule == "cosine":
            return LR_FLOOR + (1 - LR_FLOOR) * 0.5 * (1 + math.cos(math.pi * progress))
        if cfg.schedule == "poly":
            return max((1 - progress) ** 0.9, LR_FLOOR)
        return 1.0

    return factor


@dataclass
class RunClock:
    """Run time in seconds (the wall time of every session of the run, carried over resumes) and the time budget.

    ``budget_s`` 0 means no budget. ``train_start_s`` is the run time of the first step; ``val_s`` and ``save_s``
    the longest measured validation and checkpoint save, from which the time kept for the final ones is set.
    """

    budget_s: float = 0.0
    carried_s: float = 0.0  # run time of earlier sessions (from last.pt)
    train_start_s: float | None = None
    val_s: float | None = None
    save_s: float | None = None
    timer: Callable[[], float] = time.perf_counter  # seconds, monotonic (tests pass a fake one)
    started: float | None = None  # timer reading at the start of this session
    recent_steps: deque = field(default_factory=lambda: deque(maxlen=10))

    def __post_init__(self) -> None:
        if self.started is None:
            self.started = self.timer()

    def now(self) -> float:
        """Run time so far."""
        return self.carried_s + self.timer() - self.started

    def measured(self) -> bool:
        return self.val_s is not None and self.save_s is not None

    def reserve(self) -> float:
        """Seconds kept at the end of the budget for the final validation, the saves of best.pt and last.pt,
        and closing the run."""
        return RESERVE_FACTOR * ((self.val_s or 0.0) + 2 * (self.save_s or 0.0)) + RESERVE_MARGIN_S

    def step_estimate(self) -> float:
        """The longest of the last few steps (data loading included): what the next one may take."""
        return max(self.recent_steps, default=0.0)

    def position(self, step: int, steps: int) -> float:
        """Schedule position (in steps) of the step about to run: the step, or with a budget the training time
        mapped onto ``steps`` when that is further along; at most ``steps``."""
        if not self.budget_s or self.train_start_s is None:
            return float(step)
        window = self.budget_s - self.reserve() - self.train_start_s
        by_time = steps * (self.now() - self.train_start_s) / window if window > 0 else float(steps)
        return min(max(float(step), by_time), float(steps))

    def out_of_time(self, checkpoint_due: bool) -> bool:
        """True when the next step (after the checkpoint now due, if any) and the final validation + save would
        not fit in the budget."""
        if not self.budget_s:
            return False
        checkpoint = (self.val_s or 0.0) + 2 * (self.save_s or 0.0) if checkpoint_due else 0.0
        return self.now() + checkpoint + self.step_estimate() + self.reserve() > self.budget_s

    def state_dict(self) -> dict:
        return {"elapsed_s": self.now(), "train_start_s": self.train_start_s, "val_s": self.val_s,
                "save_s": self.save_s}

    def load_state_dict(self, saved: dict) -> None:
        """Continue from a checkpoint's clock: its run time, first-step time and measured durations."""
        self.carried_s = float(saved["elapsed_s"])
        self.started = self.timer()
        self.train_start_s, self.val_s, self.save_s = saved["train_start_s"], saved["val_s"], saved["save_s"]


def describe_schedule(cfg: TrainConfig, clock: RunClock) -> str:
    """One line naming the clock that drives the learning-rate schedule."""
    decay = f"{cfg.schedule} decay" if cfg.schedule != "constant" else "constant rate"
    if not clock.budget_s:
        return (f"learning-rate schedule on steps: warm-up over {cfg.warmup_steps} steps, {decay} to step "
                f"{cfg.steps}")
    return (f"learning-rate schedule on elapsed time: warm-up over the first {cfg.warmup_steps}/{cfg.steps} of the "
            f"{cfg.max_minutes:g}-minute budget, {decay} to its end less {clock.reserve():.0f} s kept for the final "
            f"validation and save; train.steps={cfg.steps} caps the run and drives the schedule instead while the "
            f"steps run ahead of the time")


# --------------------------------------------------------------------------- state and logs


@dataclass
class TrainState:
    """Everything that changes while training and is restored on resume."""

    model: nn.Module  # the plain module (never a DistributedDataParallel wrapper)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    step: int = 0
    items: int = 0  # training patches drawn so far (all processes together): the next step starts at this item
    best_metric: float = -math.inf
    splits: dict = field(default_factory=dict)  # fragment ids per split, saved in every checkpoint


def build_state(cfg: Config, device: torch.device) -> TrainState:
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model.name, **cfg.model.kwargs).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    fp16 = device.type == "cuda" and cfg.train.amp and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda", enabled=fp16)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model %s %s: %.2f M parameters on %s", cfg.model.name, cfg.model.kwargs, n_params / 1e6, device)
    return TrainState(model=model, optimizer=optimizer, scaler=scaler)


def restore_state(state: TrainState, clock: RunClock, payload: dict) -> None:
    """Put a loaded checkpoint's weights, optimiser, scaler, counters and clock into ``state`` and ``clock``."""
    state.model.load_state_dict(payload["model"])
    state.optimizer.load_state_dict(payload["optimizer"])
    state.scaler.load_state_dict(payload["scaler"])
    state.step = payload["step"]
    state.items = payload.get("items", payload["step"] * payload["config"]["train"]["batch_size"])
    state.best_metric = payload["best_metric"]
    if "clock" in payload:
        clock.load_state_dict(payload["clock"])
    log.info("resumed at step %d (%.0f s of run time)", state.step, clock.carried_s)


def save_state(path: Path, cfg: Config, state: TrainState, clock: RunClock, world_size: int = 1) -> None:
    save_checkpoint(path, cfg=cfg, model=state.model, step=state.step, optimizer=state.optimizer,
                    scaler=state.scaler, best_metric=state.best_metric, splits=state.splits, items=state.items,
                    clock=clock.state_dict(), world_size=world_size)


def log_fields(terms: Iterable[str]) -> list[str]:
    """Columns of train_log.csv: the loss, each active loss term, the gradient norm (before clipping), learning
    rate, time, speed, validation Dice."""
    return ["step", "loss", *(f"loss_{t}" for t in terms), "grad_norm", "lr", "seconds", "steps_per_s", "val_dice"]


@dataclass
class RunLog:
    """Appends rows to ``train_log.csv`` and scalars to TensorBoard."""

    run: Path
    fields: list[str]
    purge_step: int | None = None  # TensorBoard drops events logged at or after this step (a resumed run's replay)
    writer: object = field(init=False, default=None)

    def __post_init__(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.run / "tensorboard"), purge_step=self.purge_step)
        self.path = self.run / "train_log.csv"

    def write(self, row: dict) -> None:
        new = not self.path.exists()
        with self.path.open("a", newline="") as handle:
            out = csv.DictWriter(handle, fieldnames=self.fields, extrasaction="ignore")
            if new:
                out.writeheader()
            out.writerow({k: row.get(k, "") for k in self.fields})
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, row["step"])

    def truncate_after(self, step: int) -> None:
        """Keep only the rows up to ``step`` (a resumed run logs the later ones again; a restarted one all)."""
        if not self.path.exists():
            return
        with self.path.open(newline="") as handle:
            rows = [r for r in csv.DictReader(handle) if int(r["step"]) <= step]
        with self.path.open("w", newline="") as handle:
            out = csv.DictWriter(handle, fieldnames=self.fields, extrasaction="ignore", restval="")
            out.writeheader()
            out.writerows(rows)

    def close(self) -> None:
        self.writer.close()


class NullLog:
    """The log of ranks other than 0: they write nothing."""

    def write(self, row: dict) -> None:
        pass

    def close(self) -> None:
        pass


class LossMeter:
    """Sums of the loss, its terms and the gradient norm over a logging interval, kept on the device: reading them
    is the only point where a step waits for the GPU."""

    def __init__(self, terms: Iterable[str]) -> None:
        self.terms = list(terms)
        self.names = ["loss", *(f"loss_{t}" for t in self.terms), "grad_norm"]
        self.sums: torch.Tensor | None = None
        self.count = 0
        self.first_step = 0

    def add(self, step: int, total: torch.Tensor, parts: dict[str, torch.Tensor], grad_norm: torch.Tensor) -> None:
        values = torch.stack([total.detach().float(), *(parts[t].float() for t in self.terms),
                              grad_norm.detach().float().to(total.device)])
        if self.sums is None:
            self.sums, self.first_step = values, step
        else:
            self.sums = self.sums + values
        self.count += 1

    def read(self, ctx: DistContext) -> dict[str, float]:
        """Means over the interval and over all ranks (empty when no step was added), and a new interval.

        Every rank must call it at the same steps (a collective under torchrun)."""
        if self.sums is None:
            return {}
        sums = all_reduce_sum(ctx, self.sums)
        means = dict(zip(self.names, (sums / (self.count * ctx.world_size)).tolist()))
        self.sums, self.count = None, 0
        return means


# --------------------------------------------------------------------------- loop


class Trainer:
    """Trains ``state`` until a stop step, the time budget or the data runs out.

    ``validate(model) -> Dice`` scores the plain model on the validation fragments (None: no validation; the
    last model is then also saved as best.pt). ``ctx``: this process's place under torchrun (default: alone).
    """

    def __init__(self, cfg: Config, state: TrainState, *, loss_fn: nn.Module, device: torch.device,
                 runlog: RunLog | NullLog, clock: RunClock, validate: Callable[[nn.Module], float] | None = None,
                 ctx: DistContext | None = None) -> None:
        self.cfg, self.tc = cfg, cfg.train
        self.state = state
        self.loss_fn = loss_fn
        self.device = device
        self.runlog = runlog
        self.clock = clock
        self.validate = validate
        self.ctx = ctx or DistContext()
        self.net = wrap_model(self.ctx, state.model, device)  # what the steps run; state.model is saved
        self.factor = lr_factor(cfg.train)
        self.meter = LossMeter(loss_fn.weights.active())
        self.checkpoints = Path(cfg.output_dir) / "checkpoints"
        self.saved_step = state.step  # the step last.pt holds
        self.lr = cfg.train.lr * self.factor(state.step)
        self.mark = 0.0  # run time at the end of the previous step's bookkeeping
        self.session = (0.0, state.step)  # run time and step where this session's training began

    # ----------------------------------------------------------------- the loop

    def fit(self, batches: Iterable[dict], stop: int) -> None:
        """Train on ``batches`` (one per step, in order) until step ``stop``, the time budget or the batches end."""
        if self.clock.budget_s and not self.clock.measured():
            self._measure_checkpoint()
        log.info(describe_schedule(self.tc, self.clock))
        if self.clock.train_start_s is None:
            self.clock.train_start_s = self.clock.now()
        self.mark = self.clock.now()
        self.session = (self.mark, self.state.step)
        with tqdm(total=stop - self.state.step, desc="train", unit="step", dynamic_ncols=True,
                  mininterval=1.0, disable=not self.ctx.is_main) as bar:
            for batch in batches:
                self._step(batch)
                bar.update(1)
                if self._after_step(stop, bar):
                    break
        self._log_end(stop)

    def _step(self, batch: dict) -> None:
        """One optimiser step on a batch {"image", "label"} of (B, 1, Z, Y, X), at the schedule's learning rate."""
        state, tc = self.state, self.tc
        self.lr = tc.lr * self.factor(self._position())
        for group in state.optimizer.param_groups:
            group["lr"] = self.lr
        image = batch["image"].to(self.device, non_blocking=True)
        label = batch["label"].to(self.device, non_blocking=True)
        if tc.channels_last:
            image = image.contiguous(memory_format=torch.channels_last_3d)
        state.model.train()
        state.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, tc.amp):
            logits = self.net(image)
        loss = self.loss_fn(logits.float(), label)
        state.scaler.scale(loss).backward()
        state.scaler.unscale_(state.optimizer)  # no-op unless fp16 AMP scales the loss
        grad_norm = nn.utils.clip_grad_norm_(state.model.parameters(), tc.grad_clip if tc.grad_clip > 0 else math.inf)
        state.scaler.step(state.optimizer)
        state.scaler.update()
        state.step += 1
        state.items += image.shape[0] * self.ctx.world_size
        self.meter.add(state.step, loss, self.loss_fn.last_parts, grad_norm)

    def _after_step(self, stop: int, bar: tqdm) -> bool:
        """Log, validate and save as due after a step; True when this step ends the run."""
        step, tc = self.state.step, self.tc
        self.clock.recent_steps.append(self.clock.now() - self.mark)
        checkpoint_due = step % tc.val_every == 0
        final = step >= stop or self._out_of_time(checkpoint_due)
        if final or checkpoint_due or step % tc.log_every == 0:
            row = self._row()
            bar.set_postfix(loss=f"{row['loss']:.4f}", it_s=f"{row['steps_per_s']:.2f}")
            if final or checkpoint_due:
                self._checkpoint(row, final=final)
            self.runlog.write(row)
        self.mark = self.clock.now()
        return final

    def _position(self) -> float:
        """Schedule position of the step about to run (rank 0's clock under torchrun: the same lr on all ranks)."""
        position = self.clock.position(self.state.step, self.tc.steps)
        if self.clock.budget_s:
            position = broadcast_floats(self.ctx, [position], self.device)[0]
        return position

    def _out_of_time(self, checkpoint_due: bool) -> bool:
        """The time budget's stop decision, made on rank 0 and shared, so every rank stops after the same step."""
        if not self.clock.budget_s:
            return False
        return bool(broadcast_floats(self.ctx, [float(self.clock.out_of_time(checkpoint_due))], self.device)[0])

    # ----------------------------------------------------------------- logs and checkpoints

    def _row(self) -> dict:
        """The log row of the current step: mean loss (and terms) since the last row, lr, time, speed."""
        first = self.meter.first_step
        means = self.meter.read(self.ctx)
        bad = [f"{k} {v}" for k, v in means.items() if not math.isfinite(v) and k != "grad_norm"]  # (fp16 AMP
        if bad:  # overflows the gradient now and then: the grad scaler skips those steps)
            raise VesuviusError(f"training loss became non-finite ({', '.join(bad)}) during steps "
                                f"{first}..{self.state.step}; lower train.lr "
                                f"or check the data ({self.checkpoints / 'last.pt'} holds step {self.saved_step}, "
                                f"the last good state)")
        now = self.clock.now()
        start_time, start_step = self.session
        speed = (self.state.step - start_step) / max(now - start_time, 1e-9)
        return {"step": self.state.step, **means, "lr": self.lr, "seconds": now - self.clock.train_start_s,
                "steps_per_s": speed}

    def _checkpoint(self, row: dict, *, final: bool = False) -> None:
        """Validate (when there are val fragments) and keep the best model, save the last; time both.

        Under torchrun rank 0 does it while the other ranks wait."""
        if self.ctx.is_main:
            self._validate_and_save(row, final)
        barrier(self.ctx)
        self.saved_step = self.state.step

    def _validate_and_save(self, row: dict, final: bool) -> None:
        state = self.state
        if self.validate is not None:
            began = self.clock.now()
            row["val_dice"] = self.validate(state.model)
            self.clock.val_s = max(self.clock.val_s or 0.0, self.clock.now() - began)
            if row["val_dice"] > state.best_metric:
                state.best_metric = row["val_dice"]
                self._save("best.pt")
            log.info("step %d: val Dice %.4f (best %.4f)", state.step, row["val_dice"], state.best_metric)
        elif self.clock.val_s is None:
            self.clock.val_s = 0.0
        began = self.clock.now()
        self._save("last.pt")
        self.clock.save_s = max(self.clock.save_s or 0.0, self.clock.now() - began)
        if final and self.validate is None:  # nothing to select on: the last model is the best we know
            self._save("best.pt")

    def _save(self, name: str) -> None:
        save_state(self.checkpoints / name, self.cfg, self.state, self.clock, self.ctx.world_size)

    def _measure_checkpoint(self) -> None:
        """With a time budget: validate and save once before training, to know what the final ones will take."""
        row = {"step": self.state.step}
        self._checkpoint(row)
        if self.state.step == 0:  # a resumed run has this step's row already
            self.runlog.write(row)
        if not self.ctx.is_main:
            return
        log.info("validation %.1f s and checkpoint save %.1f s measured", self.clock.val_s, self.clock.save_s)
        if self.clock.now() + self.clock.reserve() >= self.clock.budget_s:
            log.warning("train.max_minutes=%g leaves no time to train after set-up and validation (%.0f s used)",
                        self.tc.max_minutes, self.clock.now())

    def _log_end(self, stop: int) -> None:
        """Say what ended a time-budgeted run: the budget, or train.steps."""
        state, clock = self.state, self.clock
        if not clock.budget_s or not self.ctx.is_main:
            return
        if state.step >= self.tc.steps:
            log.info("train.steps=%d reached at %.0f s of the %.0f s budget: the steps drove the schedule's end",
                     self.tc.steps, clock.now(), clock.budget_s)
        elif state.step < stop:
            log.warning("train.max_minutes=%g: stopped after step %d of at most %d, at %.0f s of run time, with the "
                        "learning rate annealed to %.2g", self.tc.max_minutes, state.step, self.tc.steps,
                        clock.now(), self.lr)
