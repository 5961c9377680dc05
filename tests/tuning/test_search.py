"""The chain search (vesuvius_monai.tuning): planted optima, the guard, the Dice rule, the robust rule, the gains."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from vesuvius_monai.config import PostprocessConfig, TuneConfig, load_config, resolve_config, to_dict
from vesuvius_monai.engine.tune import read_choice
from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.metrics.overlap import dice_masks
from vesuvius_monai.postprocess import postprocess
from vesuvius_monai.tuning.scorer import FnScorer
from vesuvius_monai.tuning.search import halves, held_out_gain, score_chain, search_chain
from vesuvius_monai.tuning.space import DIMENSIONS, describe_chain

THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
SIZES = (2, 4, 8, 16)


def split_chain(prob: np.ndarray, cfg: PostprocessConfig) -> np.ndarray:
    """A separable chain: the left half thresholded at ``threshold``, the right half at ``min_size / 20``."""
    half = prob.shape[2] // 2
    return np.concatenate([prob[..., :half] > cfg.threshold, prob[..., half:] > cfg.min_size / 20], axis=2)


def split_score(mask: np.ndarray, label: np.ndarray) -> float:
    """Mean of the Dice of the two halves: separable in (threshold, min_size)."""
    half = mask.shape[2] // 2
    return 0.5 * (dice_masks(mask[..., :half], label[..., :half]) + dice_masks(mask[..., half:], label[..., half:]))


@settings(max_examples=15, deadline=None)
@given(st.sampled_from(THRESHOLDS), st.sampled_from(SIZES), st.integers(0, 2**16), st.integers(2, 4),
       st.sampled_from(["robust", "majority"]))
def test_planted_optimum_found_with_fewer_candidates_than_exhaustive(t, m, seed, n, rule):
    rng = np.random.default_rng(seed)
    probs = [rng.random((6, 8, 10)) for _ in range(n)]
    labels = [split_chain(p, PostprocessConfig(threshold=t, min_size=m)) for p in probs]  # the planted optimum
    tune = TuneConfig(operators=("threshold", "dust"), thresholds=THRESHOLDS, min_sizes=SIZES, connectivities=(26,),
                      rule=rule, max_dice_drop=1.0)
    scorers = [FnScorer(label, split_score) for label in labels]
    choice = search_chain(probs, scorers, base=PostprocessConfig(threshold=0.5), tune=tune, chain=split_chain)
    grid = [PostprocessConfig(threshold=a, min_size=b) for a, b in itertools.product(THRESHOLDS, (0, *SIZES))]
    exhaustive = max(grid, key=lambda c: np.mean([split_score(split_chain(p, c), q) for p, q in zip(probs, labels)]))
    assert (choice.chosen.threshold, choice.chosen.min_size) == (exhaustive.threshold, exhaustive.min_size) == (t, m)
    assert choice.candidates < len(grid)  # fewer than the exhaustive search


class Table:
    """A scorer reading per-fragment scores off a table: ``chain`` returns the config itself."""

    def __init__(self, scores: dict[float, float], dices: dict[float, float] | None = None):
        self.scores, self.dices = scores, dices or {}

    def score(self, cfg: PostprocessConfig) -> dict[str, float]:
        return {"score": self.scores[cfg.threshold], "dice": self.dices.get(cfg.threshold, 0.5)}


def choose(per_fragment: list[dict[float, float]], rule: str, dices=None, **tune) -> PostprocessConfig:
    """The threshold the search takes from per-fragment score tables (the held-out halves off unless ``tune`` sets
    ``halves``)."""
    scorers = [Table(s, d) for s, d in zip(per_fragment, dices or [None] * len(per_fragment))]
    cfg = TuneConfig(operators=("threshold",), thresholds=tuple(per_fragment[0]), rule=rule,
                     **{"halves": 0, **tune})
    return search_chain([np.zeros(1)] * len(scorers), scorers, base=PostprocessConfig(threshold=0.5), tune=cfg,
                        chain=lambda prob, c: c).chosen


@pytest.mark.parametrize("rule", ["robust", "majority"])
def test_one_fragment_carrying_the_mean_is_refused(rule):
    frags = [{0.5: 0.5, 0.3: 0.9}, {0.5: 0.5, 0.3: 0.49}, {0.5: 0.5, 0.3: 0.49}]  # mean +0.13, better on 1 of 3
    assert choose(frags, rule).threshold == 0.5
    assert choose(frags[:1], rule).threshold == 0.5  # one fragment cannot choose


def test_robust_rule_refuses_a_gain_within_noise_that_majority_takes():
    frags = [{0.5: 0.5, 0.3: 0.6}, {0.5: 0.5, 0.3: 0.501}, {0.5: 0.5, 0.3: 0.501}, {0.5: 0.5, 0.3: 0.48}]
    assert choose(frags, "majority").threshold == 0.3  # better on 3 of 4 and on the mean (+0.0205)
    assert choose(frags, "robust").threshold == 0.5  # but the mean gain is below one standard error (0.027)
    assert choose(frags, "robust", noise_k=0.0).threshold == 0.3
    two = [{0.5: 0.5, 0.3: 0.6}, {0.5: 0.5, 0.3: 0.499}]  # better on one of two
    assert choose(two, "robust").threshold == 0.5


def test_robust_rule_takes_the_smallest_change_within_noise_of_the_best():
    frags = [{0.5: 0.5, 0.45: 0.60, 0.3: 0.62}, {0.5: 0.5, 0.45: 0.62, 0.3: 0.60}, {0.5: 0.5, 0.45: 0.61, 0.3: 0.63}]
    assert choose(frags, "majority").threshold == 0.3  # best mean
    assert choose(frags, "robust").threshold == 0.45  # within noise of the best, closer to 0.5


def test_robust_dice_rule_counts_the_spread_of_the_dice_losses():
    frags = tables([0.02, 0.03, 0.02])
    dices = [{0.5: 0.9, 0.3: 0.9}, {0.5: 0.9, 0.3: 0.9}, {0.5: 0.9, 0.3: 0.891}]  # mean -0.003, one fragment -0.009
    assert choose(frags, "majority", dices).threshold == 0.3  # within max_dice_drop on the mean
    assert choose(frags, "robust", dices).threshold == 0.5  # -0.003 - 0.003 (one standard error) < -0.005
    even = [{0.5: 0.9, 0.3: 0.897}] * 3  # the same mean loss on every fragment: no spread
    assert choose(frags, "robust", even).threshold == 0.3


def tables(gains_at_03: list[float]) -> list[dict[float, float]]:
    """Per-fragment tables where threshold 0.3 gains ``gains_at_03[i]`` over 0.5 on fragment i."""
    return [{0.5: 0.5, 0.3: 0.5 + g} for g in gains_at_03]


@pytest.mark.parametrize("rule", ["robust", "majority"])
def test_halves_keep_a_change_every_fragment_agrees_on(rule):
    frags = tables([0.10, 0.12, 0.09, 0.11, 0.10, 0.13])
    assert choose(frags, rule, halves=20).threshold == 0.3
    assert choose(tables([0.10, 0.12]), rule, halves=20).threshold == 0.3  # two: each chooses for the other


def test_halves_refuse_a_change_the_fragments_cannot_choose_for_each_other():
    frags = tables([1.0, 1.0, 1.0, -2.9])  # mean +0.025, better on 3 of 4: the majority rule takes it
    assert choose(frags, "majority").threshold == 0.3
    # each half with the loser in it picks nothing; each without it picks 0.3, which loses on the other half
    assert choose(frags, "majority", halves=20).threshold == 0.5
    assert choose(tables([0.1, -0.05]), "majority", halves=20).threshold == 0.5


def test_each_half_applies_the_dice_rule_on_its_own_fragments():
    """Row 0 gains everywhere but loses 0.02 Dice on fragments 0 and 1: only the half {2, 3} may pick it (every other
    half's mean Dice change is -0.01 or -0.02, past max_dice_drop 0.005), and it scores +1 on {0, 1}."""
    gains = np.array([[1.0, 1.0, 1.0, 1.0]])
    changes = np.array([[-0.02, -0.02, 0.0, 0.0]])
    held, _, won, lost = held_out_gain(gains, changes, changes, np.array([1.0]), TuneConfig(rule="majority"))
    assert (won, lost) == (1, 0) and held == pytest.approx(1 / 6)


def test_held_out_gain_by_hand():
    gains = np.array([[1.0, 1.0, 1.0, -2.9], [0.0, 0.0, 0.0, 0.0]])
    held, dice, won, lost = held_out_gain(gains, np.zeros_like(gains), np.zeros_like(gains), np.array([1.0, 2.0]),
                                          TuneConfig(rule="majority"))
    # 6 splits into pairs; the 3 without fragment 3 pick row 0 and score (1 - 2.9) / 2 on the other pair
    assert (won, lost) == (0, 3) and held == pytest.approx(3 * -0.95 / 6) and dice == 0.0


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 12), st.integers(0, 40), st.integers(0, 2**16))
def test_halves_are_splits_into_a_larger_and_a_smaller_half(n, limit, seed):
    splits = halves(n, limit, seed)
    assert all(np.array_equal(a, c) for (a, _), (c, _) in zip(splits, halves(n, limit, seed)))  # the same each run
    if n < 2 or limit == 0:
        assert splits == []
        return
    assert len(splits) == min(limit, math.comb(n, n - n // 2))
    for a, b in splits:
        assert len(a) == n - n // 2 and len(b) == n // 2
        assert sorted(np.concatenate([a, b]).tolist()) == list(range(n))
    if math.comb(n, n - n // 2) <= limit:  # every split, once
        assert len({tuple(a) for a, _ in splits}) == len(splits)


@pytest.mark.parametrize("rule", ["robust", "majority"])
def test_dice_rule_refuses_a_candidate_losing_overlap(rule):
    frags = [{0.5: 0.5, 0.4: 0.55, 0.3: 0.6}] * 3
    dices = [{0.5: 0.9, 0.4: 0.897, 0.3: 0.88}] * 3
    frags = [dict(f) for f in frags]
    frags[0][0.3] += 1e-3  # not every fragment equal (a noise estimate of 0 is fine too)
    assert choose(frags, rule, dices).threshold == 0.4  # 0.3 costs 0.02 Dice > max_dice_drop
    assert choose(frags, rule, dices, max_dice_drop=1.0).threshold == 0.3


def test_several_operators_gains_sum_to_the_total_and_the_dice_rule_holds():
    rng = np.random.default_rng(0)
    labels, probs = [], []
    for _ in range(3):
        label = np.zeros((16, 16, 16), dtype=bool)
        label[4:12, 3:13, 3:13] = True
        label[2, 2, 2] = False
        noise = rng.random(label.shape) * 0.7
        probs.append(np.clip(np.where(label, 0.75, 0.0) + noise - 0.2, 0, 1))
        labels.append(label)
    scorers = [FnScorer(label, dice_masks, dice_masks) for label in labels]
    base = PostprocessConfig(threshold=0.8)
    tune = TuneConfig(rule="majority", thresholds=(0.3, 0.5, 0.7), close_radii=((1, 1, 1),), min_sizes=(4, 16))
    choice = search_chain(probs, scorers, base=base, tune=tune, chain=postprocess)
    assert choice.chosen != base and choice.steps
    total = np.mean(choice.scores[describe_chain(choice.chosen)]) - np.mean(choice.scores[describe_chain(base)])
    assert sum(s.score_gain for s in choice.steps) == pytest.approx(total)
    dice_total = np.mean(choice.dices[describe_chain(choice.chosen)]) - np.mean(choice.dices[describe_chain(base)])
    assert sum(s.dice_gain for s in choice.steps) == pytest.approx(dice_total)
    assert [s.operator for s in choice.steps][0] == "threshold" and all(s.score_gain > 0 for s in choice.steps)
    assert dice_total >= -tune.max_dice_drop


def test_dimension_candidates_skip_invalid_configs_and_include_off():
    tune = TuneConfig(hysteresis_highs=(0.4, 0.9))
    values = [c.hysteresis_high for c in DIMENSIONS["hysteresis"].candidates(PostprocessConfig(threshold=0.5), tune)]
    assert values == [0.0, 0.9]  # 0.4 <= threshold is not a valid high
    closings = DIMENSIONS["closing"].candidates(PostprocessConfig(), tune)
    assert closings[0].close_radius == (0, 0, 0) and len(closings) == 1 + 2 * len(tune.close_radii)


@pytest.mark.parametrize(("override", "key"), [
    ("tune.operators=[threshhold]", "tune.operators"), ("tune.rule=robus", "tune.rule"),
    ("tune.close_modes=[sheet]", "tune.close_modes"), ("tune.sweeps=0", "tune.sweeps"),
    ("tune.noise_k=-1", "tune.noise_k"), ("tune.hysteresis_highs=[0]", "tune.hysteresis_highs"),
    ("tune.halves=-1", "tune.halves"), ("tune.halves=2.5", "tune.halves"),
    ("tune.open_radii=[[1,-1,1]]", "tune.open_radii"), ("tune.connectivities=[8]", "tune.connectivities"),
    ("tune.operators=[dust,dust]", "tune.operators")])
def test_tune_errors_name_the_key(override, key):
    with pytest.raises(VesuviusError, match=key):
        load_config(None, [override])


def test_did_you_mean_for_an_operator():
    with pytest.raises(VesuviusError, match="did you mean 'closing'"):
        TuneConfig(operators=("closng",))


def test_choice_round_trips_through_read_choice(tmp_path):
    chosen = PostprocessConfig(threshold=0.4, hysteresis_high=0.85, open_radius=(1, 1, 1), close_radius=(2, 1, 1),
                               close_per_sheet=True, min_size=64, connectivity=6, plug_holes=True, fill_voids=True)
    path = tmp_path / "postprocess.json"
    path.write_text(json.dumps({"postprocess": to_dict(chosen), "reason": "", "base": {}, "scores": {}, "steps": []}))
    assert resolve_config(None, [], fills=[read_choice(path)]).postprocess == chosen
    assert resolve_config(None, ["postprocess.min_size=3"], fills=[read_choice(path)]).postprocess == \
        dataclasses.replace(chosen, min_size=3)  # the user's keys win


# ---------------------------------------------------------------- on noisy sheets


def _noisy_sheet(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A label slab and a probability map with the slab at 0.8 and random specks at 0.65 around it."""
    rng = np.random.default_rng(seed)
    label = np.zeros((16, 16, 16), np.uint8)
    label[6:9] = 1
    prob = np.where(label == 1, 0.8, 0.1).astype(np.float32)
    specks = rng.random(label.shape) < 0.01
    prob[specks & (label == 0)] = 0.65
    return prob, label


def _dice_score(pred, label):
    return 2 * np.sum(pred & (label == 1)) / max(pred.sum() + (label == 1).sum(), 1)


def guarded(probs, labels, score_fn, *, base=PostprocessConfig(), dice_fn=None, **tune):
    """search_chain over threshold and dust as the default tune section would run it (held-out halves on)."""
    cfg = TuneConfig(operators=("threshold", "dust"), **tune)
    return search_chain(probs, [FnScorer(label, score_fn, dice_fn) for label in labels], base=base, tune=cfg,
                        chain=postprocess)


def test_search_chooses_what_helps_every_fragment():
    pairs = [_noisy_sheet(s) for s in range(3)]
    base = PostprocessConfig()
    choice = guarded([p for p, _ in pairs], [q for _, q in pairs], _dice_score, base=base)
    assert choice.chosen != base  # specks at 0.65: a threshold above them, or their removal, helps all three
    assert all(n > o for n, o in zip(choice.scores[describe_chain(choice.chosen)], choice.scores[describe_chain(base)]))


@pytest.mark.parametrize("halves", [0, 20])
def test_search_keeps_the_base_on_one_fragment_or_a_split_vote(halves):
    prob, label = _noisy_sheet(0)
    one = guarded([prob], [label], _dice_score, halves=halves)
    assert one.chosen == one.base and "one validation fragment cannot choose" in one.reason
    # a second fragment with a faint sheet (0.62) and no specks: thresholds above the specks (0.65) erase it, and
    # removing small components changes nothing there, so the best candidate is better on one fragment of two only
    faint = np.where(label == 1, 0.62, 0.1).astype(np.float32)
    split = guarded([prob, faint], [label, label.copy()], _dice_score, rule="majority", halves=halves)
    best = max(split.scores, key=lambda name: np.mean(split.scores[name]))
    assert np.mean(split.scores[best]) > np.mean(split.scores[describe_chain(split.base)])  # better on average ...
    assert split.chosen == split.base  # ... but carried by one


def _precision(pred, label):
    return float(np.sum(pred & (label == 1)) / max(pred.sum(), 1))


def test_search_does_not_buy_the_score_with_dice():
    """Precision rewards high thresholds that erase the sheet's faint rim; the Dice rule refuses them, and still
    allows removing the specks (which helps both)."""
    pairs = []
    for seed in range(3):
        prob, label = _noisy_sheet(seed)
        label[5] = label[9] = 1  # a rim of the sheet the network is unsure of (0.55)
        prob[5] = prob[9] = 0.55
        pairs.append((prob, label))
    probs, labels = [p for p, _ in pairs], [q for _, q in pairs]
    base = PostprocessConfig()
    free = guarded(probs, labels, _precision, base=base, dice_fn=_dice_score, max_dice_drop=1.0)
    assert free.chosen.threshold >= 0.55  # the rim is gone: precision 1, Dice much lower
    assert np.mean(free.dices[describe_chain(free.chosen)]) < np.mean(free.dices[describe_chain(base)]) - 0.1
    ruled = guarded(probs, labels, _precision, base=base, dice_fn=_dice_score, max_dice_drop=0.005)
    assert ruled.chosen.threshold < 0.55 and ruled.chosen.min_size > 0  # specks removed, rim kept
    assert np.mean(ruled.dices[describe_chain(ruled.chosen)]) >= np.mean(ruled.dices[describe_chain(base)])


@pytest.mark.parametrize("seed", range(8))
def test_search_dice_rule_holds_on_random_volumes(seed):
    """Whatever the score, the chosen candidate's mean Dice is never more than max_dice_drop below the base's, and
    every candidate tried has its Dice recorded."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 4))
    shape = tuple(int(v) for v in rng.integers(8, 20, size=3))
    probs = [ndimage.gaussian_filter(rng.random(shape), 1.5).astype(np.float32) for _ in range(n)]
    probs = [(p - p.min()) / (p.max() - p.min()) for p in probs]
    labels = [(ndimage.gaussian_filter(rng.random(shape), 1.5) > 0.5).astype(np.uint8) for _ in range(n)]
    drop = float(rng.choice([0.0, 0.005, 0.02, 0.1]))
    score = [_precision, lambda p, q: -float(p.sum()), _dice_score][seed % 3]
    base = PostprocessConfig(threshold=float(rng.choice([0.4, 0.5])))
    choice = guarded(probs, labels, score, base=base, dice_fn=_dice_score, thresholds=(0.3, 0.45, 0.5, 0.6, 0.75),
                     min_sizes=(4, 32), max_dice_drop=drop, rule=str(rng.choice(["robust", "majority"])),
                     halves=int(rng.choice([0, 20])))
    mean_dice = {k: float(np.mean(v)) for k, v in choice.dices.items()}
    assert mean_dice[describe_chain(choice.chosen)] >= mean_dice[describe_chain(base)] - drop - 1e-12
    assert choice.dices.keys() == choice.scores.keys()


def test_score_chain_reads_what_the_search_scored_through_the_memo():
    pairs = [_noisy_sheet(s) for s in range(3)]
    scorers = [FnScorer(q, _dice_score, _dice_score) for _, q in pairs]
    probs, memo = [p for p, _ in pairs], {}
    choice = search_chain(probs, scorers, base=PostprocessConfig(), chain=postprocess, memo=memo,
                          tune=TuneConfig(operators=("threshold",)))
    calls = sum(s.scored for s in scorers)
    scores, dices = score_chain(probs, scorers, choice.chosen, memo=memo)
    assert sum(s.scored for s in scorers) == calls  # every cell came from the memo
    assert scores.tolist() == choice.scores[describe_chain(choice.chosen)]
    assert dices.tolist() == choice.dices[describe_chain(choice.chosen)]
