"""Betti numbers, Betti errors and TopoScore on volumes whose topology is known, and against cripser."""

import cripser
import numpy as np
import pytest
from skimage.measure import euler_number

from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.metrics._common import tile_slices
from vesuvius_monai.metrics.betti import betti_numbers, euler_characteristic
from vesuvius_monai.metrics.fallback import matched_features
from vesuvius_monai.metrics.topology import betti_errors, topo_score, topo_score_from_counts

N = 32
Z, Y, X = np.mgrid[:N, :N, :N]


def ball(center=(16, 16, 16), radius=6.0) -> np.ndarray:
    cz, cy, cx = center
    return (Z - cz) ** 2 + (Y - cy) ** 2 + (X - cx) ** 2 <= radius**2


def shell(center=(16, 16, 16)) -> np.ndarray:
    return ball(center, 9.0) & ~ball(center, 6.0)


def torus(center=(16, 16, 16), major=8.0, minor=3.0) -> np.ndarray:
    cz, cy, cx = center
    ring = np.sqrt((Y - cy) ** 2 + (X - cx) ** 2) - major
    return ring**2 + (Z - cz) ** 2 <= minor**2


def sheet(z0: int) -> np.ndarray:
    out = np.zeros((N, N, N), dtype=bool)
    out[z0 : z0 + 2, 4:28, 4:28] = True
    return out


@pytest.mark.parametrize(
    "mask, expected",
    [
        (ball(), (1, 0, 0)),
        (shell(), (1, 0, 1)),
        (torus(), (1, 1, 0)),
        (ball((8, 16, 16), 5) | ball((24, 16, 16), 5), (2, 0, 0)),
        (sheet(10) | sheet(12), (1, 0, 0)),  # touching sheets: one component
        (sheet(10) | sheet(13), (2, 0, 0)),  # one empty plane between them: two
        (np.zeros((N, N, N), bool), (0, 0, 0)),
    ],
    ids=["ball", "shell", "torus", "two-balls", "touching-sheets", "separated-sheets", "empty"],
)
def test_known_shapes(mask, expected):
    assert betti_numbers(mask) == expected


def test_connectivity_foreground_26_background_6():
    diagonal = np.zeros((4, 4, 4), dtype=np.uint8)
    diagonal[1, 1, 1] = diagonal[2, 2, 2] = 1  # corner-touching voxels: one component
    assert betti_numbers(diagonal) == (1, 0, 0)
    box = np.ones((5, 5, 5), dtype=bool)
    box[2, 2, 2] = False
    box[1, 1, 1] = False  # two holes sharing only a corner: two separate cavities
    assert betti_numbers(box) == (1, 0, 2)
    ring = np.zeros((3, 4, 4), dtype=bool)
    ring[1] = True
    ring[1, 1:3, 1:3] = False  # a flat square ring around a 2x2 hole
    assert betti_numbers(ring) == (1, 1, 0)


@pytest.mark.parametrize("seed, density", [(0, 0.3), (1, 0.45), (2, 0.6)])
def test_random_volumes_match_cripser_and_skimage(seed, density):
    """Independent references: cripser's T-construction persistence and skimage's Euler number."""
    mask = np.random.default_rng(seed).random((14, 15, 16)) < density
    pairs = cripser.compute_ph(np.where(mask, 0.0, 1.0), filtration="T", maxdim=2)
    expected = tuple(int(np.count_nonzero((pairs[:, 0] == k) & (pairs[:, 1] == 0))) for k in range(3))
    assert betti_numbers(mask) == expected
    assert euler_characteristic(mask) == euler_number(mask, connectivity=3)


@pytest.mark.parametrize("seed, density", [(3, 0.3), (4, 0.5), (5, 0.7)])
def test_six_connected_betti_numbers_match_cripser_v_construction(seed, density):
    """Connectivity 6 (the exact Betti matching library's construction) is cripser's V-construction."""
    mask = np.random.default_rng(seed).random((13, 11, 15)) < density
    pairs = cripser.compute_ph(np.where(mask, 0.0, 1.0), filtration="V", maxdim=2)
    expected = tuple(int(np.count_nonzero((pairs[:, 0] == k) & (pairs[:, 1] == 0))) for k in range(3))
    assert betti_numbers(mask, connectivity=6) == expected
    assert betti_numbers(mask, connectivity=6) != betti_numbers(mask)  # the two constructions differ here


def test_six_connected_shapes():
    assert betti_numbers(ball(), connectivity=6) == (1, 0, 0)
    assert betti_numbers(shell(), connectivity=6) == (1, 0, 1)
    assert betti_numbers(torus(), connectivity=6) == (1, 1, 0)
    diagonal = np.zeros((4, 4, 4), dtype=np.uint8)
    diagonal[1, 1, 1] = diagonal[2, 2, 2] = 1
    assert betti_numbers(diagonal, connectivity=6) == (2, 0, 0)
    box = np.ones((5, 5, 5), dtype=bool)
    box[2, 2, 2] = box[1, 1, 1] = False  # holes sharing a corner: one cavity when the background is 26-connected
    assert betti_numbers(box, connectivity=6) == (1, 0, 1)
    with pytest.raises(VesuviusError, match="connectivity"):
        betti_numbers(box, connectivity=18)


def test_tiles_cover_the_volume_evenly():
    slices = tile_slices((5, 6, 7), (2, 2, 2))
    assert len(slices) == 8
    count = np.zeros((5, 6, 7), dtype=int)
    for s in slices:
        count[s] += 1
        for piece, n in zip(s, (5, 6, 7)):
            assert piece.stop - piece.start in (n // 2, n - n // 2)
    assert (count == 1).all()


def test_betti_errors_hand_built():
    label = ball((16, 16, 16), 8)  # spans all 8 tiles
    pred = label.copy()
    pred[:, 15:17, :] = False  # cut in two along y
    assert betti_errors(pred, label, tiles=(1, 1, 1)) == (1, 0, 0)
    # per tile the cut lies on the tile border (tiles split y at 16): the pieces stay one per tile
    assert betti_errors(pred, label, tiles=(2, 2, 2)) == (0, 0, 0)
    assert betti_errors(shell(), ball(radius=9.0), tiles=(1, 1, 1)) == (0, 0, 1)
    assert betti_errors(torus(), ball(radius=9.0), tiles=(1, 1, 1)) == (0, 1, 0)


def test_topo_score_from_counts_hand_computed():
    # dim 0: F1 = 2 * 1 / 3; dim 1 inactive; dim 2: no label cavity -> 0.5 / (3 + 0.5)
    expected = (0.34 * (2 / 3) + 0.33 * (0.5 / 3.5)) / (0.34 + 0.33)
    assert topo_score_from_counts((2, 0, 3), (1, 0, 0), (1, 0, 0)) == pytest.approx(expected)
    assert topo_score_from_counts((0, 0, 0), (0, 0, 0), (0, 0, 0)) == 1.0
    assert topo_score_from_counts((1, 1, 1), (1, 1, 1), (1, 1, 1)) == 1.0


@pytest.mark.parametrize("matching", ["betti", "persistence"])
def test_topo_score_perfect_and_split(matching):
    label = (sheet(8) | sheet(20) | torus((14, 16, 16))).astype(np.uint8)
    assert topo_score(label, label, matching=matching) == 1.0
    pred = label.copy()
    pred[:, :, 15:17] = 0  # cut every sheet and the torus along x
    score = topo_score(pred, label, tiles=(1, 1, 1), matching=matching)
    assert score < 1.0
    one_sheet = sheet(8).astype(np.uint8)
    cut_sheet = one_sheet.copy()
    cut_sheet[:, :, 15:17] = 0
    # p0 = 2, g0 = 1, m0 = 1: F1 = 2 / 3, other dimensions inactive
    assert topo_score(cut_sheet, one_sheet, tiles=(1, 1, 1), matching=matching) == pytest.approx(2 / 3)


def test_persistence_matching_is_spatial():
    label = ball((8, 8, 8), 4)
    far = ball((24, 24, 24), 4)  # same topology, another place
    assert topo_score(far, label, tiles=(1, 1, 1), matching="betti") == 1.0  # upper bound: counts only
    assert topo_score(far, label, tiles=(1, 1, 1), matching="persistence") == 0.0
    two_tori = torus((16, 16, 8), 5, 2) | torus((16, 16, 24), 5, 2)
    one_torus = torus((16, 16, 8), 5, 2)
    assert matched_features(two_tori, one_torus) == (1, 1, 0)
    assert matched_features(torus((16, 16, 24), 5, 2), one_torus) == (0, 0, 0)
    # two overlapping rings side by side: one component, but each ring's tunnel is a different class of
    # the union (its loop winds around a different hole), so no tunnel matches
    left, right = torus((16, 16, 12), 6, 2), torus((16, 16, 20), 6, 2)
    assert betti_numbers(left | right) == (1, 2, 0)
    assert matched_features(left, right) == (1, 0, 0)
    shifted = np.roll(torus(), 1, axis=2)
    assert matched_features(shifted, torus()) == (1, 1, 0)
    assert matched_features(shell(), np.roll(shell(), 2, axis=0)) == (1, 0, 1)
    thin_shell = shell() & ~ball(radius=8.0)
    assert matched_features(ball(radius=9.0), thin_shell) == (1, 0, 0)  # the solid ball fills the cavity


@pytest.mark.parametrize("seed", [0, 1])
def test_persistence_matches_are_bounded_by_betti(seed):
    rng = np.random.default_rng(seed)
    pred, label = rng.random((12, 12, 12)) < 0.45, rng.random((12, 12, 12)) < 0.45
    bp, bl = betti_numbers(pred), betti_numbers(label)
    m = matched_features(pred, label)
    assert all(0 <= m[k] <= min(bp[k], bl[k]) for k in range(3))
    assert m[1] > 0 and m[1] < min(bp[1], bl[1])  # random volumes: some tunnels match, not all


def test_bad_parameters():
    mask = ball().astype(np.uint8)
    with pytest.raises(VesuviusError, match="matching"):
        topo_score(mask, mask, matching="wasserstein")
    with pytest.raises(VesuviusError, match="tiles"):
        topo_score(mask, mask, tiles=(0, 2, 2))
    with pytest.raises(VesuviusError, match="betti weights"):
        topo_score(mask, mask, weights=(1, -1, 0))
    with pytest.raises(VesuviusError, match="binary"):
        betti_numbers(np.full((3, 3, 3), 3))
