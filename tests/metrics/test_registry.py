"""METRIC_NAMES and compute_metrics (vesuvius_monai/metrics/compute.py)."""

import numpy as np
import pytest

from vesuvius_monai.config import LeaderboardWeights
from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.metrics import (
    METRIC_NAMES,
    betti_errors,
    compute_metrics,
    dice,
    hausdorff95,
    iou,
    leaderboard_score,
    surface_dice,
    topo_score,
    variation_of_information,
    voi_score,
)
from vesuvius_monai.metrics.cldice import cldice

NAMES = [
    "dice", "iou", "surface_dice", "hd95", "voi_split", "voi_merge", "voi", "voi_score",
    "betti_error_0", "betti_error_1", "betti_error_2", "topo_score", "cldice", "leaderboard",
]


def pair() -> tuple[np.ndarray, np.ndarray]:
    label = np.zeros((20, 20, 20), dtype=np.uint8)
    label[3:5, 2:18, 2:18] = 1
    label[10:12, 2:18, 2:18] = 1
    label[15:17, 1:7, 1:7] = 1
    label[15:17, 3:5, 3:5] = 0  # a square ring inside one 2x2x2 tile: one tunnel
    label[:, 18:, :] = 2
    pred = (label == 1).astype(np.uint8)
    pred[3:5, 2:18, 9:11] = 0
    pred[5:10, 6:8, 6:8] = 1
    pred[15:17, 3:5, 3:5] = 1  # fill the ring's hole
    pred[:, 18:, :] = 1
    return pred, label


def test_metric_names():
    assert set(METRIC_NAMES) == set(NAMES)


def test_compute_metrics_agrees_with_the_public_functions():
    pred, label = pair()
    values = compute_metrics(pred, label, NAMES, spacing=(1, 1, 1))
    split, merge = variation_of_information(pred, label)
    errors = betti_errors(pred, label)
    expected = {
        "dice": dice(pred, label),
        "iou": iou(pred, label),
        "surface_dice": surface_dice(pred, label),
        "hd95": hausdorff95(pred, label),
        "voi_split": split,
        "voi_merge": merge,
        "voi": split + merge,
        "voi_score": voi_score(split + merge),
        "betti_error_0": errors[0],
        "betti_error_1": errors[1],
        "betti_error_2": errors[2],
        "topo_score": topo_score(pred, label),
        "cldice": cldice(pred, label),
        "leaderboard": leaderboard_score(pred, label)["score"],
    }
    assert list(values) == NAMES
    assert values == pytest.approx(expected)
    assert values["betti_error_1"] == 1  # the filled ring lost its tunnel
    assert values["dice"] < 1.0 and values["leaderboard"] < 1.0


def test_compute_metrics_settings():
    pred, label = pair()
    weights = LeaderboardWeights(tolerance=0.5, connectivity=6, tiles=(1, 1, 1))
    values = compute_metrics(pred, label, ["surface_dice", "voi", "betti_error_0"], weights=weights)
    assert values["surface_dice"] == pytest.approx(surface_dice(pred, label, tolerance=0.5))
    assert values["voi"] == pytest.approx(sum(variation_of_information(pred, label, connectivity=6)))
    assert values["betti_error_0"] == betti_errors(pred, label, tiles=(1, 1, 1))[0]


def test_unknown_metric_suggests_a_name():
    pred, label = pair()
    with pytest.raises(VesuviusError, match="unknown metric 'dcie'.*did you mean 'dice'"):
        compute_metrics(pred, label, ["dice", "dcie"])
    with pytest.raises(VesuviusError, match="unknown metric 'zzz'"):
        compute_metrics(pred, label, ["zzz"])
