"""FragmentScorer gives leaderboard_score's figures (exact matching) with the label's work and repeats cached."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from vesuvius_monai.config import LeaderboardWeights
from vesuvius_monai.metrics.betti_matching import matching_used
from vesuvius_monai.metrics.leaderboard import leaderboard_score
from vesuvius_monai.metrics.overlap import dice
from vesuvius_monai.tuning.scorer import FragmentScorer


@settings(max_examples=12, deadline=None)
@given(st.tuples(st.integers(4, 14), st.integers(4, 14), st.integers(4, 14)), st.integers(0, 2**16),
       st.sampled_from([(1.0, 1.0, 1.0), (2.0, 1.0, 0.5)]), st.booleans())
def test_scores_equal_the_leaderboard_score(shape, seed, spacing, ignore):
    rng = np.random.default_rng(seed)
    label = (ndimage.gaussian_filter(rng.random(shape), 1) > 0.5).astype(np.uint8)
    if ignore:
        label[rng.random(shape) < 0.1] = 2
    weights = LeaderboardWeights(tiles=(2, 2, 2) if min(shape) >= 2 else (1, 1, 1))
    scorer = FragmentScorer(label, weights=weights, spacing=spacing)
    masks = [ndimage.gaussian_filter(rng.random(shape), 1) > t for t in (0.45, 0.5, 0.55)]
    masks += [masks[0], np.zeros(shape, bool), (label == 1)]
    for mask in masks:
        got = scorer.score(mask)
        want = leaderboard_score(mask, label, weights=weights, spacing=spacing)
        for key, value in want.items():
            assert got[key] == pytest.approx(value, abs=1e-9), key
        assert got["dice"] == pytest.approx(dice(mask, label))
    assert scorer.reused >= 1  # masks[0] twice


@pytest.mark.skipif(matching_used("exact") != "exact", reason="the exact Betti matching library is not installed")
def test_empty_label_and_changed_tiles_only():
    label = np.zeros((8, 8, 8), dtype=np.uint8)
    scorer = FragmentScorer(label)
    assert scorer.score(np.zeros((8, 8, 8), bool))["score"] == pytest.approx(1.0)
    mask = np.zeros((8, 8, 8), bool)
    mask[1, 1, 1] = True
    assert scorer.score(mask)["score"] == pytest.approx(leaderboard_score(mask, label)["score"])
    assert len(scorer._tiles) == 8 + 1  # only the tile that changed was matched again
