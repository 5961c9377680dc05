"""The training loop of one run: its state, the optimiser step, and the loop around it (periodic logs, validation
and checkpoints, the time budget).

:func:`train_step` is one optimiser step (channels-last, autocast, loss, gradient clipping, grad scaler): the
trainer's, and the one the planner times (:func:`vesuvius_monai.plan.ladder.measure_candidate`). :class:`Trainer`
holds what the loop needs (state, loss, validation, logs, clock) so each method does one job: ``fit`` runs steps
until the run's end, ``_step`` sets the learning rate and takes a step, ``_after_step`` decides what the step is
followed by (a log row, a checkpoint, the end), ``_checkpoint`` validates and saves. The learning-rate schedule and
the run's clock are in :mod:`vesuvius_monai.engine.schedule`, the logs in :mod:`vesuvius_monai.engine.runlog`; the
run folder, data and resume checks are set up by :func:`vesuvius_monai.engine.train.train`.

Under torchrun (see :mod:`vesuvius_monai.engine.distributed`) every rank runs the same loop on its own patches
through a DistributedDataParallel wrapper; rank 0 alone validates, saves and writes the logs while the others
wait, and rank 0's clock decides the learning rate and the stop of a time-budgeted run for all ranks.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from vesuvius_monai.config import Config, TrainConfig
from vesuvius_monai.engine.device import CHANNELS_LAST, autocast, channels_last
from vesuvius_monai.engine.distributed import DistContext, barrier, broadcast_floats, wrap_model
from vesuvius_monai.engine.runlog import LossMeter, NullLog, RunLog
from vesuvius_monai.engine.schedule import RunClock, describe_schedule, lr_factor
from vesuvius_monai.errors import VesuviusError, disk_errors
from vesuvius_monai.io.checkpoint import Checkpoint
from vesuvius_monai.io.run_dir import RunDir
from vesuvius_monai.models import build_model

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- state


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
        model = model.to(memory_format=CHANNELS_LAST)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    fp16 = device.type == "cuda" and cfg.train.amp and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda", enabled=fp16)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model %s %s: %.2f M parameters on %s", cfg.model.name, cfg.model.kwargs, n_params / 1e6, device)
    return TrainState(model=model, optimizer=optimizer, scaler=scaler)


def restore_state(state: TrainState, clock: RunClock, checkpoint: Checkpoint) -> None:
    """Put a checkpoint's weights, optimiser, scaler, counters and clock into ``state`` and ``clock``."""
    if checkpoint.optimizer is None or checkpoint.scaler is None:
        raise VesuviusError(f"cannot resume from {checkpoint.path}: it holds no optimiser state (written for "
                            f"inference only)")
    state.model.load_state_dict(checkpoint.model_state)
    state.optimizer.load_state_dict(checkpoint.optimizer)
    state.scaler.load_state_dict(checkpoint.scaler)
    state.step = checkpoint.step
    batch = checkpoint.config["train"]["batch_size"]  # checkpoints from before ``items``: one process
    state.items = checkpoint.items if checkpoint.items is not None else checkpoint.step * batch
    state.best_metric = checkpoint.best_metric
    if checkpoint.clock is not None:
        clock.load_state_dict(checkpoint.clock)
    log.info("resumed at step %d (%.0f s of run time)", state.step, clock.carried_s)


def save_state(path: Path, cfg: Config, state: TrainState, clock: RunClock, world_size: int = 1) -> None:
    """Write the training state to the checkpoint ``path``."""
    Checkpoint.of(cfg, state.model, state.step, optimizer=state.optimizer, scaler=state.scaler,
                  best_metric=state.best_metric, splits=state.splits, items=state.items, clock=clock.state_dict(),
                  world_size=world_size).save(path)


def train_step(state: TrainState, net: nn.Module, loss_fn: nn.Module, batch: dict, cfg: TrainConfig,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step of ``net`` on a batch {"image", "label"} of (B, 1, Z, Y, X), at the optimiser's learning
    rate: the batch moved to ``device`` (channels-last with ``train.channels_last``), forward under autocast
    (``train.amp``, CUDA only), the loss in float32, backward through the grad scaler, the gradient norm clipped to
    ``train.grad_clip`` (0: not clipped).

    ``net`` is ``state.model`` or its DistributedDataParallel wrapper. Returns the loss and the gradient norm before
    clipping (0-d tensors on the device: reading them waits for the step).
    """
    image = batch["image"].to(device, non_blocking=True)
    label = batch["label"].to(device, non_blocking=True)
    if cfg.channels_last:
        image = channels_last(image)
    state.model.train()
    state.optimizer.zero_grad(set_to_none=True)
    with autocast(device, cfg.amp):
        logits = net(image)
    loss = loss_fn(logits.float(), label)
    state.scaler.scale(loss).backward()
    state.scaler.unscale_(state.optimizer)  # no-op unless fp16 AMP scales the loss
    clip = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
    grad_norm = nn.utils.clip_grad_norm_(state.model.parameters(), clip)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    return loss, grad_norm


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
        self.run = RunDir(cfg.output_dir)
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
        """One optimiser step (:func:`train_step`) on a batch {"image", "label"} of (B, 1, Z, Y, X), at the
        schedule's learning rate; counts the step and its patches, and adds its loss to the meter."""
        state = self.state
        self.lr = self.tc.lr * self.factor(self._position())
        for group in state.optimizer.param_groups:
            group["lr"] = self.lr
        loss, grad_norm = train_step(state, self.net, self.loss_fn, batch, self.tc, self.device)
        state.step += 1
        state.items += batch["image"].shape[0] * self.ctx.world_size
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
            self._log(row)
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
                                f"or check the data ({self.run.last} holds step {self.saved_step}, "
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
                self._save(self.run.best)
            log.info("step %d: val Dice %.4f (best %.4f)", state.step, row["val_dice"], state.best_metric)
        elif self.clock.val_s is None:
            self.clock.val_s = 0.0
        began = self.clock.now()
        self._save(self.run.last)
        self.clock.save_s = max(self.clock.save_s or 0.0, self.clock.now() - began)
        if final and self.validate is None:  # nothing to select on: the last model is the best we know
            self._save(self.run.best)

    def _log(self, row: dict) -> None:
        with disk_errors(self.run.train_log):
            self.runlog.write(row)

    def _save(self, path: Path) -> None:
        save_state(path, self.cfg, self.state, self.clock, self.ctx.world_size)

    def _measure_checkpoint(self) -> None:
        """With a time budget: validate and save once before training, to know what the final ones will take."""
        row = {"step": self.state.step}
        self._checkpoint(row)
        if self.state.step == 0:  # a resumed run has this step's row already
            self._log(row)
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
