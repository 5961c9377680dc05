"""What ``bench_stack.py`` does with trained runs: predict a split once (one run or an ensemble, through the
package's own ensemble path), tune the chain on val, and score chains on test by the exact leaderboard score.

Arrays are (z, y, x). Scores come from :class:`vesuvius_monai.tuning.scorer.FragmentScorer` (equal to
``leaderboard_score`` to 1e-9, tested in tests/tuning), one per fragment, shared by every chain scored on it.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vesuvius_monai.config import Config, PostprocessConfig, TuneConfig
from vesuvius_monai.engine.ensemble import build_ensemble, ensemble_volume
from vesuvius_monai.engine.evaluate import select_fragments
from vesuvius_monai.postprocess import postprocess
from vesuvius_monai.tuning.scorer import FragmentScorer
from vesuvius_monai.tuning.search import ChainChoice, search_chain
from vesuvius_monai.tuning.space import describe_chain

log = logging.getLogger("bench_stack")

# The field's best published fixed chain (12th place): hysteresis 0.30 / 0.85, opening, anisotropic closing (radius 2
# in z, 1 in y and x), dust below 100 voxels.
FIXED_12TH = PostprocessConfig(threshold=0.30, hysteresis_high=0.85, open_radius=(1, 1, 1), close_radius=(2, 1, 1),
                               min_size=100, connectivity=26)
# Today's tuner before the chain search: threshold and dust only, the majority guard, one sweep.
OLD_TUNER = TuneConfig(operators=("threshold", "dust"), rule="majority", sweeps=1, halves=0)


@dataclass
class Split:
    """The probabilities of one split's fragments, predicted once, and a scorer per fragment."""

    ids: list[str]
    probs: list[np.ndarray]
    scorers: list[FragmentScorer]

    def scores(self, cfg: PostprocessConfig) -> list[dict[str, float]]:
        """Every fragment's leaderboard parts and Dice with the chain ``cfg``."""
        return [scorer.score(postprocess(prob, cfg)) for prob, scorer in zip(self.probs, self.scorers)]


def predict_split(cfg: Config, checkpoints: list[Path], split: str, cache: Path) -> Split:
    """Predict ``split`` with the ensemble of ``checkpoints`` (one: that run), each member with ``cfg`` as it is;
    the probabilities are kept in ``cache`` (.npz) and read from there on a rerun."""
    fragments = select_fragments(cfg, split)
    if cache.is_file():
        stored = np.load(cache)
        probs = [stored[f.id] for f in fragments]
    else:
        ensemble = build_ensemble(cfg, checkpoints)
        probs = [ensemble_volume(ensemble, f.image, torch.device("cpu")) for f in fragments]
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp.npz")
        np.savez(tmp, **{f.id: p for f, p in zip(fragments, probs)})
        tmp.replace(cache)
    scorers = [FragmentScorer(f.label.read(), weights=cfg.evaluate.leaderboard, ignore_index=cfg.data.ignore_index)
               for f in fragments]
    return Split([f.id for f in fragments], probs, scorers)


def tune(val: Split, base: PostprocessConfig, tune_cfg: TuneConfig) -> ChainChoice:
    """The chain ``tune-postprocess`` chooses on ``val`` (its search, run on the same probabilities)."""
    return search_chain(val.probs, val.scorers, base=base, tune=tune_cfg)


def operator_gains(choice: ChainChoice, test: Split) -> list[dict]:
    """Each accepted step of ``choice`` replayed on ``test``: the step's operator, its values, its validation gains
    and the test gains of applying it after the steps before it (the chain's order of acceptance)."""
    rows, current = [], choice.base
    before = _means(test.scores(current))
    for step in choice.steps:
        current = _apply_step(current, step)
        after = _means(test.scores(current))
        rows.append({"operator": step.operator, "before": step.before, "after": step.after,
                     "val_score_gain": step.score_gain, "val_dice_gain": step.dice_gain,
                     "test_score_gain": after["score"] - before["score"],
                     "test_dice_gain": after["dice"] - before["dice"]})
        before = after
    return rows


def _apply_step(cfg: PostprocessConfig, step) -> PostprocessConfig:
    from vesuvius_monai.tuning.space import DIMENSIONS

    keys = DIMENSIONS[step.operator].keys
    return dataclasses.replace(cfg, **{k: (tuple(v) if isinstance(v, list) else v) for k, v in zip(keys, step.after)})


def _means(scores: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([s[k] for s in scores])) for k in scores[0]}


def chain_row(name: str, cfg: PostprocessConfig, test: Split, families: dict[str, str]) -> dict:
    """Mean test figures of ``cfg`` on ``test``, per family too."""
    scores = test.scores(cfg)
    row = {"chain": describe_chain(cfg), **_means(scores), "fragments": dict(zip(test.ids, scores))}
    by_family: dict[str, list[float]] = {}
    for frag_id, s in zip(test.ids, scores):
        by_family.setdefault(families[frag_id], []).append(s["score"])
    row["family_scores"] = {f: float(np.mean(v)) for f, v in sorted(by_family.items())}
    log.info("%s: test score %.4f, Dice %.4f (%s)", name, row["score"], row["dice"], row["chain"])
    return row
