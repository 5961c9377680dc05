"""Exact Betti matching (the competition's TopoScore): hand-worked topologies, tiling, the ignore label, an
independent computation straight through the extension, parallel workers, and the fallback when it is missing."""

import logging
import sys

import numpy as np
import pytest
from scipy import ndimage as ndi

from vesuvius_monai.config import LeaderboardWeights
from vesuvius_monai.metrics import (
    MetricContext,
    compute_metrics,
    leaderboard_score,
    topo_matching_used,
    topo_score,
)
from vesuvius_monai.metrics import betti_matching as bm
from vesuvius_monai.metrics.betti import betti_numbers
from vesuvius_monai.metrics.topology import betti_errors, topo_counts

needs_extension = pytest.mark.skipif(
    bm.extension() is None, reason=f"exact Betti matching cannot be loaded here: {bm.extension_status()}"
)

N = 32  # 2 x 2 x 2 tiles split every axis at 16; shapes centred at 8 lie in the first octant
Z, Y, X = np.mgrid[:N, :N, :N]


def ball(center=(8, 8, 8), radius=5.0) -> np.ndarray:
    cz, cy, cx = center
    return (Z - cz) ** 2 + (Y - cy) ** 2 + (X - cx) ** 2 <= radius**2


def torus(center=(8, 8, 8), major=4.0, minor=1.5) -> np.ndarray:
    cz, cy, cx = center
    ring = np.sqrt((Y - cy) ** 2 + (X - cx) ** 2) - major
    return ring**2 + (Z - cz) ** 2 <= minor**2


def shell(center=(8, 8, 8)) -> np.ndarray:
    return ball(center, 6.0) & ~ball(center, 3.5)


def sheets(gap: int) -> np.ndarray:
    """Two full-width sheets 2 voxels thick at z = 5, 6 and z = 7 + gap, 8 + gap (gap 0: they touch)."""
    out = np.zeros((N, N, N), dtype=bool)
    out[5:7] = True
    out[7 + gap : 9 + gap] = True
    return out


def f1_score(f1: dict[int, float]) -> float:
    """Competition weights 0.34 / 0.33 / 0.33 renormalised over the active dimensions given."""
    weights = {0: 0.34, 1: 0.33, 2: 0.33}
    return sum(weights[k] * v for k, v in f1.items()) / sum(weights[k] for k in f1)


def exact(pred: np.ndarray, label: np.ndarray, tiles=(2, 2, 2)) -> float:
    return topo_score(pred.astype(np.uint8), label.astype(np.uint8), tiles=tiles, matching="exact")


# The library's construction: foreground 6-connected, the one essential class of a tile not counted, so a
# tile whose foreground is one component has no dimension-0 feature. Worked by hand, (p, g, m) per dimension.
HAND_CASES = [
    # one ball in one tile, nothing else: no feature anywhere, no active dimension
    ("ball vs ball", ball(), ball(), 1.0),
    ("ball vs empty", ball(), np.zeros((N, N, N), bool), 1.0),
    # two balls in one tile: one dimension-0 label feature; the empty prediction has none: F1_0 = 0
    ("empty vs two balls", np.zeros((N, N, N), bool), ball((8, 8, 4), 3) | ball((8, 8, 12), 3), 0.0),
    # the cavity: g_2 = 1
    ("shell vs shell", shell(), shell(), 1.0),
    ("solid ball vs shell", ball(radius=6.0), shell(), 0.0),  # p_2 = 0, m_2 = 0: F1_2 = 0
    # the tunnel: g_1 = 1 or p_1 = 1
    ("torus vs torus", torus(), torus(), 1.0),
    ("ball vs torus", ball(), torus(), 0.0),
    ("torus vs ball", torus(), ball(), 0.5 / 1.5),  # p_1 = 1, g_1 = 0: F1_1 = 0.5 / (1 + 0.5)
    # sheets spanning the four upper tiles: two separate sheets are one feature per tile (g_0 = 4)
    ("separate vs separate sheets", sheets(1), sheets(1), 1.0),
    ("touching vs separate sheets", sheets(0), sheets(1), 0.0),  # p_0 = 0: F1_0 = 0
    ("separate vs touching sheets", sheets(1), sheets(0), 0.5 / 4.5),  # p_0 = 4, g_0 = 0
]


@needs_extension
@pytest.mark.parametrize("name, pred, label, expected", HAND_CASES, ids=[c[0] for c in HAND_CASES])
def test_known_topologies(name, pred, label, expected):
    assert exact(pred, label) == pytest.approx(expected, abs=1e-12)


@needs_extension
def test_one_missing_cavity_drops_dimension_2_only():
    label = shell((8, 8, 8)) | torus((8, 24, 24))  # two components, one tunnel, one cavity: g = (1, 1, 1)
    pred = ball((8, 8, 8), 6.0) | torus((8, 24, 24))  # the cavity filled: p = (1, 1, 0)
    counts = topo_counts(pred, label, (1, 1, 1), "exact")
    assert [c.tolist() for c in counts.totals()] == [[1, 1, 0], [1, 1, 1], [1, 1, 0]]
    assert exact(pred, label, (1, 1, 1)) == pytest.approx(f1_score({0: 1.0, 1: 1.0, 2: 0.0}))


@needs_extension
def test_one_extra_tunnel_drops_dimension_1_only():
    label = ball((8, 8, 8), 5.0) | torus((8, 24, 24))  # g = (1, 1, 0)
    pred = label.copy()
    pred[:, 7:10, 7:10] &= ~ball((8, 8, 8), 5.0)[:, 7:10, 7:10]  # a hole drilled through the ball: p = (1, 2, 0)
    counts = topo_counts(pred, label, (1, 1, 1), "exact")
    assert [c.tolist() for c in counts.totals()] == [[1, 2, 0], [1, 1, 0], [1, 1, 0]]
    assert exact(pred, label, (1, 1, 1)) == pytest.approx(f1_score({0: 1.0, 1: 2 / 3}))


@needs_extension
def test_bridge_in_one_tile_loses_that_tile_only():
    label = sheets(1)  # g_0 = 4, one per upper tile
    pred = label.copy()
    pred[7, 2:4, 2:4] = True  # joins the sheets inside tile (0, 0, 0): p_0 = 3, all three matched
    assert exact(pred, label) == pytest.approx(2 * 3 / (3 + 4))


@needs_extension
def test_diagonal_contact_does_not_connect():
    """Voxels sharing only an edge are two components here (26-connected they would be one)."""
    label = np.zeros((6, 6, 6), dtype=bool)
    label[1, 1, 1:5] = True
    label[2, 2, 1:5] = True  # touches the first rod along an edge only
    joined = label.copy()
    joined[2, 1, 1:5] = True  # now face-connected
    assert betti_numbers(label, connectivity=26)[0] == 1 and betti_numbers(label, connectivity=6)[0] == 2
    assert exact(joined, label, (1, 1, 1)) == 0.0  # g_0 = 1 (two components), p_0 = 0
    assert exact(label, label, (1, 1, 1)) == 1.0


@needs_extension
def test_odd_shapes_split_like_array_split():
    """9 voxels split 5 + 4: z = 3 and z = 4 lie in the same tile (a split 4 + 5 would separate them)."""
    label = np.zeros((9, 4, 6), dtype=np.uint8)
    label[3, 1, 1] = 1
    label[4, 1, 4] = 1  # not touching: two components in tile z [0:5], so g_0 = 1 there
    empty = np.zeros_like(label)
    assert topo_score(empty, label, tiles=(2, 1, 1)) == 0.0
    assert topo_score(empty, label[::-1].copy(), tiles=(2, 1, 1)) == 1.0  # z = 4, 5: split apart, no feature


class RecordingExtension:
    """Wraps the extension and records the arrays it is called with."""

    def __init__(self, real):
        self.real = real
        self.calls = []

    def compute_matching(self, a, b):
        self.calls.append((a, b))
        return self.real.compute_matching(a, b)


@needs_extension
def test_extension_gets_inverted_float64_tiles_prediction_first(monkeypatch):
    rng = np.random.default_rng(0)
    pred = rng.random((9, 6, 7)) < 0.5
    label = (rng.random((9, 6, 7)) < 0.5).astype(np.uint8)
    label[:2] = 2  # ignored: background in both
    recorder = RecordingExtension(bm.extension())
    monkeypatch.setattr(bm, "_load", lambda: (recorder, "recording"))
    topo_score(pred, label)
    keep = label != 2
    expected = []
    for pz, lz in zip(np.array_split(pred & keep, 2, axis=0), np.array_split(label == 1, 2, axis=0)):
        for py, ly in zip(np.array_split(pz, 2, axis=1), np.array_split(lz, 2, axis=1)):
            expected += list(zip(np.array_split(py, 2, axis=2), np.array_split(ly, 2, axis=2)))
    assert len(recorder.calls) == 8
    for (a, b), (p, q) in zip(recorder.calls, expected):
        for array, mask in ((a, p), (b, q)):
            assert array.dtype == np.float64 and array.flags.c_contiguous
            np.testing.assert_array_equal(array, np.where(mask, 0.0, 1.0))


@needs_extension
def test_ignore_label_is_background_in_both():
    label = sheets(1).astype(np.uint8)
    pred = sheets(0).astype(np.uint8)  # touching sheets: scores 0 against separate ones
    label[:, :, 16:] = 2
    pred[:, 20:, :] = 1  # whatever lies in the ignored half does not count
    ignored = label == 2
    assert exact(pred, label) == 0.0
    bare_label = np.where(ignored, 0, label)
    bare_pred = np.where(ignored, 0, pred)
    assert exact(pred, label) == exact(bare_pred, bare_label)
    # the ignore region cuts the label's sheets: predicted voxels there are removed before matching
    cut = sheets(1).astype(np.uint8)
    cut[:, :, 8] = 2  # splits each sheet of the lower-x tiles in two
    assert topo_score(sheets(1), cut) == exact(sheets(1) & (cut != 2), cut == 1)
    assert topo_score(sheets(1), cut) == 1.0


def independent_topo_score(pred: np.ndarray, label: np.ndarray, ignore: int = 2) -> float:
    """TopoScore computed straight through the extension: np.array_split octants, counts summed, F1, weights."""
    keep = label != ignore
    p_mask, l_mask = (pred != 0) & keep, label == 1
    parts = [np.array_split(np.arange(n), 2) for n in pred.shape]
    p, g, m = np.zeros(3), np.zeros(3), np.zeros(3)
    for iz in parts[0]:
        for iy in parts[1]:
            for ix in parts[2]:
                index = np.ix_(iz, iy, ix)
                a = np.ascontiguousarray(1.0 - p_mask[index].astype(np.float64))
                b = np.ascontiguousarray(1.0 - l_mask[index].astype(np.float64))
                result = bm.extension().compute_matching(a, b)
                m += result.num_matched
                p += np.asarray(result.num_matched) + result.num_unmatched_input1
                g += np.asarray(result.num_matched) + result.num_unmatched_input2
    f1 = {}
    for k in range(3):
        if p[k] + g[k] > 0:
            f1[k] = 2 * m[k] / (p[k] + g[k]) if g[k] > 0 else 0.5 / (p[k] + 0.5)
    return f1_score(f1) if f1 else 1.0


def random_pair(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A smooth random label (with an ignored box) and a noisy, shifted prediction of a random odd-ish shape."""
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in rng.integers(4, 19, size=3))
    label = ndi.gaussian_filter(rng.random(shape), 1.2) > rng.uniform(0.45, 0.55)
    pred = np.roll(label, int(rng.integers(-1, 2)), axis=int(rng.integers(3)))
    pred ^= rng.random(shape) < rng.uniform(0.0, 0.15)
    label = label.astype(np.uint8)
    if seed % 2:
        z0, y0 = int(rng.integers(shape[0])), int(rng.integers(shape[1]))
        label[z0 : z0 + 3, y0:] = 2
    return pred.astype(np.uint8), label


@needs_extension
def test_topo_score_equals_an_independent_computation_on_random_volumes():
    asymmetric = 0
    for seed in range(12):
        pred, label = random_pair(seed)
        expected = independent_topo_score(pred, label)
        assert topo_score(pred, label) == pytest.approx(expected, abs=1e-12), (seed, pred.shape)
        assert leaderboard_score(pred, label)["topo_score"] == pytest.approx(expected, abs=1e-12)
        assert compute_metrics(pred, label, ["topo_score"])["topo_score"] == pytest.approx(expected, abs=1e-12)
        swapped = independent_topo_score((label == 1).astype(np.uint8), np.where(label == 2, 2, pred))
        asymmetric += not np.isclose(swapped, expected)
    assert asymmetric > 0  # prediction-first order matters on these volumes: the test would catch a swap


@needs_extension
@pytest.mark.parametrize("seed", range(6))
def test_identical_volumes_score_one(seed):
    pred, label = random_pair(seed)
    truth = (label == 1).astype(np.uint8)
    assert topo_score(truth, label) == 1.0


@needs_extension
def test_betti_numbers_are_the_librarys_counts_plus_the_essential_class():
    """Betti errors with "exact" use 6-connected counting; it agrees with the library on random volumes."""
    rng = np.random.default_rng(5)
    for _ in range(25):
        shape = tuple(int(s) for s in rng.integers(1, 13, size=3))
        mask = rng.random(shape) < rng.uniform(0.2, 0.8)
        features = bm.match_pair(mask, mask)[1]
        b = betti_numbers(mask, connectivity=6)
        assert features.tolist() == [max(b[0] - 1, 0), b[1], b[2]], shape


@needs_extension
def test_betti_errors_follow_the_exact_construction():
    label = np.zeros((6, 6, 6), dtype=np.uint8)
    label[1, 1, 1:5] = 1
    label[2, 2, 1:5] = 1  # edge contact: two components when 6-connected
    pred = label.copy()
    pred[2, 1, 1:5] = 1  # one component
    assert betti_errors(pred, label, tiles=(1, 1, 1)) == (1, 0, 0)
    assert betti_errors(pred, label, tiles=(1, 1, 1), matching="betti") == (0, 0, 0)
    weights = LeaderboardWeights(tiles=(1, 1, 1))
    assert compute_metrics(pred, label, ["betti_error_0"], weights=weights)["betti_error_0"] == 1


@needs_extension
def test_parallel_workers_give_the_same_counts():
    pairs = [random_pair(seed) for seed in (20, 21, 22)]
    preds = [p.astype(bool) for p, _ in pairs]
    labels = [lab == 1 for _, lab in pairs]
    sequential = bm.match_tiles(preds, labels, workers=1)
    assert sequential.shape == (3, 3, 3)
    np.testing.assert_array_equal(bm.match_tiles(preds, labels, workers=2), sequential)


def test_worker_choice_is_bounded_by_tiles_cores_and_memory(monkeypatch):
    import psutil

    class Memory:
        available = 12 * bm.BYTES_PER_VOXEL * 160**3

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Memory)
    monkeypatch.setattr(bm, "_available_cores", lambda: 16)
    assert bm.choose_workers(27, 160**3) == 9  # 80 % of the memory holds 9 matchings at once
    assert bm.choose_workers(8, 160**3) == 8
    assert bm.choose_workers(4, 160**3) == 4
    assert bm.choose_workers(8, 32**3) == 1  # small tiles: in-process
    monkeypatch.setattr(bm, "_available_cores", lambda: 2)
    assert bm.choose_workers(8, 160**3) == 2
    Memory.available = bm.BYTES_PER_VOXEL * 160**3
    assert bm.choose_workers(8, 160**3) == 1


@needs_extension
def test_loading_does_not_import_the_topolosses_package():
    assert bm.extension() is not None
    for name in ("topolosses", "topolosses.losses", "torchvision", "cv2", "gudhi", "ot"):
        assert name not in sys.modules


def test_loader_reports_why_it_cannot_load(monkeypatch, tmp_path):
    monkeypatch.setattr(bm, "extension_paths", lambda: [])
    missing = "the topolosses wheel (with the Betti-Matching-3D extension) is not installed"
    assert bm._load.__wrapped__() == (None, missing)
    broken = tmp_path / "betti_matching.cpython-311-x86_64-linux-gnu.so"
    broken.write_bytes(b"not an extension")
    monkeypatch.setattr(bm, "extension_paths", lambda: [broken])
    module, reason = bm._load.__wrapped__()
    assert module is None and reason.startswith(f"loading {broken} failed")


def test_fallback_warns_once_and_names_itself(monkeypatch, caplog):
    monkeypatch.setattr(bm, "_load", lambda: (None, "test: extension removed"))
    monkeypatch.setattr(bm, "_warned", False)
    pred, label = random_pair(3)
    with caplog.at_level(logging.WARNING, logger=bm.__name__):
        first = topo_score(pred, label)
        again = compute_metrics(pred, label, ["topo_score", "betti_error_0", "leaderboard"])
        used = topo_matching_used(LeaderboardWeights())
    warnings = [r for r in caplog.records if r.name == bm.__name__ and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "test: extension removed" in warnings[0].getMessage() and "'persistence'" in warnings[0].getMessage()
    assert used == "persistence"
    assert topo_matching_used("betti") == "betti" and topo_matching_used("exact") == "persistence"
    assert MetricContext(pred, label).topo_matching == "persistence"
    assert first == again["topo_score"] == topo_score(pred, label, matching="persistence")
    assert again["betti_error_0"] == betti_errors(pred, label, matching="betti")[0]  # 26-connected counts
    with pytest.raises(Exception, match="test: extension removed"):
        bm.match_pair(pred == 1, label == 1)


@needs_extension
def test_exact_is_used_where_it_loads():
    assert topo_matching_used(LeaderboardWeights()) == "exact"
    assert LeaderboardWeights().topo_matching == "exact"
    pred, label = random_pair(4)
    assert MetricContext(pred, label).topo_matching == "exact"
    assert topo_counts(pred == 1, label == 1).matching == "exact"
