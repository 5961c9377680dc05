"""Topology of binary volumes: Betti numbers, Betti errors and the competition's TopoScore.

Connectivity. A foreground voxel is the closed unit cube; the foreground is the union of its closed cubes.
Two foreground voxels touch when they share a face, an edge or a corner, so foreground components are
26-connected, and the background (the open complement) is 6-connected. This is what cubical persistent
homology of the inverted volume (foreground 0, background 1) gives with the T-construction (voxels are
top-dimensional cells), e.g. ``cripser.compute_ph(np.where(mask, 0.0, 1.0), filtration="T")``.

Betti numbers (:func:`betti_numbers`) come from counting, not from persistence, because it is much faster:

- b0 = number of 26-connected foreground components;
- b2 = number of cavities = 6-connected background components that do not touch the volume border
  (the volume is treated as surrounded by background);
- b1 = b0 + b2 - chi, with chi = V - E + F - C the Euler characteristic of the union of closed voxel cubes
  (counted vertices, edges, faces and cubes of the voxel grid).

TopoScore (:func:`topo_score`) follows the competition: the volume is cut into ``tiles`` (2 x 2 x 2 by
default, sizes differing by at most one voxel); per tile and dimension k it counts prediction features
p_k, label features g_k and matched features m_k; the counts are summed over tiles; per dimension
F1_k = 2 m_k / (p_k + g_k) if g_k > 0, 0.5 / (p_k + 0.5) if g_k = 0 < p_k, inactive if p_k + g_k = 0;
the score is the weighted mean of F1 over the active dimensions (weights renormalised over them),
1.0 when no dimension is active.

The competition matches features with Betti matching (persistent homology with induced matchings; not on
the package index). Two replacements are offered, both with p_k = b_k(pred tile) and g_k = b_k(label tile):

- ``matching="betti"``: m_k = min(p_k, g_k). It ignores where the features are, so it is an UPPER BOUND
  of what a spatial matching gives (a prediction component far from every label component still counts).
- ``matching="persistence"``: spatial matching through the union U = pred ∪ label (Betti matching's
  comparison image for binary inputs). A prediction class and a label class match when they become the same
  class in U; m_k = dim(im(H_k(P) -> H_k(U)) ∩ im(H_k(L) -> H_k(U))), which is basis-free (Betti
  matching picks one basis through its tie-breaking, so exact agreement with it is not guaranteed):

  * k = 0: number of components of U that contain both a prediction and a label voxel;
  * k = 2: cavities of U are grouped when they lie in the same prediction cavity or the same label cavity;
    m_2 = number of groups in which every cavity of U lies inside both a prediction and a label cavity;
  * k = 1: m_1 = r_P + r_L - s_1, where r_P = rank(H_1(P) -> H_1(U)) is read from the persistent homology
    (``cripser``, T-construction) of the two-step filtration P ⊂ U, likewise r_L, and
    s_1 = dim(im_P + im_L) = b1(U) - b0(I) + b0(P) + b0(L) - b0(U) by the Mayer-Vietoris sequence, with
    I = P ∩ L the intersection of the two cube complexes (cells that are faces of a prediction voxel and of
    a label voxel), whose components are counted on its vertices and edges.

  m_k <= min(p_k, g_k) always; it is slower (a few seconds per 160^3 tile with tunnels on both sides).
"""

from __future__ import annotations

import itertools
import logging
from typing import Sequence

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.metrics._common import (
    binary_mask,
    label_components,
    prepare_pair,
    tile_slices,
)

logger = logging.getLogger(__name__)

MATCHINGS = ("betti", "persistence")


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
_FACES = ((2, 1, 1), (1, 2, 1), (1, 1, 2))


def euler_characteristic(mask: np.ndarray) -> int:
    """Euler characteristic V - E + F - C of the union of the closed cubes of a boolean volume (z, y, x)."""
    padded = np.pad(mask.astype(bool, copy=False), 1)
    vertices = int(np.count_nonzero(_cells_touched(padded, _VERTEX)))
    edges = sum(int(np.count_nonzero(_cells_touched(padded, s))) for s in _EDGES)
    faces = sum(int(np.count_nonzero(_cells_touched(padded, s))) for s in _FACES)
    return vertices - edges + faces - int(np.count_nonzero(mask))


def cavity_labels(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """6-connected background components of a boolean volume (z, y, x) and which of them are cavities.

    Returns:
        (labels, is_cavity): int32 labels of ``~mask`` (0 on the foreground), and a boolean array indexed by
        label (entry 0 is False) that is True for components not touching the volume border.
    """
    labels, count = label_components(~mask, 6)
    is_cavity = np.ones(count + 1, dtype=bool)
    is_cavity[0] = False
    for axis in range(3):
        for index in (0, -1):
            is_cavity[np.take(labels, index, axis=axis)] = False
    return labels, is_cavity


def betti_of_mask(mask: np.ndarray) -> tuple[int, int, int]:
    """(b0, b1, b2) of a boolean volume (z, y, x), foreground 26-connected; no input checks."""
    if not mask.any():
        return 0, 0, 0
    _, b0 = label_components(mask, 26)
    _, is_cavity = cavity_labels(mask)
    b2 = int(np.count_nonzero(is_cavity))
    b1 = b0 + b2 - euler_characteristic(mask)
    return b0, b1, b2


def betti_numbers(mask: np.ndarray) -> tuple[int, int, int]:
    """Betti numbers (components, tunnels, cavities) of a binary 3D volume.

    Args:
        mask: binary (z, y, x), bool or 0/1. Foreground is 26-connected, background 6-connected; the volume
            is treated as surrounded by background.

    Returns:
        (b0, b1, b2): e.g. (1, 0, 0) for a ball, (1, 1, 0) for a solid torus, (1, 0, 1) for a hollow shell.
    """
    return betti_of_mask(binary_mask(mask, "mask"))


def tile_betti(mask: np.ndarray, tiles: Sequence[int] = (2, 2, 2)) -> np.ndarray:
    """Betti numbers of each tile of a boolean volume (z, y, x): int64 array (n_tiles, 3)."""
    slices = tile_slices(mask.shape, tiles)
    rows = [betti_of_mask(mask[s]) for s in slices]
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


def tile_matches(
    pred: np.ndarray,
    label: np.ndarray,
    tiles: Sequence[int] = (2, 2, 2),
    matching: str = "betti",
    pred_betti: np.ndarray | None = None,
    label_betti: np.ndarray | None = None,
) -> np.ndarray:
    """Matched features m_k of each tile of two boolean volumes (z, y, x): int64 array (n_tiles, 3).

    ``pred_betti`` / ``label_betti`` (from :func:`tile_betti`, same tiles) may be passed to share work.
    """
    check_matching(matching)
    if matching == "betti":
        pred_betti = tile_betti(pred, tiles) if pred_betti is None else pred_betti
        label_betti = tile_betti(label, tiles) if label_betti is None else label_betti
        return np.minimum(pred_betti, label_betti)
    slices = tile_slices(pred.shape, tiles)
    rows = [matched_features(pred[s], label[s]) for s in slices]
    return np.array(rows, dtype=np.int64).reshape(len(slices), 3)


def check_matching(matching: str) -> str:
    """Raise VesuviusError unless ``matching`` is "betti" or "persistence"."""
    if matching not in MATCHINGS:
        raise VesuviusError(f"matching must be one of {MATCHINGS}, got {matching!r}")
    return matching


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


def betti_errors(
    pred: np.ndarray,
    label: np.ndarray,
    *,
    tiles: Sequence[int] = (2, 2, 2),
    ignore_index: int | None = 2,
) -> tuple[int, int, int]:
    """Per-dimension Betti errors: sum over tiles of |b_k(pred tile) - b_k(label tile)|, k = 0, 1, 2.

    Args:
        pred: binary mask (z, y, x), bool or 0/1.
        label: (z, y, x) with values 0, 1 and ``ignore_index``; ignored voxels count as background in both.
        tiles: number of tiles along (z, y, x); (1, 1, 1) compares the whole volumes.
        ignore_index: the unlabeled value, or None.
    """
    pred_mask, label_mask = prepare_pair(pred, label, ignore_index)
    diff = np.abs(tile_betti(pred_mask, tiles) - tile_betti(label_mask, tiles)).sum(axis=0)
    return int(diff[0]), int(diff[1]), int(diff[2])


def topo_score(
    pred: np.ndarray,
    label: np.ndarray,
    *,
    tiles: Sequence[int] = (2, 2, 2),
    weights: Sequence[float] = (0.34, 0.33, 0.33),
    ignore_index: int | None = 2,
    matching: str = "betti",
) -> float:
    """The competition's TopoScore with Betti matching replaced as described in the module docstring.

    Args:
        pred: binary mask (z, y, x), bool or 0/1.
        label: (z, y, x) with values 0, 1 and ``ignore_index``; ignored voxels count as background in both.
        tiles: number of tiles along (z, y, x).
        weights: weights of dimensions 0, 1, 2 (>= 0), renormalised over the active dimensions.
        ignore_index: the unlabeled value, or None.
        matching: "betti" (m_k = min(p_k, g_k), an upper bound) or "persistence" (spatial matching).

    Returns:
        Score in [0, 1]; 1.0 when no dimension has a feature in either volume.
    """
    check_betti_weights(weights)
    check_matching(matching)
    pred_mask, label_mask = prepare_pair(pred, label, ignore_index)
    pred_betti, label_betti = tile_betti(pred_mask, tiles), tile_betti(label_mask, tiles)
    matches = tile_matches(pred_mask, label_mask, tiles, matching, pred_betti, label_betti)
    p, g, m = pred_betti.sum(axis=0), label_betti.sum(axis=0), matches.sum(axis=0)
    logger.debug("topo counts p=%s g=%s m=%s", p, g, m)
    return topo_score_from_counts(p, g, m, weights)
