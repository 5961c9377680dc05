"""The logs of a training run: ``train_log.csv`` and TensorBoard (:class:`RunLog`, rank 0; :class:`NullLog` on the
other ranks) and the loss means between log rows (:class:`LossMeter`)."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from typing import Iterable

import torch

from vesuvius_monai.io.run_dir import RunDir
from vesuvius_monai.engine.distributed import DistContext, all_reduce_sum


def log_fields(terms: Iterable[str]) -> list[str]:
    """Columns of train_log.csv: the loss, each active loss term, the gradient norm (before clipping), learning
    rate, time, speed, validation Dice."""
    return ["step", "loss", *(f"loss_{t}" for t in terms), "grad_norm", "lr", "seconds", "steps_per_s", "val_dice"]


@dataclass
class RunLog:
    """Appends rows to ``train_log.csv`` and scalars to TensorBoard."""

    run: RunDir
    fields: list[str]
    purge_step: int | None = None  # TensorBoard drops events logged at or after this step (a resumed run's replay)
    writer: object = field(init=False, default=None)

    def __post_init__(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.run.tensorboard), purge_step=self.purge_step)
        self.path = self.run.train_log

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
