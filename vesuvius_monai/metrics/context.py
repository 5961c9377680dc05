"""One prediction/label pair with its intermediate results cached, so several metrics share the work.

The masks are checked once; tile Betti numbers serve the three Betti errors (and the stand-in matchings'
TopoScore); the topology counts serve TopoScore; the component labelings serve the VOI parts; the surface
Dice, the TopoScore and the VOI serve the leaderboard score.
"""

from __future__ import annotations

from functools import cached_property
from typing import Callable, Sequence

import numpy as np

from vesuvius_monai.config import LeaderboardWeights
from vesuvius_monai.metrics._common import check_spacing, check_tiles, prepare_pair
from vesuvius_monai.metrics.betti import betti_connectivity, tile_betti
from vesuvius_monai.metrics.betti_matching import matching_used
from vesuvius_monai.metrics.cldice import cldice_from_skeletons, skeleton
from vesuvius_monai.metrics.leaderboard import combine_parts
from vesuvius_monai.metrics.overlap import dice_masks, iou_masks
from vesuvius_monai.metrics.surface import hausdorff_masks, surface_dice_masks
from vesuvius_monai.metrics.topology import TopoCounts, topo_counts
from vesuvius_monai.metrics.voi import voi_masks, voi_score


class MetricContext:
    """Checked boolean masks (z, y, x) of a pair plus lazily computed, cached intermediate results.

    Settings of the VOI (connectivity, alpha), TopoScore (tiles, Betti weights, matching) and surface Dice
    (tolerance) come from ``weights``; ``spacing`` applies to the surface metrics. ``topo_matching`` is the
    matching that actually produces the TopoScore and Betti errors here (``weights.topo_matching``, or the
    stand-in where exact Betti matching cannot be loaded).
    """

    def __init__(
        self,
        pred: np.ndarray,
        label: np.ndarray,
        *,
        ignore_index: int | None = 2,
        spacing: Sequence[float] = (1, 1, 1),
        weights: LeaderboardWeights = LeaderboardWeights(),
    ) -> None:
        self.pred, self.label = prepare_pair(pred, label, ignore_index)
        self.spacing = check_spacing(spacing)
        self.weights = weights
        check_tiles(weights.tiles, self.pred.shape)

    @cached_property
    def topo_matching(self) -> str:
        """"exact", "persistence" or "betti": the matching used for TopoScore and the Betti errors."""
        return matching_used(self.weights.topo_matching)

    @cached_property
    def tile_betti(self) -> tuple[np.ndarray, np.ndarray]:
        """Betti numbers per tile of (pred, label), each int64 (n_tiles, 3), in the matching's construction."""
        connectivity = betti_connectivity(self.topo_matching)
        tiles = self.weights.tiles
        return tile_betti(self.pred, tiles, connectivity), tile_betti(self.label, tiles, connectivity)

    @cached_property
    def betti_errors(self) -> np.ndarray:
        """Summed absolute Betti errors over tiles, int64 (3,)."""
        pred_betti, label_betti = self.tile_betti
        return np.abs(pred_betti - label_betti).sum(axis=0)

    @cached_property
    def topo_counts(self) -> TopoCounts:
        """Per-tile p_k, g_k, m_k of the TopoScore."""
        if self.topo_matching == "exact":
            return topo_counts(self.pred, self.label, self.weights.tiles, "exact")
        pred_betti, label_betti = self.tile_betti
        return topo_counts(self.pred, self.label, self.weights.tiles, self.topo_matching,
                           pred_betti=pred_betti, label_betti=label_betti)

    @cached_property
    def topo_score(self) -> float:
        """TopoScore with the settings of ``weights``."""
        return self.topo_counts.score(self.weights.betti_weights)

    @cached_property
    def voi_parts(self) -> tuple[float, float]:
        """(split, merge) in bits."""
        return voi_masks(self.pred, self.label, self.weights.connectivity)

    @cached_property
    def surface_dice(self) -> float:
        """Normalised surface Dice at ``weights.tolerance``."""
        return surface_dice_masks(self.pred, self.label, self.weights.tolerance, self.spacing)

    @cached_property
    def cldice_parts(self) -> tuple[float, float, float]:
        """(clDice, topology precision, topology sensitivity)."""
        return cldice_from_skeletons(self.pred, self.label, skeleton(self.pred), skeleton(self.label))

    @cached_property
    def leaderboard(self) -> dict[str, float]:
        """The leaderboard dict (score and parts)."""
        return combine_parts(self.topo_score, self.surface_dice, *self.voi_parts, self.weights)

    def value(self, name: str) -> float:
        """The scalar metric ``name`` (a key of :data:`SCALAR_GETTERS`)."""
        return float(SCALAR_GETTERS[name](self))


SCALAR_GETTERS: dict[str, Callable[[MetricContext], float]] = {
    "dice": lambda c: dice_masks(c.pred, c.label),
    "iou": lambda c: iou_masks(c.pred, c.label),
    "surface_dice": lambda c: c.surface_dice,
    "hd95": lambda c: hausdorff_masks(c.pred, c.label, c.spacing, 95.0),
    "voi_split": lambda c: c.voi_parts[0],
    "voi_merge": lambda c: c.voi_parts[1],
    "voi": lambda c: sum(c.voi_parts),
    "voi_score": lambda c: voi_score(sum(c.voi_parts), c.weights.voi_alpha),
    "betti_error_0": lambda c: c.betti_errors[0],
    "betti_error_1": lambda c: c.betti_errors[1],
    "betti_error_2": lambda c: c.betti_errors[2],
    "topo_score": lambda c: c.topo_score,
    "cldice": lambda c: c.cldice_parts[0],
    "leaderboard": lambda c: c.leaderboard["score"],
}
