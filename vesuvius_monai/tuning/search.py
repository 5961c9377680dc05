"""Coordinate-wise search of the post-processing chain on validation fragments, with a rule that holds on held-out data.

:func:`search_chain` starts from the config's post-processing (``base``) and, for ``tune.sweeps`` sweeps, takes each
operator of ``tune.operators`` in chain order (:mod:`vesuvius_monai.tuning.space`): every candidate value of that
operator is applied with the other keys at the current choice, post-processed from the probabilities (predicted
once) and scored on every fragment; the rule (``tune.rule``) decides whether one replaces the current choice:

- Dice rule (both rules): a candidate whose mean Dice is more than ``tune.max_dice_drop`` below ``base``'s is never
  taken.
- "robust": a candidate may replace the current choice only when it is better on a strict majority of the
  fragments (at least two) and its mean gain g = mean(d_i) over the per-fragment gains d_i exceeds ``noise_k``
  standard errors, g > noise_k * sd(d) / sqrt(n) (so that with two fragments and noise_k = 1 it must be better on
  both). Among those, the one of best mean gain sets the noise band [g_best - noise_k * se_best, g_best]; the
  candidate in that band closest to the current value (mildest first, :class:`Dimension` order) is taken: of
  several changes that validation cannot tell apart, the smallest.
- "majority": the candidate of best mean score is taken when it is better on the mean and on a strict majority of
  the fragments (at least two), the tuner's guard before the chain search.

The chosen chain must finally beat ``base`` on the mean and on a strict majority (at least two fragments), else
``base`` is kept. Each accepted change is a :class:`Step` with its mean score and Dice gains: the gains of the
steps sum to the chosen chain's gain over ``base``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import numpy as np
from tqdm.auto import tqdm

from vesuvius_monai.config import PostprocessConfig, TuneConfig
from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.tuning.space import Dimension, describe_chain, searched

log = logging.getLogger(__name__)

Chain = Callable[[np.ndarray, PostprocessConfig], np.ndarray]  # (prob (Z, Y, X), cfg) -> bool mask (Z, Y, X)


class Scorer(Protocol):
    """Scores a bool mask (Z, Y, X) of one fragment: a dict with "score" (higher is better) and "dice"."""

    def score(self, mask: np.ndarray) -> dict[str, float]: ...


@dataclass(frozen=True)
class Step:
    """One accepted change: the operator, its value before and after, the sweep, and the mean validation score and
    Dice gains it brought (over the choice before it)."""

    operator: str
    before: list
    after: list
    sweep: int
    score_gain: float
    dice_gain: float


@dataclass
class ChainChoice:
    """What :func:`search_chain` chose: ``chosen`` (``base`` when the final guard kept it), per-fragment scores and
    Dice of every candidate tried (keyed by :func:`describe_chain`), the accepted ``steps`` in order, the reason in
    one line, and the cost: ``candidates`` tried, masks ``scored`` (others came from the cache), ``seconds``."""

    chosen: PostprocessConfig
    base: PostprocessConfig
    scores: dict[str, list[float]]
    dices: dict[str, list[float]]
    steps: list[Step]
    reason: str
    candidates: int = 0
    scored: int = 0
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)


class _Table:
    """Per-fragment score and Dice of every candidate tried, each computed once."""

    def __init__(self, probs: Sequence[np.ndarray], scorers: Sequence[Scorer], chain: Chain):
        if len(probs) == 0 or len(probs) != len(scorers):
            raise VesuviusError(f"the chain search needs equally many probs and labels (> 0), got {len(probs)} and "
                                f"{len(scorers)}")
        self.probs, self.scorers, self.chain = probs, scorers, chain
        self.scores: dict[str, list[float]] = {}
        self.dices: dict[str, list[float]] = {}
        self.timings = {"chain": 0.0, "score": 0.0}

    def measure(self, cfg: PostprocessConfig) -> tuple[np.ndarray, np.ndarray]:
        """(scores, dices) of ``cfg``, each float64 (n_fragments,)."""
        name = describe_chain(cfg)
        if name not in self.scores:
            scores, dices = [], []
            for i, (prob, scorer) in enumerate(zip(self.probs, self.scorers)):
                start = time.perf_counter()
                mask = self.chain(prob, cfg)
                middle = time.perf_counter()
                result = scorer.score(mask)
                self.timings["chain"] += middle - start
                self.timings["score"] += time.perf_counter() - middle
                if not (math.isfinite(result["score"]) and math.isfinite(result["dice"])):
                    raise VesuviusError(f"post-processing score of fragment {i} with {name} is not finite: {result}")
                scores.append(float(result["score"]))
                dices.append(float(result["dice"]))
            self.scores[name], self.dices[name] = scores, dices
        return np.array(self.scores[name]), np.array(self.dices[name])


def _beats(new: np.ndarray, old: np.ndarray) -> bool:
    """Better on the mean and on a strict majority of at least two fragments."""
    return len(old) >= 2 and new.mean() > old.mean() and int(np.sum(new > old)) > len(old) / 2


def _noise(gains: np.ndarray, k: float) -> float:
    """``k`` standard errors of the per-fragment gains (ddof 1)."""
    return k * float(np.std(gains, ddof=1)) / math.sqrt(len(gains)) if len(gains) > 1 else math.inf


def _pick(dim: Dimension, current: PostprocessConfig, table: _Table, tune: TuneConfig,
          dice_floor: float) -> PostprocessConfig:
    """The value of ``dim`` that the rule takes at ``current`` (``current`` itself when nothing qualifies)."""
    old, _ = table.measure(current)
    candidates = dim.candidates(current, tune)
    qualified = []  # (gain, noise, distance, cfg)
    for cfg in tqdm(candidates, desc=f"tune {dim.name}", leave=False, dynamic_ncols=True):
        new, dices = table.measure(cfg)
        if cfg == current or dices.mean() < dice_floor or not _beats(new, old):
            continue
        gains = new - old
        noise = _noise(gains, tune.noise_k)
        if tune.rule == "robust" and gains.mean() <= noise:
            continue
        distance = abs(dim.order(dim.value_of(cfg), tune) - dim.order(dim.value_of(current), tune))
        qualified.append((float(gains.mean()), noise, distance, cfg))
    if not qualified:
        return current
    best_gain, best_noise, best_distance, best = max(qualified, key=lambda q: (q[0], -q[2]))
    if tune.rule == "majority":
        return best
    band = [q for q in qualified if q[0] >= best_gain - best_noise]
    return min(band, key=lambda q: (q[2], -q[0]))[3]


def search_chain(probs: Sequence[np.ndarray], scorers: Sequence[Scorer], *, base: PostprocessConfig,
                 tune: TuneConfig = TuneConfig(), chain: Chain | None = None) -> ChainChoice:
    """Choose the post-processing chain on validation fragments (see the module docstring for the rule).

    probs[i]: (Z, Y, X) probabilities in [0, 1] of fragment i; scorers[i].score(bool mask) -> {"score", "dice"}
    against that fragment's label (e.g. :class:`vesuvius_monai.tuning.scorer.FragmentScorer`). ``chain(prob, cfg)``
    post-processes (default :func:`vesuvius_monai.postprocess.postprocess`).
    """
    if chain is None:
        from vesuvius_monai.postprocess import postprocess as chain
    start = time.perf_counter()
    table = _Table(probs, scorers, chain)
    base_scores, base_dices = table.measure(base)
    dice_floor = base_dices.mean() - tune.max_dice_drop
    current, steps = base, []
    for sweep in range(1, tune.sweeps + 1):
        changed = False
        for dim in searched(tune):
            picked = _pick(dim, current, table, tune, dice_floor)
            if picked != current:
                (old, old_dice), (new, new_dice) = table.measure(current), table.measure(picked)
                steps.append(Step(dim.name, list(dim.value_of(current)), list(dim.value_of(picked)), sweep,
                                  float(new.mean() - old.mean()), float(new_dice.mean() - old_dice.mean())))
                log.info("tune %s: %s -> %s (sweep %d): mean score %+.4f, mean Dice %+.4f", dim.name,
                         steps[-1].before, steps[-1].after, sweep, steps[-1].score_gain, steps[-1].dice_gain)
                current, changed = picked, True
        if not changed:
            break
    chosen, reason = _final(current, base, table, tune)
    if chosen == base:
        steps = []
    choice = ChainChoice(chosen=chosen, base=base, scores=table.scores, dices=table.dices, steps=steps,
                         reason=reason, candidates=len(table.scores),
                         scored=sum(getattr(s, "scored", 0) for s in scorers),
                         seconds=time.perf_counter() - start, timings=dict(table.timings))
    log.info("post-processing search: %d candidates x %d fragments, %d masks scored (the rest from the cache), in "
             "%.1f s (chain %.1f s, exact score %.1f s)", choice.candidates, len(probs), choice.scored, choice.seconds,
             table.timings["chain"], table.timings["score"])
    log.info("post-processing: %s", reason)
    return choice


def _final(current: PostprocessConfig, base: PostprocessConfig, table: _Table,
           tune: TuneConfig) -> tuple[PostprocessConfig, str]:
    """``current`` when it beats ``base`` on the mean and a strict majority (>= 2 fragments), with the reason."""
    (old, old_dice), (new, new_dice) = table.measure(base), table.measure(current)
    gain = (f"mean score {old.mean():.4f} -> {new.mean():.4f}, better on {int(np.sum(new > old))} of {len(old)} "
            f"fragments, mean Dice {old_dice.mean():.4f} -> {new_dice.mean():.4f}")
    rule = f"rule {tune.rule}" + (f", noise_k {tune.noise_k:g}" if tune.rule == "robust" else "")
    if len(old) < 2:
        return base, f"kept {describe_chain(base)}: one validation fragment cannot choose"
    if current == base:
        return base, f"kept {describe_chain(base)}: no candidate passed the {rule} ({old.mean():.4f})"
    if not _beats(new, old):
        return base, f"kept {describe_chain(base)}: {describe_chain(current)} is not better on most fragments ({gain})"
    return current, f"chose {describe_chain(current)} ({rule}): {gain}"
