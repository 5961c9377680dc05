"""The package's leaderboard figures against a reference computed without it.

tests/fixtures/make_metric_fixtures.py builds three small prediction/label pairs (tunnels, cavities, several
components, ignore regions, odd tile sizes) and computes their figures with the scorer's libraries called
directly (the compiled Betti matching, MONAI, scikit-image, SciPy); it never imports vesuvius_monai. Its
outputs, metric_pairs.npz and metric_pairs.json, are committed; this test holds the package to them.

Tolerances: 1e-9 absolute wherever the reference does the same arithmetic in float64 (Dice, VOI, TopoScore from
the same integer counts, surface Dice summed in float64 from MONAI's surfel areas and distance-transform
distances, which the package gets from a KD-tree instead). MONAI's own ``compute_surface_dice`` returns float32:
against it, 1e-6 (float32 carries 7 digits, and its sums run over a few thousand surfels).
"""

import json
from pathlib import Path

import numpy as np
import pytest

from vesuvius_monai.metrics import (
    compute_metrics,
    dice,
    leaderboard_score,
    surface_dice,
    topo_matching_used,
    topo_score,
    variation_of_information,
)
from vesuvius_monai.metrics.topology import topo_counts

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
EXPECTED = json.loads((FIXTURES / "metric_pairs.json").read_text())
PAIRS = sorted(name for name in EXPECTED if name != "generated_with")
TIGHT = 1e-9

needs_exact = pytest.mark.skipif(
    topo_matching_used("exact") != "exact", reason="exact Betti matching (topolosses' extension) cannot be loaded"
)


def load_pair(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(pred uint8 0/1, label uint8 0/1/2) of a committed pair, shape (z, y, x)."""
    shape = tuple(EXPECTED[name]["shape"])
    with np.load(FIXTURES / "metric_pairs.npz") as data:
        pred = np.unpackbits(data[f"{name}_pred"], count=int(np.prod(shape))).reshape(shape)
        label = data[f"{name}_label"]
    assert label.shape == shape
    return pred, label


def close(expected: float, tol: float = TIGHT):
    return pytest.approx(expected, abs=tol, rel=0)


def test_reference_script_does_not_use_the_package():
    source = (FIXTURES / "make_metric_fixtures.py").read_text()
    assert "import vesuvius_monai" not in source and "from vesuvius_monai" not in source
    assert len(PAIRS) == 3


@pytest.mark.parametrize("name", PAIRS)
def test_dice_surface_dice_and_voi_match_the_reference(name):
    pred, label = load_pair(name)
    want = EXPECTED[name]
    assert dice(pred, label) == close(want["dice"])
    sd = surface_dice(pred, label, tolerance=2.0)
    assert sd == close(want["surface_dice"])
    assert sd == close(want["surface_dice_monai_float32"], 1e-6)
    split, merge = variation_of_information(pred, label)
    assert (split, merge) == (close(want["voi_split"]), close(want["voi_merge"]))
    got = compute_metrics(pred, label, ["dice", "surface_dice", "voi_split", "voi_merge", "voi", "voi_score"])
    assert got == {key: close(want[key]) for key in got}


@needs_exact
@pytest.mark.parametrize("name", PAIRS)
def test_topo_score_and_leaderboard_match_the_reference(name):
    pred, label = load_pair(name)
    want = EXPECTED[name]
    keep = label != 2
    counts = topo_counts((pred != 0) & keep, label == 1, (2, 2, 2), "exact")
    p, g, m = counts.totals()
    assert {"p": list(p), "g": list(g), "m": list(m)} == want["topo_counts"]
    assert topo_score(pred, label) == close(want["topo_score"])
    board = leaderboard_score(pred, label)
    assert board == {key: close(want[key]) for key in board}
    got = compute_metrics(pred, label, ["topo_score", "leaderboard"])
    assert got == {"topo_score": close(want["topo_score"]), "leaderboard": close(want["score"])}
