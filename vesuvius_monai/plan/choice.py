"""The planner's choice: what each measured candidate leaves of the time budget, the largest that still leaves enough
steps, and the planned config values with their reasons (:func:`make_plan`)."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

from vesuvius_monai.config import Config, covered, to_dict
from vesuvius_monai.engine.device import resolve_device
from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.plan.fingerprint import dataset_fingerprint
from vesuvius_monai.plan.ladder import Candidate, PlanRules, candidate_ladder, measure_candidate, model_kwargs
from vesuvius_monai.plan.output import Plan

log = logging.getLogger(__name__)


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


def least_seconds(timing: dict[str, float], rules: PlanRules) -> float:
    """The smallest budget that holds the set-up and ``rules.least_steps`` steps of a candidate with ``timing``."""
    return rules.setup_seconds + rules.least_steps * (timing["step_s"] + timing["read_s"])


def check_budget(timing: dict[str, float], cfg: Config, rules: PlanRules) -> None:
    """Refuse a budget that cannot hold the set-up (``rules.setup_seconds``) and ``rules.least_steps`` steps of the
    smallest candidate (``timing``); the error names ``train.max_minutes`` and the least budget that works."""
    need = least_seconds(timing, rules)
    if cfg.train.max_minutes * 60 >= need:
        return
    steps = "1 training step" if rules.least_steps == 1 else f"{rules.least_steps} training steps"
    raise VesuviusError(f"config key 'train.max_minutes': {cfg.train.max_minutes:g} min cannot hold the set-up "
                        f"({rules.setup_seconds:g} s) and {steps} of the smallest network "
                        f"({timing['step_s'] + timing['read_s']:.3f} s/step measured); give at least "
                        f"train.max_minutes={math.ceil(need / 60 * 100) / 100:g}")


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


def _keep_from(cfg: Config, keep: set[str]) -> Candidate | None:
    """The ladder dimensions the user fixed: patch, batch, and the whole model (any model.kwargs key)."""
    if not keep:
        return None
    fixed_model = any(k in ("model", "model.kwargs") or k.startswith("model.kwargs.") for k in keep)
    return Candidate(patch=tuple(cfg.transforms.patch_size) if covered("transforms.patch_size", keep) else (),
                     width=-1 if fixed_model else 0, depth=0,
                     batch=cfg.train.batch_size if covered("train.batch_size", keep) else 0)


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
    device = resolve_device(cfg.train.device)
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
    device in :func:`make_plan`; a cost model in tests): climb the ladder while candidates fit, then choose. A budget
    that cannot hold the set-up and ``rules.least_steps`` steps of the first (smallest) candidate is refused before
    more is measured (:func:`check_budget`)."""
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
        if len(timings) == 1:
            check_budget(timings[0], cfg, rules)
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
    plan.values = {k: v for k, v in plan.values.items() if not covered(k, keep)}
    plan.reasons = {k: plan.reasons[k] for k in plan.values}
    return plan


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
                f"width {cand.width} (first-level channels), {cand.depth} halvings of the resolution ("
                f"{'strided stem and poolings' if cfg.model.name == 'resunet3d' else 'poolings'}): the ladder grows "
                f"width and patch together; the halvings bring the patch {list(cand.patch)} to about 4 voxels")
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
