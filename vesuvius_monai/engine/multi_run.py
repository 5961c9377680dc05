"""Several training runs for an ensemble (``vesuvius-monai train --seeds 0,1,2`` or ``--folds k``).

``--seeds`` trains one run per seed (``seed=<s>``) into ``<output_dir>/seed<s>``; ``--folds k`` trains k runs into
``<output_dir>/fold<i>``: the training and validation fragments of the config's split are pooled (in the order the
data lists them) and dealt into k folds (fragment j goes to fold j mod k); run i validates on fold i and trains on
the others, the test fragments stay out of every run. Each run is an ordinary run of the config (its own folder,
lock and ``--resume``); the last line logged is the one ``evaluate`` command that scores their ensemble.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Callable

from vesuvius_monai.config import Config
from vesuvius_monai.data.dataset import find_fragments, split_fragments
from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.io.run_dir import RunDir

log = logging.getLogger(__name__)


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> [0, 1, 2]: distinct integers >= 0, at least one; VesuviusError naming ``--seeds``."""
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise VesuviusError(f"--seeds '{text}' must be integers separated by commas, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise VesuviusError(f"--seeds '{text}' must be distinct integers >= 0, e.g. 0,1,2")
    return seeds


def fold_overrides(cfg: Config, k: int) -> list[tuple[str, list[str]]]:
    """(run name ``fold<i>``, its ``data`` overrides) for each of the ``k`` folds (module docstring); a VesuviusError
    when there are fewer than ``k`` train + val fragments or the dataset YAML fixes a split the folds would change."""
    files = find_fragments(cfg.data)
    splits = split_fragments(files, cfg.data)
    test = [f.id for f in splits["test"]]
    pool = [f.id for f in files if f.id not in set(test)]
    if k < 2 or k > len(pool):
        raise VesuviusError(f"--folds {k}: need 2 <= k <= {len(pool)} (the training and validation fragments)")
    runs = []
    for i in range(k):
        val = pool[i::k]
        overrides = [f"data.val_fragments={json.dumps(val)}", f"data.test_fragments={json.dumps(test)}"]
        data = dataclasses.replace(cfg.data, val_fragments=val, test_fragments=test)
        got = split_fragments(files, data)
        if sorted(f.id for f in got["train"]) != sorted(set(pool) - set(val)):
            raise VesuviusError(f"--folds {k}: the dataset YAML ({cfg.data.dataset}) fixes the split of some "
                                f"fragments; remove their 'split' entries (except 'test') to deal them into folds")
        runs.append((f"fold{i}", overrides))
    return runs


def seed_overrides(seeds: list[int]) -> list[tuple[str, list[str]]]:
    """(run name ``seed<s>``, its overrides) per seed."""
    return [(f"seed{s}", [f"seed={s}"]) for s in seeds]


def train_runs(runs: list[tuple[str, list[str]]], output_dir: str, config_of: Callable[[list[str]], Config],
               train: Callable[[Config], Path]) -> list[Path]:
    """Train every run (``config_of(overrides)`` with ``output_dir=<output_dir>/<name>`` added) one after the other;
    logs the ensemble's ``evaluate`` command. Returns the run folders."""
    folders = []
    for n, (name, overrides) in enumerate(runs):
        cfg = config_of([*overrides, f"output_dir={Path(output_dir) / name}"])
        log.info("run %d of %d: %s (%s)", n + 1, len(runs), cfg.output_dir, " ".join(overrides))
        folders.append(Path(train(cfg)))
    command = " ".join(f"--checkpoint {RunDir(f).best}" for f in folders)
    log.info("the ensemble of these %d runs: vesuvius-monai evaluate %s", len(folders), command)
    return folders
