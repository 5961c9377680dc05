"""The surface-detection leaderboard score: 0.30 TopoScore + 0.35 SurfaceDice + 0.35 VOI_score.

Parts (see /work/shared/notes/competition-metric.md):

- TopoScore: :func:`vesuvius_monai.metrics.topology.topo_score` on 2 x 2 x 2 tiles, Betti weights
  0.34 / 0.33 / 0.33; Betti matching is replaced by ``topo_matching`` ("betti": m_k = min(p_k, g_k), an upper
  bound, the default because it is fast; "persistence": spatial matching through the union).
- SurfaceDice: DeepMind's normalised surface Dice at tolerance 2 voxels (surfel areas weighted).
- VOI_score = 1 / (1 + alpha VOI), alpha = 0.3, VOI in bits between 26-connected components over the union
  of both foregrounds.

The three part weights are clamped at >= 0 and renormalised to sum to 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.metrics._common import check_connectivity, check_spacing, prepare_pair
from vesuvius_monai.metrics.surface import surface_dice_masks
from vesuvius_monai.metrics.topology import (
    check_betti_weights,
    check_matching,
    tile_betti,
    tile_matches,
    topo_score_from_counts,
)
from vesuvius_monai.metrics.voi import voi_masks, voi_score


@dataclass(kw_only=True, frozen=True)
class LeaderboardWeights:
    """Weights and settings of the leaderboard score.

    Attributes:
        topo, surface_dice, voi: weights of the three parts; clamped at >= 0 and renormalised (not all <= 0).
        tolerance: surface Dice tolerance in spacing units (>= 0).
        voi_alpha: alpha of VOI_score = 1 / (1 + alpha VOI) (>= 0).
        betti_weights: TopoScore weights of dimensions 0, 1, 2 (>= 0, not all zero).
        tiles: TopoScore tiles along (z, y, x).
        connectivity: VOI component connectivity, 6, 18 or 26.
        topo_matching: TopoScore feature matching, "betti" or "persistence".
    """

    topo: float = 0.30
    surface_dice: float = 0.35
    voi: float = 0.35
    tolerance: float = 2.0
    voi_alpha: float = 0.3
    betti_weights: tuple[float, float, float] = (0.34, 0.33, 0.33)
    tiles: tuple[int, int, int] = (2, 2, 2)
    connectivity: int = 26
    topo_matching: str = "betti"

    def __post_init__(self) -> None:
        """Check every field; raise VesuviusError naming the first bad one."""
        for name in ("topo", "surface_dice", "voi", "tolerance", "voi_alpha"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise VesuviusError(f"leaderboard weight {name} must be a finite number, got {value!r}")
        if max(self.topo, self.surface_dice, self.voi) <= 0:
            raise VesuviusError("leaderboard weights topo, surface_dice and voi must not all be <= 0")
        if self.tolerance < 0:
            raise VesuviusError(f"leaderboard tolerance must be >= 0, got {self.tolerance!r}")
        if self.voi_alpha < 0:
            raise VesuviusError(f"leaderboard voi_alpha must be >= 0, got {self.voi_alpha!r}")
        try:
            tiles_ok = len(self.tiles) == 3 and all(int(t) == t and t >= 1 for t in self.tiles)
        except (TypeError, ValueError):
            tiles_ok = False
        if not tiles_ok:
            raise VesuviusError(f"leaderboard tiles must be three positive integers, got {self.tiles!r}")
        check_betti_weights(self.betti_weights)
        check_connectivity(self.connectivity)
        check_matching(self.topo_matching)

    def part_weights(self) -> tuple[float, float, float]:
        """(topo, surface_dice, voi) weights clamped at >= 0 and renormalised to sum to 1."""
        clamped = np.maximum([self.topo, self.surface_dice, self.voi], 0.0)
        topo, surface, voi = clamped / clamped.sum()
        return float(topo), float(surface), float(voi)


def combine_parts(
    topo: float, surface: float, voi_split: float, voi_merge: float, weights: LeaderboardWeights
) -> dict[str, float]:
    """Leaderboard dict from the three raw parts: score, topo_score, surface_dice, voi_score, voi, split, merge."""
    voi = voi_split + voi_merge
    v_score = voi_score(voi, weights.voi_alpha)
    w_topo, w_surface, w_voi = weights.part_weights()
    return {
        "score": w_topo * topo + w_surface * surface + w_voi * v_score,
        "topo_score": float(topo),
        "surface_dice": float(surface),
        "voi_score": v_score,
        "voi": voi,
        "voi_split": voi_split,
        "voi_merge": voi_merge,
    }


def leaderboard_score(
    pred: np.ndarray,
    label: np.ndarray,
    *,
    weights: LeaderboardWeights = LeaderboardWeights(),
    ignore_index: int | None = 2,
    spacing: Sequence[float] = (1, 1, 1),
) -> dict[str, float]:
    """The competition's leaderboard score of a binary prediction against a label.

    Args:
        pred: binary mask (z, y, x), bool or 0/1.
        label: (z, y, x) with values 0, 1 and ``ignore_index``; ignored voxels become background in both
            before any part is computed.
        weights: part weights and settings, see :class:`LeaderboardWeights`.
        ignore_index: the unlabeled value, or None.
        spacing: voxel size along (z, y, x), used by the surface Dice only.

    Returns:
        {"score", "topo_score", "surface_dice", "voi_score", "voi", "voi_split", "voi_merge"}; score in [0, 1],
        1.0 for a perfect prediction.
    """
    pred_mask, label_mask = prepare_pair(pred, label, ignore_index)
    spacing = check_spacing(spacing)
    pred_betti = tile_betti(pred_mask, weights.tiles)
    label_betti = tile_betti(label_mask, weights.tiles)
    matches = tile_matches(pred_mask, label_mask, weights.tiles, weights.topo_matching, pred_betti, label_betti)
    topo = topo_score_from_counts(
        pred_betti.sum(axis=0), label_betti.sum(axis=0), matches.sum(axis=0), weights.betti_weights
    )
    surface = surface_dice_masks(pred_mask, label_mask, weights.tolerance, spacing)
    split, merge = voi_masks(pred_mask, label_mask, weights.connectivity)
    return combine_parts(topo, surface, split, merge, weights)
