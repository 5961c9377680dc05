"""Topology of binary volumes: Betti numbers, Betti errors and the competition's TopoScore.

TopoScore (:func:`topo_score`, :func:`topo_counts`) follows the competition: the volume is cut into ``tiles``
(2 x 2 x 2 by default, split as ``np.array_split`` splits: the first pieces take the odd voxel); per tile and
dimension k it counts prediction features p_k, label features g_k and matched features m_k; the counts are
summed over tiles; per dimension F1_k = 2 m_k / (p_k + g_k) if g_k > 0, 0.5 / (p_k + 0.5) if g_k = 0 < p_k,
inactive if p_k + g_k = 0; the score is the weighted mean of F1 over the active dimensions (weights
renormalised over them), 1.0 when no dimension is active.

Three matchings (``matching``):

- "exact" (default): Betti matching by the competition's library (:mod:`vesuvius_monai.metrics.betti_matching`);
  p_k, g_k and m_k are the library's own counts. Its construction: foreground 6-connected, background
  26-connected, the one essential class of each tile not counted (p_0 = b_0 - 1 for a non-empty tile).
  Where the library cannot be loaded, "exact" falls back to "persistence" with a warning
  (:func:`vesuvius_monai.metrics.betti_matching.matching_used` names the matching actually used).
- "persistence" and "betti": stand-ins with another construction, p_k = b_k(pred tile) and g_k = b_k(label tile)
  for a 26-connected foreground (6-connected background), the essential class counted.

  * "betti": m_k = min(p_k, g_k). It ignores where the features are, so it is an UPPER BOUND of what a spatial
    matching gives (a prediction component far from every label component still counts).
  * "persistence": spatial matching through the union U = pred ∪ label (Betti matching's comparison image for
    binary inputs). A prediction class and a label class match when they become the same class in U;
    m_k = dim(im(H_k(P) -> H_k(U)) ∩ im(H_k(L) -> H_k(U))), which is basis-free (Betti matching picks one
    basis through its tie-breaking, so exact agreement with it is not guaranteed):

    - k = 0: number of components of U that contain both a prediction and a label voxel;
    - k = 2: cavities of U are grouped when they lie in the same prediction cavity or the same label cavity;
      m_2 = number of groups in which every cavity of U lies inside both a prediction and a label cavity;
    - k = 1: m_1 = r_P + r_L - s_1, where r_P = rank(H_1(P) -> H_1(U)) is read from the persistent homology
      (``cripser``, T-construction) of the two-step filtration P ⊂ U, likewise r_L, and
      s_1 = dim(im_P + im_L) = b1(U) - b0(I) + b0(P) + b0(L) - b0(U) by the Mayer-Vietoris sequence, with
      I = P ∩ L the intersection of the two cube complexes (cells that are faces of a prediction voxel and of
      a label voxel), whose components are counted on its vertices and edges.

    m_k <= min(p_k, g_k) always; it is slower (a few seconds per 160^3 tile with tunnels on both sides).

Betti numbers (:func:`betti_numbers`) come from counting, not from persistence, because it is much faster.
With foreground connectivity c (26, or 6 for the exact library's construction) and the other one for the
background (6, or 26), the volume treated as surrounded by background:

- b0 = number of c-connected foreground components;
- b2 = number of cavities = background components that do not touch the volume border;
- b1 = b0 + b2 - chi, with chi the Euler characteristic (``skimage.measure.euler_number``; connectivity 26 is
  the union of closed voxel cubes, the T-construction, e.g. ``cripser.compute_ph(..., filtration="T")``;
  connectivity 6 the complex with voxels as vertices, the V-construction).

The Betti errors (:func:`betti_errors`, sum over tiles of |b_k(pred tile) - b_k(label tile)|) use the
construction of the matching in use: connectivity 6 with "exact" (the library's counts plus the essential
class), 26 with the stand-ins.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from skimage.measure import euler_number

from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.metrics._common import (
    binary_mask,
    label_components,
    prepare_pair,
    tile_slices,
)
from vesuvius_monai.metrics.betti_matching import check_matching, match_tiles, matching_used

logger = logging.getLogger(__name__)

_EULER_CONNECTIVITY = {26: 3, 6: 1}  # foreground connectivity -> skimage's euler_number connectivity
_BACKGROUND = {26: 6, 6: 26}


def betti_connectivity(matching: str) -> int:
    """Foreground connectivity of the Betti numbers that go with a matching in use: 6 for "exact", else 26."""
    return 6 if check_matching(matching) == "exact" else 26


def _check_betti_connectivity(connectivity: int) -> int:
    """Raise VesuviusError unless ``connectivity`` is 26 or 6 (the foreground connectivities with a dual)."""
    if connectivity not in _BACKGROUND:
        raise VesuviusError(f"Betti number connectivity must be 26 or 6, got {connectivity!r}")
    return connectivity


def _cells_touched(padded: np.ndarray, sizes: tuple[int, int, int]) -> np.ndarray:
    """Which cells of one kind touch the foreground of a volume padded by one background voxel.

    Along an axis, size 2 means the cell sits on a grid plane between two voxels (it touches both), size 1
    means it spans a voxel interval (it touches that voxel only). (2, 2, 2) gives vertices, (1, 2, 2) edges
    along z, (2, 1, 1) faces normal to z, (1, 1, 1) the cubes themselves.

    Args:
        padded: boolean (Z+2, Y+2, X+2).
        sizes: 1 or 2 per axis.

    Returns:
        boolean array with Z+1 (size 2) or Z (size 1) entries along each axis.
    """
    options = []
    for axis, size in enumerate(sizes):
        n = padded.shape[axis] - 2
        options.append([slice(1, n + 1)] if size == 1 else [slice(0, n + 1), slice(1, n + 2)])
    out = None
    for index in itertools.product(*options):
        out = padded[index].copy() if out is None else out | padded[index]
    return out


_VERTEX = (2, 2, 2)
_EDGES = ((1, 2, 2), (2, 1, 2), (2, 2, 1))


def euler_characteristic(mask: np.ndarray, connectivity: int = 26) -> int:
    """Euler characteristic of a boolean volume (z, y, x) with a ``connectivity``-connected foreground.

    26: the union of the closed voxel cubes (V - E + F - C of the voxel grid's cells); 6: the complex with the
    voxels as vertices. Computed by ``skimage.measure.euler_number``.
    """
    connectivity = _check_betti_connectivity(connectivity)
    return int(euler_number(mask, connectivity=_EULER_CONNECTIVITY[connectivity]))


def cavity_labels(mask: np.ndarray, connectivity: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """``connectivity``-connected background components of a boolean volume (z, y, x) and which are cavities.

    Returns:
        (labels, is_cavity): int32 labels of ``~mask`` (0 on the foreground), and a boolean array indexed by
        label (entry 0 is False) that is True for components not touching the volume border.
    """
    labels, count = label_components(~mask, connectivity)
    is_cavity = np.ones(count + 1, dtype=bool)
    is_cavity[0] = False
    for axis in range(3):
        for index in (0, -1):
            is_cavity[np.take(labels, index, axis=axis)] = False
    return labels, is_cavity


def betti_of_mask(mask: np.ndarray, connectivity: int = 26) -> tuple[int, int, int]:
    """(b0, b1, b2) of a boolean volume (z, y, x), foreground ``connectivity``-connected; no input checks."""
    if not mask.any():
        return 0, 0, 0
    _, b0 = label_components(mask, connectivity)
    _, is_cavity = cavity_labels(mask, _BACKGROUND[connectivity])
    b2 = int(np.count_nonzero(is_cavity))
    b1 = b0 + b2 - euler_characteristic(mask, connectivity)
    return b0, b1, b2


def betti_numbers(mask: np.ndarray, connectivity: int = 26) -> tuple[int, int, int]:
    """Betti numbers (components, tunnels, cavities) of a binary 3D volume.

    Args:
        mask: binary (z, y, x), bool or 0/1. The volume is treated as surrounded by background.
        connectivity: 26 (foreground 26-connected, background 6-connected) or 6 (foreground 6-connected,
            background 26-connected: the exact Betti matching library's construction).

    Returns:
        (b0, b1, b2): e.g. (1, 0, 0) for a ball, (1, 1, 0) for a solid torus, (1, 0, 1) for a hollow shell.
    """
    return betti_of_mask(binary_mask(mask, "mask"), _check_betti_connectivity(connectivity))


def tile_betti(mask: np.ndarray, tiles: Sequence[int] = (2, 2, 2), connectivity: int = 26) -> np.ndarray:
    """Betti numbers of each tile of a boolean volume (z, y, x): int64 array (n_tiles, 3)."""
    connectivity = _check_betti_connectivity(connectivity)
    slices = tile_slices(mask.shape, tiles)
    rows = [betti_of_mask(mask[s], connectivity) for s in slices]
    return np.array(rows, dtype=np.int64).reshape(len(slices), 3)


def _matched_components(pred: np.ndarray, label: np.ndarray) -> int:
    """Number of components of pred ∪ label (26-connected) holding both a pred and a label voxel."""
    union_cc, count = label_components(pred | label, 26)
    if count == 0:
        return 0
    has_pred = np.zeros(count + 1, dtype=bool)
    has_pred[union_cc[pred]] = True
    has_label = np.zeros(count + 1, dtype=bool)
    has_label[union_cc[label]] = True
    return int(np.count_nonzero(has_pred[1:] & has_label[1:]))


def _matched_cavities(pred: np.ndarray, label: np.ndarray) -> int:
    """dim(im H2(P) ∩ im H2(L)) in H2(P ∪ L), counted on cavities (see the module docstring)."""
    union_bg, union_is_cavity = cavity_labels(pred | label)
    cavity_ids = np.flatnonzero(union_is_cavity)
    if cavity_ids.size == 0:
        return 0
    first_voxel = np.unique(union_bg.ravel(), return_index=True)[1]  # label i -> index of its first voxel
    where = first_voxel[cavity_ids]
    pred_bg, pred_is_cavity = cavity_labels(pred)
    label_bg, label_is_cavity = cavity_labels(label)
    pred_of = pred_bg.ravel()[where]
    label_of = label_bg.ravel()[where]
    # graph nodes: prediction background labels, then label background labels, then one "outside" node
    n_pred, n_label = pred_is_cavity.size, label_is_cavity.size
    outside = n_pred + n_label
    a = np.where(pred_is_cavity[pred_of], pred_of, outside)
    b = np.where(label_is_cavity[label_of], n_pred + label_of, outside)
    graph = coo_matrix((np.ones(a.size), (a, b)), shape=(outside + 1, outside + 1))
    _, component = connected_components(graph, directed=False)
    touched = np.unique(component[np.concatenate([a, b])])
    return int(np.count_nonzero(touched != component[outside]))


def _intersection_components(pred: np.ndarray, label: np.ndarray) -> int:
    """b0 of the intersection of the closed-cube complexes of two boolean volumes (z, y, x).

    A cell belongs to the intersection when it is a face of a pred voxel and of a label voxel; components
    are counted on the vertices and edges, laid out on a grid of doubled resolution.
    """
    pred_pad, label_pad = np.pad(pred, 1), np.pad(label, 1)
    grid = np.zeros(tuple(2 * s + 1 for s in pred.shape), dtype=bool)
    grid[0::2, 0::2, 0::2] = _cells_touched(pred_pad, _VERTEX) & _cells_touched(label_pad, _VERTEX)
    grid[1::2, 0::2, 0::2] = _cells_touched(pred_pad, _EDGES[0]) & _cells_touched(label_pad, _EDGES[0])
    grid[0::2, 1::2, 0::2] = _cells_touched(pred_pad, _EDGES[1]) & _cells_touched(label_pad, _EDGES[1])
    grid[0::2, 0::2, 1::2] = _cells_touched(pred_pad, _EDGES[2]) & _cells_touched(label_pad, _EDGES[2])
    return label_components(grid, 6)[1]


def _surviving_tunnels(inner: np.ndarray, outer: np.ndarray) -> int:
    """rank(H1(inner) -> H1(outer)) for boolean volumes inner ⊂ outer, from cripser's T-construction PH."""
    import cripser

    values = np.where(inner, 0.0, np.where(outer, 1.0, 2.0))
    pairs = cripser.compute_ph(values, filtration="T", maxdim=1)
    return int(np.count_nonzero((pairs[:, 0] == 1) & (pairs[:, 1] == 0) & (pairs[:, 2] > 1)))


def _matched_tunnels(pred: np.ndarray, label: np.ndarray, b_pred: tuple, b_label: tuple) -> int:
    """dim(im H1(P) ∩ im H1(L)) in H1(P ∪ L) (see the module docstring)."""
    if b_pred[1] == 0 or b_label[1] == 0:
        return 0
    union = pred | label
    b_union = betti_of_mask(union)
    span = b_union[1] - _intersection_components(pred, label) + b_pred[0] + b_label[0] - b_union[0]
    return _surviving_tunnels(pred, union) + _surviving_tunnels(label, union) - span


def matched_features(pred: np.ndarray, label: np.ndarray) -> tuple[int, int, int]:
    """Spatially matched features (m0, m1, m2) of two boolean volumes (z, y, x) ("persistence" matching)."""
    b_pred, b_label = betti_of_mask(pred), betti_of_mask(label)
    if np.array_equal(pred, label):
        return b_pred
    return (
        _matched_components(pred, label),
        _matched_tunnels(pred, label, b_pred, b_label),
        _matched_cavities(pred, label),
    )


def matched_features(pred: np.ndarray, label: np.ndarray) -> tuple[int, int, int]:
    """Spatially matched features (m0, m1, m2) of two boolean volumes (z, y, x) ("persistence" matching)."""
    b_pred, b_label = betti_of_mask(pred), betti_of_mask(label)
    if np.array_equal(pred, label):
        return b_pred
    return (
        _matched_components(pred, label),
        _matched_tunnels(pred, label, b_pred, b_label),
        _matched_cavities(pred, label),
    )


def check_betti_weights(weights: Sequence[float]) -> np.ndarray:
    """Return three finite non-negative weights, not all zero, as float64 (3,), or raise VesuviusError."""
    try:
        values = np.array([float(w) for w in weights], dtype=np.float64)
    except (TypeError, ValueError):
        raise VesuviusError(f"betti weights must be three numbers >= 0, got {weights!r}") from None
    if values.shape != (3,) or not np.isfinite(values).all() or (values < 0).any() or values.sum() == 0:
        raise VesuviusError(f"betti weights must be three numbers >= 0, not all zero, got {weights!r}")
    return values


def topological_f1(p: int, g: int, m: int) -> float | None:
    """Competition F1 of one dimension from counts; None when inactive (p + g = 0)."""
    if p + g == 0:
        return None
    if g == 0:
        return 0.5 / (p + 0.5)
    return 2.0 * m / (p + g)


def topo_score_from_counts(
    p: Sequence[int], g: Sequence[int], m: Sequence[int], weights: Sequence[float] = (0.34, 0.33, 0.33)
) -> float:
    """Weighted mean of the per-dimension F1 over the active dimensions; 1.0 when none is active.

    Active dimensions whose weights are all zero also give 1.0 (nothing weighted to score).
    """
    w = check_betti_weights(weights)
    total, weight_sum = 0.0, 0.0
    for k in range(3):
        f1 = topological_f1(int(p[k]), int(g[k]), int(m[k]))
        if f1 is not None:
            total += w[k] * f1
            weight_sum += w[k]
    return 1.0 if weight_sum == 0 else total / weight_sum


@dataclass(frozen=True)
class TopoCounts:
    """Per-tile feature counts of a pair, each int64 (n_tiles, 3) over dimensions 0, 1, 2.

    pred: p_k; label: g_k; matched: m_k; matching: the matching that produced them ("exact", "persistence"
    or "betti"; see the module docstring).
    """

    pred: np.ndarray
    label: np.ndarray
    matched: np.ndarray
    matching: str

    def totals(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(p, g, m) summed over tiles, each int64 (3,)."""
        return self.pred.sum(axis=0), self.label.sum(axis=0), self.matched.sum(axis=0)

    def score(self, weights: Sequence[float] = (0.34, 0.33, 0.33)) -> float:
        """TopoScore from the counts summed over tiles, with Betti ``weights`` of dimensions 0, 1, 2."""
        p, g, m = self.totals()
        logger.debug("topo counts (%s) p=%s g=%s m=%s", self.matching, p, g, m)
        return topo_score_from_counts(p, g, m, weights)


def topo_counts(
    pred: np.ndarray,
    label: np.ndarray,
    tiles: Sequence[int] = (2, 2, 2),
    matching: str = "exact",
    *,
    pred_betti: np.ndarray | None = None,
    label_betti: np.ndarray | None = None,
    workers: int | None = None,
) -> TopoCounts:
    """Feature counts p_k, g_k, m_k of each tile of two boolean volumes (z, y, x): the TopoScore chain.

    Args:
        pred, label: boolean masks of one shape (ignored voxels already background in both).
        tiles: number of tiles along (z, y, x).
        matching: "exact" (falls back to "persistence" where the library cannot be loaded), "persistence"
            or "betti".
        pred_betti, label_betti: the stand-ins' per-tile Betti numbers (:func:`tile_betti`, connectivity 26,
            same tiles), passed in to share work; unused by "exact", which takes the library's counts.
        workers: worker processes for "exact" (None: chosen by cores and memory; 1: in this process).
    """
    used = matching_used(matching)
    slices = tile_slices(pred.shape, tiles)
    if used == "exact":
        counts = match_tiles([pred[s] for s in slices], [label[s] for s in slices], workers)
        return TopoCounts(pred=counts[:, 1], label=counts[:, 2], matched=counts[:, 0], matching=used)
    pred_betti = tile_betti(pred, tiles) if pred_betti is None else pred_betti
    label_betti = tile_betti(label, tiles) if label_betti is None else label_betti
    if used == "betti":
        matched = np.minimum(pred_betti, label_betti)
    else:
        rows = [matched_features(pred[s], label[s]) for s in slices]
        matched = np.array(rows, dtype=np.int64).reshape(len(slices), 3)
    return TopoCounts(pred=pred_betti, label=label_betti, matched=matched, matching=used)


def betti_errors(
    pred: np.ndarray,
    label: np.ndarray,
    *,
    tiles: Sequence[int] = (2, 2, 2),
    ignore_index: int | None = 2,
    matching: str = "exact",
) -> tuple[int, int, int]:
    """Per-dimension Betti errors: sum over tiles of |b_k(pred tile) - b_k(label tile)|, k = 0, 1, 2.

    Args:
        pred: binary mask (z, y, x), bool or 0/1.
        label: (z, y, x) with values 0, 1 and ``ignore_index``; ignored voxels count as background in both.
        tiles: number of tiles along (z, y, x); (1, 1, 1) compares the whole volumes.
        ignore_index: the unlabeled value, or None.
        matching: the TopoScore matching whose construction the Betti numbers follow: "exact" (6-connected
            foreground, where the library loads) or a stand-in (26-connected); see the module docstring.
    """
    connectivity = betti_connectivity(matching_used(matching))
    pred_mask, label_mask = prepare_pair(pred, label, ignore_index)
    diff = np.abs(tile_betti(pred_mask, tiles, connectivity) - tile_betti(label_mask, tiles, connectivity)).sum(axis=0)
    return int(diff[0]), int(diff[1]), int(diff[2])


def topo_score(
    pred: np.ndarray,
    label: np.ndarray,
    *,
    tiles: Sequence[int] = (2, 2, 2),
    weights: Sequence[float] = (0.34, 0.33, 0.33),
    ignore_index: int | None = 2,
    matching: str = "exact",
) -> float:
    """The competition's TopoScore (see the module docstring).

    Args:
        pred: binary mask (z, y, x), bool or 0/1.
        label: (z, y, x) with values 0, 1 and ``ignore_index``; ignored voxels count as background in both.
        tiles: number of tiles along (z, y, x).
        weights: weights of dimensions 0, 1, 2 (>= 0), renormalised over the active dimensions.
        ignore_index: the unlabeled value, or None.
        matching: "exact" (Betti matching, the competition's; falls back to "persistence" with a warning where
            the library cannot be loaded), "persistence" (spatial stand-in) or "betti" (m_k = min(p_k, g_k)).

    Returns:
        Score in [0, 1]; 1.0 when no dimension has a feature in either volume.
    """
    check_betti_weights(weights)
    check_matching(matching)
    pred_mask, label_mask = prepare_pair(pred, label, ignore_index)
    return topo_counts(pred_mask, label_mask, tiles, matching).score(weights)
