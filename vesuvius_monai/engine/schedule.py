"""The learning-rate schedule of a run and the clock that drives it.

Linear warm-up, then cosine or poly decay to 1 % of ``train.lr`` (or constant), as a function of a *position*
measured in steps (:func:`lr_factor`). Without a time budget the position is the step. With ``train.max_minutes``
the position is the training time mapped onto the steps (the budget's end, less the time kept for the final
validation and save, is step ``train.steps``), or the step when that is further along (:class:`RunClock`): a
6-minute and a 6-hour run both end annealed, and ``train.steps`` only caps.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from vesuvius_monai.config import TrainConfig

LR_FLOOR = 0.01  # the cosine and poly schedules end at this fraction of train.lr
RESERVE_FACTOR = 1.5  # the final validation + save is given this many times its longest measured duration
RESERVE_MARGIN_S = 1.0  # plus this, for closing the logs and drawing the learning curve


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
