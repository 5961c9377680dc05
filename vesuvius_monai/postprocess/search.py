""":func:`pick_postprocess` (``tune-postprocess``), which picks threshold and small-component removal on validation
fragments with a guard against over-fitting, through :class:`Search` (every candidate scored once per fragment).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Callable, Sequence

import numpy as np
from tqdm import tqdm

from vesuvius_monai.config import PostprocessConfig, TuneConfig
from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.postprocess.chain import apply_chain as _apply
from vesuvius_monai.postprocess.chain import check_prob as _check_prob

logger = logging.getLogger(__name__)

Scorer = Callable[[np.ndarray, np.ndarray], float]  # (bool pred (Z, Y, X), label (Z, Y, X)) -> score, higher is better


def _check_fragments(probs: list[np.ndarray], labels: list[np.ndarray]) -> None:
    """Raise unless there are equally many probs and labels (> 0), each prob checked, each pair of one shape."""
    if len(probs) == 0 or len(probs) != len(labels):
        raise VesuviusError(f"post-processing search needs equally many probs and labels (> 0), got {len(probs)} and "
                            f"{len(labels)}")
    for i, (prob, label) in enumerate(zip(probs, labels)):
        _check_prob(prob)
        if prob.shape != label.shape:
            raise VesuviusError(f"post-processing search fragment {i}: prob shape {prob.shape} != label shape "
                                f"{label.shape}")


@dataclasses.dataclass(frozen=True)
class PostprocessChoice:
    """What :func:`pick_postprocess` chose: ``chosen`` (``base`` when the guard kept it), the per-fragment scores and
    Dice of every candidate tried (keyed by :func:`describe`; ``dices`` empty without a ``dice_fn``), and the reason
    in one line."""

    chosen: PostprocessConfig
    base: PostprocessConfig
    scores: dict[str, list[float]]
    dices: dict[str, list[float]]
    reason: str


_DEFAULT = PostprocessConfig()
_NEW_KEYS = ("hysteresis_high", "open_radius", "close_radius", "close_per_sheet", "patch_holes", "plug_holes",
             "fill_voids")


def describe(cfg: PostprocessConfig) -> str:
    """``threshold 0.55, min_size 256 (6-connected), fill_holes_max 0``: a candidate's name, followed by every
    other operator key not at its default (``, hysteresis_high 0.85, close_radius (2, 1, 1)``)."""
    extra = "".join(f", {key} {getattr(cfg, key)}" for key in _NEW_KEYS if getattr(cfg, key) != getattr(_DEFAULT, key))
    return (f"threshold {cfg.threshold:.2f}, min_size {cfg.min_size} ({cfg.connectivity}-connected), "
            f"fill_holes_max {cfg.fill_holes_max}{extra}")


def pick_postprocess(
    probs: list[np.ndarray],
    labels: list[np.ndarray],
    score_fn: Scorer,
    *,
    base: PostprocessConfig,
    tune: TuneConfig = TuneConfig(),
    dice_fn: Scorer | None = None,
    connectivities: Sequence[int] = (6, 26),
) -> PostprocessChoice:
    """Choose post-processing on validation fragments: threshold first, then small-component removal at that threshold.

    probs[i] (Z, Y, X) in [0, 1] and labels[i] of the same shape; ``score_fn(bool pred, label)``, higher is better.
    ``tune`` gives the candidates (``thresholds``, ``min_sizes``; no sizes: thresholds only) and, with
    ``dice_fn(bool pred, label)``, the Dice rule: a candidate whose mean Dice is more than ``tune.max_dice_drop`` below
    that of ``base`` is never chosen. The candidate with the best mean score replaces ``base`` only when it beats
    ``base`` on a strict majority of the fragments, at least two: a setting chosen on one fragment, or carried by one,
    over-fits it. Ties of the mean go to the candidate closer to ``base``.
    """
    search = Search(probs, labels, score_fn, base=base, dice_fn=dice_fn, max_dice_drop=tune.max_dice_drop)
    best_t = search.best([base, *(dataclasses.replace(base, threshold=float(t)) for t in tune.thresholds)])
    by_size = [dataclasses.replace(best_t, min_size=int(m), connectivity=int(c)) for m in tune.min_sizes
               for c in connectivities]
    return _guarded(search.best([best_t, *by_size]), search)


class Search:
    """The per-fragment scores (and Dice) of every candidate tried, each computed once, and the best allowed one.

    probs[i] (Z, Y, X) in [0, 1] and labels[i] of the same shape (checked here); ``score_fn`` and ``dice_fn`` take
    (bool pred, label), higher is better. A candidate whose mean Dice is more than ``max_dice_drop`` below
    ``base``'s is not allowed (without a ``dice_fn`` every candidate is).
    """

    def __init__(self, probs: list[np.ndarray], labels: list[np.ndarray], score_fn: Scorer, *,
                 base: PostprocessConfig, dice_fn: Scorer | None = None, max_dice_drop: float = math.inf):
        _check_fragments(probs, labels)
        self.probs, self.labels, self.score_fn, self.dice_fn = probs, labels, score_fn, dice_fn
        self.base, self.max_dice_drop = base, max_dice_drop
        self.scores: dict[str, list[float]] = {}
        self.dices: dict[str, list[float]] = {}
        self.measure(base)

    def measure(self, cfg: PostprocessConfig) -> list[float]:
        """The scores of ``cfg`` on every fragment (computed once)."""
        name = describe(cfg)
        if name not in self.scores:
            masks = [_apply(prob, cfg) for prob in self.probs]
            self.scores[name] = _checked(self.score_fn, masks, self.labels, "score_fn", name)
            if self.dice_fn is not None:
                self.dices[name] = _checked(self.dice_fn, masks, self.labels, "dice_fn", name)
        return self.scores[name]

    def refused(self) -> list[str]:
        """Names of the candidates tried whose mean Dice is more than ``max_dice_drop`` below the base's."""
        floor = np.mean(self.dices[describe(self.base)]) - self.max_dice_drop if self.dice_fn else -np.inf
        return [name for name, values in self.dices.items() if np.mean(values) < floor]

    def best(self, candidates: list[PostprocessConfig]) -> PostprocessConfig:
        """The allowed candidate of best mean score (ties: closest to ``base``); ``base`` itself is always allowed."""
        for cfg in tqdm(candidates, desc="post-processing", leave=False):
            self.measure(cfg)
        refused = set(self.refused())
        allowed = [cfg for cfg in candidates if describe(cfg) not in refused]

        def key(cfg: PostprocessConfig) -> tuple[float, float, int]:
            return (float(np.mean(self.scores[describe(cfg)])), -abs(cfg.threshold - self.base.threshold),
                    -cfg.min_size)

        return max(allowed, key=key) if allowed else self.base


def _guarded(best: PostprocessConfig, search: Search) -> PostprocessChoice:
    """``best`` if it beats ``base`` on a strict majority (>= 2) of fragments, else ``base``, with the reason."""
    base, scores = search.base, search.scores
    new, old = np.array(scores[describe(best)]), np.array(scores[describe(base)])
    wins, n = int(np.sum(new > old)), len(old)
    gain = f"mean score {old.mean():.4f} -> {new.mean():.4f}, better on {wins} of {n} fragments"
    if search.dice_fn is not None:
        dice_old, dice_new = np.mean(search.dices[describe(base)]), np.mean(search.dices[describe(best)])
        gain += f", mean Dice {dice_old:.4f} -> {dice_new:.4f}"
    chosen = base
    if best == base:
        reason = f"kept {describe(base)}: no allowed candidate scored higher on average ({old.mean():.4f})"
    elif n < 2:
        reason = f"kept {describe(base)}: one validation fragment cannot choose ({describe(best)}: {gain})"
    elif new.mean() > old.mean() and wins > n / 2:
        chosen, reason = best, f"chose {describe(best)}: {gain}"
    else:
        reason = f"kept {describe(base)}: {describe(best)} is not better on most fragments ({gain})"
    if refused := search.refused():
        reason += (f"; {len(refused)} candidates not allowed: mean Dice more than {search.max_dice_drop:g} below the "
                   f"base's")
    logger.info("post-processing: %s", reason)
    return PostprocessChoice(chosen=chosen, base=base, scores=scores, dices=search.dices, reason=reason)


def _checked(fn: Scorer, masks: list[np.ndarray], labels: list[np.ndarray], what: str, name: str) -> list[float]:
    """fn(mask, label) per fragment; raises on a non-finite value."""
    values = []
    for i, (mask, label) in enumerate(zip(masks, labels)):
        value = float(fn(mask, label))
        if not math.isfinite(value):
            raise VesuviusError(f"post-processing {what} gave {value} for fragment {i} with {name}")
        values.append(value)
    return values

