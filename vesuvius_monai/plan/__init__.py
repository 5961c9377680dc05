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
   a budget that cannot hold the set-up and ``PlanRules.least_steps`` steps of the first candidate is refused,
   naming the least budget that works;
4. **chooses** the largest measured candidate that still leaves ``PlanRules.min_steps`` optimiser steps after the
   validation passes and set-up, and fits the device memory (:func:`choose`); from it: ``train.steps`` (the steps
   the budget holds), ``train.val_every`` (``PlanRules.validations`` passes within ``PlanRules.val_share`` of the
   budget), ``train.warmup_steps``, ``infer.roi_size``, ``transforms.pos_fraction`` (from the foreground share).

The result is a :class:`Plan`: dotted config keys -> values, with a one-line reason per key. Because the ladder is
monotone and a bigger budget only raises the step time a candidate may take, a bigger budget never picks a smaller
patch, width or batch from the same measurements (tested).

``train`` resolves its config with the plan as a layer (``resolve_config(path, overrides, fills=[plan.layer()])``),
which fills every key the user's config file and overrides leave out (:func:`vesuvius_monai.config.explicit_keys`).

The modules, by job: :mod:`~vesuvius_monai.plan.fingerprint` (what the data are),
:mod:`~vesuvius_monai.plan.ladder` (the rules, the candidates and their measurement on the device),
:mod:`~vesuvius_monai.plan.choice` (the budget of each candidate, the choice and the planned values) and
:mod:`~vesuvius_monai.plan.output` (the :class:`Plan`, the keys a user set, printing, saving and loading).
"""

from vesuvius_monai.plan.choice import Budget, budget_for, choose, free_memory, make_plan, plan_from_measurements
from vesuvius_monai.plan.fingerprint import dataset_fingerprint
from vesuvius_monai.plan.ladder import (Candidate, PlanRules, Triple, candidate_ladder, depth_for, measure_candidate,
                                        model_kwargs, patch_caps)
from vesuvius_monai.plan.output import Plan, format_plan, load_plan, save_plan

__all__ = ["Budget", "Candidate", "Plan", "PlanRules", "Triple", "budget_for", "candidate_ladder", "choose",
           "dataset_fingerprint", "depth_for", "format_plan", "free_memory", "load_plan",
           "make_plan", "measure_candidate", "model_kwargs", "patch_caps", "plan_from_measurements", "save_plan"]
