"""Data-parallel training and prediction with PyTorch's ``torch.distributed``, launched by ``torchrun``.

``torchrun --nproc_per_node=N -m vesuvius_monai train ...`` starts N processes; torchrun gives each its
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``. Each process trains a copy of the model on its own patches
(``DistributedDataParallel`` averages the gradients), on ``cuda:LOCAL_RANK`` with NCCL or on the CPU with gloo.
Rank 0 alone touches the run folder (run marker, config, logs, TensorBoard, checkpoints, surface-index cache) and
validates; the other ranks wait for it. ``predict`` under torchrun splits the blocks of its volumes between the
ranks (:func:`split_contiguous`); ranks that finish early wait for the others in :func:`gather_results` (on a gloo
group of its own, for up to :data:`WAIT_TIMEOUT`), where an error of any rank reaches all of them. Without
torchrun's variables nothing of this is used: one process, as always.
"""

from __future__ import annotations

import atexit
import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from vesuvius_monai.engine.device import resolve_device
from vesuvius_monai.errors import VesuviusError

log = logging.getLogger(__name__)

# Ranks wait in collectives while rank 0 alone indexes surfaces, validates and saves: allow that much time.
TIMEOUT = timedelta(hours=2)
# Prediction ranks that finished their share wait this long for the slowest (its share's imbalance, not its all).
WAIT_TIMEOUT = timedelta(hours=24)


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank among ``world_size`` processes, its GPU index on the node, and
    whether a process group is in use (False: a plain single-process run)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    active: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes the run folder and validates."""
        return self.rank == 0


def torchrun_env() -> tuple[int, int, int] | None:
    """(RANK, WORLD_SIZE, LOCAL_RANK) as torchrun sets them, or None outside torchrun."""
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    if not all(name in os.environ for name in names):
        return None
    try:
        rank, world, local = (int(os.environ[name]) for name in names)
    except ValueError:
        raise VesuviusError(f"torchrun variables RANK, WORLD_SIZE, LOCAL_RANK must be integers, got "
                            f"{[os.environ[n] for n in names]}") from None
    return rank, world, local


def init_distributed(device_name: str) -> tuple[DistContext, torch.device]:
    """Join torchrun's process group (when launched by torchrun) and pick this process's device.

    Returns the context and the device (``cuda:LOCAL_RANK`` under torchrun on GPUs). The process group, once
    made, serves every later call in the process and ends when the process does (joining a new one after
    ``destroy_process_group`` can hang under torchrun).
    """
    device = resolve_device(device_name)
    env = torchrun_env()
    if env is None:
        return DistContext(), device
    rank, world, local = env
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise VesuviusError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPUs are visible; start "
                                f"torchrun with --nproc_per_node <= the number of GPUs")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=TIMEOUT, device_id=device if device.type == "cuda" else None)
        atexit.register(_destroy)
    if rank != 0:  # one voice: the other ranks report only warnings and errors
        logging.getLogger("vesuvius_monai").setLevel(logging.WARNING)
    ctx = DistContext(rank=rank, world_size=world, local_rank=local, active=True)
    log.info("torch.distributed: %d processes (%s), this is rank %d on %s", world, dist.get_backend(), rank,
             device)
    return ctx, device


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def on_main(ctx: DistContext, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run ``func`` on rank 0 only and give every rank its result; a VesuviusError there is raised on every rank.

    The result must pickle (it is broadcast). Without a process group this is just ``func(*args, **kwargs)``.
    """
    if not ctx.active:
        return func(*args, **kwargs)
    box: list[Any] = [None]
    if ctx.is_main:
        try:
            box = [("ok", func(*args, **kwargs))]
        except VesuviusError as err:
            box = [("error", str(err))]
        except BaseException as err:  # tell the others, then fail here with the real traceback
            dist.broadcast_object_list([("error", f"rank 0 failed: {type(err).__name__}: {err}")], src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise VesuviusError(value)
    return value


def broadcast_floats(ctx: DistContext, values: list[float], device: torch.device) -> list[float]:
    """Rank 0's ``values`` on every rank (one small collective); unchanged without a process group."""
    if not ctx.active:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.broadcast(tensor, src=0)
    return tensor.tolist()


def all_reduce_sum(ctx: DistContext, tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``tensor`` over all ranks (``tensor`` itself without a process group)."""
    if ctx.active:
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier(ctx: DistContext) -> None:
    """Wait until every rank arrives (no-op without a process group)."""
    if ctx.active:
        dist.barrier()


def wrap_model(ctx: DistContext, model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` wrapped in DistributedDataParallel (gradients averaged over ranks), or itself in a single process.

    Checkpoints and validation always use the plain ``model``, so a checkpoint loads whatever the world size.
    """
    if not ctx.active:
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def split_contiguous(costs: list[float], parts: int) -> list[range]:
    """Items ``0 .. len(costs) - 1``, in order, cut into ``parts`` contiguous ranges of about equal total cost.

    Item i goes to the part in which the middle of its cost falls (cumulative cost / total * parts), so each part
    is within one item's cost of ``total / parts``; parts may be empty when items are fewer or uneven.
    """
    total = float(sum(costs))
    bounds, below, part = [0] * (parts + 1), 0.0, 0
    for i, cost in enumerate(costs):
        middle = (below + cost / 2) / total * parts if total > 0 else i * parts / max(len(costs), 1)
        while part < parts - 1 and middle >= part + 1:
            part += 1
            bounds[part] = i
        below += cost
    for p in range(part + 1, parts + 1):
        bounds[p] = len(costs)
    return [range(bounds[p], bounds[p + 1]) for p in range(parts)]


_wait_group: list = []  # the gloo group of gather_results, made once per process by every rank together


def make_wait_group(ctx: DistContext) -> None:
    """Make the group :func:`gather_results` waits on (every rank calls this at the same point, early, before the
    ranks' work drifts apart); a no-op without a process group or when made already."""
    if ctx.active and not _wait_group:
        _wait_group.append(dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT))


def gather_results(ctx: DistContext, error: str | None, value: Any) -> list[Any]:
    """Every rank's ``value`` (in rank order), once every rank has arrived; ``error``: what failed on this rank.

    When any rank reports an error, every rank raises one VesuviusError naming the failed ranks and their errors.
    A rank that has died (or takes longer than :data:`WAIT_TIMEOUT` more than this one) is a VesuviusError too.
    ``value`` must pickle. Without a process group: ``[value]``, or the error raised.
    """
    if not ctx.active:
        if error is not None:
            raise VesuviusError(error)
        return [value]
    make_wait_group(ctx)
    box: list[Any] = [None] * ctx.world_size
    try:
        dist.all_gather_object(box, (error, value), group=_wait_group[0])
    except RuntimeError as err:  # gloo: a peer closed its connection, or the wait timed out
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        hours = WAIT_TIMEOUT.total_seconds() / 3600
        raise VesuviusError(f"rank {ctx.rank} lost the other processes while waiting (up to {hours:g} h) for them "
                            f"to finish; did one of them stop? ({first})") from None
    failed = [f"rank {rank}: {err}" for rank, (err, _) in enumerate(box) if err is not None]
    if failed:
        raise VesuviusError("; ".join(failed))
    return [v for _, v in box]
