"""Tests for vesuvius_monai.postprocess: threshold, small-component removal, cavity filling."""

import math

import numpy as np
import pytest

from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.postprocess import PostprocessConfig, postprocess


def two_cubes() -> np.ndarray:
    """(20, 20, 20) probabilities: a 2x2x2 cube (8 voxels) and a 4x4x4 cube (64 voxels) at 0.9."""
    prob = np.zeros((20, 20, 20), dtype=np.float32)
    prob[2:4, 2:4, 2:4] = 0.9
    prob[10:14, 10:14, 10:14] = 0.9
    return prob


def hollow_cube() -> np.ndarray:
    """(12, 12, 12) probabilities: a solid 7x7x7 cube [2:9]^3 at 0.9 with a 3x3x3 (27-voxel) cavity [4:7]^3."""
    prob = np.zeros((12, 12, 12), dtype=np.float32)
    prob[2:9, 2:9, 2:9] = 0.9
    prob[4:7, 4:7, 4:7] = 0.1
    return prob


def test_threshold_is_strict():
    prob = np.array([0.2, 0.5, 0.50001, 0.9], dtype=np.float32).reshape(1, 1, 4)
    out = postprocess(prob, PostprocessConfig(threshold=0.5))
    assert out.dtype == bool
    assert out.ravel().tolist() == [False, False, True, True]


def test_small_components_removed_large_kept():
    prob = two_cubes()
    out = postprocess(prob, PostprocessConfig(min_size=9))
    assert not out[2:4, 2:4, 2:4].any()
    assert out[10:14, 10:14, 10:14].all()
    assert out.sum() == 64


def test_component_of_exactly_min_size_kept():
    out = postprocess(two_cubes(), PostprocessConfig(min_size=8))
    assert out.sum() == 72


def test_connectivity_decides_what_a_component_is():
    prob = np.zeros((5, 5, 5), dtype=np.float32)
    prob[1, 1, 1] = prob[2, 2, 2] = 0.9  # corner neighbours only
    assert postprocess(prob, PostprocessConfig(min_size=2, connectivity=26)).sum() == 2
    assert postprocess(prob, PostprocessConfig(min_size=2, connectivity=18)).sum() == 0
    assert postprocess(prob, PostprocessConfig(min_size=2, connectivity=6)).sum() == 0


def test_cavity_filled_up_to_size():
    prob = hollow_cube()
    filled = postprocess(prob, PostprocessConfig(fill_holes_max=27))
    assert filled[4:7, 4:7, 4:7].all()
    assert filled.sum() == 7**3


def test_cavity_not_filled_beyond_size():
    prob = hollow_cube()
    out = postprocess(prob, PostprocessConfig(fill_holes_max=26))
    assert not out[4:7, 4:7, 4:7].any()
    assert out.sum() == 7**3 - 27


def test_background_open_to_the_border_is_not_a_hole():
    prob = np.full((6, 6, 6), 0.9, dtype=np.float32)
    prob[0:2, 2:4, 2:4] = 0.1  # an 8-voxel pit touching the z = 0 face
    out = postprocess(prob, PostprocessConfig(fill_holes_max=100))
    assert out.sum() == 6**3 - 8


def test_diagonal_gap_does_not_connect_a_cavity_to_the_outside():
    """Background is 6-connected: a cavity touching the outside only at a corner is enclosed."""
    prob = np.full((5, 5, 5), 0.9, dtype=np.float32)
    prob[1, 1, 1] = 0.1
    prob[0, 0, 0] = 0.1  # border background, corner-adjacent to the cavity
    out = postprocess(prob, PostprocessConfig(fill_holes_max=1))
    assert out[1, 1, 1] and not out[0, 0, 0]


def test_removal_happens_before_filling():
    """A small speck inside a cavity is removed first, so the whole cavity (27 voxels) can be filled."""
    prob = hollow_cube()
    prob[5, 5, 5] = 0.9
    out = postprocess(prob, PostprocessConfig(min_size=2, fill_holes_max=27))
    assert out.sum() == 7**3


def test_input_not_modified():
    prob = hollow_cube()
    before = prob.copy()
    postprocess(prob, PostprocessConfig(min_size=5, fill_holes_max=30))
    assert np.array_equal(prob, before)


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"threshold": 1.5}, "threshold"),
        ({"threshold": math.nan}, "threshold"),
        ({"min_size": -1}, "min_size"),
        ({"min_size": 2.5}, "min_size"),
        ({"fill_holes_max": -3}, "fill_holes_max"),
        ({"connectivity": 8}, "connectivity"),
    ],
)
def test_bad_config_names_the_key(kwargs, key):
    with pytest.raises(VesuviusError, match=rf"'postprocess\.{key}'"):
        PostprocessConfig(**kwargs)


@pytest.mark.parametrize(
    "prob, text",
    [
        (np.full((2, 2, 2), np.nan, dtype=np.float32), "NaN"),
        (np.full((2, 2, 2), 1.5, dtype=np.float32), r"\[0, 1\]"),
        (np.zeros((2, 2), dtype=np.float32), "Z, Y, X"),
    ],
)
def test_bad_prob_rejected(prob, text):
    with pytest.raises(VesuviusError, match=text):
        postprocess(prob, PostprocessConfig())
