"""Automatic configuration for a compute budget, in the spirit of nnU-Net's plans.

nnU-Net derives patch size, network depth and batch size from a dataset's fingerprint and the GPU memory. Here the
binding constraint is a *time* budget (``train.max_minutes``) on whatever device trains: a bigger network or patch
sees more context per step but gets fewer steps. :func:`make_plan`:

1. reads the dataset's **fingerprint** lazily (:func:`dataset_fingerprint`: volume sizes, spacing, dtype, the
   foreground and ignore shares and the intensity range from a bounded sample of the training fragments);
2. builds a **ladder** of candidates (patch edge, network width, depth, batch size), each at least as large as the
   one before in every dimension: the patch grows first (to 64 or the volume), then width and patch alternately,
   then the batch (:func:`candidate_ladder`); the depth follows the patch (pooled until about 4 voxels remain);
3. **measures** each candidate on the actual device (one warm-up and ``repeats`` timed optimiser steps with the
   run's loss, one inference pass, the time to read a patch from disk; seconds each), climbing until a candidate
   no longer fits the budget (:func:`measure_candidate`);
4. **chooses** the largest measured candidate that still leaves ``PlanRules.min_steps`` optimiser steps after the
   validation passes and set-up, and fits the device memory (:func:`choose`); from it: ``train.steps`` (the steps
   the budget holds), ``train.val_every`` (``PlanRules.validations`` passes within ``PlanRules.val_share`` of the
   budget), ``train.warmup_steps``, ``infer.roi_size``, ``transforms.pos_fraction`` (from the foreground share).

The result is a :class:`Plan`: dotted config keys -> values, with a one-line reason per key. Because the ladder is
monotone and a bigger budget only raises the step time a candidate may take, a bigger budget never picks a smaller
patch, width or batch from the same measurements (tested).

For the CLI: ``cfg = load_config(path, plan.overrides(exclude=explicit_keys(raw, overrides)) + overrides)`` uses the
plan for every key the user's config file and overrides do not set (see :func:`explicit_keys`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import yaml

from vesuvius_monai.config import Config, DataConfig, read_yaml_mapping, set_override, to_dict
from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.io.atomic import write_text

log = logging.getLogger(__name__)

Triple = tuple[int, int, int]


# --------------------------------------------------------------------------- rules


@dataclass(frozen=True, kw_only=True)
class PlanRules:
    """The knobs of the planner (not the dataset's or the device's facts, which are measured).

    min_steps: the fewest optimiser steps a plan may leave; the largest candidate with at least this many is chosen.
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

    min_steps: int = 300
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


# --------------------------------------------------------------------------- fingerprint


def dataset_fingerprint(data: DataConfig, max_voxels: int = 4_000_000) -> dict[str, Any]:
    """What the planner needs to know about the data, read lazily from at most ``max_voxels`` voxels.

    Returns a plain dict: ``n_train``, ``n_val``, ``shapes`` (z, y, x of each training fragment), ``min_shape``,
    ``median_shape``, ``spacing`` (median, z, y, x), ``dtype``, ``val_voxels`` (total voxels of the validation
    fragments), ``foreground_fraction`` and ``ignore_fraction`` (of the sampled label voxels),
    ``intensity`` (percentiles 0.5 / 50 / 99.5, mean and std of the sampled image voxels) and ``sampled_voxels``.
    """
    from vesuvius_monai.data.dataset import find_fragments, open_fragment, split_fragments
    from vesuvius_monai.data.readers import sample_regions

    splits = split_fragments(find_fragments(data), data)
    if not splits["train"]:
        raise VesuviusError("the data config leaves no training fragments to plan for")
    train = [open_fragment(f, data, check_labels=False) for f in splits["train"]]
    val = [open_fragment(f, data, check_labels=False) for f in splits["val"]]
    per_fragment = max(max_voxels // len(train), 32**3)
    counts, values = np.zeros(3, np.int64), []  # label 0 / 1 / ignore
    for fragment in train:
        for region in sample_regions(fragment.image.shape, per_fragment):
            values.append(fragment.image.read(region).ravel())
            if fragment.label is not None:
                label = fragment.label.read(region)
                counts += [np.sum(label == 0), np.sum(label == 1), np.sum(label == data.ignore_index)]
    sample = np.concatenate(values).astype(np.float64)
    shapes = [list(f.image.shape) for f in train]
    labelled = max(int(counts.sum()), 1)
    return {
        "n_train": len(train), "n_val": len(val), "shapes": shapes,
        "min_shape": [int(v) for v in np.min(shapes, axis=0)],
        "median_shape": [int(v) for v in np.median(shapes, axis=0)],
        "spacing": [float(v) for v in np.median([f.image.spacing for f in train], axis=0)],
        "dtype": str(train[0].image.dtype),
        "val_voxels": int(sum(int(np.prod(f.image.shape)) for f in val)),
        "foreground_fraction": float(counts[1] / labelled),
        "ignore_fraction": float(counts[2] / labelled),
        "intensity": {"p0.5": float(np.percentile(sample, 0.5)), "p50": float(np.percentile(sample, 50)),
                      "p99.5": float(np.percentile(sample, 99.5)), "mean": float(sample.mean()),
                      "std": float(sample.std())},
        "sampled_voxels": int(sample.size),
    }


# --------------------------------------------------------------------------- candidates


@dataclass(frozen=True, kw_only=True)
class Candidate:
    """One configuration to measure: cubic-ish ``patch`` (z, y, x), network ``width`` and ``depth``, ``batch``."""

    patch: Triple
    width: int
    depth: int
    batch: int


def model_kwargs(name: str, width: int, depth: int) -> dict[str, Any]:
    """Keyword arguments giving model ``name`` first-level width ``width`` and ``depth`` poolings (where it has one).

    basicunet always pools four times (its depth is fixed); the others double the channels at every level.
    """
    levels = [width * 2**i for i in range(depth + 1)]
    if name == "resunet3d":
        return {"init_features": width, "depth": depth}
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


def _autocast(device: torch.device, enabled: bool):
    """bf16 (or fp16) autocast on CUDA when enabled; never on a CPU (bf16 there is far slower)."""
    if device.type != "cuda" or not enabled:
        return torch.autocast("cpu", enabled=False)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_candidate(cfg: Config, cand: Candidate, device: torch.device, repeats: int = 2,
                      reader_pair: tuple | None = None) -> dict[str, float]:
    """Time candidate ``cand`` on ``device``: ``step_s`` (median of ``repeats`` optimiser steps after a warm-up, the
    run's loss and AdamW, random data), ``infer_vox_s`` (voxels per second of one no-grad forward of
    ``infer.sw_batch_size`` windows), ``read_s`` (reading one patch of image and label from the first training
    fragment, when ``reader_pair`` is given) and ``peak_bytes`` (CUDA peak memory of a step; 0 on a CPU).
    """
    from vesuvius_monai.losses import build_loss
    from vesuvius_monai.models import build_model

    torch.manual_seed(0)
    kwargs = {**model_kwargs(cfg.model.name, cand.width, cand.depth)} if cand.width > 0 else dict(cfg.model.kwargs)
    model = build_model(cfg.model.name, **kwargs).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    loss_fn = build_loss(cfg.train.loss, ignore_index=cfg.data.ignore_index)
    shape = (cand.batch, 1, *cand.patch)
    image = torch.rand(shape, device=device)
    label = (torch.rand(shape, device=device) > 0.5).float()
    amp = cfg.train.amp and device.type == "cuda"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    model.train()
    for _ in range(repeats + 1):
        _sync(device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, amp):
            logits = model(image)
        loss_fn(logits.float(), label).backward()
        optimizer.step()
        _sync(device)
        times.append(time.perf_counter() - start)
    peak = float(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else 0.0
    model.eval()
    windows = torch.rand((cfg.infer.sw_batch_size, 1, *cand.patch), device=device)
    with torch.no_grad(), _autocast(device, cfg.infer.amp and device.type == "cuda"):
        model(windows)  # warm-up
        _sync(device)
        start = time.perf_counter()
        model(windows)
        _sync(device)
    infer_vox_s = windows.numel() / max(time.perf_counter() - start, 1e-9)
    read_s = _read_seconds(reader_pair, cand.patch) * cand.batch if reader_pair else 0.0
    return {"step_s": float(np.median(times[1:])), "infer_vox_s": float(infer_vox_s), "read_s": float(read_s),
            "peak_bytes": peak}


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


# --------------------------------------------------------------------------- choice


@dataclass(kw_only=True)
class Budget:
    """What one measured candidate leaves of the budget: validation passes and their time, training steps."""

    validations: int
    val_seconds: float
    steps: int
    fits_memory: bool


def budget_for(timing: dict[str, float], fingerprint: dict, cfg: Config, rules: PlanRules,
               free_bytes: float | None) -> Budget:
    """Steps and validation passes a candidate with ``timing`` gets within ``cfg.train.max_minutes``.

    A validation pass predicts every val fragment by sliding windows: val voxels x 1 / (1 - overlap)^3 (window
    overlap) / the measured inference speed. Up to ``rules.validations`` passes, as many as fit ``val_share``.
    """
    budget = cfg.train.max_minutes * 60
    overlap = 1 / (1 - cfg.infer.overlap) ** 3
    one_pass = fingerprint["val_voxels"] * overlap / max(timing["infer_vox_s"], 1e-9)
    passes = 0
    if fingerprint["n_val"]:
        passes = int(min(rules.validations, max(1, (rules.val_share * budget) // max(one_pass, 1e-9))))
    train_seconds = budget - rules.setup_seconds - passes * one_pass
    steps = int(max(train_seconds, 0) // (timing["step_s"] + timing["read_s"]))
    fits = free_bytes is None or timing["peak_bytes"] <= rules.memory_share * free_bytes
    return Budget(validations=passes, val_seconds=passes * one_pass, steps=steps, fits_memory=fits)


def choose(ladder: list[Candidate], timings: list[dict[str, float]], fingerprint: dict, cfg: Config,
           rules: PlanRules = PlanRules(), free_bytes: float | None = None) -> tuple[int, list[Budget]]:
    """Index of the chosen candidate: the last of the measured prefix of ``ladder`` (``timings`` in ladder order)
    before the first one that leaves fewer than ``min_steps`` steps or does not fit memory; 0 if even the first
    does not (then the plan says so). Also returns each measured candidate's :class:`Budget`."""
    budgets = [budget_for(t, fingerprint, cfg, rules, free_bytes) for t in timings]
    chosen = 0
    for i, b in enumerate(budgets):
        if b.steps < rules.min_steps or not b.fits_memory:
            break
        chosen = i
    return chosen, budgets


# --------------------------------------------------------------------------- the plan


@dataclass(kw_only=True)
class Plan:
    """Chosen config values (dotted key -> value) with a one-line reason each, and what they came from."""

    values: dict[str, Any]
    reasons: dict[str, str]
    fingerprint: dict[str, Any] = field(default_factory=dict)
    measurements: list[dict[str, Any]] = field(default_factory=list)
    budget_minutes: float = 0.0
    device: str = "cpu"
    chosen: dict[str, Any] = field(default_factory=dict)  # the chosen candidate: patch, width, depth, batch

    def overrides(self, exclude: Iterable[str] = ()) -> list[str]:
        """``key=value`` strings (values in YAML flow style) of the planned keys, leaving out every key in
        ``exclude``, under one of them (excluding ``model.kwargs`` drops ``model.kwargs.depth``) or above one
        (excluding ``model.kwargs.depth`` drops every ``model.kwargs.*`` key, so the model stays as the user set it)."""
        exclude = set(exclude)
        return [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
                for key, value in self.values.items() if not _covered(key, exclude)]


def _covered(key: str, exclude: set[str]) -> bool:
    """True when ``key`` or one of its parents is excluded, or a model keyword is (the model is then the user's)."""
    parts = key.split(".")
    if any(".".join(parts[:i]) in exclude for i in range(1, len(parts) + 1)):
        return True
    return key.startswith("model.kwargs.") and any(e.startswith("model.kwargs") for e in exclude)


def explicit_keys(raw: dict, overrides: Sequence[str] = ()) -> set[str]:
    """Dotted keys a raw config mapping (a YAML file) and ``key=value`` overrides set: every leaf, e.g.
    {"train.steps", "model.kwargs.depth"}; an empty mapping counts as set itself (``model.kwargs={}``)."""
    keys: set[str] = set()

    def walk(node: Any, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict) and value:
                walk(value, f"{prefix}{key}.")
            else:
                keys.add(f"{prefix}{key}")

    walk(raw, "")
    for override in overrides:
        single: dict = {}
        set_override(single, override)
        walk(single, "")
    return keys


def _keep_from(cfg: Config, keep: set[str]) -> Candidate | None:
    """The ladder dimensions the user fixed: patch, batch, and the whole model (any model.kwargs key)."""
    if not keep:
        return None
    fixed_model = any(k in ("model", "model.kwargs") or k.startswith("model.kwargs.") for k in keep)
    return Candidate(patch=tuple(cfg.transforms.patch_size) if _covered("transforms.patch_size", keep) else (),
                     width=-1 if fixed_model else 0, depth=0,
                     batch=cfg.train.batch_size if _covered("train.batch_size", keep) else 0)


def free_memory(device: torch.device) -> float | None:
    """Free bytes of a CUDA device, None on a CPU (the time budget binds long before its memory there)."""
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    return None


def make_plan(cfg: Config, *, rules: PlanRules = PlanRules(), keep: Iterable[str] = (),
              fingerprint: dict | None = None) -> Plan:
    """Plan the run of ``cfg`` for its budget ``train.max_minutes`` on ``train.device``, measuring on that device.

    ``keep``: dotted keys the user set (see :func:`explicit_keys`): the plan does not change them and plans the
    rest around them (a set patch or batch is measured as it is; any ``model.kwargs`` key keeps the whole model).
    ``fingerprint`` may be passed to skip reading the data again.
    """
    from vesuvius_monai.data.dataset import find_fragments, open_fragment, split_fragments

    if cfg.train.max_minutes <= 0:
        raise VesuviusError("config key 'train.max_minutes': a plan needs a time budget (minutes > 0)")
    device = _device(cfg.train.device)
    fingerprint = fingerprint or dataset_fingerprint(cfg.data)
    first = split_fragments(find_fragments(cfg.data), cfg.data)["train"][0]
    opened = open_fragment(first, cfg.data, check_labels=False)

    def measure(cand: Candidate) -> dict[str, float]:
        return measure_candidate(cfg, cand, device, rules.repeats, (opened.image, opened.label))

    return plan_from_measurements(cfg, fingerprint, measure, rules=rules, keep=keep, device=device,
                                  free_bytes=free_memory(device))


def plan_from_measurements(cfg: Config, fingerprint: dict, measure: Callable[[Candidate], dict[str, float]], *,
                           rules: PlanRules = PlanRules(), keep: Iterable[str] = (),
                           device: torch.device = torch.device("cpu"), free_bytes: float | None = None) -> Plan:
    """The planning itself, given a ``measure(candidate) -> timing`` function (:func:`measure_candidate` on the
    device in :func:`make_plan`; a cost model in tests): climb the ladder while candidates fit, then choose."""
    from vesuvius_monai.models import size_divisor

    if cfg.train.max_minutes <= 0:
        raise VesuviusError("config key 'train.max_minutes': a plan needs a time budget (minutes > 0)")
    keep = set(keep)
    fixed = _keep_from(cfg, keep)
    user_model = fixed is not None and fixed.width < 0
    divisor = size_divisor(cfg.model.name, **cfg.model.kwargs) if user_model else 16
    ladder = candidate_ladder(cfg.model.name, fingerprint["min_shape"], rules, keep=fixed, device=device.type,
                              divisor=divisor)
    timings, started = [], time.perf_counter()
    for cand in ladder:
        timings.append(measure(cand))
        budget = budget_for(timings[-1], fingerprint, cfg, rules, free_bytes)
        log.info("measured %s: %.3f s/step, %.2f Mvox/s inference -> %d steps", cand, timings[-1]["step_s"],
                 timings[-1]["infer_vox_s"] / 1e6, budget.steps)
        if budget.steps < rules.min_steps or not budget.fits_memory:
            break
        if time.perf_counter() - started > rules.max_measure_seconds:
            log.info("stopped measuring after %.0f s (PlanRules.max_measure_seconds)", time.perf_counter() - started)
            break
    index, budgets = choose(ladder[: len(timings)], timings, fingerprint, cfg, rules, free_bytes)
    chosen = ladder[index]
    model_kw = dict(cfg.model.kwargs) if user_model else model_kwargs(cfg.model.name, chosen.width, chosen.depth)
    need = size_divisor(cfg.model.name, **model_kw)
    if any(s % need for s in chosen.patch):
        raise VesuviusError(f"config key 'transforms.patch_size': {list(chosen.patch)} is not a multiple of {need}, "
                            f"which model '{cfg.model.name}' {model_kw} needs")
    plan = _plan_values(cfg, chosen, timings[index], budgets[index], fingerprint, rules, user_model, device)
    plan.measurements = [{"candidate": to_dict(c), **t, "steps": b.steps, "validations": b.validations}
                         for c, t, b in zip(ladder, timings, budgets)]
    plan.chosen = to_dict(chosen)
    plan.values = {k: v for k, v in plan.values.items() if not _covered(k, keep)}
    plan.reasons = {k: plan.reasons[k] for k in plan.values}
    return plan


def _device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise VesuviusError("config key 'train.device': cuda was asked for but no CUDA device is available")
        return torch.device("cuda")
    return torch.device("cpu")


def _plan_values(cfg: Config, cand: Candidate, timing: dict, budget: Budget, fp: dict, rules: PlanRules,
                 user_model: bool, device: torch.device) -> Plan:
    """The chosen keys and their one-line reasons."""
    step = timing["step_s"] + timing["read_s"]
    minutes = cfg.train.max_minutes
    enough = budget.steps >= rules.min_steps
    values: dict[str, Any] = {"transforms.patch_size": list(cand.patch), "infer.roi_size": list(cand.patch)}
    reasons = {
        "transforms.patch_size": (f"largest patch on the ladder that leaves >= {rules.min_steps} steps in "
                                  f"{minutes:g} min ({step:.3f} s/step measured on {device.type}); volumes are at "
                                  f"least {fp['min_shape']}" if enough else
                                  f"smallest patch on the ladder: even it leaves only {budget.steps} steps (< "
                                  f"{rules.min_steps}) in {minutes:g} min; raise train.max_minutes"),
        "infer.roi_size": "the training patch, so windows see the context the network was trained on",
    }
    if not user_model:
        for key, value in model_kwargs(cfg.model.name, cand.width, cand.depth).items():
            values[f"model.kwargs.{key}"] = value
            reasons[f"model.kwargs.{key}"] = (
                f"width {cand.width} (first-level channels) with depth {cand.depth}: the ladder grows width and patch "
                f"together; depth pools the patch {list(cand.patch)} to about 4 voxels")
    values["train.batch_size"] = cand.batch
    reasons["train.batch_size"] = (f"{cand.batch}: the ladder doubles the batch only once patch and width are at "
                                   f"their caps" + ("" if device.type == "cuda" else " and only on CUDA"))
    values["train.steps"] = max(budget.steps, 1)
    reasons["train.steps"] = (f"{budget.steps} steps fit {minutes:g} min at {step:.3f} s/step (model "
                              f"{timing['step_s']:.3f} + reading {timing['read_s']:.3f}) after "
                              f"{budget.val_seconds:.0f} s of validation and {rules.setup_seconds:.0f} s of set-up")
    values["train.warmup_steps"] = max(5, int(round(rules.warmup_share * budget.steps)))
    reasons["train.warmup_steps"] = f"{rules.warmup_share:.0%} of the planned steps (at least 5)"
    if budget.validations:
        values["train.val_every"] = max(1, budget.steps // budget.validations)
        each = budget.val_seconds / budget.validations
        passes = "1 validation pass" if budget.validations == 1 else f"{budget.validations} validation passes"
        reasons["train.val_every"] = (f"{passes} of {each:.1f} s each "
                                      f"({fp['val_voxels']} val voxels at {timing['infer_vox_s'] / 1e6:.2f} Mvox/s, "
                                      f"overlap {cfg.infer.overlap}) within {rules.val_share:.0%} of the budget")
    else:
        values["train.val_every"] = max(1, budget.steps)
        reasons["train.val_every"] = "no validation fragments: validate (save best) only at the end"
    fg = fp["foreground_fraction"]
    values["transforms.pos_fraction"] = 0.33 if fg >= 0.2 else (0.67 if fg < 0.02 else 0.5)
    reasons["transforms.pos_fraction"] = (f"foreground is {fg:.1%} of the labelled voxels: "
                                          + ("random patches already hold surface, so 1/3 are centred on it "
                                             "(nnU-Net's share)" if fg >= 0.2 else
                                             "surface is rare, so 2/3 of patches are centred on it" if fg < 0.02
                                             else "half of the patches are centred on surface"))
    return Plan(values=values, reasons=reasons, fingerprint=fp, budget_minutes=minutes, device=device.type)


# --------------------------------------------------------------------------- output


def format_plan(plan: Plan) -> str:
    """One line per planned key: ``key = value  # reason``, after a header naming the budget and device."""
    fp = plan.fingerprint
    lines = [f"plan for {plan.budget_minutes:g} min on {plan.device}: {fp.get('n_train', '?')} training fragments, "
             f"smallest {fp.get('min_shape')}, spacing {fp.get('spacing')}, foreground "
             f"{fp.get('foreground_fraction', float('nan')):.1%}, ignore {fp.get('ignore_fraction', float('nan')):.1%}"]
    width = max((len(k) + len(str(v)) for k, v in plan.values.items()), default=0) + 3
    for key, value in plan.values.items():
        lines.append(f"{f'{key} = {value}':<{width}}  # {plan.reasons[key]}")
    return "\n".join(lines)


def save_plan(plan: Plan, path: str | Path) -> None:
    """Write the plan as YAML (values, reasons, fingerprint, measurements), atomically."""
    payload = {"format": "vesuvius_monai.plan/1", **to_dict(plan)}
    write_text(path, yaml.safe_dump(payload, sort_keys=False))


def load_plan(path: str | Path) -> Plan:
    """A plan written by :func:`save_plan`."""
    raw = read_yaml_mapping(path, "plan file")
    if raw.get("format") != "vesuvius_monai.plan/1":
        raise VesuviusError(f"{path}: not a plan written by vesuvius_monai (no format 'vesuvius_monai.plan/1')")
    raw.pop("format")
    return Plan(**raw)
