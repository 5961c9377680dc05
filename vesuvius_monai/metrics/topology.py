"""The competition's TopoScore and the Betti errors of binary volumes (z, y, x).

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
- "persistence" and "betti": stand-ins with another construction (:mod:`vesuvius_monai.metrics.fallback`),
  p_k = b_k(pred tile) and g_k = b_k(label tile) for a 26-connected foreground (6-connected background), the
  essential class counted.

The Betti errors (:func:`betti_errors`, sum over tiles of |b_k(pred tile) - b_k(label tile)|) use the
construction of the matching in use: connectivity 6 with "exact" (the library's counts plus the essential
class), 26 with the stand-ins (:mod:`vesuvius_monai.metrics.betti`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.metrics._common import check_tiles, prepare_pair, tile_slices
from vesuvius_monai.metrics.betti import betti_connectivity, tile_betti
from vesuvius_monai.metrics.betti_matching import match_tiles, matching_used
from vesuvius_monai.metrics.fallback import standin_matched

logger = logging.getLogger(__name__)


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

    ``weights``: three numbers >= 0, not all zero (see :func:`check_betti_weights`). Active dimensions whose
    weights are all zero also give 1.0 (nothing weighted to score).
    """
    w = np.asarray(weights, dtype=np.float64)
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
    pred_tiles, label_tiles = [pred[s] for s in slices], [label[s] for s in slices]
    if used == "exact":
        counts = match_tiles(pred_tiles, label_tiles, workers)
        return TopoCounts(pred=counts[:, 1], label=counts[:, 2], matched=counts[:, 0], matching=used)
    pred_betti = tile_betti(pred, tiles) if pred_betti is None else pred_betti
    label_betti = tile_betti(label, tiles) if label_betti is None else label_betti
    matched = standin_matched(pred_tiles, label_tiles, pred_betti, label_betti, used)
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
    check_tiles(tiles, pred_mask.shape)
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
    pred_mask, label_mask = prepare_pair(pred, label, ignore_index)
    check_tiles(tiles, pred_mask.shape)
    return topo_counts(pred_mask, label_mask, tiles, matching).score(weights)
