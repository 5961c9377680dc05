"""The window grid and its blocks against MONAI's own grid (dense_patch_slices) and weight sums."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from monai.data.utils import compute_importance_map, dense_patch_slices
from monai.inferers.utils import _get_scan_interval

from vesuvius_monai.engine.windows import WindowGrid


def monai_windows(shape, roi, overlap):
    """MONAI's windows of sliding_window_inference (padded coordinates) and the padded shape."""
    padded = tuple(max(d, r) for d, r in zip(shape, roi))
    slices = dense_patch_slices(padded, roi, _get_scan_interval(padded, roi, 3, (overlap,) * 3))
    return [tuple(s.start for s in w) for w in slices], padded


def cases(n, seed=0, max_windows=3000):
    """Random shapes (1..59), windows (1..19), blocks (1..49) and overlaps in [0, 1), at most ``max_windows``."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        case = (tuple(int(v) for v in rng.integers(1, 60, 3)), tuple(int(v) for v in rng.integers(1, 20, 3)),
                tuple(int(v) for v in rng.integers(1, 50, 3)),
                float(rng.choice([0, 0.25, 0.5, 0.9, rng.uniform(0, 1)])))
        if len(monai_windows(case[0], case[1], case[3])[0]) <= max_windows:
            out.append(case)
    return out


@pytest.mark.parametrize("shape, roi, block, overlap", cases(60))
def test_blocks_own_each_monai_window_once(shape, roi, block, overlap):
    grid = WindowGrid(shape, roi, overlap, block)
    expected, padded = monai_windows(shape, roi, overlap)
    owned = [w for index in grid.blocks() for batch in grid.window_batches(index, 3) for w in batch]
    assert sorted(owned) == sorted(expected) and len(owned) == grid.n_windows
    hits = np.zeros(shape, dtype=np.int32)
    for index in grid.blocks():
        block_region = grid.block_region(index)
        for axis, (a, s) in enumerate(zip(grid.axes, block_region)):
            assert a.padded == padded[axis]
            assert a.n_blocks == 1 or a.block % a.stride == 0 and a.block >= a.window  # boundaries are starts
        for start in (w for batch in grid.window_batches(index, 3) for w in batch):
            assert all(s.start <= t < s.stop for t, s in zip(start, block_region))  # owned: starts inside
        reach = [grid.block_region(tuple(min(i + 1, c - 1) for i, c in zip(index, grid.counts)))[k].stop
                 for k in range(3)]
        assert all(e.stop <= r for e, r in zip(grid.extent(index), reach))  # spills reach the next block only
        hits[grid.output_region(index)[0]] += 1
    assert (hits == 1).all()


@pytest.mark.parametrize("shape, roi, block, overlap", cases(15, seed=1, max_windows=500))
@pytest.mark.parametrize("mode, sigma", [("gaussian", 0.125), ("gaussian", 0.6), ("constant", 0.125)])
def test_weights_equal_monai_count_map(shape, roi, block, overlap, mode, sigma):
    grid = WindowGrid(shape, roi, overlap, block)
    starts, padded = monai_windows(shape, roi, overlap)
    importance = compute_importance_map(roi, mode=mode, sigma_scale=sigma).numpy()
    count = np.zeros(padded, dtype=np.float32)
    for start in starts:
        count[tuple(slice(t, t + r) for t, r in zip(start, roi))] += importance
    for index in grid.blocks():
        np.testing.assert_allclose(grid.weights(index, mode, sigma), count[grid.block_region(index)], rtol=1e-5)


def test_spills_and_predecessors_agree():
    grid = WindowGrid((50, 37, 61), (16, 12, 20), 0.5, (16, 20, 30))
    for index in grid.blocks():
        for succ, part in grid.successors(index):
            assert index in grid.predecessors(succ)
            assert all(s.start < s.stop for s in part)
        for pred in grid.predecessors(index):
            assert all(p <= i for p, i in zip(pred, index)) and pred != index


def nnunet_cases(n, seed=2):
    """Random shapes (1..59), windows (2..19), blocks (1..49) and nnU-Net's overlaps (tile step 1 - overlap)."""
    rng = np.random.default_rng(seed)
    return [(tuple(int(v) for v in rng.integers(1, 60, 3)), tuple(int(v) for v in rng.integers(2, 20, 3)),
             tuple(int(v) for v in rng.integers(1, 50, 3)), float(rng.choice([0, 0.25, 0.5]))) for _ in range(n)]


@pytest.mark.parametrize("shape, roi, block, overlap", nnunet_cases(20))
def test_nnunet_grid_owns_each_nnunet_window_once_and_weighs_them(shape, roi, block, overlap):
    """steps="nnunet": the windows are nnU-Net's (tests/nnunet_reference.py, on the padded shape), each owned by one
    block, and blend "nnunet" weights sum nnU-Net's Gaussian over them."""
    from tests.nnunet_reference import gaussian, steps

    grid = WindowGrid(shape, roi, overlap, block, "nnunet")
    padded = tuple(max(d, r) for d, r in zip(shape, roi))
    expected = list(itertools.product(*(steps(p, r, 1 - overlap) for p, r in zip(padded, roi))))
    owned = [w for index in grid.blocks() for batch in grid.window_batches(index, 3) for w in batch]
    assert sorted(owned) == sorted(expected) and len(owned) == grid.n_windows
    count, g = np.zeros(padded, dtype=np.float64), gaussian(roi)
    for start in expected:
        count[tuple(slice(t, t + r) for t, r in zip(start, roi))] += g
    for index in grid.blocks():
        np.testing.assert_allclose(grid.weights(index, "nnunet", 0.125), count[grid.block_region(index)], rtol=1e-5)
