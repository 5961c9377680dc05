"""The chain search (vesuvius_monai.tuning): planted optima, the guard, the Dice rule, the robust rule, the gains."""

from __future__ import annotations

import dataclasses
import itertools
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vesuvius_monai.config import PostprocessConfig, TuneConfig, load_config, resolve_config, to_dict
from vesuvius_monai.engine.tune import read_choice
from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.metrics.overlap import dice_masks
from vesuvius_monai.postprocess import postprocess
from vesuvius_monai.tuning.scorer import FnScorer
from vesuvius_monai.tuning.search import search_chain
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
    scorers = [Table(s, d) for s, d in zip(per_fragment, dices or [None] * len(per_fragment))]
    cfg = TuneConfig(operators=("threshold",), thresholds=tuple(per_fragment[0]), rule=rule, **tune)
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
