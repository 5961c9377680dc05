"""Leaderboard score: perfect, perturbed, hand-combined from its parts; weights."""

import numpy as np
import pytest

from vesuvius_monai.config import LeaderboardWeights
from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.metrics.leaderboard import leaderboard_score
from vesuvius_monai.metrics.surface import surface_dice
from vesuvius_monai.metrics.topology import topo_score
from vesuvius_monai.metrics.voi import variation_of_information

N = 24


def sheets_label() -> np.ndarray:
    """Three flat sheets, 2 voxels thick, and an unlabeled band."""
    label = np.zeros((N, N, N), dtype=np.uint8)
    for z in (4, 11, 18):
        label[z : z + 2, 2:22, 2:22] = 1
    label[:, :, 22:] = 2
    return label


def perturbed(label: np.ndarray) -> np.ndarray:
    pred = (label == 1).astype(np.uint8)
    pred[4:6, 2:22, 11:13] = 0  # split the first sheet
    pred[6:11, 10:12, 10:12] = 1  # bridge the first two sheets
    pred[13:18, 3:5, 3:5] = 1  # and the last two
    return pred


def test_perfect_prediction_scores_one():
    label = sheets_label()
    pred = (label == 1).astype(np.uint8)
    pred[:, :, 22:] = 1  # anything in the unlabeled band is ignored
    result = leaderboard_score(pred, label)
    assert result["score"] == pytest.approx(1.0)
    assert result["voi"] == pytest.approx(0.0, abs=1e-12)
    assert result["topo_score"] == 1.0 and result["surface_dice"] == 1.0


def test_perturbed_prediction_scores_lower_and_combines_its_parts():
    label = sheets_label()
    pred = perturbed(label)
    result = leaderboard_score(pred, label)
    topo = topo_score(pred, label)
    surface = surface_dice(pred, label, tolerance=2.0)
    voi = sum(variation_of_information(pred, label))
    expected = 0.30 * topo + 0.35 * surface + 0.35 / (1 + 0.3 * voi)
    assert result["score"] == pytest.approx(expected)
    assert result["score"] < 0.99
    assert result["topo_score"] < 1.0 and result["voi"] > 0.0
    assert set(result) == {"score", "topo_score", "surface_dice", "voi_score", "voi", "voi_split", "voi_merge"}


def test_weights_are_clamped_and_renormalised():
    label = sheets_label()
    pred = perturbed(label)
    only_voi = LeaderboardWeights(topo=-1.0, surface_dice=0.0, voi=5.0)
    assert only_voi.part_weights() == pytest.approx((0.0, 0.0, 1.0))
    result = leaderboard_score(pred, label, weights=only_voi)
    assert result["score"] == pytest.approx(result["voi_score"])
    assert LeaderboardWeights(topo=1, surface_dice=1, voi=2).part_weights() == pytest.approx((0.25, 0.25, 0.5))


def test_both_empty_scores_one():
    empty = np.zeros((8, 8, 8), dtype=np.uint8)
    assert leaderboard_score(empty, empty)["score"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"topo": 0, "surface_dice": -1, "voi": 0}, "not all"),
        ({"tolerance": -1}, "tolerance"),
        ({"voi_alpha": float("nan")}, "voi_alpha"),
        ({"connectivity": 4}, "connectivity"),
        ({"tiles": (2, 0, 2)}, "tiles"),
        ({"topo_matching": "exakt"}, "matching"),
    ],
)
def test_bad_weights(kwargs, message):
    with pytest.raises(VesuviusError, match=message):
        LeaderboardWeights(**kwargs)


def test_shape_mismatch():
    with pytest.raises(VesuviusError, match="shape"):
        leaderboard_score(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)))
