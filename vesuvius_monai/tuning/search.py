"""Coordinate-wise search of the post-processing chain on validation fragments, with a rule that holds on held-out data.

:func:`search_chain` starts from the config's post-processing (``base``) and, for ``tune.sweeps`` sweeps, takes each
operator of ``tune.operators`` in chain order (:mod:`vesuvius_monai.tuning.space`): every candidate value of that
operator is applied with the other keys at the current choice, post-processed from the probabilities (predicted
once) and scored on every fragment; the rule (``tune.rule``) decides whether one replaces the current choice:

- Dice rule: a candidate whose mean Dice is more than ``tune.max_dice_drop`` below ``base``'s is never taken; with
  "robust", neither is one whose per-fragment Dice changes from ``base`` are that far below zero within
  ``noise_k`` standard errors (mean(e) - noise_k * sd(e) / sqrt(n) < -max_dice_drop): a Dice loss that varies
  from fragment to fragment may be larger on the next one.
- "robust": a candidate may replace the current choice only when it is better on a strict majority of the
  fragments (at least two) and its mean gain g = mean(d_i) over the per-fragment gains d_i exceeds ``noise_k``
  standard errors, g > noise_k * sd(d) / sqrt(n) (so that with two fragments and noise_k = 1 it must be better on
  both). Among those, the one of best mean gain sets the noise band [g_best - noise_k * se_best, g_best]; the
  candidate in that band closest to the current value (mildest first, :class:`Dimension` order) is taken: of
  several changes that validation cannot tell apart, the smallest.
- "majority": the candidate of best mean score is taken when it is better on the mean and on a strict majority of
  the fragments (at least two), the tuner's guard before the chain search.
- Resampled halves (``tune.halves`` > 0, both rules): the rule is also run on one half of the fragments (the larger
  half A of a split; up to ``tune.halves`` splits, every split when there are no more) and its pick scored on the
  other half B against the current choice. The operator changes only when that held-out gain is positive on the
  mean over the splits and on more splits than it is negative, and its mean held-out Dice loss stays within
  ``tune.max_dice_drop``: a change the validation fragments cannot choose for each other is not made. These
  splits cost no scoring: every candidate is scored on every fragment anyway.

The chosen chain must finally beat ``base`` on the mean and on a strict majority (at least two fragments), else
``base`` is kept. Each accepted change is a :class:`Step` with its mean score and Dice gains: the gains of the
steps sum to the chosen chain's gain over ``base``.
"""

from __future__ import annotations

import itertools
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
    """One accepted change: the operator, its value before and after, the sweep, the mean validation score and
    Dice gains it brought (over the choice before it), and the mean score gain of the rule's pick on held-out halves
    (``tune.halves``; None when off)."""

    operator: str
    before: list
    after: list
    sweep: int
    score_gain: float
    dice_gain: float
    held_out_gain: float | None = None


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


Memo = dict  # (scorer, chain name) -> (score, dice): one fragment's figures for one chain, shared between searches


class _Table:
    """Per-fragment score and Dice of every candidate tried, each computed once (and once per ``memo``: searches
    over overlapping fragments, keyed by their scorer objects, share it)."""

    def __init__(self, probs: Sequence[np.ndarray], scorers: Sequence[Scorer], chain: Chain, memo: Memo | None):
        if len(probs) == 0 or len(probs) != len(scorers):
            raise VesuviusError(f"the chain search needs equally many probs and labels (> 0), got {len(probs)} and "
                                f"{len(scorers)}")
        self.probs, self.scorers, self.chain = probs, scorers, chain
        self.memo = {} if memo is None else memo
        self.scores: dict[str, list[float]] = {}
        self.dices: dict[str, list[float]] = {}
        self.timings = {"chain": 0.0, "score": 0.0}

    def measure(self, cfg: PostprocessConfig) -> tuple[np.ndarray, np.ndarray]:
        """(scores, dices) of ``cfg``, each float64 (n_fragments,)."""
        name = describe_chain(cfg)
        if name not in self.scores:
            cells = [self._cell(i, cfg, name) for i in range(len(self.probs))]
            self.scores[name], self.dices[name] = [c[0] for c in cells], [c[1] for c in cells]
        return np.array(self.scores[name]), np.array(self.dices[name])

    def _cell(self, i: int, cfg: PostprocessConfig, name: str) -> tuple[float, float]:
        """(score, dice) of fragment ``i`` post-processed by ``cfg``."""
        key = (self.scorers[i], name)
        if key not in self.memo:
            start = time.perf_counter()
            mask = self.chain(self.probs[i], cfg)
            middle = time.perf_counter()
            result = self.scorers[i].score(mask)
            self.timings["chain"] += middle - start
            self.timings["score"] += time.perf_counter() - middle
            if not (math.isfinite(result["score"]) and math.isfinite(result["dice"])):
                raise VesuviusError(f"post-processing score of fragment {i} with {name} is not finite: {result}")
            self.memo[key] = (float(result["score"]), float(result["dice"]))
        return self.memo[key]


def _noise(gains: np.ndarray, k: float) -> float:
    """``k`` standard errors of the per-fragment gains (ddof 1); 0 for a single fragment, whose spread is unknown
    (the guards on the number of fragments decide there)."""
    return k * float(np.std(gains, ddof=1)) / math.sqrt(len(gains)) if len(gains) > 1 else 0.0


def _beats(new: np.ndarray, old: np.ndarray) -> bool:
    """Better on the mean and on a strict majority of at least two fragments."""
    return len(old) >= 2 and new.mean() > old.mean() and int(np.sum(new > old)) > len(old) / 2


def _rule_pick(gains: np.ndarray, distance: np.ndarray, allowed: np.ndarray, tune: TuneConfig,
               least: int = 2) -> int | None:
    """Row of ``gains`` (candidates, fragments: each candidate's score gain over the current choice) that the rule
    takes among the ``allowed`` rows (the Dice rule), None when none qualifies: better on the mean and on a strict
    majority of at least ``least`` fragments (and, "robust", by more than the noise, which is waived for a single
    fragment); "majority" takes the best mean, "robust" the candidate of least ``distance`` from the current value
    within noise of the best."""
    n = gains.shape[1]
    qualified = []  # (mean gain, noise, distance, row)
    for row, g in enumerate(gains):
        if not allowed[row] or n < least or g.mean() <= 0 or int(np.sum(g > 0)) <= n / 2:
            continue
        noise = _noise(g, tune.noise_k)
        if tune.rule == "robust" and g.mean() <= noise:
            continue
        qualified.append((float(g.mean()), noise, float(distance[row]), row))
    if not qualified:
        return None
    best_gain, best_noise, _, best = max(qualified, key=lambda q: (q[0], -q[2]))
    if tune.rule == "majority":
        return best
    return min((q for q in qualified if q[0] >= best_gain - best_noise), key=lambda q: (q[2], -q[0]))[3]


def halves(n: int, limit: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Splits (A, B) of ``n`` fragments, A the larger half (n - n // 2): every split when there are at most
    ``limit``, else ``limit`` drawn at random (seeded: the same every run)."""
    size = n - n // 2
    if n < 2 or limit == 0:
        return []
    if math.comb(n, size) <= limit:
        chosen = [np.array(a) for a in itertools.combinations(range(n), size)]
    else:
        rng = np.random.default_rng(seed)
        chosen = [np.sort(rng.choice(n, size, replace=False)) for _ in range(limit)]
    return [(a, np.setdiff1d(np.arange(n), a)) for a in chosen]


def held_out_gain(gains: np.ndarray, dice_gains: np.ndarray, dice_changes: np.ndarray, distance: np.ndarray,
                  tune: TuneConfig) -> tuple[float, float, int, int]:
    """The rule run on each half A of :func:`halves` (its Dice rule on A's fragments only) and its pick scored on
    the other half B (no pick: gain 0): (mean score gain, mean Dice gain, splits with a gain, splits with a loss).
    Arrays are (candidates, fragments): score and Dice gains over the current choice, Dice changes from ``base``."""
    scores, dices = [], []
    for a, b in halves(gains.shape[1], tune.halves):
        allowed = np.array([_dice_allowed(change[a], tune) for change in dice_changes])
        row = _rule_pick(gains[:, a], distance, allowed, tune, least=1)
        scores.append(0.0 if row is None else float(gains[row, b].mean()))
        dices.append(0.0 if row is None else float(dice_gains[row, b].mean()))
    if not scores:
        return 0.0, 0.0, 0, 0
    return float(np.mean(scores)), float(np.mean(dices)), sum(x > 0 for x in scores), sum(x < 0 for x in scores)


def _dice_allowed(change: np.ndarray, tune: TuneConfig) -> bool:
    """The Dice rule (module docstring) for a candidate's per-fragment Dice changes from ``base``."""
    noise = _noise(change, tune.noise_k) if tune.rule == "robust" else 0.0
    return float(change.mean()) - noise >= -tune.max_dice_drop


def _pick(dim: Dimension, current: PostprocessConfig, table: _Table, tune: TuneConfig,
          base_dices: np.ndarray) -> tuple[PostprocessConfig, float | None]:
    """The value of ``dim`` that the rule takes at ``current`` (``current`` itself when nothing qualifies), and the
    held-out gain that let it through (None without ``tune.halves``)."""
    old, old_dice = table.measure(current)
    configs, rows = [], []
    for cfg in tqdm(dim.candidates(current, tune), desc=f"tune {dim.name}", leave=False, dynamic_ncols=True):
        new, dices = table.measure(cfg)
        if cfg != current:
            configs.append(cfg)
            rows.append((new - old, dices - old_dice, dices - base_dices))
    if not configs:
        return current, None
    gains, dice_gains, dice_changes = (np.array(column) for column in zip(*rows))
    distance = np.array([abs(dim.order(dim.value_of(c), tune) - dim.order(dim.value_of(current), tune))
                         for c in configs])
    allowed = np.array([_dice_allowed(change, tune) for change in dice_changes])
    row = _rule_pick(gains, distance, allowed, tune)
    if row is None:
        return current, None
    if tune.halves == 0:
        return configs[row], None
    held, held_dice, won, lost = held_out_gain(gains, dice_gains, dice_changes, distance, tune)
    if held <= 0 or won <= lost or held_dice < -tune.max_dice_drop:
        log.info("tune %s: %s refused: on held-out halves its rule gains %+.4f (better on %d splits, worse on %d), "
                 "Dice %+.4f", dim.name, list(dim.value_of(configs[row])), held, won, lost, held_dice)
        return current, None
    return configs[row], held


def score_chain(probs: Sequence[np.ndarray], scorers: Sequence[Scorer], cfg: PostprocessConfig, *,
                memo: Memo | None = None, chain: Chain | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(scores, dices) of one chain ``cfg`` on each fragment, float64 (n_fragments,), through ``memo`` as
    :func:`search_chain` fills it (e.g. the test fragments of a held-out check)."""
    return _Table(probs, scorers, chain or _default_chain(), memo).measure(cfg)


def _default_chain() -> Chain:
    from vesuvius_monai.postprocess import postprocess

    return postprocess


def search_chain(probs: Sequence[np.ndarray], scorers: Sequence[Scorer], *, base: PostprocessConfig,
                 tune: TuneConfig = TuneConfig(), chain: Chain | None = None, memo: Memo | None = None) -> ChainChoice:
    """Choose the post-processing chain on validation fragments (see the module docstring for the rule).

    probs[i]: (Z, Y, X) probabilities in [0, 1] of fragment i; scorers[i].score(bool mask) -> {"score", "dice"}
    against that fragment's label (e.g. :class:`vesuvius_monai.tuning.scorer.FragmentScorer`). ``chain(prob, cfg)``
    post-processes (default :func:`vesuvius_monai.postprocess.postprocess`). ``memo``: a dict shared by searches
    over the same scorer objects (e.g. splits of one set of fragments), so that a chain is scored once per fragment.
    """
    start = time.perf_counter()
    table = _Table(probs, scorers, chain or _default_chain(), memo)
    base_scores, base_dices = table.measure(base)
    current, steps = base, []
    for sweep in range(1, tune.sweeps + 1):
        changed = False
        for dim in searched(tune):
            picked, held = _pick(dim, current, table, tune, base_dices)
            if picked != current:
                (old, old_dice), (new, new_dice) = table.measure(current), table.measure(picked)
                steps.append(Step(dim.name, list(dim.value_of(current)), list(dim.value_of(picked)), sweep,
                                  float(new.mean() - old.mean()), float(new_dice.mean() - old_dice.mean()), held))
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
    rule = (f"rule {tune.rule}" + (f", noise_k {tune.noise_k:g}" if tune.rule == "robust" else "")
            + (f", {tune.halves} held-out halves" if tune.halves else ""))
    if len(old) < 2:
        return base, f"kept {describe_chain(base)}: one validation fragment cannot choose"
    if current == base:
        return base, f"kept {describe_chain(base)}: no candidate passed the {rule} ({old.mean():.4f})"
    if not _beats(new, old):
        return base, f"kept {describe_chain(base)}: {describe_chain(current)} is not better on most fragments ({gain})"
    return current, f"chose {describe_chain(current)} ({rule}): {gain}"
