"""The planner's rules, its ladder of candidates (patch, width, depth, batch) and their measurement on the device."""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from vesuvius_monai.config import Config, InferConfig
from vesuvius_monai.engine.device import sync
from vesuvius_monai.errors import VesuviusError

Triple = tuple[int, int, int]


@dataclass(frozen=True, kw_only=True)
class PlanRules:
    """The knobs of the planner (not the dataset's or the device's facts, which are measured).

    min_steps: the fewest optimiser steps a plan may leave; the largest candidate with at least this many is chosen.
        1000: on the benchmark families at 6 CPU minutes, the half-resolution network at width 8 (2150-2700
        steps) beat width 16 (967 steps), and the MONAI networks that made 500-800 steps trailed (README,
        "Choosing the default recipe"); 300 let the plan pick width 16 and 80^3 patches for 378 steps.
    least_steps: the fewest steps of the smallest candidate a budget must hold after the set-up; a smaller budget is
        refused, naming the least one that works (``min_steps`` is what a plan aims for; a budget between the two
        gets the smallest candidate, and its reason says to raise ``train.max_minutes``).
    val_share: the most of the budget that validation passes may take.
    validations: how many validation passes to aim for (fewer when they would exceed ``val_share``).
    setup_seconds: time kept for set-up, the surface index, saving and the final validation's margin.
    warmup_share: warm-up steps as a share of the planned steps (at least 5).
    min_patch, max_patch: patch edge range (voxels) before the volume size caps it.
    widths: network widths (first-level channels) to climb through.
    max_batch: the largest batch the ladder climbs to once patch and width are at their caps.
    memory_share: the share of the free device memory (CUDA) a training step may take.
    repeats: timed optimiser steps per candidate (after one warm-up step).
    max_measure_seconds: stop climbing the ladder once measuring has taken this long.
    """

    min_steps: int = 1000
    least_steps: int = 1
    val_share: float = 0.1
    validations: int = 5
    setup_seconds: float = 15.0
    warmup_share: float = 0.05
    min_patch: int = 32
    max_patch: int = 160
    widths: tuple[int, ...] = (8, 12, 16, 24, 32)
    max_batch: int = 8
    memory_share: float = 0.8
    repeats: int = 2
    max_measure_seconds: float = 90.0


# --------------------------------------------------------------------------- candidates


@dataclass(frozen=True, kw_only=True)
class Candidate:
    """One configuration to measure: cubic-ish ``patch`` (z, y, x), network ``width``, ``depth`` (halvings of the
    resolution: poolings, and resunet3d's strided stem; see :func:`model_kwargs`), ``batch``."""

    patch: Triple
    width: int
    depth: int
    batch: int


def model_kwargs(name: str, width: int, depth: int) -> dict[str, Any]:
    """Keyword arguments giving model ``name`` first-level width ``width`` and ``depth`` poolings (where it has one).

    basicunet always pools four times (its depth is fixed); the others double the channels at every level.
    resunet3d is planned as in the default recipe, behind a strided stem (``stem_stride`` 2): its stem halves the
    resolution once, so ``depth - 1`` poolings follow and the size divisor stays ``2 ** depth``.
    """
    levels = [width * 2**i for i in range(depth + 1)]
    if name == "resunet3d":
        return {"init_features": width, "depth": depth - 1, "stem_stride": 2}
    if name == "basicunet":
        return {"features": [width, width, 2 * width, 4 * width, 8 * width, width]}
    if name == "unet":
        return {"channels": levels, "strides": [2] * depth, "num_res_units": 2}
    if name == "segresnet":  # its GroupNorm has 8 groups by default: fewer when the width is not a multiple of 8
        groups = {} if width % 8 == 0 else {"norm": ["GROUP", {"num_groups": math.gcd(8, width)}]}
        return {"init_filters": width, "blocks_down": [1, 2, 2, *[4] * (depth - 2)], "blocks_up": [1] * depth, **groups}
    if name == "dynunet":
        return {"filters": levels, "strides": [1] + [2] * depth, "kernel_size": [3] * (depth + 1)}
    raise VesuviusError(f"config key 'model.name': the planner knows no width/depth of model '{name}'; "
                        f"set model.kwargs yourself (the plan then keeps them)")


def depth_for(name: str, patch: Triple) -> int:
    """Poolings for a patch: 3, or more (up to 5) while the smallest edge pools to >= 4 voxels and every edge stays
    divisible by 2^depth (the models' size divisor); basicunet always pools 4 times."""
    if name == "basicunet":
        return 4
    depth = 3
    while depth < 5 and min(patch) // 2 ** (depth + 1) >= 4 and all(p % 2 ** (depth + 1) == 0 for p in patch):
        depth += 1
    return depth


def patch_caps(min_shape: Sequence[int], divisor: int, rules: PlanRules) -> Triple:
    """Largest patch edge per axis: the smallest volume's edge (rounded down to ``divisor``), at most max_patch;
    y and x share the smaller cap so that rot90 augmentation stays possible."""
    caps = [max(divisor, min(rules.max_patch, int(n)) // divisor * divisor) for n in min_shape]
    caps[1] = caps[2] = min(caps[1], caps[2])
    return tuple(caps)  # type: ignore[return-value]


def _clip_patch(edge: int, caps: Triple) -> Triple:
    return tuple(min(edge, c) for c in caps)  # type: ignore[return-value]


def candidate_ladder(name: str, min_shape: Sequence[int], rules: PlanRules = PlanRules(), *,
                     keep: Candidate | None = None, device: str = "cpu", divisor: int = 16) -> list[Candidate]:
    """Candidates from small to large, each >= the previous in patch, width and batch (a ladder).

    Patch edges are multiples of lcm(16, ``divisor``) (16 fits every registered model's divisor at the depths
    planned here); the patch grows first to 64 (or its cap), then width and patch alternate, then the batch doubles
    up to ``max_batch`` (on CUDA only: on a CPU a bigger batch costs time in proportion and the batch stays 2).
    Dimensions the user fixed come from ``keep``: ``patch`` (non-empty), ``width`` (non-zero; -1 = the user's
    model kwargs as they are), ``batch`` (> 0).
    """
    step = math.lcm(16, divisor)
    caps = patch_caps(min_shape, step, rules)
    start = max(step, min(rules.min_patch, max(caps)) // step * step)
    edges = list(range(start, max(max(caps), start) + 1, step))
    widths = list(rules.widths)
    batches = [2] + [b for b in (4, 8, 16) if b <= rules.max_batch and device == "cuda"]
    if keep is not None and keep.patch:
        edges = [max(keep.patch)]
    if keep is not None and keep.width != 0:
        widths = [keep.width]
    if keep is not None and keep.batch > 0:
        batches = [keep.batch]
    e, w = 0, 0
    steps = [(e, w)]
    while edges[e] < 64 and e + 1 < len(edges):
        e += 1
        steps.append((e, w))
    grow_width = True
    while e + 1 < len(edges) or w + 1 < len(widths):
        if (grow_width and w + 1 < len(widths)) or e + 1 >= len(edges):
            w += 1
        else:
            e += 1
        grow_width = not grow_width
        steps.append((e, w))
    ladder = []
    for ei, wi in steps:
        patch = tuple(keep.patch) if keep is not None and keep.patch else _clip_patch(edges[ei], caps)
        ladder.append(Candidate(patch=patch, width=widths[wi], depth=depth_for(name, patch), batch=batches[0]))
    last = ladder[-1]
    ladder += [dataclasses.replace(last, batch=b) for b in batches[1:]]
    return list(dict.fromkeys(ladder))


# --------------------------------------------------------------------------- measurement


def measure_candidate(cfg: Config, cand: Candidate, device: torch.device, repeats: int = 2,
                      reader_pair: tuple | None = None) -> dict[str, float]:
    """Time candidate ``cand`` on ``device``: ``step_s`` (median of ``repeats`` optimiser steps after a warm-up: the
    trainer's own step, :func:`~vesuvius_monai.engine.trainer.train_step`, with the run's model set-up, loss, AdamW,
    channels-last, autocast, clipping and grad scaler, on random data), ``infer_vox_s`` (voxels per second of one
    batch of ``infer.sw_batch_size`` windows through the validation's predictor: no TTA), ``read_s`` (reading one
    patch of image and label from the first training fragment, when ``reader_pair`` is given) and ``peak_bytes``
    (CUDA peak memory of a step; 0 on a CPU).
    """
    from vesuvius_monai.engine.trainer import build_state, train_step
    from vesuvius_monai.losses import build_loss

    kwargs = model_kwargs(cfg.model.name, cand.width, cand.depth) if cand.width > 0 else dict(cfg.model.kwargs)
    run = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, kwargs=kwargs))
    state = build_state(run, device)
    loss_fn = build_loss(cfg.train.loss, ignore_index=cfg.data.ignore_index)
    shape = (cand.batch, 1, *cand.patch)
    batch = {"image": torch.rand(shape, device=device), "label": (torch.rand(shape, device=device) > 0.5).float()}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats + 1):
        sync(device)
        start = time.perf_counter()
        train_step(state, state.model, loss_fn, batch, run.train, device)
        sync(device)
        times.append(time.perf_counter() - start)
    peak = float(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else 0.0
    infer_vox_s = _infer_speed(state.model, cfg.infer, cand.patch, device)
    read_s = _read_seconds(reader_pair, cand.patch) * cand.batch if reader_pair else 0.0
    return {"step_s": float(np.median(times[1:])), "infer_vox_s": infer_vox_s, "read_s": float(read_s),
            "peak_bytes": peak}


def _infer_speed(model: nn.Module, cfg: InferConfig, window: Triple, device: torch.device) -> float:
    """Window voxels per second of ``model`` on one batch of ``infer.sw_batch_size`` windows of ``window`` (the
    plan sets ``infer.roi_size`` to the patch), predicted as validation predicts them (the engine's predictor, no
    TTA), timed after one warm-up batch."""
    from vesuvius_monai.engine.infer import evaluating

    icfg = dataclasses.replace(cfg, tta_flip_axes=[], tta_rot90=False)
    windows = torch.rand((icfg.sw_batch_size, 1, *window), device=device)
    with evaluating(model, icfg, device) as predictor, torch.inference_mode():
        predictor(windows)  # warm-up
        sync(device)
        start = time.perf_counter()
        predictor(windows)
        sync(device)
    return float(windows.numel() / max(time.perf_counter() - start, 1e-9))


def _read_seconds(reader_pair: tuple, patch: Triple) -> float:
    """Seconds to read one ``patch`` of image and label at the centre of a fragment (its readers in ``reader_pair``)."""
    image, label = reader_pair
    corner = [max(0, (n - p) // 2) for n, p in zip(image.shape, patch)]
    region = tuple(slice(c, min(c + p, n)) for c, p, n in zip(corner, patch, image.shape))
    start = time.perf_counter()
    image.read(region)
    if label is not None:
        label.read(region)
    return time.perf_counter() - start
