"""The post-processing operators on hand-built volumes and, on random volumes, against a direct library call."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage
from skimage.filters import apply_hysteresis_threshold
from skimage.morphology import remove_small_objects

from vesuvius_monai.metrics.betti import betti_of_mask
from vesuvius_monai.postprocess import operators as ops
from vesuvius_monai.postprocess.patching import _accepted, betti, patch_holes

RANK = {6: 1, 18: 2, 26: 3}
FEW = settings(max_examples=20, deadline=None)


def random_mask(seed: int, shape=(14, 15, 16), density: float = 0.5, smooth: float = 1.0) -> np.ndarray:
    """A bool volume: smoothed noise above its ``density`` quantile."""
    noise = ndimage.gaussian_filter(np.random.default_rng(seed).random(shape), smooth)
    return noise > np.quantile(noise, 1 - density)


def random_prob(seed: int, shape=(14, 15, 16)) -> np.ndarray:
    noise = ndimage.gaussian_filter(np.random.default_rng(seed).random(shape), 1.0)
    return ((noise - noise.min()) / (noise.max() - noise.min())).astype(np.float32)


def cube_face_connected(mask: np.ndarray) -> np.ndarray:
    """Per 2x2x2 cube (Z-1, Y-1, X-1): True when its foreground is one 6-connected set (or < 2 voxels)."""
    inner = tuple(s - 1 for s in mask.shape)
    codes = np.zeros(inner, dtype=np.int64)
    for bit, (dz, dy, dx) in enumerate(ops.CUBE):
        codes |= mask[dz:dz + inner[0], dy:dy + inner[1], dx:dx + inner[2]].astype(np.int64) << bit
    table = np.array([ops._face_connected(b) for b in range(256)])
    return table[codes]


# ---------------------------------------------------------------- threshold, hysteresis


@FEW
@given(st.integers(0, 10**6), st.floats(0.2, 0.6), st.floats(0.05, 0.35))
def test_hysteresis_6_is_skimage(seed, low, step):
    prob = random_prob(seed)
    high = min(low + step, 1.0)
    expected = apply_hysteresis_threshold(prob, low, high)
    assert np.array_equal(ops.hysteresis(prob, low, high, connectivity=6), expected)


@FEW
@given(st.integers(0, 10**6), st.sampled_from([18, 26]))
def test_hysteresis_keeps_whole_components_touching_high(seed, connectivity):
    prob = random_prob(seed)
    out = ops.hysteresis(prob, 0.4, 0.7, connectivity)
    labels, _ = ndimage.label(prob > 0.4, ndimage.generate_binary_structure(3, RANK[connectivity]))
    kept = set(np.unique(labels[prob > 0.7])) - {0}
    assert np.array_equal(out, np.isin(labels, list(kept)))


def test_hysteresis_drops_a_weak_component():
    prob = np.zeros((8, 8, 8), np.float32)
    prob[1:3, 1:3, 1:3] = 0.6  # never above high
    prob[5:7, 5:7, 5:7] = 0.6
    prob[6, 6, 6] = 0.95
    out = ops.hysteresis(prob, 0.5, 0.9)
    assert not out[1:3, 1:3, 1:3].any() and out[5:7, 5:7, 5:7].all()


# ---------------------------------------------------------------- opening, closing


def test_ellipsoid_shapes():
    assert np.array_equal(ops.ellipsoid((1, 1, 1)), ndimage.generate_binary_structure(3, 1))
    element = ops.ellipsoid((2, 1, 0))
    assert element.shape == (5, 3, 1)
    assert element[:, 1, 0].all() and element[2, :, 0].all() and element.sum() == 7  # no corners of the box


@FEW
@given(st.integers(0, 10**6), st.tuples(st.integers(0, 2), st.integers(0, 2), st.integers(0, 2)))
def test_open_close_away_from_the_border_are_scipy(seed, radius):
    """Foreground at least 2 r + 1 from every face: no border effect, the same as scipy's own."""
    mask = np.zeros((22, 22, 22), bool)
    mask[6:16, 6:16, 6:16] = random_mask(seed, (10, 10, 10))
    element = ops.ellipsoid(radius)
    assert np.array_equal(ops.closing(mask, radius), ndimage.binary_closing(mask, element))
    assert np.array_equal(ops.opening(mask, radius), ndimage.binary_opening(mask, element))


@FEW
@given(st.integers(0, 10**6), st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 3)), st.floats(0.2, 0.8))
def test_open_close_are_scipy_on_the_edge_padded_mask(seed, radius, density):
    mask = random_mask(seed, density=density, smooth=0.8)
    padded = np.pad(mask, [(2 * r, 2 * r) for r in radius], mode="edge")
    crop = tuple(slice(2 * r, 2 * r + n) for r, n in zip(radius, mask.shape))
    element = ops.ellipsoid(radius)
    assert np.array_equal(ops.closing(mask, radius), ndimage.binary_closing(padded, element)[crop])
    assert np.array_equal(ops.opening(mask, radius), ndimage.binary_opening(padded, element)[crop])


def test_closing_does_not_erode_at_the_border():
    mask = np.zeros((10, 8, 8), bool)
    mask[0:3] = True  # a slab through the z = 0 face and every side face
    assert not ndimage.binary_closing(mask, ops.ellipsoid((1, 1, 1))).all(where=mask)  # scipy's erodes it
    assert np.array_equal(ops.closing(mask, (1, 1, 1)), mask)
    assert np.array_equal(ops.opening(mask, (1, 1, 1)), mask)


@FEW
@given(st.integers(0, 10**6), st.tuples(st.integers(0, 2), st.integers(0, 2), st.integers(0, 2)))
def test_closing_adds_and_opening_removes(seed, radius):
    mask = random_mask(seed)
    assert not (mask & ~ops.closing(mask, radius)).any()
    assert not (ops.opening(mask, radius) & ~mask).any()


def two_sheets() -> np.ndarray:
    """(8, 12, 12): planes z = 3 and z = 5 (one background voxel apart), each with a 1-voxel pinhole."""
    mask = np.zeros((8, 12, 12), bool)
    mask[3, 1:11, 1:11] = mask[5, 1:11, 1:11] = True
    mask[3, 5, 5] = mask[5, 7, 7] = False
    return mask


def test_closing_per_sheet_never_merges_two_sheets():
    mask = two_sheets()
    merged = ops.closing(mask, (1, 1, 1))
    assert merged[4, 2:10, 2:10].all() and ndimage.label(merged)[1] == 1  # plain closing bridges the gap
    apart = ops.closing_per_sheet(mask, (1, 1, 1))
    assert not apart[4].any() and ndimage.label(apart, np.ones((3, 3, 3)))[1] == 2


def test_closing_per_sheet_closes_each_sheet():
    mask = two_sheets()
    out = ops.closing_per_sheet(mask, (0, 1, 1))  # in-plane disk: fills each pinhole
    assert out[3, 5, 5] and out[5, 7, 7] and not out[4].any()


@FEW
@given(st.integers(0, 10**6), st.tuples(st.integers(0, 2), st.integers(0, 2), st.integers(0, 2)),
       st.sampled_from([6, 18, 26]))
def test_closing_per_sheet_keeps_components_apart(seed, radius, connectivity):
    mask = random_mask(seed, density=0.3)
    structure = ndimage.generate_binary_structure(3, RANK[connectivity])
    out = ops.closing_per_sheet(mask, radius, connectivity)
    assert not (mask & ~out).any()
    assert not (out & ~ops.closing(mask, radius)).any()
    assert ndimage.label(out, structure)[1] == ndimage.label(mask, structure)[1]


@FEW
@given(st.integers(0, 10**6), st.tuples(st.integers(0, 2), st.integers(0, 2), st.integers(0, 2)))
def test_closing_per_sheet_of_one_sheet_is_closing(seed, radius):
    mask = random_mask(seed, density=0.6, smooth=2.0)
    labels, n = ndimage.label(mask, np.ones((3, 3, 3)))
    one = labels == 1 + np.argmax(np.bincount(labels.ravel())[1:])
    assert np.array_equal(ops.closing_per_sheet(one, radius), ops.closing(one, radius))


# ---------------------------------------------------------------- dust, cavities


@FEW
@given(st.integers(0, 10**6), st.integers(1, 40), st.sampled_from([6, 18, 26]))
def test_dust_is_remove_small_objects(seed, min_size, connectivity):
    mask = random_mask(seed, density=0.3, smooth=0.7)
    expected = remove_small_objects(mask, max_size=min_size - 1, connectivity=RANK[connectivity])
    assert np.array_equal(ops.remove_small_components(mask, min_size, connectivity), expected)


def test_dust_by_size_and_connectivity():
    mask = np.zeros((9, 9, 9), bool)
    mask[1, 1, 1] = mask[2, 2, 2] = True  # two corner neighbours: one component only 26-connected
    mask[5:8, 5:8, 5:8] = True
    assert ops.remove_small_components(mask, 2, 26).sum() == 29
    assert ops.remove_small_components(mask, 2, 6).sum() == 27
    assert ops.remove_small_components(mask, 28, 26).sum() == 0


@FEW
@given(st.integers(0, 10**6), st.floats(0.3, 0.8))
def test_fill_cavities_is_binary_fill_holes(seed, density):
    mask = random_mask(seed, density=density)
    assert np.array_equal(ops.fill_cavities(mask), ndimage.binary_fill_holes(mask))


def test_fill_cavities_fills_a_cavity_not_a_pit():
    mask = np.zeros((12, 12, 12), bool)
    mask[2:9, 2:9, 2:9] = True
    mask[4:7, 4:7, 4:7] = False  # enclosed
    mask[2, 6, 6] = False  # a pit open to the outside, not reaching the cavity
    mask[0, 0, 0] = mask[0, 0, 2] = mask[0, 1, 1] = mask[1, 0, 1] = True  # (0, 0, 1) walled in on the border
    out = ops.fill_cavities(mask)
    assert out[4:7, 4:7, 4:7].all() and not out[2, 6, 6] and not out[0, 0, 1]


# ---------------------------------------------------------------- 2x2x2 plugging


def test_plug_table_answers_are_minimal_and_connect():
    for bits in range(256):
        add = int(ops.PLUG_TABLE[bits])
        assert add & bits == 0 and ops._face_connected(bits | add)
        if ops._face_connected(bits):
            assert add == 0
    assert bin(int(ops.PLUG_TABLE[0b10000001])).count("1") == 2  # opposite corners: a 2-voxel path


def test_plugging_closes_a_one_voxel_hole_through_a_sheet():
    """A plane z = 4 with one voxel lifted to z = 5: the lifted voxel touches the plane only along edges, so the
    26-connected background passes through the gap it left (a tunnel for the 6-connected foreground)."""
    mask = np.zeros((9, 12, 12), bool)
    mask[4, 1:11, 1:11] = True
    mask[4, 5, 5], mask[5, 5, 5] = False, True
    assert betti_of_mask(mask, 6)[1] >= 1
    out = ops.plug_holes(mask)
    assert betti_of_mask(out, 6) == (1, 0, 0)
    assert out.sum() - mask.sum() <= 4


def test_plugging_leaves_a_face_connected_sheet_alone():
    mask = np.zeros((6, 10, 10), bool)
    mask[2:4, 1:9, 1:9] = True
    mask[2:4, 4, 4] = False  # a true pinhole: every cube is face-connected, so not this operator's business
    assert np.array_equal(ops.plug_holes(mask), mask)


@FEW
@given(st.integers(0, 10**6), st.floats(0.1, 0.5))
def test_plugging_connects_every_cube_it_saw_disconnected(seed, density):
    mask = random_mask(seed, density=density, smooth=0.6)
    out = ops.plug_holes(mask, max_passes=1000)
    assert not (mask & ~out).any() and cube_face_connected(out).all()
    assert np.array_equal(out, mask) == cube_face_connected(mask).all()
    once = ops.plug_holes(mask, max_passes=1)
    assert cube_face_connected(once)[~cube_face_connected(mask)].any() or cube_face_connected(mask).all()


# ---------------------------------------------------------------- sheet hole patching


def wavy_sheet_with_hole(hole: int = 5) -> np.ndarray:
    """(16, 24, 24): a 2-voxel-thick sheet z ~ 6 + 2 sin(x / 4) with a hole x ``hole`` voxels wide in its middle."""
    z, y, x = np.mgrid[:16, :24, :24]
    height = np.rint(6 + 2 * np.sin(x / 4.0))
    mask = (z >= height) & (z < height + 2) & (y >= 2) & (y < 22) & (x >= 2) & (x < 22)
    mask[:, 10:10 + hole, 9:9 + hole] = False
    return mask


def test_patching_fills_a_larger_hole():
    mask = wavy_sheet_with_hole()
    assert betti(mask, 26) == (1, 1, 0)
    out = patch_holes(mask)
    assert betti(out, 26) == (1, 0, 0)
    assert not (mask & ~out).any() and out[:, 10:15, 9:14].any(axis=0).all()
    assert 40 <= out.sum() - mask.sum() <= 2 * 25 + 10  # about the hole's two-voxel thickness, no more


def test_patching_rejects_a_patch_that_adds_a_component():
    """A hollow box with aligned holes in its top and bottom: the interpolated patch floats inside, touching
    nothing, so it would add a component and is rejected."""
    mask = np.zeros((14, 14, 14), bool)
    mask[2:12, 2:12, 2:12] = True
    mask[3:11, 3:11, 3:11] = False
    mask[:, 5:9, 5:9] = False
    assert np.array_equal(patch_holes(mask), mask)


def test_a_patch_that_adds_a_tunnel_is_rejected():
    sheet = np.zeros((10, 12, 12), bool)
    sheet[2, 1:11, 1:11] = True
    handle = np.zeros_like(sheet)
    handle[3:6, 5, 3] = handle[3:6, 5, 8] = True
    handle[5, 5, 3:9] = True  # an arch standing on the sheet: one more tunnel
    assert betti(sheet | handle, 26)[1] == 1
    assert not _accepted(sheet, [handle], 26).any()
    fine = np.zeros_like(sheet)
    fine[3, 4:6, 4:6] = True
    assert np.array_equal(_accepted(sheet, [handle, fine], 26), fine)


@FEW
@given(st.integers(0, 10**6), st.sampled_from([6, 26]))
def test_betti_is_the_metrics_count(seed, connectivity):
    mask = random_mask(seed, density=0.4, smooth=0.8)
    assert betti(mask, connectivity) == betti_of_mask(mask, connectivity)


@FEW
@given(st.integers(0, 10**6), st.sampled_from([6, 18, 26]))
def test_patching_only_adds_and_never_worsens_a_sheet(seed, connectivity):
    mask = random_mask(seed, shape=(16, 16, 16), density=0.25, smooth=1.5)
    out = patch_holes(mask, connectivity)
    assert not (mask & ~out).any()
    structure = ndimage.generate_binary_structure(3, RANK[connectivity])
    assert ndimage.label(out, structure)[1] == ndimage.label(mask, structure)[1]


@pytest.mark.parametrize("op", [lambda m: ops.closing(m, (1, 2, 1)), lambda m: ops.opening(m, (1, 1, 2)),
                                lambda m: ops.closing_per_sheet(m, (1, 1, 1)), ops.plug_holes, ops.fill_cavities,
                                lambda m: ops.remove_small_components(m, 5), patch_holes])
def test_operators_leave_their_input_alone(op):
    mask = random_mask(3)
    before = mask.copy()
    out = op(mask)
    assert out.dtype == bool and out.shape == mask.shape and np.array_equal(mask, before)
