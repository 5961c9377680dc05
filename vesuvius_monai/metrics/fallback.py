"""The stand-in matchings of TopoScore, "persistence" and "betti", used where exact Betti matching is not.

Both count p_k = b_k(pred tile) and g_k = b_k(label tile) for a 26-connected foreground (6-connected background),
the essential class counted (:mod:`vesuvius_monai.metrics.betti`), and differ in the matched features m_k:

- "betti": m_k = min(p_k, g_k). It ignores where the features are, so it is an UPPER BOUND of what a spatial
  matching gives (a prediction component far from every label component still counts).
- "persistence" (:func:`matched_features`): spatial matching through the union U = pred ∪ label (Betti
  matching's comparison image for binary inputs). A prediction class and a label class match when they become
  the same class in U; m_k = dim(im(H_k(P) -> H_k(U)) ∩ im(H_k(L) -> H_k(U))), which is basis-free (Betti
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

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from vesuvius_monai.metrics.betti import betti_of_mask
from vesuvius_monai.metrics.components import cavity_labels, label_components

_VERTEX = (2, 2, 2)
_EDGES = ((1, 2, 2), (2, 1, 2), (2, 2, 1))


def standin_matched(pred_tiles: list[np.ndarray], label_tiles: list[np.ndarray], pred_betti: np.ndarray,
                    label_betti: np.ndarray, matching: str) -> np.ndarray:
    """Matched features m_k of each tile pair under a stand-in matching: int64 (n_tiles, 3).

    Args:
        pred_tiles, label_tiles: boolean tiles (z, y, x), pair i of one shape.
        pred_betti, label_betti: their Betti numbers (26-connected), int64 (n_tiles, 3).
        matching: "persistence" or "betti".
    """
    if matching == "betti":
        return np.minimum(pred_betti, label_betti)
    rows = [matched_features(p, g) for p, g in zip(pred_tiles, label_tiles)]
    return np.array(rows, dtype=np.int64).reshape(len(rows), 3)


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


def _matched_tunnels(pred: np.ndarray, label: np.ndarray, b_pred: tuple, b_label: tuple) -> int:
    """dim(im H1(P) ∩ im H1(L)) in H1(P ∪ L) (see the module docstring)."""
    if b_pred[1] == 0 or b_label[1] == 0:
        return 0
    union = pred | label
    b_union = betti_of_mask(union)
    span = b_union[1] - _intersection_components(pred, label) + b_pred[0] + b_label[0] - b_union[0]
    return _surviving_tunnels(pred, union) + _surviving_tunnels(label, union) - span


def _surviving_tunnels(inner: np.ndarray, outer: np.ndarray) -> int:
    """rank(H1(inner) -> H1(outer)) for boolean volumes inner ⊂ outer, from cripser's T-construction PH."""
    import cripser

    values = np.where(inner, 0.0, np.where(outer, 1.0, 2.0))
    pairs = cripser.compute_ph(values, filtration="T", maxdim=1)
    return int(np.count_nonzero((pairs[:, 0] == 1) & (pairs[:, 1] == 0) & (pairs[:, 2] > 1)))


def _intersection_components(pred: np.ndarray, label: np.ndarray) -> int:
    """b0 of the intersection of the closed-cube complexes of two boolean volumes (z, y, x).

    A cell belongs to the intersection when it is a face of a pred voxel and of a label voxel; components
    are counted on the vertices and edges, laid out on a grid of doubled resolution.
    """
    pred_pad, label_pad = np.pad(pred, 1), np.pad(label, 1)
    grid = np.zeros(tuple(2 * s + 1 for s in pred.shape), dtype=bool)
    grid[0::2, 0::2, 0::2] = cells_touched(pred_pad, _VERTEX) & cells_touched(label_pad, _VERTEX)
    grid[1::2, 0::2, 0::2] = cells_touched(pred_pad, _EDGES[0]) & cells_touched(label_pad, _EDGES[0])
    grid[0::2, 1::2, 0::2] = cells_touched(pred_pad, _EDGES[1]) & cells_touched(label_pad, _EDGES[1])
    grid[0::2, 0::2, 1::2] = cells_touched(pred_pad, _EDGES[2]) & cells_touched(label_pad, _EDGES[2])
    return label_components(grid, 6)[1]


def cells_touched(padded: np.ndarray, sizes: tuple[int, int, int]) -> np.ndarray:
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
