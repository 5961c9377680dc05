"""The trained runs of ``bench_stack.py``: one per (system, seed, steps), trained on the benchmark families' train
split with the schedule on steps (``train.max_minutes=0``), so that a run is the same on a quiet or a loaded machine
and "equal minutes" means equal optimiser steps of the same network.

A finished run (its ``checkpoints/best.pt`` and a saved config equal to the one asked for) is reused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import yaml

from recipes_runs import recipe
from vesuvius_monai.config import Config, config_from_raw, load_config, to_dict
from vesuvius_monai.engine.train import train
from vesuvius_monai.io.run_dir import RunDir

log = logging.getLogger("bench_stack")

RECIPE_STEPS = 2000  # the built-in recipe's train.steps, against which warm-up is scaled


@dataclass(frozen=True)
class RunSpec:
    """One training run: ``system`` ('default' or a registered model name with the plain MONAI recipe), its seed and
    its optimiser steps."""

    system: str
    seed: int
    steps: int

    @property
    def name(self) -> str:
        return f"{self.system}_{self.steps}steps_seed{self.seed}"


def run_config(spec: RunSpec, dataset: Path, run_dir: Path, overrides: list[str]) -> Config:
    """The config of one run: the system's recipe, the bench's overrides, then the data, folder, seed and steps (the
    warm-up keeps the recipe's share of the steps)."""
    recipe_cfg = load_config(None, [*recipe(spec.system), *overrides])
    warmup = max(5, round(spec.steps * recipe_cfg.train.warmup_steps / RECIPE_STEPS))
    return load_config(None, [*recipe(spec.system), *overrides, f"seed={spec.seed}",
                              f"output_dir={run_dir / spec.name}", f"data.dataset={dataset}",
                              "train.max_minutes=0", f"train.steps={spec.steps}", f"train.warmup_steps={warmup}",
                              f"train.val_every={max(50, spec.steps // 10)}"])


def finished(cfg: Config) -> bool:
    """True when ``output_dir`` holds a finished run of exactly ``cfg``."""
    run = RunDir(cfg.output_dir)
    if not (run.checkpoint("best").is_file() and run.checkpoint("last").is_file() and run.config.is_file()):
        return False
    saved = config_from_raw(yaml.safe_load(run.config.read_text()), [])
    return to_dict(saved) == to_dict(cfg)


def ensure_trained(spec: RunSpec, dataset: Path, run_dir: Path, overrides: list[str]) -> Path:
    """Train the run of ``spec`` unless it is there; returns its best checkpoint."""
    cfg = run_config(spec, dataset, run_dir, overrides)
    run = RunDir(cfg.output_dir)
    if not finished(cfg):
        log.info("training %s (%s, %d steps) into %s", spec.name, cfg.model.name, spec.steps, run.path)
        train(cfg)
    return run.checkpoint("best")
