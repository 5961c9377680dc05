"""bench_tta_postprocess.py's grid search: the threshold of best mean score over validation fragments."""

import math

import numpy as np
import pytest
from bench_tta_postprocess import pick_threshold

from vesuvius_monai.config import PostprocessConfig
from vesuvius_monai.errors import VesuviusError


def accuracy(pred: np.ndarray, label: np.ndarray) -> float:
    return float((pred == (label == 1)).mean())


def fragment(values_and_labels) -> tuple[np.ndarray, np.ndarray]:
    """(1, 1, N) prob and label volumes, 10 voxels per (prob value, label) pair."""
    prob = np.concatenate([np.full(10, p, dtype=np.float32) for p, _ in values_and_labels]).reshape(1, 1, -1)
    label = np.concatenate([np.full(10, lab, dtype=np.uint8) for _, lab in values_and_labels]).reshape(1, 1, -1)
    return prob, label


def test_pick_threshold_maximises_mean_over_fragments():
    """Fragment A is right for t < 0.32, B for t >= 0.62; the mean is 0.75 at <= 0.30 and >= 0.65, else 0.5.

    0.65 is closer to 0.5 than 0.30, so it wins the tie.
    """
    prob_a, label_a = fragment([(0.32, 1), (0.12, 0)])
    prob_b, label_b = fragment([(0.62, 0), (0.90, 1)])
    best, scores = pick_threshold([prob_a, prob_b], [label_a, label_b], accuracy)
    assert best == pytest.approx(0.65)
    assert len(scores) == 13
    for t, score in scores.items():
        expected = 0.75 if (t < 0.32 or t >= 0.62) else 0.5
        assert score == pytest.approx(expected), t


def test_pick_threshold_finds_single_best():
    prob, label = fragment([(0.1, 0), (0.47, 0), (0.52, 1), (0.8, 1)])
    best, scores = pick_threshold([prob], [label], accuracy, candidates=[0.3, 0.45, 0.5, 0.6])
    assert best == 0.5
    assert scores == {0.3: 0.75, 0.45: 0.75, 0.5: 1.0, 0.6: 0.75}


def test_pick_threshold_uses_base_postprocessing():
    """With min_size = 11 the isolated 10-voxel blob is dropped, which makes every threshold perfect."""
    prob = np.zeros((3, 10, 30), dtype=np.float32)
    prob[1, 2:4, 2:7] = 0.9  # 10 false-positive voxels
    label = np.zeros(prob.shape, dtype=np.uint8)
    plain_best, plain = pick_threshold([prob], [label], accuracy, candidates=[0.5, 0.95])
    assert plain == {0.5: pytest.approx(1 - 10 / prob.size), 0.95: 1.0} and plain_best == 0.95
    base = PostprocessConfig(min_size=11)
    best, scores = pick_threshold([prob], [label], accuracy, candidates=[0.5, 0.95], base=base)
    assert scores == {0.5: 1.0, 0.95: 1.0} and best == 0.5


def test_pick_threshold_rejects_mismatches():
    prob, label = fragment([(0.3, 1)])
    with pytest.raises(VesuviusError, match="equally many"):
        pick_threshold([prob], [], accuracy)
    with pytest.raises(VesuviusError, match="fragment 0"):
        pick_threshold([prob], [label[..., :-1]], accuracy)
    with pytest.raises(VesuviusError, match="score_fn gave nan"):
        pick_threshold([prob], [label], lambda p, q: math.nan)
